"""The numba backend's serving paths against the NumPy oracle: the streaming
kernel (decode, split-KV with the in-call merge, ragged ``key_lens``), paged
KV caches (decode and prefill with a cache), float16/bfloat16 storage and
attention sinks (counted once per row, in the merge of the splits).

Splits and chunks are forced small through the ``force`` fixture's
``split_keys``, ``stream_keys`` and ``decode_stream_keys`` (runtime arguments:
no extra compiled signatures).
"""

import numpy as np
import pytest

import fastqkv
from fastqkv import testing

numba = pytest.importorskip("numba")

from fastqkv._numba import vec  # noqa: E402

BACKEND = "numba"
HALF = [d.name for d in testing.half_dtypes()]


@pytest.fixture
def forced(force):
    """Set the streaming kernel's keys per split / per chunk for one test."""
    def set_(split=0, keys=None):
        force(split_keys=split)
        if keys is not None:
            force(stream_keys=keys, decode_stream_keys=keys)
    return set_


def _qkv(rng, B, Hq, Hkv, Lq, Lk, D, dtype=np.float32, Dv=None):
    case = testing.make_case("serving", rng, B, Hq, Hkv, Lq, Lk, D, Dv, dtype=dtype)
    return case.q, case.k, case.v


def _check(q, k, v, threads=2, **kw):
    case = testing.Case("serving", q, k, v, kw)
    testing.check_case(case, BACKEND, num_threads=threads)


def _run(q, k, v, threads=2, **kw):
    with testing.threads(threads):
        return fastqkv.attention(q, k, v, return_lse=True, backend=BACKEND, **kw)


def _check_paged(q, kc, vc, bt, sl, threads=2, **kw):
    case = testing.Case("serving-paged", q, kc, vc, kw, fn="paged_attention", args=(bt, sl))
    testing.check_case(case, BACKEND, num_threads=threads)


# ---------------------------------------------------------------------------
# decode / streaming kernel

DECODE = testing.generate_cases(kinds=("decode",), dtypes=("float32",))


@pytest.mark.parametrize("split,keys", [(0, None), (7, 8), (64, 12), (1, 4)],
                         ids=["auto", "split7-chunk8", "split64-chunk12", "split1"])
@pytest.mark.parametrize("case", DECODE, ids=lambda c: c.name)
def test_decode_vs_oracle(case, split, keys, forced):
    forced(split, keys)
    assert fastqkv._problem.plan_attention(case.q, case.k, case.v, **case.kwargs).route == "stream"
    testing.check_case(case, BACKEND, num_threads=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_split_and_unsplit_agree(forced, threads):
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 2, 16, 4, 1, 3000, 64)
    kl = np.array([3000, 1234])
    forced(0)
    base, lse0 = _run(q, k, v, threads, key_lens=kl)
    for split in (100, 333, 1024, 2999):
        forced(split, 16)
        out, lse = _run(q, k, v, threads, key_lens=kl)
        testing.assert_close(out, base, np.float32, what="out")
        testing.assert_close(lse, lse0, np.float32, what="lse")


def test_empty_and_fully_masked_splits(forced):
    """A window leaves whole splits without visible keys; sequence 1 has none."""
    forced(16, 8)
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 3, 4, 2, 2, 200, 16)
    kl = np.array([200, 0, 40])
    k[0, :, :100] = np.nan                    # outside the window of both rows
    v[0, :, :100] = np.nan
    _check(q, k, v, key_lens=kl, window=(30, 0))
    out, lse = _run(q, k, v, key_lens=kl, window=(30, 0))
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))


@pytest.mark.parametrize("split", [0, 50])
def test_nan_reaches_only_its_rows(forced, split):
    forced(split, 16)
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, 2, 4, 2, 1, 300, 16)
    v[0, 1, 250] = np.nan                    # visible to heads 2, 3 of batch 0
    out, lse = _run(q, k, v)
    assert np.isnan(out[0, 2:]).all() and np.isfinite(out[0, :2]).all() and np.isfinite(out[1]).all()
    assert np.isfinite(lse).all()
    k[1, 0, 10, 0] = np.nan                  # a NaN score: the row and its lse
    out, lse = _run(q, k, v)
    assert np.isnan(out[1, :2]).all() and np.isnan(lse[1, :2]).all() and np.isfinite(lse[1, 2:]).all()


def test_strided_kv_and_dv(forced):
    """blhd K/V (rows not contiguous: gathered chunks) and Dv != D."""
    forced(0, 8)
    rng = np.random.default_rng(14)
    q = rng.standard_normal((2, 3, 8, 16)).astype(np.float32)    # (B, L, H, D)
    k = rng.standard_normal((2, 90, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 90, 2, 12)).astype(np.float32)
    _check(q, k, v, layout="blhd", causal=True, key_lens=np.array([90, 41]))


@pytest.mark.parametrize("dtype", ["float32", "float64"] + HALF)
@pytest.mark.parametrize("D,Dv", [(136, 100), (40, 72), (8, 200)], ids=["D136Dv100", "D40Dv72", "D8Dv200"])
@pytest.mark.parametrize("Hq", [8, 32], ids=["G4", "G16"])
def test_decode_head_dims(dtype, D, Dv, Hq, forced):
    """Head dims past the streaming micro-kernels' vector blocks: QK on whole
    vectors plus a scalar rest of D, PV on 4, 3, 2 or 1 vectors plus a
    scalar rest of Dv; dense bhld, blhd (every KV head per item) and paged,
    chunks whose key count is not a multiple of 4; on the row path (G4) and
    the transposed one (G16)."""
    forced(0, 12)
    dt = testing.as_dtype(dtype)
    rng = np.random.default_rng(D + Dv)
    q, k, v = _qkv(rng, 2, Hq, 2, 1, 75, D, dt, Dv=Dv)
    kl = np.array([75, 30])
    _check(q, k, v, key_lens=kl)
    _check(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), layout="blhd",
           key_lens=kl)
    kc, vc, bt = testing.paged_cache(k, v, 16, rng, kl)
    _check_paged(q, kc, vc, bt, kl)


def test_decode_large_logits_and_negative_scale():
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, 1, 4, 1, 1, 700, 16)
    _check(q * 300, k, v)
    _check(q, k, v, scale=-0.9)


# ---------------------------------------------------------------------------
# paged KV cache

PAGED = testing.generate_cases(kinds=("paged",), dtypes=("float32",))


def _query_rows(case):
    return case.q.shape[-3] if case.kwargs.get("layout") == "blhd" else case.q.shape[-2]


@pytest.mark.parametrize("case", PAGED, ids=lambda c: c.name)
def test_paged_vs_oracle(case, forced):
    forced(0 if _query_rows(case) > 1 else 100, 16)
    testing.check_case(case, BACKEND, num_threads=2)


def test_paged_chunked_prefill_equals_full_prefill():
    """Prefill in chunks against the paged cache = the last rows of one full prefill."""
    rng = np.random.default_rng(21)
    L, bs = 150, 16
    q, k, v = _qkv(rng, 1, 8, 2, L, L, 32)
    full, full_lse = _run(q, k, v, causal=True)
    kc, vc, bt = testing.paged_cache(k, v, bs, rng)
    start = 0
    for chunk in (50, 17, 1, 60, 22):
        end = start + chunk
        out, lse = fastqkv.paged_attention(q[:, :, start:end], kc, vc, bt, np.array([end]),
                                           causal=True, return_lse=True, backend=BACKEND)
        testing.assert_close(out, full[:, :, start:end], np.float32, what="out")
        testing.assert_close(lse, full_lse[:, :, start:end], np.float32, what="lse")
        start = end
    assert start == L


# ---------------------------------------------------------------------------
# float16 / bfloat16

@pytest.mark.parametrize("case", testing.generate_cases(quick=True, dtypes=HALF), ids=lambda c: c.name)
def test_half_generated_cases(case):
    testing.check_case(case, BACKEND, num_threads=2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("split", [0, 40])
def test_half_decode(dtype, split, forced):
    forced(split, 16)
    dt = testing.as_dtype(dtype)
    rng = np.random.default_rng(31)
    q, k, v = _qkv(rng, 2, 8, 2, 1, 300, 64, dt)
    kl = np.array([300, 101])
    k[1, :, 101:] = np.nan
    _check(q, k, v, key_lens=kl)
    _check(q, k, v, key_lens=kl, window=(50, -1))


@pytest.mark.parametrize("case", testing.generate_cases(quick=True, dtypes=HALF, kinds=("paged",)),
                         ids=lambda c: c.name)
def test_half_paged(case):
    testing.check_case(case, BACKEND, num_threads=2)


@pytest.mark.parametrize("dtype", HALF)
def test_half_output_rounding(dtype):
    """The output is the float32 result rounded to nearest even: with one key
    it is exactly v, and with two keys of equal score their mean."""
    dt = testing.as_dtype(dtype)
    rng = np.random.default_rng(32)
    v = rng.standard_normal((1, 1, 2, 64)).astype(dt)
    k = np.zeros((1, 1, 2, 64), dt)
    q = np.ones((1, 1, 1, 64), dt)
    out = fastqkv.attention(q, k[:, :, :1], v[:, :, :1], backend=BACKEND)
    assert np.array_equal(out.view(np.uint16), v[:, :, :1].view(np.uint16))
    out = fastqkv.attention(q, k, v, backend=BACKEND)
    want = ((v[0, 0, 0].astype(np.float32) + v[0, 0, 1].astype(np.float32)) * np.float32(0.5)).astype(dt)
    assert np.array_equal(out[0, 0, 0].view(np.uint16), want.view(np.uint16))


def test_half_conversions_exact():
    """The kernel's 16-bit codecs against NumPy / ml_dtypes, every bit pattern."""
    from numba import njit

    @njit
    def codec(bits, f32, kind, wide, narrow):
        for i in range(bits.shape[0]):
            wide[i] = vec._f16_to_f32(bits[i]) if kind == 1 else vec._bf16_to_f32(bits[i])
        for i in range(f32.shape[0]):
            narrow[i] = vec._f32_to_f16(f32[i]) if kind == 1 else vec._f32_to_bf16(f32[i])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(33)
    randoms = (rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000)).astype(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 65504.0, 65520.0, 3.4e38], np.float32)
    ties = ((bits.astype(np.uint32) << np.uint32(16)) | np.uint32(0x8000)).view(np.float32)   # bf16 ties
    f32 = np.concatenate([randoms, special, ties])
    for kind, dt in ((1, np.dtype(np.float16)), (2, testing.as_dtype("bfloat16") if "bfloat16" in HALF else None)):
        if dt is None:
            continue
        wide = np.empty(bits.shape, np.float32)
        narrow = np.empty(f32.shape, np.uint16)
        codec(bits, f32, kind, wide, narrow)
        assert np.array_equal(wide, bits.view(dt).astype(np.float32), equal_nan=True)
        with np.errstate(over="ignore", invalid="ignore"):
            want = f32.astype(dt)
        got = narrow.view(dt)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_supports_and_features():
    from fastqkv import _numba
    assert "paged" in _numba.FEATURES
    for dt in HALF:
        z = np.zeros((1, 2, 3), testing.as_dtype(dt))
        assert _numba.supports(fastqkv._problem.plan_attention(z, z, z)) is None


# ---------------------------------------------------------------------------
# attention sinks: counted once per row, in the merge of the split partials

def _sinks(rng, Hq):
    """One sink logit per query head, of either sign, head 1 without one (-inf)."""
    sinks = rng.standard_normal(Hq) * 3
    sinks[1] = -np.inf
    return sinks


@pytest.mark.parametrize("nsplit", [0, 1, 3, 7], ids=["auto", "split1", "split3", "split7"])
@pytest.mark.parametrize("Hq", [8, 16], ids=["G4", "G8"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sinks_decode(dtype, Hq, nsplit, forced):
    """Decode over ragged lengths (one of 0) with the longest sequence cut
    into ``nsplit`` KV splits (0: the kernel's choice): the sink is counted
    once, whatever the number of splits; the row path (G4) and the
    transposed one (G8)."""
    Lk = 210
    forced(-(-Lk // nsplit) if nsplit else 0, 12)
    dt = testing.as_dtype(dtype)
    rng = np.random.default_rng(50 + Hq)
    q, k, v = _qkv(rng, 3, Hq, 2, 1, Lk, 32, dt)
    kl = np.array([Lk, 0, 77])
    sinks = _sinks(rng, Hq)
    assert fastqkv._problem.plan_attention(q, k, v, key_lens=kl, sinks=sinks).route == "stream"
    _check(q, k, v, key_lens=kl, sinks=sinks)
    out, lse = _run(q, k, v, key_lens=kl, sinks=sinks)
    assert np.all(out[1] == 0)
    assert np.array_equal(lse[1, :, 0], sinks.astype(lse.dtype))
    _check(q, k, v, key_lens=kl, sinks=sinks, window=(40, -1))


@pytest.mark.parametrize("split", [0, 30])
def test_sinks_splits_agree(split, forced):
    """With sinks, split and unsplit decodes agree (the partials leave the sink out)."""
    rng = np.random.default_rng(51)
    q, k, v = _qkv(rng, 2, 16, 4, 1, 500, 64)
    kl = np.array([500, 123])
    sinks = _sinks(rng, 16)
    forced(1000)
    base, lse0 = _run(q, k, v, key_lens=kl, sinks=sinks)
    forced(split, 16)
    out, lse = _run(q, k, v, key_lens=kl, sinks=sinks)
    testing.assert_close(out, base, np.float32, what="out")
    testing.assert_close(lse, lse0, np.float32, what="lse")


@pytest.mark.parametrize("Lq", [1, 24], ids=["decode", "chunk"])
def test_sinks_paged(Lq, forced):
    """A paged cache, decode and a causal chunk, with sinks."""
    forced(40 if Lq == 1 else 0, 16)
    rng = np.random.default_rng(52)
    q, k, v = _qkv(rng, 3, 8, 2, Lq, 150, 32)
    kl = np.array([150, 61, 30])
    kc, vc, bt = testing.paged_cache(k, v, 16, rng, kl)
    _check_paged(q, kc, vc, bt, kl, sinks=_sinks(rng, 8), causal=Lq > 1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("split", [0, 40])
def test_sinks_half(dtype, split, forced):
    """float16 / bfloat16 storage with sinks: decode (the streaming kernel,
    dense and paged) and a masked prefill (widened to the tiled kernel)."""
    forced(split, 16)
    dt = testing.as_dtype(dtype)
    rng = np.random.default_rng(53)
    q, k, v = _qkv(rng, 2, 8, 2, 1, 300, 64, dt)
    kl = np.array([300, 0])
    sinks = _sinks(rng, 8)
    _check(q, k, v, key_lens=kl, sinks=sinks)
    kc, vc, bt = testing.paged_cache(k, v, 16, rng, kl)
    _check_paged(q, kc, vc, bt, kl, sinks=sinks)
    q, k, v = _qkv(rng, 1, 8, 2, 20, 60, 32, dt)
    mask = rng.random((1, 8, 20, 60)) < 0.6
    mask[0, :, 3] = False
    out, lse = _run(q, k, v, mask=mask, sinks=sinks)
    assert np.all(out[0, :, 3].astype(np.float32) == 0)
    assert np.array_equal(lse[0, :, 3], sinks.astype(np.float32))
    _check(q, k, v, mask=mask, sinks=sinks)
