"""Numerics: huge logits, -inf biases, fully masked rows, NaN/inf inputs,
denormals, a million keys, a KV cache past 2**31 bytes, bitwise
reproducibility at a fixed thread count."""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_subprocess as hs  # noqa: E402

BACKENDS = hs.available_backends()
DTYPES = [np.float32, np.float64]


def _qkv(rng, B, Hq, Hkv, Lq, Lk, D, dtype, amp=1.0):
    return (
        (rng.standard_normal((B, Hq, Lq, D)) * amp).astype(dtype),
        rng.standard_normal((B, Hkv, Lk, D)).astype(dtype),
        rng.standard_normal((B, Hkv, Lk, D)).astype(dtype),
    )


def _case(name, q, k, v, **kw):
    return testing.Case(name, q, k, v, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp,scale", [(300.0, None), (1.0, 5e3), (40.0, 1.0)], ids=["q300", "scale5e3", "scale1"])
def test_huge_logits(backend, dtype, amp, scale):
    """Scores of magnitude 1e4 and more are handled exactly by max subtraction."""
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, 1, 4, 2, 17, 150, 32, dtype, amp)
    kw = {} if scale is None else {"scale": scale}
    testing.check_case(_case("huge", q, k, v, causal=True, **kw), backend)
    out = fastqkv.attention(q, k, v, backend=backend, **kw)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_bias(backend, dtype):
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 2, 4, 1, 9, 70, 16, dtype)
    bias = rng.standard_normal((2, 4, 9, 70))
    bias[rng.random(bias.shape) < 0.5] = -np.inf      # half the keys gone
    bias[0, 1, 3] = -np.inf                            # a whole row gone
    bias[1, :, :, :69] = -np.inf                       # batch 1 sees only its last key
    bias[1, :, :, 69] = 0.0
    testing.check_case(_case("neg-inf-bias", q, k, v, bias=bias), backend)
    out, lse = fastqkv.attention(q, k, v, bias=bias, return_lse=True, backend=backend)
    assert (out[0, 1, 3] == 0).all() and np.isneginf(lse[0, 1, 3])
    testing.assert_close(out[1], np.broadcast_to(v[1, :, 69:], out[1].shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_neg_inf_lse(backend, dtype):
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 3, 4, 2, 6, 40, 16, dtype)
    mask = rng.random((3, 4, 6, 40)) < 0.5
    mask[0, 2, 1] = False                                    # one row by mask
    ways = [
        dict(mask=mask),
        dict(key_lens=np.array([0, 40, 3]), causal=True),     # batch 0 has no keys; batch 2: Lq > Lk_b
        dict(window=(0, 0), key_lens=np.array([40, 2, 0])),
        dict(bias=np.where(mask, 0.0, -np.inf)),
    ]
    for kw in ways:
        testing.check_case(_case("masked", q, k, v, **kw), backend)
        out, lse = fastqkv.attention(q, k, v, return_lse=True, backend=backend, **kw)
        ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **kw)
        empty = np.isneginf(ref_lse)
        assert empty.any()
        assert np.isneginf(lse[empty]).all()
        assert (out[empty] == 0).all()
    # Lq > Lk with causal: the first rows see nothing (bottom-right alignment)
    q2, k2, v2 = q[:, :, :6], k[:, :, :3], v[:, :, :3]
    out, lse = fastqkv.attention(q2, k2, v2, causal=True, return_lse=True, backend=backend)
    assert (out[:, :, :3] == 0).all() and np.isneginf(lse[:, :, :3]).all()
    assert np.isfinite(lse[:, :, 3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_inputs(backend, dtype):
    rng = np.random.default_rng(13)
    cases = []
    q, k, v = _qkv(rng, 1, 4, 2, 8, 90, 16, dtype)
    q[0, 1, 2, 5] = np.nan                      # one query row
    k[0, 0, 40, 0] = np.nan                     # a key seen by some rows (causal)
    cases.append(_case("nan-q-k", q, k, v, causal=True))
    q, k, v = _qkv(rng, 1, 4, 2, 8, 90, 16, dtype)
    v[0, 1, 17, 3] = np.inf                     # inf value: column 3 of rows that see key 17
    v[0, 0, 5, 2] = np.nan
    cases.append(_case("inf-nan-v", q, k, v, window=(30, 0)))
    q, k, v = _qkv(rng, 1, 4, 2, 8, 90, 16, dtype)
    q[0, 3, 6, :] = np.inf                      # +inf/-inf scores: NaN row
    k[0, 1, 80:] = -np.inf
    cases.append(_case("inf-q-k", q, k, v))
    q, k, v = _qkv(rng, 2, 4, 2, 8, 90, 16, dtype)
    k[0, :, 50:] = np.nan                        # NaN beyond key_lens / masked: never read
    v[0, :, 50:] = np.inf
    mask = np.ones((2, 1, 1, 90), bool)
    mask[1, ..., 10:20] = False
    k[1, :, 10:20] = np.nan
    v[1, :, 10:20] = np.nan
    cases.append(_case("hidden-nan", q, k, v, key_lens=np.array([50, 90]), mask=mask))
    q, k, v = _qkv(rng, 1, 2, 1, 4, 33, 8, dtype)
    bias = np.zeros((4, 33))
    bias[1, 7] = np.nan                           # NaN bias on a visible key: row 1 NaN
    bias[2, 9] = np.inf                           # +inf bias: row 2 NaN (inf - inf)
    cases.append(_case("nan-inf-bias", q, k, v, bias=bias))
    q, k, v = _qkv(rng, 2, 2, 1, 6, 40, 8, dtype)
    mask = np.ones((2, 1, 6, 40), bool)
    mask[0, :, 2] = False                         # row 2 of batch 0 sees nothing...
    q[0, :, 2] = np.nan                           # ...so its NaN query never becomes a score
    bias = np.zeros((2, 2, 6, 40))
    bias[~np.broadcast_to(mask, bias.shape)] = np.nan     # NaN bias only where masked
    bias[1, :, :, 30:] = np.nan                   # and past key_lens of batch 1
    bias[0, :, 5, :10] = np.inf                   # and outside the window
    cases.append(_case("hidden-nan-q-bias", q, k, v, mask=mask, bias=bias, key_lens=np.array([40, 30]),
                       window=(20, -1)))
    q, k, v = _qkv(rng, 1, 2, 1, 5, 30, 8, dtype)
    q[0, 0, 1] = np.inf                           # +-inf scores capped by softcap: finite
    cases.append(_case("inf-q-softcap", q, k, v, softcap=3.0))
    cases.append(_case("zero-scale-inf-q", q, k, v, scale=0.0))      # 0 * inf = NaN row
    for c in cases:
        testing.check_case(c, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_v_behind_underflowed_weight_many_tiles(backend):
    """Same rule over several key tiles: ALiBi pushes the last key's weight
    below float32's range for the first rows; its NaN must still reach them."""
    rng = np.random.default_rng(19)
    q, k, v = _qkv(rng, 1, 1, 1, 200, 640, 16, np.float32)
    v[0, 0, 639, 0] = np.nan
    testing.check_case(_case("alibi-underflow", q, k, v, scale=0.01, alibi_slopes=np.array([0.45])), backend)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("how", ["neg-inf-bias", "float32-underflow"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_v_behind_zero_weight(backend, how, poison):
    """A visible key whose weight is 0 still passes NaN/inf of its V row to the
    output (0 * NaN and 0 * inf are NaN: the oracle's rule).  One case is left open by the precision model: inf behind a
    weight that underflows in float32 only is NaN in a kernel (0 * inf) and
    inf in the float64 oracle (tiny * inf); both must be non-finite there."""
    rng = np.random.default_rng(18)
    dtype = np.float32
    q, k, v = _qkv(rng, 1, 1, 1, 3, 14, 80, dtype)
    kw = {}
    if how == "neg-inf-bias":
        bias = np.zeros((3, 14))
        bias[:, 5] = -np.inf
        kw["bias"] = bias
    else:
        k[0, 0, 5] = -q[0, 0, 2] * (130 * np.sqrt(80) / float(q[0, 0, 2] @ q[0, 0, 2]))  # score of key 5 ~ -130
    v[0, 0, 5, 6] = poison
    ref = reference.attention(q, k, v, **kw)
    assert not np.isfinite(ref[0, 0, 2, 6]), "the oracle's rule changed: update this test"
    if how == "float32-underflow" and np.isinf(poison):
        out = fastqkv.attention(q, k, v, backend=backend, **kw)
        assert not np.isfinite(out[0, 0, 2, 6])
        good = np.ones(out.shape, bool)
        good[0, 0, 2, 6] = False
        cond, vmax = testing.case_bounds(_case(how, q, k, v, **kw))
        testing.assert_close(out[good], ref[good], dtype, cond=cond, vmax=vmax)
    else:
        testing.check_case(_case(how, q, k, v, **kw), backend)


@pytest.mark.parametrize("dtype,tiny", [(np.float32, 1e-40), (np.float64, 1e-310)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_denormals(backend, dtype, tiny):
    """Subnormal inputs give the oracle's answer, and calling the kernel does
    not leave flush-to-zero / denormals-are-zero set in the caller's thread."""
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, 1, 2, 1, 5, 64, 16, dtype)
    v_sub = (v * dtype(tiny)).astype(dtype)
    assert (np.abs(v_sub[v_sub != 0]) < np.finfo(dtype).tiny).all()
    testing.check_case(_case("denormal-v", q, k, v_sub), backend)
    out = fastqkv.attention(q, k, v_sub, backend=backend)
    ref = reference.attention(q, k, v_sub)
    # relative to the subnormal scale: output should not be flushed to zero
    assert np.abs(ref).max() > 0
    assert np.abs(out).max() > 0, "subnormal values flushed to zero"
    q_sub = (q * dtype(tiny)).astype(dtype)     # scores underflow to ~0: uniform weights
    testing.check_case(_case("denormal-q", q_sub, k, v), backend)
    x = np.array([tiny], dtype)
    assert (x * dtype(1.0))[0] != 0 and (x / dtype(2))[0] != 0, \
        "the caller's thread has flush-to-zero / denormals-are-zero set after a call"


def _chunked_oracle(q, k, v, chunk, **kw):
    """Oracle over key chunks merged exactly through their lse (keeps the
    float64 oracle's memory modest)."""
    outs, lses = [], []
    Lk = k.shape[-2]
    for j in range(0, Lk, chunk):
        o, l = reference.attention(q, k[..., j:j + chunk, :], v[..., j:j + chunk, :], return_lse=True, **kw)
        outs.append(o.astype(np.float64))
        lses.append(l.astype(np.float64))
    return reference.merge_attention(outs, lses)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_million_key_decode(backend, dtype):
    """Lq 1 against Lk 2**20 (GQA 4, D 8): the online softmax over a million
    keys matches the oracle merged chunk-wise in float64."""
    if backend == "numpy" and dtype == np.float64:
        pytest.skip("the dense backend is the oracle itself; the float32 case covers it")
    rng = np.random.default_rng(15)
    Lk = 1 << 20
    q, k, v = _qkv(rng, 1, 4, 1, 1, Lk, 8, dtype, amp=2.0)
    out, lse = fastqkv.attention(q, k, v, return_lse=True, backend=backend)
    want, want_lse = _chunked_oracle(q, k, v, 1 << 18)
    # float32 sums of 2**20 terms: allow a log2(Lk)-fold growth of the table's tolerance
    cond = testing.condition_number(q, k) * np.log2(Lk)
    testing.assert_close(out, want, dtype, cond=cond, vmax=float(np.abs(v).max()), context="Lk=2**20")
    testing.assert_close(lse, want_lse, dtype, cond=cond, what="lse", context="Lk=2**20")


_BIG_SCRIPT = """
import numpy as np
import fastqkv
from fastqkv import reference, testing
from helpers_subprocess import emit

backend = {backend!r}
D = 64
Lk = 9 << 20                                   # 9 Mi keys x 64 x 4 B = 2.25 GiB, one buffer
buf = np.zeros((Lk, D), np.float32)            # calloc: untouched pages cost no memory
rng = np.random.default_rng(16)
buf[-4096:] = rng.standard_normal((4096, D))
k1 = buf.reshape(1, 1, Lk, D)                  # B 1: the visible keys sit past 2 GiB
k2 = buf.reshape(2, 1, Lk // 2, D)             # B 2: batch 1 starts at 1.125 GiB
q1 = rng.standard_normal((1, 4, 2, D)).astype(np.float32)
q2 = rng.standard_normal((2, 4, 2, D)).astype(np.float32)
assert k1.nbytes > 2**31

def check(name, q, k, v, ref_args, **kw):
    try:
        out, lse = fastqkv.attention(q, k, v, return_lse=True, backend=backend, **kw)
        rq, rk, rv, rkw = ref_args
        want, wl = reference.attention(rq, rk, rv, return_lse=True, **rkw)
        cond = testing.condition_number(rq, rk)
        testing.assert_close(out, want, np.float32, cond=cond, vmax=float(np.abs(rv).max()))
        testing.assert_close(lse, wl, np.float32, cond=cond, what="lse")
        emit(dict(name=name, ok=True, detail=""))
    except Exception as e:
        emit(dict(name=name, ok=False, detail=f"{{type(e).__name__}}: {{e}}"[:2000]))

tail = k1[:, :, -256:]
# window: only the last 64 keys are visible, tiles before them are skipped
check("window", q1, k1, k1, (q1, tail, tail, dict(causal=True, window=(63, -1))), causal=True, window=(63, -1))
# key_lens + window: the last 7 keys are past the length
t7 = k1[:, :, -7 - 256:-7]
check("key-lens", q1, k1, k1, (q1, t7, t7, dict(causal=True, window=(50, -1))),
      causal=True, window=(50, -1), key_lens=np.array([Lk - 7]))
# mask: every key is scanned, only the last 64 attend
mask = np.zeros((1, 1, 1, Lk), bool); mask[..., -64:] = True
check("mask", q1, k1, k1, (q1, tail, tail, dict(mask=mask[..., -256:])), mask=mask)
# batch 1 of a 2-batch view: its keys end at 2.25 GiB
kl = np.array([100, Lk // 2 - 3])
t2 = k2[1:, :, Lk // 2 - 3 - 256:Lk // 2 - 3]
want_q = q2[1:]
check("batch-stride", q2[1:], k2[1:], k2[1:], (want_q, t2, t2, dict(causal=True, window=(40, -1))),
      causal=True, window=(40, -1), key_lens=kl[1:])
emit(dict(name="done", ok=True, detail=""))
"""


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_past_2gib(backend):
    """Offsets past 2**31 bytes: a 2.25 GiB K/V buffer (mostly untouched
    zero pages) whose visible keys sit at the far end."""
    if backend not in hs.COMPILED:
        pytest.skip("the dense oracle backend would copy 2.25 GiB to float64")
    if _mem_available() < 6 * (1 << 30):
        pytest.skip("needs 6 GiB of available memory")
    proc = hs.run_python(_BIG_SCRIPT.format(backend=backend), timeout=300)
    recs = {r["name"]: r for r in hs.records(proc.stdout)}
    assert "done" in recs, hs.describe(proc)
    bad = [f"{n}: {r['detail']}" for n, r in recs.items() if not r["ok"]]
    assert not bad, "\n".join(bad)


def _digest(res):
    h = hashlib.sha256()
    for r in res if isinstance(res, tuple) else (res,):
        h.update(np.ascontiguousarray(r).tobytes())
    return h.hexdigest()


_REPRO_SCRIPT = """
import numpy as np
import fastqkv
from helpers_subprocess import emit
import test_reliability_numerics as T
fastqkv.set_num_threads({threads})
emit([T._digest(fastqkv.attention(q, k, v, backend={backend!r}, return_lse=True, **kw))
      for q, k, v, kw in T._repro_problems()])
"""


def _repro_problems():
    rng = np.random.default_rng(17)
    out = []
    for dtype in DTYPES:
        q, k, v = _qkv(rng, 2, 8, 2, 70, 333, 64, dtype)
        out.append((q, k, v, {"causal": True}))
        q, k, v = _qkv(rng, 3, 8, 1, 1, 5000, 128, dtype)
        out.append((q, k, v, {"key_lens": np.array([5000, 1234, 1])}))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_reproducible(backend, threads):
    """Same call, same thread count: the same bits, run to run in one process
    and process to process.  Known gap: the numba backend's freshly
    JIT-compiled code gives other bits than the same kernels loaded from
    Numba's disk cache, so for numba this process (which may have compiled)
    is compared only with itself, and two children (which load the cache it
    wrote) with each other."""
    with testing.threads(threads):
        probs = _repro_problems()
        first = [_digest(fastqkv.attention(q, k, v, backend=backend, return_lse=True, **kw)) for q, k, v, kw in probs]
        for _ in range(3):
            again = [_digest(fastqkv.attention(q, k, v, backend=backend, return_lse=True, **kw))
                     for q, k, v, kw in probs]
            assert again == first, "results differ between runs in one process"
    code = _REPRO_SCRIPT.format(threads=threads, backend=backend)
    child = hs.run_record(code)
    assert hs.run_record(code) == child, "results differ between two processes"
    if backend != "numba":
        assert child == first, "results differ between processes"
