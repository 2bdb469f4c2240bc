"""Compiling Numba kernels ahead of their first call, in parallel processes.

Contract: :func:`kernel` names the kernel (a key of ``launch.KERNELS``) a
planned Problem runs on; :func:`missing` those of some kernels that Numba's
disk cache lacks; :func:`precompile` compiles kernels, the ones of each
driver in one process, up to ``processes`` drivers at once: this process
compiles one driver's kernels, a child process of the same interpreter and
package each other's (Numba compiles one function at a time, on one core).
It reports each kernel as it is done through ``log`` and returns when all
are, so that nothing timed afterwards shares the machine with a compiler.

Numba saves a cache entry by reading the function's index, picking a data
file name the index does not use and writing both; two processes saving
entries of one function at once (the drivers share helper functions) could
give one data file to two signatures.  While :func:`precompile` runs, each
save in this process and in its children holds an exclusive ``fcntl`` lock
on a file beside the cache.  Without ``fcntl`` everything compiles in this
process.  A child that fails leaves its kernels to compile at first use.
Importing this module imports neither numba nor the kernels.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["kernel", "missing", "describe", "parallelism", "precompile"]

# the file beside Numba's cache that each save locks while precompile runs
LOCK_NAME = ".fastqkv-save.lock"


def _launch():
    from . import _launch
    return _launch()


def kernel(problem):
    """The kernel key ``(route, dtype name)`` that runs ``problem``."""
    return _launch().kernel(problem)


def describe(key):
    """``"tiled float32"``, ``"streaming float16/bfloat16"``: a kernel key in words."""
    route, name = key
    return f"{'tiled' if route == 'tile' else 'streaming'} {'float16/bfloat16' if name == 'uint16' else name}"


def missing(keys):
    """``(kernels of keys the disk cache lacks, in launch.KERNELS order;
    the cache directory)``; all of them, and None, when Numba's cache index
    cannot be read."""
    launch = _launch()
    want = [k for k in launch.KERNELS if k in set(keys)]
    try:
        found, where = launch.cached_kernels()
    except Exception:  # noqa: BLE001 - private Numba API: compile rather than fail
        return want, None
    return [k for k in want if k not in found], where


@contextlib.contextmanager
def _serialised_saves():
    """Every save to Numba's disk cache holds an exclusive lock on
    :data:`LOCK_NAME` beside the cache."""
    import fcntl

    from numba.core.caching import IndexDataCacheFile
    plain = IndexDataCacheFile.save

    def save(self, *args, **kwargs):
        with open(os.path.join(self._cache_path, LOCK_NAME), "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            return plain(self, *args, **kwargs)          # closing f releases the lock

    IndexDataCacheFile.save = save
    try:
        yield
    finally:
        IndexDataCacheFile.save = plain


def _can_share():
    """Whether cache saves can be serialised across processes here."""
    try:
        import fcntl  # noqa: F401

        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return False
    return callable(getattr(IndexDataCacheFile, "save", None))


def _compile(keys, log):
    launch = _launch()
    for key in keys:
        t0 = time.perf_counter()
        launch.compile_kernel(key)
        log(key, time.perf_counter() - t0)


def _child(args):
    """A child process's work: compile the kernels ``route:name`` of
    ``args``, one line ``route:name seconds`` each."""
    keys = [tuple(a.split(":")) for a in args]
    with _serialised_saves():
        _compile(keys, lambda key, s: print(f"{key[0]}:{key[1]} {s:.1f}", flush=True))


def _start(keys):
    """A child process compiling ``keys``: its stdout a pipe, its stderr a
    temporary file (a pipe nobody reads while this process compiles could
    fill and stop it)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from fastqkv._numba.precompile import _child; _child(sys.argv[1:])"
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", code, *(f"{r}:{n}" for r, n in keys)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    return proc, err


def _relay(proc, done):
    """A thread passing each line of a child's stdout to ``done(key, seconds)``."""
    def relay():
        for line in proc.stdout:
            name, _, seconds = line.strip().partition(" ")
            route, _, dtype = name.partition(":")
            try:
                done((route, dtype), float(seconds))
            except ValueError:
                continue
    t = threading.Thread(target=relay, daemon=True)
    t.start()
    return t


def _groups(keys, processes):
    """``keys`` in groups compiled by one process each: one per driver, at
    most ``processes`` groups (the first this process's)."""
    groups = {}
    for key in keys:
        groups.setdefault(key[0], []).append(key)
    groups = list(groups.values())
    if processes < 2 or len(groups) < 2 or not _can_share():
        return [[k for g in groups for k in g]]
    return [[k for g in groups[:1] + groups[processes:] for k in g]] + groups[1:processes]


def parallelism(keys, processes):
    """How many processes :func:`precompile` compiles ``keys`` in."""
    return len(_groups(keys, processes))


def precompile(keys, processes=2, log=print):
    """Compile the kernels ``keys`` (each loaded instead when the disk cache
    holds it), the kernels of one driver per process, in at most
    ``processes`` processes; ``log(line)`` reports each when it is done, and
    a child that failed.  Returns ``{key: seconds}`` of the kernels
    compiled."""
    own, *others = _groups(keys, processes)
    took = {}

    def done(key, seconds):
        took[key] = seconds
        log(f"  numba: {describe(key)} compiled in {seconds:.0f} s")

    children = []
    for g in others:
        try:
            children.append((*_start(g), g))
        except OSError:                     # no process to be had: this one compiles them
            own = own + g
    relays = [_relay(proc, done) for proc, _err, _g in children]
    try:
        with _serialised_saves() if children else contextlib.nullcontext():
            _compile(own, done)
            for proc, err, g in children:
                if proc.wait() != 0:
                    err.seek(0)
                    lines = err.read().strip().splitlines()
                    why = lines[-1] if lines else f"exit status {proc.returncode}"
                    left = ", ".join(describe(k) for k in g if k not in took)
                    log(f"  numba: the process compiling {left} failed ({why}); they compile at first use")
        for t in relays:
            t.join()
    finally:
        for proc, err, _g in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
    return took
