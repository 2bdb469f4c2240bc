"""Serving paths of the C backend against the oracle: the streaming kernel
(decode), split-KV with the LSE merge (split counts forced through the
``force`` fixture), paged KV caches and float16/bfloat16 storage; at 1 and 2
threads, every ISA.  The decode and paged cases come from
``testing.generate_cases(kinds=...)``."""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

pytestmark = pytest.mark.skipif(not fastqkv.backends()["c"].available,
                                reason=f"c backend unavailable: {fastqkv.backends()['c'].reason}")

DECODE = testing.generate_cases(kinds=("decode",), dtypes=("float32",))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("case", DECODE, ids=lambda c: c.name)
def test_split_kv_matches_oracle(case, splits, threads, isa, force):
    """Every split count (incl. empty and fully masked splits) equals the oracle."""
    force(splits=splits)
    testing.check_case(case, backend="c", num_threads=threads)


def test_split_and_unsplit_agree(force):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 1, 64), np.float32)
    k = rng.standard_normal((1, 2, 3000, 64), np.float32)
    v = rng.standard_normal((1, 2, 3000, 64), np.float32)
    outs = []
    for s in (1, 4, 13):
        force(splits=s)
        outs.append(fastqkv.attention(q, k, v, return_lse=True, backend="c"))
    for o, l in outs[1:]:
        testing.assert_close(o, outs[0][0], np.float32, what="out")
        testing.assert_close(l, outs[0][1], np.float32, what="lse")


def test_nan_value_beyond_split_visible_range(force):
    """NaN/inf in keys a row cannot see (causal tail, key_lens) never reach it."""
    force(splits=5)
    rng = np.random.default_rng(6)
    case = testing.make_case("nan-tail", rng, 2, 4, 2, 3, 100, 16, causal=True,
                             key_lens=np.array([60, 100]))
    case.k[0, :, 60:] = np.nan
    case.v[0, :, 60:] = np.inf
    case.v[1, :, 99] = np.nan        # only the last query row sees key 99
    testing.check_case(case, backend="c", num_threads=2)


STREAMABLE = [c for c in testing.generate_cases()
              if not any(key in c.kwargs for key in ("mask", "bias", "softcap", "alibi_slopes"))]


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("case", STREAMABLE, ids=[c.name for c in STREAMABLE])
def test_streaming_kernel_on_generated_cases(case, splits, isa, force):
    """The streaming kernel forced on every generated case it can run (any Lq)."""
    force(route="stream", splits=splits)
    testing.check_case(case, backend="c", num_threads=2)


# ---------------------------------------------------------------------------
# paged KV caches

PAGED = testing.generate_cases(kinds=("paged",), dtypes=("float32",))
PAGED64 = testing.generate_cases(kinds=("paged",), dtypes=("float64",), quick=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", PAGED, ids=lambda c: c.name)
def test_paged_equals_oracle(case, threads, isa):
    testing.check_case(case, backend="c", num_threads=threads)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("case", PAGED64, ids=lambda c: c.name)
def test_paged_split_kv(case, splits, force):
    force(splits=splits)
    testing.check_case(case, backend="c", num_threads=2)


def test_chunked_prefill_equals_last_rows_of_full_prefill():
    rng = np.random.default_rng(9)
    L, C = 150, 37
    x = rng.standard_normal((1, 8, L, 32), np.float32)
    k = rng.standard_normal((1, 2, L, 32), np.float32)
    v = rng.standard_normal((1, 2, L, 32), np.float32)
    full = fastqkv.attention(x, k, v, causal=True, backend="c")
    kc, vc, table = testing.paged_cache(k, v, 16, rng)
    chunk = fastqkv.paged_attention(x[:, :, L - C:], kc, vc, table, np.array([L]), causal=True,
                                    backend="c")
    testing.assert_close(chunk, full[:, :, L - C:], np.float32)


def test_module_checks_block_table():
    from fastqkv import _ckernels

    q = np.zeros((1, 2, 1, 8), np.float32)
    out = np.zeros_like(q)
    kc = np.zeros((4, 4, 1, 8), np.float32)
    lens = np.array([5], np.int64)
    for bad in (np.zeros((1, 2), np.int32), np.zeros((2, 2), np.int64), np.zeros(2, np.int64),
                np.zeros((1, 4), np.int64)[:, ::2]):
        with pytest.raises(ValueError, match="block_table"):
            _ckernels.attention(q, kc, kc, out, None, None, None, lens, None, None, 1.0, 0.0, -1,
                                -1, 1, 1, bad, 4)
    with pytest.raises(ValueError, match="key_lens"):
        _ckernels.attention(q, kc, kc, out, None, None, None, np.array([9]), None, None, 1.0, 0.0,
                            -1, -1, 1, 1, np.zeros((1, 2), np.int64), 4)


# ---------------------------------------------------------------------------
# attention sinks

SINK_DTYPES = ["float32", "float64"] + [d.name for d in testing.half_dtypes()]


def _sinks(rng, Hq):
    sinks = (2 * rng.standard_normal(Hq)).astype(np.float32)
    sinks[Hq // 2] = -np.inf                    # a head without a sink
    return sinks


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("dt", SINK_DTYPES)
def test_sinks_split_kv_dense_and_paged(dt, splits, isa, force):
    """sinks= with a forced split count (the sink counted once, in the merge)
    equals the oracle, dense and paged; the rows of a zero-length sequence
    give out = 0 and lse = their head's sink exactly."""
    rng = np.random.default_rng(14)
    sinks = _sinks(rng, 8)
    lens = np.array([700, 0, 300])
    case = testing.make_case("sinks-split", rng, 3, 8, 2, 1, 700, 64, dtype=testing.as_dtype(dt),
                             key_lens=lens, causal=True, sinks=sinks)
    kc, vc, table = testing.paged_cache(case.k, case.v, 16, rng, lens)
    paged = testing.Case("sinks-split-paged", case.q, kc, vc, {"causal": True, "sinks": sinks},
                         fn="paged_attention", args=(table, lens))
    force(splits=splits)
    for c in (case, paged):
        out, lse = testing.check_case(c, backend="c", num_threads=2)
        assert np.all(out[1].astype(np.float64) == 0)
        np.testing.assert_array_equal(lse[1, :, 0], sinks.astype(lse.dtype))


@pytest.mark.parametrize("route", ["tile", "stream"])
@pytest.mark.parametrize("dt", SINK_DTYPES)
def test_sinks_rows_without_keys_give_the_sink(dt, route, isa, force):
    """Rows that see no key (a zero-length sequence; causal rows before a
    short sequence's first key) give out = 0 and lse = the sink exactly, on
    both routes and with the tiled kernel skipping their key tiles."""
    rng = np.random.default_rng(15)
    sinks = _sinks(rng, 4)
    case = testing.make_case("sinks-keyless", rng, 3, 4, 2, 6, 40, 16, dtype=testing.as_dtype(dt),
                             key_lens=np.array([0, 3, 40]), causal=True, sinks=sinks)
    force(route=route, splits=3)
    out, lse = testing.check_case(case, backend="c", num_threads=2)
    for b, rows in ((0, slice(0, 6)), (1, slice(0, 3))):
        assert np.all(out[b, :, rows].astype(np.float64) == 0)
        want = np.broadcast_to(sinks.astype(lse.dtype)[:, None], (4, rows.stop))
        np.testing.assert_array_equal(lse[b, :, rows], want)


def test_module_checks_sinks():
    """_ckernels refuses a sinks array it could read out of bounds or
    misread: not the accumulation dtype, not (Hq,), not contiguous."""
    from fastqkv import _ckernels

    q = np.zeros((1, 4, 1, 8), np.float32)
    k = np.zeros((1, 2, 5, 8), np.float32)
    out = np.zeros_like(q)
    for bad, err in ((np.zeros(4, np.float64), TypeError), (np.zeros(3, np.float32), ValueError),
                     (np.zeros(8, np.float32)[::2], ValueError)):
        with pytest.raises(err, match="sinks"):
            _ckernels.attention(q, k, k, out, None, None, None, None, None, bad, 1.0, 0.0, -1, -1,
                                1, 1)


# ---------------------------------------------------------------------------
# float16 / bfloat16 storage

HALF_CASES = testing.generate_cases(dtypes=tuple(d.name for d in testing.half_dtypes()))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.name for c in HALF_CASES])
def test_half_generated_case(case, threads, isa):
    testing.check_case(case, backend="c", num_threads=threads)


@pytest.mark.parametrize("splits", [1, 6])
@pytest.mark.parametrize("dt", testing.half_dtypes(), ids=lambda d: d.name)
def test_half_split_and_paged_decode(dt, splits, isa, force):
    rng = np.random.default_rng(12)
    case = testing.make_case("half-decode", rng, 2, 8, 2, 1, 500, 64, dtype=dt, key_lens=np.array([500, 123]))
    kc, vc, table = testing.paged_cache(case.k, case.v, 16, rng, case.kwargs["key_lens"])
    paged = testing.Case("half-paged-decode", case.q, kc, vc, fn="paged_attention",
                         args=(table, case.kwargs["key_lens"]))
    force(splits=splits)
    for c in (case, paged):
        testing.check_case(c, backend="c", num_threads=2)


@pytest.mark.parametrize("reps", [1, 16], ids=["D10", "D160"])
@pytest.mark.parametrize("dt", testing.half_dtypes(), ids=lambda d: d.name)
def test_half_conversions_exact(dt, reps, isa):
    """q = 0: out is the mean of V exactly representable values, so the
    widening (subnormals, zero, extremes) and the rounding are checked bit for bit.
    D 160 has whole register-tile blocks of columns and a tail on every ISA."""
    ml_dtypes = pytest.importorskip("ml_dtypes")

    finfo = ml_dtypes.finfo(dt)
    vals = np.array([finfo.smallest_subnormal, -finfo.smallest_subnormal, finfo.tiny, 0.0,
                     2.0, 1.0, -3.5, float(finfo.max) / 4, -float(finfo.max) / 4, 0.1], np.float64)
    vals = np.tile(vals, reps)
    v = np.broadcast_to(vals.astype(dt)[None, None, None, :], (1, 1, 1, vals.size)).copy()
    v = np.repeat(v, 3, axis=2)                      # 3 identical keys: the mean is the value
    q = np.zeros((1, 1, 1, vals.size), dt)
    k = np.ones((1, 1, 3, vals.size), dt)
    got = fastqkv.attention(q, k, v, backend="c")
    np.testing.assert_array_equal(got.view(np.uint16)[0, 0, 0], v.view(np.uint16)[0, 0, 0])


def test_half_rounds_to_nearest_even():
    """The output is the float32 result rounded to nearest even."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(13)
    for dt in testing.half_dtypes():
        q = rng.standard_normal((1, 4, 1, 32)).astype(dt)
        k = rng.standard_normal((1, 1, 257, 32)).astype(dt)
        v = rng.standard_normal((1, 1, 257, 32)).astype(dt)
        want = reference.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
        got = fastqkv.attention(q, k, v, backend="c")
        # within one unit of the last place of the storage type (plus float32 noise)
        ulp = np.abs(want.astype(dt).astype(np.float64)) * float(ml_dtypes.finfo(dt).eps)
        assert np.all(np.abs(got.astype(np.float64) - want) <= ulp + 1e-6)


def test_half_with_score_options_broadcast_inputs():
    """Half inputs with a score option go through float32 copies in C order
    (a broadcast V must not leave a zero stride innermost)."""
    for dt in testing.half_dtypes():
        q = np.array([[[[0.1257, -0.1321]]]]).astype(dt)
        k = np.array([[[[0.6406, 0.1049], [-0.5356, 0.3616]]]]).astype(dt)
        v = np.broadcast_to(np.array([1.304, 2.0]).astype(dt), (1, 1, 2, 2))
        testing.check_case(testing.Case("half-broadcast-v", q, k, v, {"softcap": 1.0, "scale": 0.01}),
                           backend="c", num_threads=1)


# ---------------------------------------------------------------------------
# quantized K/V (int8, float8): widened in registers by the streaming kernel

QUANT = testing.quant_dtypes()
QUANT_DECODE = [c for dt in QUANT for c in testing.generate_cases(quick=True, dtypes=(dt,), kinds=("decode",))]
QUANT_PAGED = [c for dt in QUANT for c in testing.generate_cases(quick=True, dtypes=(dt,), kinds=("paged",))
               if c.name.split("-paged-")[1] in ("gqa4-decode-bs3", "b3-lq4-causal-bs16",
                                                 "gqa16-chunk-prefill-bs16", "sinks-mqa32-decode-causal")]


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("case", QUANT_DECODE + QUANT_PAGED, ids=lambda c: c.name)
def test_quant_split_kv(case, splits, isa, force):
    """Quantized decode and paged cases (per-token and per-head scales, NaN
    scales and poison past each length) at forced split counts."""
    force(splits=splits)
    testing.check_case(case, backend="c", num_threads=2)


def _quant_case(dt, rng, B, Hq, Hkv, Lq, Lk, D, key_lens, **kw):
    """A causal case with K/V quantized to ``dt`` per token, scales NaN
    and values poison (NaN codes, or 127 in int8) past each length."""
    case = testing.make_case(f"{dt}-codes", rng, B, Hq, Hkv, Lq, Lk, D, causal=True,
                             key_lens=np.asarray(key_lens), **kw)
    kv = []
    for x in (case.k, case.v):
        xq, s = fastqkv.quantize_kv(x, dt)
        for b, n in enumerate(key_lens):
            s[b, :, n:] = np.nan
            xq.view(np.uint8)[b, :, n:] = 0x7f
        kv += [xq, s]
    kq, ks, vq, vs = kv
    return testing.Case(case.name, case.q, kq, vq, {"causal": True, "key_lens": np.asarray(key_lens),
                                                    "k_scale": ks, "v_scale": vs})


def _paged_quant(case, block_size, rng):
    """``case`` (from _quant_case) on a paged cache: values and scales
    placed by one block table, the scales in the cache's layout."""
    lens = case.kwargs["key_lens"]
    k, v = (np.concatenate([x.astype(np.float32), case.kwargs[s][..., None]], axis=-1)
            for x, s in ((case.k, "k_scale"), (case.v, "v_scale")))
    kc, vc, table = testing.paged_cache(k, v, block_size, rng, lens)
    dt = case.k.dtype
    (kq, ks), (vq, vs) = (((np.nan_to_num(c[..., :-1], nan=127) if dt == np.int8 else c[..., :-1]).astype(dt),
                           np.ascontiguousarray(c[..., -1])) for c in (kc, vc))
    return testing.Case(case.name + "-paged", case.q, kq, vq,
                        {"causal": True, "k_scale": ks, "v_scale": vs},
                        fn="paged_attention", args=(table, lens))


FLOAT8_CODES = {"float8_e4m3fn": {"nan": 0x7f, "-nan": 0xff},
                "float8_e5m2": {"nan": 0x7e, "-nan": 0xff, "inf": 0x7c, "-inf": 0xfc}}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dt", [d for d in QUANT if d in FLOAT8_CODES])
def test_float8_nan_and_inf_codes(dt, splits, isa, force):
    """NaN (and e5m2's inf) codes in visible K and V reach the rows and
    columns the oracle says, dense and paged; codes past a length do not."""
    rng = np.random.default_rng(16)
    case = _quant_case(dt, rng, 2, 8, 2, 3, 150, 40, [150, 90])
    codes = FLOAT8_CODES[dt]
    kb, vb = case.k.view(np.uint8), case.v.view(np.uint8)
    kb[0, 1, 20, 5] = codes["nan"]           # every row of heads 4-7 of batch 0
    vb[0, 0, 33, 39] = codes["-nan"]         # column 39 (past the vector columns) of heads 0-3
    vb[1, 0, 89, 3] = codes["nan"]           # the last key: only the last query row sees it
    kb[1, 1, 89, 0] = codes["-nan"]
    if "inf" in codes:
        vb[1, 1, 40, 7] = codes["inf"]
        vb[1, 1, 41, 7] = codes["-inf"]      # inf - inf: NaN in column 7
        vb[1, 0, 10, 12] = codes["-inf"]
        kb[0, 0, 2, 3] = codes["inf"]
    force(splits=splits)
    for c in (case, _paged_quant(case, 16, rng)):
        out, _ = testing.check_case(c, backend="c", num_threads=2)
        assert np.isnan(out[0, 4:]).all() and np.isnan(out[0, :4, :, 39]).all()
        assert np.isnan(out[1, :4, 2, 3]).all() and not np.isnan(out[1, :4, :2, 3]).any()


def test_quant_per_head_and_strided_scales(isa, force):
    """Scales as zero-stride (one per KV head), strided and reversed views."""
    rng = np.random.default_rng(17)
    force(splits=3)
    for dt in QUANT:
        case = _quant_case(dt, rng, 2, 8, 2, 1, 300, 24, [300, 170])
        ks, vs = case.kwargs["k_scale"], case.kwargs["v_scale"]
        wide = np.full(ks.shape[:2] + (2 * ks.shape[2],), np.nan, np.float32)
        wide[..., ::2] = ks
        rev = np.ascontiguousarray(vs[:, ::-1, ::-1])[:, ::-1, ::-1]
        for k_scale, v_scale in ((wide[..., ::2], rev), (np.array([0.02, 0.05], np.float32), vs),
                                 (ks, np.array([0.01, 0.03], np.float32))):
            kw = dict(case.kwargs, k_scale=k_scale, v_scale=v_scale)
            testing.check_case(testing.Case(case.name, case.q, case.k, case.v, kw), backend="c",
                               num_threads=2)


def test_module_checks_scales():
    """_ckernels refuses quantized K/V or scales it could misread or read
    out of bounds: scales not float32, misshapen, misaligned or missing,
    scales of float K/V, quantized K/V with half q or on the tiled route."""
    from fastqkv import _ckernels

    q = np.zeros((1, 4, 1, 8), np.float32)
    k = np.zeros((1, 2, 5, 8), np.int8)
    out = np.zeros_like(q)
    s = np.ones((1, 2, 5), np.float32)
    misaligned = np.ones(41, np.uint8)[1:].view(np.float32).reshape(1, 2, 5)

    def call(ks, vs=s, kk=k, qq=q, route=1):
        _ckernels.attention(qq, kk, kk, out if qq is q else np.zeros_like(qq), None, None, None,
                            None, None, None, 1.0, 0.0, -1, -1, 1, route, None, 0, ks, vs)

    for bad, err in ((s.astype(np.float64), TypeError), (np.ones((1, 2, 4), np.float32), ValueError),
                     (np.ones((1, 2, 5, 1), np.float32), ValueError), (misaligned, ValueError),
                     (None, TypeError)):
        with pytest.raises(err, match="k_scale"):
            call(bad)
    with pytest.raises(TypeError, match="for quantized k and v only"):
        call(s, kk=k.astype(np.float32))
    with pytest.raises(TypeError, match="float32 q"):
        call(s, qq=q.astype(np.float16))
    with pytest.raises(ValueError, match="tiled route"):
        call(s, route=0)
    call(s)
