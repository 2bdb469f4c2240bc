"""The numba backend's serving paths against the NumPy oracle: the streaming
kernel (decode, split-KV with the in-call merge, ragged ``key_lens``), paged
KV caches (decode and prefill with a cache) and float16/bfloat16 storage.

Splits and chunks are forced small through ``launch.FORCE_SPLIT``,
``tuning.STREAM_KEYS`` and ``tuning.DECODE_STREAM_KEYS`` (runtime arguments:
no extra compiled signatures).
"""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

numba = pytest.importorskip("numba")

from fastqkv._numba import launch, tuning, vec  # noqa: E402

BACKEND = "numba"
HALF = [d.name for d in testing.half_dtypes()]


def _dtype(name):
    return testing.half_dtypes()[-1] if name == "bfloat16" else np.dtype(name)


@pytest.fixture
def forced(monkeypatch):
    """Set the streaming kernel's split / chunk sizes for one test."""
    def set_(split=0, keys=None):
        monkeypatch.setattr(launch, "FORCE_SPLIT", split)
        if keys is not None:
            monkeypatch.setattr(tuning, "STREAM_KEYS", keys)
            monkeypatch.setattr(tuning, "DECODE_STREAM_KEYS", keys)
    return set_


def _qkv(rng, B, Hq, Hkv, Lq, Lk, D, dtype=np.float32, Dv=None):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


def _check(q, k, v, threads=2, **kw):
    case = testing.Case("serving", q, k, v, kw)
    testing.check_case(case, BACKEND, num_threads=threads)


def _run(q, k, v, threads=2, **kw):
    old = fastqkv.get_num_threads()
    fastqkv.set_num_threads(threads)
    try:
        return fastqkv.attention(q, k, v, return_lse=True, backend=BACKEND, **kw)
    finally:
        fastqkv.set_num_threads(old)


def _paginate(rng, k, v, lens, bs, spare=3):
    """A paged cache holding dense ``k``/``v`` (B, Hkv, L, D) in shuffled
    blocks of ``bs``; unused table entries point at NaN-filled blocks or
    hold garbage ids (never read)."""
    B, Hkv, L, D = k.shape
    Dv = v.shape[3]
    nb = -(-L // bs)
    nblocks = B * nb + spare
    kc = np.full((nblocks, bs, Hkv, D), np.nan, k.dtype)
    vc = np.full((nblocks, bs, Hkv, Dv), np.nan, v.dtype)
    ids = rng.permutation(nblocks)
    bt = np.full((B, nb + 1), 2**40, np.int64)        # one spare column of garbage ids
    for b in range(B):
        used = -(-int(lens[b]) // bs)
        for t in range(used):
            blk = ids[b * nb + t]
            bt[b, t] = blk
            rows = k[b, :, t * bs:(t + 1) * bs].transpose(1, 0, 2)
            kc[blk, :rows.shape[0]] = rows
            vc[blk, :rows.shape[0]] = v[b, :, t * bs:(t + 1) * bs].transpose(1, 0, 2)
        # rows past the length inside the last block stay NaN: never read
        if used:
            last = ids[b * nb + used - 1]
            r = int(lens[b]) - (used - 1) * bs
            kc[last, r:] = np.nan
            vc[last, r:] = np.nan
    return kc, vc, bt


def _check_paged(q, kc, vc, bt, sl, threads=2, **kw):
    ref_out, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, return_lse=True, **kw)
    old = fastqkv.get_num_threads()
    fastqkv.set_num_threads(threads)
    try:
        out, lse = fastqkv.paged_attention(q, kc, vc, bt, sl, return_lse=True, backend=BACKEND, **kw)
    finally:
        fastqkv.set_num_threads(old)
    assert out.dtype == q.dtype and lse.dtype == ref_lse.dtype
    finite_k = np.nan_to_num(kc.astype(np.float64), nan=0.0)
    cond = testing._condition(q, finite_k, kw.get("scale") or 1 / np.sqrt(q.shape[-1]))
    testing.assert_close(out, ref_out, q.dtype, cond=cond, what="out")
    testing.assert_close(lse, ref_lse, q.dtype, cond=cond, what="lse")
    return out, lse


# ---------------------------------------------------------------------------
# decode / streaming kernel

DECODE = [
    # B, Hq, Hkv, Lq, Lk, D, key_lens, kwargs
    (3, 8, 8, 1, 300, 32, [300, 0, 17], {}),                 # MHA, an empty sequence
    (2, 8, 2, 1, 517, 64, [517, 260], {}),                   # GQA 4
    (2, 8, 1, 1, 400, 16, None, {}),                         # GQA 8 (MQA)
    (2, 8, 2, 5, 300, 32, [300, 7], {"causal": True}),       # speculative / short chunk
    (1, 4, 2, 16, 200, 24, None, {"causal": True, "window": (50, -1)}),
    (2, 4, 1, 3, 250, 8, [250, 90], {"window": (20, 1)}),    # both sides, splits outside it
    (1, 2, 1, 2, 33, 5, [3], {"causal": True}),              # the first row sees 2 keys
    # rows in vector lanes (the transposed path)
    (2, 32, 1, 1, 300, 67, [300, 45], {}),                   # MQA 32, odd D
    (1, 32, 2, 3, 200, 80, None, {"causal": True}),          # GQA 16, a causal 3-token step
]


@pytest.mark.parametrize("split,keys", [(0, None), (7, 8), (64, 12), (1, 4)],
                         ids=["auto", "split7-chunk8", "split64-chunk12", "split1"])
@pytest.mark.parametrize("shape", DECODE, ids=lambda s: f"B{s[0]}Hq{s[1]}Hkv{s[2]}Lq{s[3]}Lk{s[4]}")
def test_decode_vs_oracle(shape, split, keys, forced):
    forced(split, keys)
    B, Hq, Hkv, Lq, Lk, D, kl, kw = shape
    rng = np.random.default_rng(Lk)
    q, k, v = _qkv(rng, B, Hq, Hkv, Lq, Lk, D)
    if kl is not None:
        kw = dict(kw, key_lens=np.array(kl))
        for b, n in enumerate(kl):             # beyond the length: never read
            k[b, :, n:] = np.nan
            v[b, :, n:] = np.inf
    assert launch.route(fastqkv._validate.plan_attention(q, k, v, **kw)) == "stream"
    _check(q, k, v, **kw)


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
        testing.assert_close(out, base, np.float32, cond=20)
        testing.assert_close(lse, lse0, np.float32, cond=20)


def test_empty_and_fully_masked_splits(forced):
    """A window leaves whole splits without visible keys; sequence 1 has none."""
    forced(16, 8)
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 3, 4, 2, 2, 200, 16)
    kl = np.array([200, 0, 40])
    k[0, :, :100] = np.nan                    # outside the window of both rows
    v[0, :, :100] = np.nan
    out, lse = _run(q, k, v, key_lens=kl, window=(30, 0))
    ref, ref_lse = reference.attention(q, k, v, key_lens=kl, window=(30, 0), return_lse=True)
    testing.assert_close(out, ref, np.float32, cond=20)
    testing.assert_close(lse, ref_lse, np.float32, cond=20)
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
    dt = _dtype(dtype)
    rng = np.random.default_rng(D + Dv)
    q, k, v = _qkv(rng, 2, Hq, 2, 1, 75, D, dt, Dv=Dv)
    kl = np.array([75, 30])
    _check(q, k, v, key_lens=kl)
    _check(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), layout="blhd",
           key_lens=kl)
    kc, vc, bt = _paginate(rng, k, v, kl, 16)
    _check_paged(q, kc, vc, bt, kl)


def test_decode_large_logits_and_negative_scale():
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, 1, 4, 1, 1, 700, 16)
    _check(q * 300, k, v)
    _check(q, k, v, scale=-0.9)


# ---------------------------------------------------------------------------
# paged KV cache

@pytest.mark.parametrize("bs", [1, 3, 16, 64, 333])
@pytest.mark.parametrize("Lq,kw", [(1, {}), (4, {"causal": True}), (40, {"causal": True}),
                                   (40, {"causal": True, "window": (60, -1)})],
                         ids=["decode", "lq4-causal", "prefill40-causal", "prefill40-window"])
def test_paged_equals_dense(bs, Lq, kw, forced):
    forced(0 if Lq > 1 else 100, 16)
    rng = np.random.default_rng(bs)
    L = 333
    lens = np.array([333, 47, 200]) if Lq == 1 else np.array([333, 47, 200]).clip(Lq)
    q, k, v = _qkv(rng, 3, 8, 2, Lq, L, 16)
    kc, vc, bt = _paginate(rng, k, v, lens, bs)
    out, lse = _check_paged(q, kc, vc, bt, lens, **kw)
    dense, dlse = _run(q, k, v, key_lens=lens, **kw)
    testing.assert_close(out, dense, np.float32, cond=20)
    testing.assert_close(lse, dlse, np.float32, cond=20)


def test_paged_chunked_prefill_equals_full_prefill():
    """Prefill in chunks against the paged cache = the last rows of one full prefill."""
    rng = np.random.default_rng(21)
    L, bs = 150, 16
    q, k, v = _qkv(rng, 1, 8, 2, L, L, 32)
    full, full_lse = _run(q, k, v, causal=True)
    kc, vc, bt = _paginate(rng, k, v, np.array([L]), bs)
    start = 0
    for chunk in (50, 17, 1, 60, 22):
        end = start + chunk
        out, lse = fastqkv.paged_attention(q[:, :, start:end], kc, vc, bt, np.array([end]),
                                           causal=True, return_lse=True, backend=BACKEND)
        testing.assert_close(out, full[:, :, start:end], np.float32, cond=20)
        testing.assert_close(lse, full_lse[:, :, start:end], np.float32, cond=20)
        start = end
    assert start == L


@pytest.mark.parametrize("kw", [{"softcap": 5.0}, {"alibi_slopes": np.array([0.5, 0.1, 0.2, 0.3])},
                                {"mask": "random"}], ids=["softcap", "alibi", "mask"])
def test_paged_with_options(kw, rng):
    """Options the streaming kernel does not take: gathered, then the tiled kernel."""
    q, k, v = _qkv(rng, 2, 4, 2, 3, 70, 8)
    lens = np.array([70, 20])
    kc, vc, bt = _paginate(rng, k, v, lens, 16)
    if "mask" in kw:
        kw = {"mask": rng.random((2, 4, 3, bt.shape[1] * 16)) < 0.7}
    _check_paged(q, kc, vc, bt, lens, **kw)


def test_paged_gqa_ratios():
    rng = np.random.default_rng(22)
    for hq, g in ((8, 1), (8, 4), (8, 8), (32, 16), (32, 32)):
        q, k, v = _qkv(rng, 2, hq, hq // g, 1, 100, 16)
        lens = np.array([100, 0])
        kc, vc, bt = _paginate(rng, k, v, lens, 7)
        _check_paged(q, kc, vc, bt, lens)


def test_paged_layout_blhd(rng):
    q, k, v = _qkv(rng, 2, 4, 2, 3, 50, 8)
    lens = np.array([50, 9])
    kc, vc, bt = _paginate(rng, k, v, lens, 8)
    _check_paged(q.transpose(0, 2, 1, 3), kc, vc, bt, lens, layout="blhd", causal=True)


# ---------------------------------------------------------------------------
# float16 / bfloat16

@pytest.mark.parametrize("case", testing.generate_cases(quick=True, dtypes=HALF), ids=lambda c: c.name)
def test_half_generated_cases(case):
    testing.check_case(case, BACKEND, num_threads=2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("split", [0, 40])
def test_half_decode(dtype, split, forced):
    forced(split, 16)
    dt = _dtype(dtype)
    rng = np.random.default_rng(31)
    q, k, v = _qkv(rng, 2, 8, 2, 1, 300, 64, dt)
    kl = np.array([300, 101])
    k[1, :, 101:] = np.nan
    _check(q, k, v, key_lens=kl)
    _check(q, k, v, key_lens=kl, window=(50, -1))


@pytest.mark.parametrize("dtype", HALF)
def test_half_paged(dtype, rng):
    dt = _dtype(dtype)
    q, k, v = _qkv(rng, 2, 8, 2, 1, 120, 32, dt)
    lens = np.array([120, 33])
    kc, vc, bt = _paginate(rng, k, v, lens, 16)
    out, lse = _check_paged(q, kc, vc, bt, lens)
    assert out.dtype == dt and lse.dtype == np.float32
    q2 = rng.standard_normal((2, 8, 20, 32)).astype(dt)
    _check_paged(q2, kc, vc, bt, np.array([120, 40]), causal=True)       # prefill with a cache
    _check_paged(q2, kc, vc, bt, np.array([120, 40]), causal=True, softcap=4.0)


@pytest.mark.parametrize("dtype", HALF)
def test_half_output_rounding(dtype):
    """The output is the float32 result rounded to nearest even: with one key
    it is exactly v, and with two keys of equal score their mean."""
    dt = _dtype(dtype)
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
    for kind, dt in ((1, np.dtype(np.float16)), (2, _dtype("bfloat16") if "bfloat16" in HALF else None)):
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
        z = np.zeros((1, 2, 3), _dtype(dt))
        assert _numba.supports(fastqkv._validate.plan_attention(z, z, z)) is None
