"""Backend registry, selection, environment overrides and thread count.

A backend is a module exposing

* ``probe() -> (available: bool, reason: str, details: dict)`` - cheap, called
  once and cached; ``reason`` says why a backend is not available;
* ``supports(problem) -> str | None`` - None, or why this call is not
  supported (``auto`` then tries the next backend);
* ``run(problem, num_threads) -> None`` - fills ``problem.out`` (and
  ``problem.lse`` when it is not None) for a non-empty problem with
  ``Lk > 0``, prepared by :func:`fastqkv._problem.prepare`, with the kernel
  ``problem.route`` names where the backend has two;
* optionally ``FEATURES`` - a set naming what :func:`fastqkv._problem.prepare`
  need not convert for it: ``"paged"`` (paged caches read in place on the
  streaming route), ``"half_options"`` (score options applied to
  float16/bfloat16 storage without float32 copies).

``backend="auto"`` resolves, in order: :func:`use_backend` (per context),
:func:`set_backend` (process-wide), ``$FASTQKV_BACKEND``, then the first
available backend that supports the call in the order :mod:`fastqkv._tune`
gives for its call class: measured on this machine by ``fastqkv tune``, else
``_config.AUTO_ORDER``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
from typing import NamedTuple

from . import _config, _tune

__all__ = ["BackendInfo", "backends", "set_backend", "use_backend", "get_backend",
           "set_num_threads", "get_num_threads", "resolve", "BACKEND_MODULES"]

# name -> module implementing probe/supports/run
BACKEND_MODULES = {
    "c": "fastqkv._c",
    "numba": "fastqkv._numba",
    "numpy": "fastqkv._numpy_backend",
}


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str
    details: dict


_lock = threading.Lock()
_probed: dict = {}
_modules: dict = {}
_global_backend = None
_context_backend = contextvars.ContextVar("fastqkv_backend", default=None)
_num_threads = None
_probed_all: list = []         # True once every backend of AUTO_ORDER was probed


def _probe(name):
    info = _probed.get(name)
    if info is not None:
        return info
    with _lock:
        info = _probed.get(name)
        if info is not None:
            return info
        try:
            mod = importlib.import_module(BACKEND_MODULES[name])
            ok, reason, details = mod.probe()
        except Exception as exc:  # noqa: BLE001 - a broken backend is reported, not raised
            mod, ok, reason, details = None, False, f"{type(exc).__name__}: {exc}", {}
        info = BackendInfo(name, bool(ok), reason if not ok else (reason or "available"), dict(details))
        if ok:
            _modules[name] = mod
        _probed[name] = info
        return info


def backends():
    """``{name: BackendInfo(available, reason, details)}`` for every backend."""
    return {name: _probe(name) for name in BACKEND_MODULES}


def _check_name(name, what):
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"{what} must be 'auto' or one of {sorted(BACKEND_MODULES)}, got {name!r}")
    return name


def set_backend(name):
    """Set the process-wide backend used when a call says ``backend="auto"``
    (``"auto"`` or None restores automatic selection)."""
    global _global_backend
    _global_backend = None if name in (None, "auto") else _require(_check_name(name, "backend"))


@contextlib.contextmanager
def use_backend(name):
    """Context manager: calls with ``backend="auto"`` inside use ``name``."""
    tok = _context_backend.set(None if name == "auto" else _require(_check_name(name, "backend")))
    try:
        yield
    finally:
        _context_backend.reset(tok)


def get_backend():
    """The name ``backend="auto"`` is currently pinned to, or ``"auto"``."""
    return _context_backend.get() or _global_backend or _env_backend() or "auto"


_env_cache = []


def _env_backend():
    """``$FASTQKV_BACKEND``, read once per process."""
    if not _env_cache:
        name = os.environ.get(_config.ENV_BACKEND, "").strip()
        name = None if not name or name == "auto" else _check_name(name, f"${_config.ENV_BACKEND}")
        _env_cache.append(name)
    return _env_cache[0]


def _require(name):
    info = _probe(name)
    if not info.available:
        raise RuntimeError(f"backend {name!r} is not available: {info.reason}")
    return name


def resolve(backend, problem):
    """The backend module that runs ``problem`` and its name."""
    if backend == "auto":
        pinned = _context_backend.get() or _global_backend or (
            _env_cache[0] if _env_cache else _env_backend())
        if pinned is None:
            if not _probed_all:
                for n in _config.AUTO_ORDER:
                    _probe(n)
                _probed_all.append(True)
            modules = _modules
            for name in _tune.order(problem, _num_threads or get_num_threads()):
                mod = modules.get(name)
                if mod is not None and mod.supports(problem) is None:
                    return mod, name
            raise RuntimeError("no backend supports this call")  # numpy supports all
        backend = pinned
    else:
        _check_name(backend, "backend")
    _require(backend)
    mod = _modules[backend]
    why = mod.supports(problem)
    if why is not None:
        raise ValueError(f"backend {backend!r} does not support this call: {why}")
    return mod, backend


# ---------------------------------------------------------------------------
# threads

MAX_THREADS = _config.MAX_THREADS

def _default_threads():
    env = os.environ.get(_config.ENV_NUM_THREADS, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"${_config.ENV_NUM_THREADS} must be a positive integer, got {env!r}") from None
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"${_config.ENV_NUM_THREADS} must be an integer in [1, {MAX_THREADS}], got {env!r}")
        return n
    return available_cpus()


def available_cpus():
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_num_threads(n):
    """Set the number of threads the kernels use (``None`` restores the default:
    ``$FASTQKV_NUM_THREADS`` or the CPUs this process may run on)."""
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import operator
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"num_threads must be an integer, got {type(n).__name__}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {MAX_THREADS}], got {n}")
    _num_threads = int(n)


def get_num_threads():
    """The number of threads the kernels use."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _default_threads()
    return _num_threads


def warmup(names=None):
    """Prepare backends ahead of the first call (compile the Numba kernels,
    start the C thread pool).  Returns ``{name: seconds}`` for each backend
    warmed; unavailable backends are skipped."""
    import time
    out = {}
    for name in names or list(BACKEND_MODULES):
        _check_name(name, "backend")
        if not _probe(name).available:
            continue
        fn = getattr(_modules[name], "warmup", None)
        t0 = time.perf_counter()
        if fn is not None:
            fn()
        out[name] = time.perf_counter() - t0
    return out
