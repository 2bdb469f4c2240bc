"""Memory: no Lq x Lk allocation in the fused backends, no leak over 10,000
calls, no output-sized allocation in a steady ``out=`` loop.  Each
measurement runs in a fresh child process so its baseline is clean.

The AddressSanitizer + UBSan run of the C extension is scripts/asan_check.sh.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_subprocess as hs  # noqa: E402

BACKENDS = hs.available_backends()
MiB = 1 << 20

_PEAK_SCRIPT = """
import resource, tracemalloc
import numpy as np
import fastqkv
from helpers_subprocess import emit

backend = {backend!r}
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rng = np.random.default_rng(0)
B, Hq, Hkv, L, D = 1, 8, 2, 2048, 64
q = rng.standard_normal((B, Hq, L, D)).astype(np.float32)
k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
v = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
pad = np.ones((B, 1, 1, L), bool); pad[..., -100:] = False
# warm up on a small problem with the same options: compilation, thread pool
for kw in ({{"causal": True}}, {{"mask": pad[..., :256]}}):
    fastqkv.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], backend=backend, return_lse=True, **kw)
res = {{}}
for name, kw in (("causal", {{"causal": True}}), ("mask", {{"mask": pad}})):
    base_rss = maxrss()
    tracemalloc.start()
    out, lse = fastqkv.attention(q, k, v, backend=backend, return_lse=True, **kw)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res[name] = dict(traced_peak=peak, rss_growth=maxrss() - base_rss,
                     result=int(out.nbytes + lse.nbytes))
    del out, lse
emit(res)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_score_matrix_allocation(backend):
    """A 2k x 2k GQA prefill (Hq 8, Hkv 2, D 64, float32) allocates less than
    32 MiB beyond its inputs and output; the scores alone would be 128 MiB."""
    if backend not in hs.COMPILED:
        pytest.skip("the dense oracle backend materialises the scores by design")
    for name, r in hs.run_record(_PEAK_SCRIPT.format(backend=backend)).items():
        limit = 32 * MiB + r["result"]
        assert r["traced_peak"] < limit, f"{name}: traced peak {r['traced_peak'] / MiB:.1f} MiB"
        assert r["rss_growth"] < limit, f"{name}: peak RSS grew by {r['rss_growth'] / MiB:.1f} MiB"


_LEAK_SCRIPT = """
import gc
import tracemalloc
import numpy as np
import fastqkv
from helpers_subprocess import emit

backend = {backend!r}
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
rng = np.random.default_rng(1)
q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
k = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
v = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
out = np.empty((2, 4, 3, 8), np.float32)
mask = rng.random((2, 1, 3, 9)) < 0.8
kl = np.array([9, 4])
bias = rng.standard_normal((3, 9)).astype(np.float32)
calls = [
    lambda: fastqkv.attention(q, k, v, backend=backend),
    lambda: fastqkv.attention(q, k, v, out=out, return_lse=True, causal=True, backend=backend),
    lambda: fastqkv.attention(q64, k64, v64, mask=mask, key_lens=kl, backend=backend),
    lambda: fastqkv.attention(q[0, 0], k[0, 0], v[0, 0], bias=bias, softcap=5.0, backend=backend),
    lambda: fastqkv.attention(q, k, v, window=(2, 1), alibi_slopes=np.ones(4), backend=backend),
    lambda: fastqkv.attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                              layout="blhd", backend=backend),
]
def bad():
    try:
        fastqkv.attention(q, k, v, key_lens=np.array([99, 1]), backend=backend)
    except ValueError:
        pass
calls.append(bad)
N = 10_000
for i in range(1000):
    calls[i % len(calls)]()
tracemalloc.start()
for i in range(1000):
    calls[i % len(calls)]()
gc.collect()                       # cyclic garbage is not a leak
rss0, (t0, _) = rss(), tracemalloc.get_traced_memory()
for i in range(N - 2000):
    calls[i % len(calls)]()
gc.collect()
rss1, (t1, _) = rss(), tracemalloc.get_traced_memory()
emit(dict(rss_growth=rss1 - rss0, traced_growth=t1 - t0, calls=N))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_leak_over_10000_calls(backend):
    r = hs.run_record(_LEAK_SCRIPT.format(backend=backend), timeout=600)
    # 8000 measured calls: 1 MiB of RSS is ~130 bytes a call
    assert r["rss_growth"] < 2 * MiB, f"RSS grew by {r['rss_growth'] / 1024:.0f} KiB over 8000 calls"
    assert r["traced_growth"] < 64 * 1024, f"traced memory grew by {r['traced_growth'] / 1024:.0f} KiB"


_STEADY_SCRIPT = """
import tracemalloc
import numpy as np
import fastqkv
from helpers_subprocess import emit

backend = {backend!r}
rng = np.random.default_rng(2)
q = rng.standard_normal((1, 8, 256, 128)).astype(np.float32)    # out is 1 MiB
k = rng.standard_normal((1, 2, 300, 128)).astype(np.float32)
v = rng.standard_normal((1, 2, 300, 128)).astype(np.float32)
out = np.empty_like(q)
for _ in range(3):
    fastqkv.attention(q, k, v, causal=True, out=out, backend=backend)
tracemalloc.start()
base, _ = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
for _ in range(20):
    fastqkv.attention(q, k, v, causal=True, out=out, backend=backend)
cur, peak = tracemalloc.get_traced_memory()
emit(dict(peak_over_base=peak - base, out_bytes=out.nbytes))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_out_loop_allocates_no_output(backend):
    """A loop passing ``out=`` allocates nothing output-sized per call."""
    r = hs.run_record(_STEADY_SCRIPT.format(backend=backend))
    if backend == "numpy":
        pytest.skip("the dense oracle backend allocates scores by design "
                    f"(peak {r['peak_over_base'] / MiB:.1f} MiB)")
    assert r["peak_over_base"] < r["out_bytes"] // 4, \
        f"traced peak {r['peak_over_base'] / 1024:.0f} KiB per steady call with out= ({r['out_bytes'] // 1024} KiB out)"
