"""Ctrl-C for long kernel calls: :func:`run` is the one place a backend's
``run`` is called.

Contract: ``run(mod, name, p, num_threads)`` does ``mod.run(p, num_threads)``.
The C and Numba kernels release the GIL in the calling thread, so Python's
SIGINT handler (which runs only in the main thread, between bytecodes) waits
for the call to return.  A call of at least
:data:`fastqkv._config.INTERRUPTIBLE_MIN_WORK` multiply-adds made from the
main thread on a backend that can be stopped (:data:`_ABORTABLE`) therefore
runs on one persistent helper thread while the main thread waits on an
event, which a signal interrupts.  On any exception there (KeyboardInterrupt
from Ctrl-C) the main thread raises the backend's abort flag, which its
kernels read before each work item, waits for the helper to return (within
one work item), lowers the flag and re-raises: no worker keeps running, the
inputs are untouched, ``out`` may hold partial results, and the next call
starts afresh.  Smaller calls, calls from other threads and the numpy
backend run directly, as before.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading

from . import _config

# backend -> the module with interruptible() (mark the calling thread as the
# one whose calls abort() stops) and abort(on)
_ABORTABLE = {"c": "fastqkv._c", "numba": "fastqkv._numba.launch"}

_jobs = None                # the helper's job queue, started on first use
_jobs_lock = threading.Lock()


def _forget_helper():
    """A fork child has no helper thread: start its own on first use."""
    global _jobs, _jobs_lock
    _jobs = None
    _jobs_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_helper)


def run(mod, name, p, num_threads):
    """``mod.run(p, num_threads)``, stoppable with Ctrl-C when long."""
    if (p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv) < _config.INTERRUPTIBLE_MIN_WORK
            or name not in _ABORTABLE or threading.current_thread() is not threading.main_thread()):
        mod.run(p, num_threads)
        return
    done = threading.Event()
    box = []
    _helper().put((mod, name, p, num_threads, done, box))
    try:
        # a timed wait: the main thread returns to the interpreter, which
        # runs the SIGINT handler, at least this often
        while not done.wait(0.1):
            pass
    except BaseException:
        _stop(name, done)
        raise
    if box:
        raise box[0]


def _stop(name, done):
    """Abort the helper's call and wait until it has returned; the flag is
    raised again while waiting (a Numba driver resets its counters when it
    starts), and a second Ctrl-C does not cut the wait short."""
    mod = None
    while True:
        try:
            mod = mod or sys.modules.get(_ABORTABLE[name])
            if mod is not None:
                mod.abort(True)
            if done.wait(0.01):
                break
        except KeyboardInterrupt:
            continue
    if mod is not None:
        mod.abort(False)


def _helper():
    global _jobs
    with _jobs_lock:
        if _jobs is None:
            jobs = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(jobs,), name="fastqkv-kernel",
                             daemon=True).start()
            _jobs = jobs
    return _jobs


def _serve(jobs):
    marked = set()
    while True:
        _serve_one(marked, *jobs.get())


def _serve_one(marked, mod, name, p, num_threads, done, box):
    """One job; its arrays are released when this returns."""
    try:
        if name not in marked:
            importlib.import_module(_ABORTABLE[name]).interruptible()
            marked.add(name)
        mod.run(p, num_threads)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        box.append(exc)
    finally:
        done.set()
