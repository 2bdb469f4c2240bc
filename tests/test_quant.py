"""Quantized K/V (int8, float8_e4m3fn, float8_e5m2 with float32 scales):
quantize_kv, every backend against the oracle on the case generator, and
the checks of bad scales.  Kernel-specific forcing (split counts, ISA
variants) lives in the backends' serving suites."""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

QUANT = testing.quant_dtypes()
BACKENDS = [n for n, i in fastqkv.backends().items() if i.available] + ["auto"]
CASES = [c for dt in QUANT for c in testing.generate_cases(quick=True, dtypes=(dt,), kinds=testing.KINDS)]

if len(QUANT) < 3:
    print("float8 K/V cases skipped: ml_dtypes is not installed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_quantized_matches_oracle(backend, case):
    testing.check_case(case, backend)


# ---------------------------------------------------------------------------
# quantize_kv

# largest |x - dequantized| relative to the row's absmax, per format: half a
# step of 127 (int8); half an ulp of 3 or 2 mantissa bits at the top (float8)
ROUND_TRIP = {"int8": 0.5 / 127, "float8_e4m3fn": 2.0 ** -4, "float8_e5m2": 2.0 ** -3}


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_quantize_kv_round_trip(name, layout, rng):
    x = rng.standard_normal((2, 3, 40, 16)) * np.exp(rng.standard_normal((2, 3, 40, 1)) * 3)
    x[0, 1, 5] = 0.0                                     # an all-zero row
    x = x.astype(np.float32)
    xq, s = fastqkv.quantize_kv(x, name, layout=layout)
    assert xq.dtype == testing.as_dtype(name) and xq.shape == x.shape
    assert s.dtype == np.float32 and s.shape == x.shape[:-1]
    assert s[0, 1, 5] == 1 and not xq[0, 1, 5].astype(np.float64).any()
    back = xq.astype(np.float64) * s[..., None]
    amax = np.abs(x).max(-1, keepdims=True).astype(np.float64)
    err = np.abs(back - x) / np.where(amax == 0, 1, amax)
    assert err.max() <= ROUND_TRIP[name] * (1 + 1e-6)
    # the largest magnitude of each row is representable: it maps onto the format's top
    top = np.abs(xq.astype(np.float64)).max(-1)
    assert np.allclose(top[amax[..., 0] > 0], fastqkv._quant.QUANT_MAX[name])


def test_quantize_kv_bad_input():
    x = np.ones((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        fastqkv.quantize_kv(x, "int4")
    with pytest.raises(TypeError, match="floating-point"):
        fastqkv.quantize_kv(x.astype(np.int32), "int8")
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fastqkv.quantize_kv(bad, "int8")
    with pytest.raises(ValueError, match="layout"):
        fastqkv.quantize_kv(x, "int8", layout="hbld")


def test_quantized_paged_cache_quantized_whole(rng):
    """quantize_kv on a paged cache gives (num_blocks, block_size, Hkv)
    scales that paged_attention takes."""
    k = rng.standard_normal((2, 2, 37, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 37, 16)).astype(np.float32)
    q = rng.standard_normal((2, 8, 1, 16)).astype(np.float32)
    kc, vc, table = testing.paged_cache(k, v, 8, rng, spare_blocks=0)
    kc, vc = np.nan_to_num(kc), np.nan_to_num(vc)        # the slots past 37
    kq, ks = fastqkv.quantize_kv(kc, "int8", layout="blhd")
    vq, vs = fastqkv.quantize_kv(vc, "int8", layout="blhd")
    assert ks.shape == kc.shape[:3]
    lens = np.array([37, 20])
    got = fastqkv.paged_attention(q, kq, vq, table, lens, k_scale=ks, v_scale=vs)
    want = reference.paged_attention(q, kq, vq, table, lens, k_scale=ks, v_scale=vs)
    testing.assert_close(got, want, np.float32, cond=10, vmax=3)


def test_attention_weights_quantized_k(rng):
    q = rng.standard_normal((1, 4, 5, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 30, 16)).astype(np.float32)
    kq, ks = fastqkv.quantize_kv(k, "int8")
    got = fastqkv.attention_weights(q, kq, k_scale=ks, causal=True)
    want = reference.attention_weights(q, kq, k_scale=ks, causal=True)
    testing.assert_close(got, want, np.float32, cond=10)
    dense = reference.attention_weights(q.astype(np.float64), kq.astype(np.float64) * ks[..., None],
                                        causal=True)
    testing.assert_close(want, dense, np.float32, cond=10)


# ---------------------------------------------------------------------------
# bad input

def _call(rng, fn=fastqkv.attention, **kw):
    q = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    kq, ks = fastqkv.quantize_kv(k, "int8")
    args = dict(k_scale=ks, v_scale=ks.copy())
    args.update(kw)
    kk = args.pop("k", kq)
    vv = args.pop("v", kq)
    return fn(args.pop("q", q), kk, vv, **args)


def test_bad_scales(rng):
    ks = np.ones((2, 2, 10), np.float32)
    with pytest.raises(TypeError, match="need k_scale"):
        _call(rng, k_scale=None)
    with pytest.raises(TypeError, match="need v_scale"):
        _call(rng, v_scale=None)
    with pytest.raises(TypeError, match="k_scale must be a float32 array"):
        _call(rng, k_scale=ks.astype(np.float64))
    with pytest.raises(ValueError, match=r"k_scale must have shape \(2, 2, 10\).*or \(2,\)"):
        _call(rng, k_scale=ks[:, :, :9])
    with pytest.raises(ValueError, match=r"v_scale must have shape"):
        _call(rng, v_scale=np.ones((2, 10, 2), np.float32))
    for value in (0.0, -1.0, np.nan, np.inf):
        bad = ks.copy()
        bad[1, 0, 4] = value
        with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
            _call(rng, k_scale=bad)
        with pytest.raises(ValueError, match="v_scale must be finite and > 0"):
            _call(rng, v_scale=bad)
        with pytest.raises(ValueError, match="finite and > 0"):
            _call(rng, k_scale=np.array([1.0, value], np.float32))
    # scales of keys past key_lens are never read, so never checked
    bad = ks.copy()
    bad[1, :, 6:] = np.nan
    bad[0, :, 9] = 0
    out = _call(rng, k_scale=bad, v_scale=bad, key_lens=[9, 6])
    assert np.isfinite(out).all()


def test_bad_dtypes(rng):
    x = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="k_scale is only for quantized"):
        _call(rng, k=x, v=x)
    with pytest.raises(TypeError, match="needs q of dtype float32, float16, bfloat16"):
        _call(rng, q=np.zeros((2, 4, 3, 8)))
    with pytest.raises(TypeError, match="k and v must share one quantized dtype"):
        _call(rng, v=x)
    if "float8_e4m3fn" in QUANT:
        with pytest.raises(TypeError, match="k and v must share one quantized dtype"):
            _call(rng, v=np.zeros(x.shape, testing.as_dtype("float8_e4m3fn")))


def test_bad_paged_and_varlen_scales(rng):
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 20, 8)).astype(np.float32)
    kc, vc, table = testing.paged_cache(k, k, 8, rng, spare_blocks=1)
    kc, vc = np.nan_to_num(kc), np.nan_to_num(vc)
    kq, ks = fastqkv.quantize_kv(kc, "int8", layout="blhd")
    lens = np.array([20, 9])
    with pytest.raises(ValueError, match=r"k_scale must have shape \(7, 8, 2\)"):
        fastqkv.paged_attention(q, kq, kq, table, lens, k_scale=ks[:, :4], v_scale=ks)
    with pytest.raises(TypeError, match="k_cache and v of dtype int8 need v_scale"):
        fastqkv.paged_attention(q, kq, kq, table, lens, k_scale=ks)
    # a zero scale in an unused block, or past a sequence's length, is never read
    bad = ks.copy()
    spare = sorted(set(range(kq.shape[0])) - set(table[0, :3]) - set(table[1, :2]))[0]
    bad[spare] = 0
    bad[table[1, 1], 1:] = np.nan
    fastqkv.paged_attention(q, kq, kq, table, lens, k_scale=bad, v_scale=bad)
    bad[table[1, 1], 0] = 0                              # key 8 of sequence 1 is read
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        fastqkv.paged_attention(q, kq, kq, table, lens, k_scale=bad, v_scale=ks)
    kp, cu = testing.varlen_pack([rng.standard_normal((n, 2, 8)).astype(np.float32) for n in (5, 7)])
    qp, cq = testing.varlen_pack([rng.standard_normal((n, 4, 8)).astype(np.float32) for n in (2, 3)])
    kpq, kps = fastqkv.quantize_kv(kp, "int8", layout="blhd")
    with pytest.raises(ValueError, match=r"k_scale must have shape \(12, 2\)"):
        fastqkv.attention_varlen(qp, kpq, kpq, cq, cu, k_scale=kps.T, v_scale=kps)
    kps[11, 1] = -2
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        fastqkv.attention_varlen(qp, kpq, kpq, cq, cu, k_scale=kps, v_scale=kps)


@pytest.mark.parametrize("name", QUANT)
def test_oracle_is_attention_on_dequantized_kv(name, rng):
    """The oracle's definition: K = k * k_scale, V = v * v_scale, in float64."""
    q = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 2, 30, 16)) for _ in range(2))
    (kq, ks), (vq, vs) = (fastqkv.quantize_kv(x, name) for x in (k, v))
    got = reference.attention(q, kq, vq, k_scale=ks, v_scale=vs, causal=True, return_lse=True)
    kd, vd = (x.astype(np.float64) * s[..., None] for x, s in ((kq, ks), (vq, vs)))
    want = reference.attention(q.astype(np.float64), kd, vd, causal=True, return_lse=True)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w.astype(np.float32))
    # one scale per KV head is that scale on every token
    hs = np.array([0.5, 2.0], np.float32)
    per_head = reference.attention(q, kq, vq, k_scale=hs, v_scale=hs[::-1].copy())
    full = reference.attention(q, kq, vq, k_scale=np.broadcast_to(hs[None, :, None], ks.shape).copy(),
                               v_scale=np.broadcast_to(hs[::-1][None, :, None], ks.shape).copy())
    np.testing.assert_array_equal(per_head, full)
