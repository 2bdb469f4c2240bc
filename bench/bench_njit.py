"""Per-call cost of a tiny attention call (B1 H1 Lq1 Lk16 D64 float32,
``out=`` given, one thread) three ways: from Python
(``fastqkv.attention(..., out=out, backend="c")``), from ``@numba.njit``
code (a loop of calls inside one jitted function, divided), and the C API's
entry point alone (a jitted loop calling it on a struct filled once: its
checks and the kernel, without the overload's work).

    python bench/bench_njit.py [--calls 20000] [--repeat 7]

Prints the best of ``repeat`` rounds (the three take turns in each), in
microseconds per call.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import fastqkv
from fastqkv import _njit


@numba.njit
def _njit_loop(q, k, v, out, n):
    for _ in range(n):
        fastqkv.attention(q, k, v, out=out)


@numba.njit
def _entry_loop(words, n):
    fp = _njit._frame()
    frame = numba.carray(fp, _njit._FRAME_WORDS)
    frame[:_njit.ARGS_WORDS] = words
    status = 0
    for _ in range(n):
        status |= _njit._call_entry(fp)
    return status


def _words(q, k, v, out):
    """The struct of ``attention(q, k, v, out=out)`` on 4-D bhld float32 arrays."""
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    w = np.zeros(_njit.ARGS_WORDS, np.int64)
    w[:9] = (8 * _njit.ARGS_WORDS, 0, B, Hq, Hkv, Lq, Lk, D, v.shape[3])
    for at, a in ((9, q), (14, k), (19, v), (24, out)):
        w[at] = a.ctypes.data
        w[at + 1:at + 5] = np.array(a.strides) // a.itemsize
    w.view(np.float64)[43] = np.nan                # default scale
    w[46:49] = (-1, -1, 1)
    return w


def _best(fns, calls, repeat):
    """Microseconds per call of each ``fn(n)`` (n calls), the best of
    ``repeat`` rounds in which the functions take turns."""
    best = [np.inf] * len(fns)
    for _ in range(repeat):
        for i, (fn, n) in enumerate(zip(fns, calls)):
            t = time.perf_counter()
            fn(n)
            best[i] = min(best[i], (time.perf_counter() - t) / n)
    return [b * 1e6 for b in best]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16, 64)).astype(np.float32)
    v = rng.standard_normal((1, 1, 16, 64)).astype(np.float32)
    out = np.empty_like(q)
    words = _words(q, k, v, out)
    _njit_loop(q, k, v, out, 1)
    assert _entry_loop(words, 1) == 0

    def python(n):
        for _ in range(n):
            fastqkv.attention(q, k, v, out=out, backend="c")

    py, nj, entry = _best([python, lambda n: _njit_loop(q, k, v, out, n), lambda n: _entry_loop(words, n)],
                          [args.calls // 10, args.calls, args.calls], args.repeat)
    print(f"python  fastqkv.attention(..., out=out, backend='c'): {py:7.3f} us/call")
    print(f"@njit   fastqkv.attention(..., out=out):              {nj:7.3f} us/call "
          f"({nj / py:.2f}x python, {nj - entry:+.3f} us over the entry point)")
    print(f"C API   entry point alone:                            {entry:7.3f} us/call")


if __name__ == "__main__":
    main()
