"""The numba backend's serving paths against the NumPy oracle: the streaming
kernel (decode, split-KV with the in-call merge, ragged ``key_lens``), paged
KV caches (decode and prefill with a cache), float16/bfloat16 storage,
attention sinks (counted once per row, in the merge of the splits) and
int8/float8 K/V read in place (split counts, NaN and inf codes, scale views;
every quantized case of the generator is in ``test_quant.py``).

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
QUANT = testing.quant_dtypes()


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
    assert "paged" in _numba.FEATURES and "quant" in _numba.FEATURES
    for dt in HALF:
        z = np.zeros((1, 2, 3), testing.as_dtype(dt))
        assert _numba.supports(fastqkv._problem.plan_attention(z, z, z)) is None
    for name in QUANT:
        z = np.zeros((1, 2, 3), testing.as_dtype(name))
        ones = np.ones((1, 2), np.float32)
        for qdt in ["float32"] + HALF:
            p = fastqkv._problem.plan_attention(np.zeros((1, 2, 3), testing.as_dtype(qdt)), z, z,
                                                k_scale=ones, v_scale=ones)
            assert p.route == "stream" and _numba.supports(p) is None


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


# ---------------------------------------------------------------------------
# int8 / float8 K/V: decoded in the micro-kernels, scales per chunk

def _quantize(x, name, per_head=False, layout="bhld"):
    """``(xq, scale)``: per token and head (fastqkv.quantize_kv), or one
    scale per KV head (axis 1 in bhld, 2 in blhd)."""
    if not per_head:
        return fastqkv.quantize_kv(x, name, layout=layout)
    hax = 1 if layout == "bhld" else 2
    axes = tuple(a for a in range(x.ndim) if a != hax)
    s = fastqkv._quant.scale_for(np.abs(x.astype(np.float64)).max(axis=axes), name)
    return fastqkv._quant.encode(x.astype(np.float64), np.expand_dims(s, axes), name), s


def _qcase(rng, name, B, Hq, Hkv, Lq, Lk, D, per_head=False, paged=False, **kw):
    """A quantized case: dense (Case) or paged on 16-key blocks, every K/V
    row and scale past ``key_lens`` poison (NaN codes or 0, NaN scales)."""
    q, k, v = _qkv(rng, B, Hq, Hkv, Lq, Lk, D)
    kl = kw.setdefault("key_lens", np.array([Lk] + [Lk // 2 + 3] * (B - 1)))
    (kq, ks), (vq, vs) = (_quantize(x, name, per_head) for x in (k, v))
    poison = np.nan if name != "int8" else 0
    for b, n in enumerate(kl):
        kq[b, :, n:] = poison
        vq[b, :, n:] = poison
        if not per_head:
            ks[b, :, n:] = np.nan
            vs[b, :, n:] = np.nan
    if not paged:
        return testing.Case(f"{name}-serving", q, kq, vq, dict(kw, k_scale=ks, v_scale=vs))
    kc, vc, bt = testing.paged_cache(kq.astype(np.float32), vq.astype(np.float32), 16, rng, kl)
    kc, vc = (np.nan_to_num(x, nan=poison).astype(kq.dtype) for x in (kc, vc))
    ksc, vsc = ks, vs
    if not per_head:                # scale caches on the table's blocks, NaN elsewhere
        ksc, vsc = (np.full(kc.shape[:3], np.nan, np.float32) for _ in range(2))
        for b, n in enumerate(kl):
            for t in range(-(-int(n) // 16)):
                rows = min(16, int(n) - 16 * t)
                ksc[bt[b, t], :rows] = ks[b, :, 16 * t:16 * t + rows].T
                vsc[bt[b, t], :rows] = vs[b, :, 16 * t:16 * t + rows].T
    kw = dict(kw)
    kw.pop("key_lens")
    return testing.Case(f"{name}-serving-paged", q, kc, vc, dict(kw, k_scale=ksc, v_scale=vsc),
                        fn="paged_attention", args=(bt, kl))


@pytest.mark.parametrize("nsplit", [1, 3, 7], ids=["split1", "split3", "split7"])
def test_quant_splits(nsplit, forced):
    """Every format, the longest sequence cut into ``nsplit`` KV splits in
    chunks of 12 keys, dense and paged: decode on the row path (G4), on the
    transposed path (G8), and a windowed chunk of queries (gathered chunks)."""
    Lk = 90
    forced(-(-Lk // nsplit), 12)
    rng = np.random.default_rng(60 + nsplit)
    for name in QUANT:
        for Hq, Lq, kw in ((8, 1, {}), (16, 1, {}), (8, 3, {"window": (20, 0)})):
            for paged in (False, True):
                case = _qcase(rng, name, 2, Hq, 2, Lq, Lk, 24, paged=paged, **kw)
                testing.check_case(case, BACKEND, num_threads=2)


def test_quant_route_reads_in_place(monkeypatch):
    """A quantized call without score options reaches the kernel as int8/float8
    (no dequantized copy); with one it takes the tiled kernel's copies."""
    from fastqkv._numba import launch
    seen = []
    monkeypatch.setattr(launch, "_run_stream", lambda p, n: seen.append(("stream", p.k.dtype)))
    monkeypatch.setattr(launch, "_run_general", lambda p, n: seen.append(("tile", p.k.dtype)))
    rng = np.random.default_rng(61)
    case = _qcase(rng, "int8", 1, 4, 2, 1, 20, 8)
    case.call(fastqkv, backend=BACKEND)
    case.call(fastqkv, backend=BACKEND, softcap=5.0)
    assert seen == [("stream", np.dtype(np.int8)), ("tile", np.dtype(np.float32))]


@pytest.mark.parametrize("name", [n for n in QUANT if n != "int8"])
def test_quant_nan_inf_codes(name, forced):
    """float8 NaN (e4m3fn S.1111.111) and inf (e5m2) codes in visible K and V:
    a K code makes its score and the rows that see it NaN, a V code only its
    column; row and transposed paths, split, dense and paged."""
    forced(30, 12)
    dt = testing.as_dtype(name)
    rng = np.random.default_rng(62)
    for Hq in (8, 16):
        for paged in (False, True):
            case = _qcase(rng, name, 2, Hq, 2, 1, 70, 16, paged=paged)
            k, v = case.k, case.v
            nan = np.array(np.nan, dt)
            if paged:
                bt = case.args[0]
                k[bt[0, 1], 3, 1, 5] = nan                    # key 19 of batch 0, KV head 1
                v[bt[1, 0], 7, 0, 2] = nan                    # key 7 of batch 1, KV head 0
                v[bt[0, 2], 1, 0, 9] = np.array(-np.inf if name == "float8_e5m2" else np.nan, dt)
            else:
                k[0, 1, 19, 5] = nan
                v[1, 0, 7, 2] = nan
                v[0, 0, 33, 9] = np.array(-np.inf if name == "float8_e5m2" else np.nan, dt)
            out, _ = testing.check_case(case, BACKEND, num_threads=2)
            g = Hq // 2
            assert np.isnan(out[0, g:]).all() and np.isfinite(out[0, :g, :, :9]).all()
            assert np.isnan(out[1, :g, :, 2]).all() and np.isfinite(out[1, g:]).all()


def test_quant_scale_views(forced):
    """Scales read through their strides: one per KV head (a zero stride),
    every other element of a larger array, a blhd layout's (B, L, Hkv)
    scales, reversed; dense and paged."""
    forced(0, 12)
    rng = np.random.default_rng(63)
    q, k, v = _qkv(rng, 2, 8, 2, 1, 50, 16)
    kl = np.array([50, 31])
    for name in QUANT:
        (kq, _), (vq, _) = (_quantize(x, name, per_head=True) for x in (k, v))
        (kt, ks), (vt, vs) = (_quantize(x, name) for x in (k, v))
        wide = np.ones(ks.shape[:-1] + (2 * ks.shape[-1],), np.float32)
        wide[..., ::2] = ks
        rev = ks[:, ::-1].copy()[:, ::-1]
        head = np.array([0.02, 0.5, 3.0, 0.07], np.float32)[::2]
        for kw in (dict(k=kq, v=vq, k_scale=head, v_scale=head[::-1]),
                   dict(k=kt, v=vt, k_scale=wide[..., ::2], v_scale=rev),
                   dict(k=kt.transpose(0, 2, 1, 3), v=vt.transpose(0, 2, 1, 3), layout="blhd",
                        k_scale=ks.transpose(0, 2, 1), v_scale=vs.transpose(0, 2, 1),
                        q=q.transpose(0, 2, 1, 3))):
            kw = dict(kw)
            qq = kw.pop("q", q)
            _check(qq, kw.pop("k"), kw.pop("v"), key_lens=kl, **kw)
        kc, vc, bt = testing.paged_cache(k, v, 16, rng, kl)
        kc, vc = np.nan_to_num(kc), np.nan_to_num(vc)
        (kcq, kcs), (vcq, vcs) = (fastqkv.quantize_kv(x, name, layout="blhd") for x in (kc, vc))
        wide = np.ones(kcs.shape + (3,), np.float32)
        wide[..., 1] = kcs
        _check_paged(q, kcq, vcq, bt, kl, k_scale=wide[..., 1], v_scale=vcs[::-1].copy()[::-1])
        _check_paged(q, kcq, vcq, bt, kl, k_scale=head, v_scale=head)


@pytest.mark.parametrize("name", QUANT)
def test_quant_codes_exact(name):
    """Every 8-bit code through the scalar decode and through the kernel's
    vector P.V (one key: out = v * v_scale, exactly; NaN codes in their
    columns only)."""
    from numba import njit

    dt = testing.as_dtype(name)
    kind = {"int8": vec.KIND_I8, "float8_e4m3fn": vec.KIND_E4M3, "float8_e5m2": vec.KIND_E5M2}[name]

    @njit
    def codec(bits, kind, out):
        for i in range(bits.shape[0]):
            out[i] = vec._q8_to_f32(bits[i], kind) * vec._dec_factor(kind)

    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(dt).astype(np.float32)
    got = np.empty(256, np.float32)
    codec(codes, kind, got)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))
    q = np.ones((1, 4, 1, 256), np.float32)
    kv = codes.view(dt).reshape(1, 1, 1, 256)
    s = np.full((1, 1, 1), 0.75, np.float32)
    out = fastqkv.attention(q, np.zeros_like(kv), kv, k_scale=s, v_scale=s, backend=BACKEND)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(out[0, :, 0], np.broadcast_to(want * np.float32(0.75), (4, 256)), equal_nan=True)
