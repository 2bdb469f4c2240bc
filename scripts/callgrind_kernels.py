"""Instruction counts of the C kernels for fixed problems, under callgrind.

Run by ``scripts/callgrind_kernels.sh``, which starts this file under
``valgrind --tool=callgrind --toggle-collect=fq_run`` so that only the
kernel call (``fq_run`` and everything below it) is counted, not Python's
start-up or the inputs' set-up.  Each case is one process and one call on
one thread (its count includes the first allocation of the thread's scratch).

    python scripts/callgrind_kernels.py CASE     # CASE: see CASES below
"""

from __future__ import annotations

import sys

import numpy as np

# name -> (B, Hq, Hkv, Lq, Lk, D, dtype, causal)
CASES = {
    "prefill-f32": (1, 8, 2, 512, 512, 128, "float32", True),
    "decode-f32": (4, 32, 8, 1, 4096, 128, "float32", False),
    "decode-bf16": (4, 32, 8, 1, 4096, 128, "bfloat16", False),
}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _inputs(B, Hq, Hkv, Lq, Lk, D, dt):
    rng = np.random.default_rng(0)
    q = rng.random((B, Hq, Lq, D), np.float32).astype(dt)
    k = rng.random((B, Hkv, Lk, D), np.float32).astype(dt)
    v = rng.random((B, Hkv, Lk, D), np.float32).astype(dt)
    return q, k, v


def main(name):
    import fastqkv

    B, Hq, Hkv, Lq, Lk, D, dtn, causal = CASES[name]
    dt = _dtype(dtn)
    fastqkv.set_num_threads(1)
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dt)
    out = np.empty(q.shape, dt)
    fastqkv.attention(q, k, v, causal=causal, out=out, backend="c")
    print(name, "isa", fastqkv.backends()["c"].details["isa"], "checksum",
          float(out.astype(np.float64).sum()))


if __name__ == "__main__":
    main(sys.argv[1])
