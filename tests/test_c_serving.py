"""Serving paths of the C backend against the oracle: the streaming kernel
(decode), split-KV with the LSE merge (forced through the test hook), paged
KV caches and float16/bfloat16 storage; at 1 and 2 threads, every ISA."""

import contextlib

import numpy as np
import pytest

import fastqkv
from fastqkv import _c, reference, testing

pytestmark = pytest.mark.skipif(not fastqkv.backends()["c"].available,
                                reason=f"c backend unavailable: {fastqkv.backends()['c'].reason}")

ISAS = _c.isa_variants()


@pytest.fixture(params=ISAS)
def isa(request):
    with _c.forced_isa(request.param):
        yield request.param


@pytest.fixture
def decode_hook():
    """set(stream, splits): stream 0 auto / 1 the tiled / 2 the streaming kernel
    wherever the call allows it; splits 0 auto / n forced."""
    from fastqkv import _problem

    routes = {0: None, 1: "tile", 2: "stream"}
    with contextlib.ExitStack() as stack:
        def set_hooks(stream, splits):
            stack.enter_context(_problem.force_route(routes[stream]))
            _c.set_splits(splits)

        try:
            yield set_hooks
        finally:
            _c.set_splits(0)


# (name, (B, Hq, Hkv, Lq, Lk, D, Dv), kwargs)
DECODE = [
    ("mha-decode", (2, 3, 3, 1, 150, 16, 16), {}),
    ("gqa4-decode-ragged", (3, 8, 2, 1, 200, 32, 32), dict(key_lens=np.array([200, 0, 77]))),
    ("gqa8-decode-causal", (2, 16, 2, 1, 130, 64, 48), dict(causal=True, key_lens=np.array([1, 130]))),
    ("gqa8-decode-odd", (2, 16, 2, 1, 77, 67, 40), {}),
    ("gqa4-spec-causal", (2, 8, 2, 5, 90, 24, 24), dict(causal=True, key_lens=np.array([90, 7]))),
    ("gqa4-q16-window", (1, 4, 1, 16, 120, 8, 8), dict(causal=True, window=(20, 0))),
    ("odd-dims", (1, 2, 1, 3, 67, 3, 5), dict(window=(10, 4))),
    # rows in vector lanes (the transposed path): MQA, odd D and Dv, and a
    # causal multi-token step whose last tile takes the row path
    ("mqa32-decode-ragged", (2, 32, 1, 1, 150, 80, 72), dict(key_lens=np.array([150, 37]))),
    ("gqa16-decode-odd", (1, 32, 2, 1, 100, 67, 33), {}),
    ("gqa8-spec-causal", (2, 16, 2, 4, 90, 16, 16), dict(causal=True, key_lens=np.array([90, 50]))),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("name,shape,kw", DECODE, ids=[d[0] for d in DECODE])
def test_split_kv_matches_oracle(name, shape, kw, splits, threads, isa, decode_hook):
    """Every split count (incl. empty and fully masked splits) equals the oracle."""
    decode_hook(0, splits)
    rng = np.random.default_rng(len(name) + splits)
    case = testing.make_case(name, rng, *shape, **kw)
    testing.check_case(case, backend="c", num_threads=threads)


def test_split_and_unsplit_agree(decode_hook):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 1, 64), np.float32)
    k = rng.standard_normal((1, 2, 3000, 64), np.float32)
    v = rng.standard_normal((1, 2, 3000, 64), np.float32)
    outs = []
    for s in (1, 4, 13):
        decode_hook(0, s)
        outs.append(fastqkv.attention(q, k, v, return_lse=True, backend="c"))
    for o, l in outs[1:]:
        np.testing.assert_allclose(o, outs[0][0], atol=2e-6)
        np.testing.assert_allclose(l, outs[0][1], atol=2e-6)


def test_nan_value_beyond_split_visible_range(decode_hook):
    """NaN/inf in keys a row cannot see (causal tail, key_lens) never reach it."""
    decode_hook(0, 5)
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
def test_streaming_kernel_on_generated_cases(case, splits, isa, decode_hook):
    """The streaming kernel forced on every generated case it can run (any Lq)."""
    decode_hook(2, splits)
    testing.check_case(case, backend="c", num_threads=2)


# ---------------------------------------------------------------------------
# paged KV caches

def _paged(rng, k, v, seq_lens, bs, extra_cols=2):
    """Scatter dense (B, Hkv, Lk, D) K/V into shuffled blocks of a cache
    (num_blocks, bs, Hkv, D); table entries past each sequence's last block
    hold junk ids that must never be read."""
    B, Hkv, Lk, D = k.shape
    nbs = -(-Lk // bs)
    cols = nbs + extra_cols
    nblocks = B * nbs + 3
    perm = rng.permutation(nblocks)
    kc = rng.standard_normal((nblocks, bs, Hkv, D)).astype(k.dtype)
    vc = rng.standard_normal((nblocks, bs, Hkv, v.shape[-1])).astype(v.dtype)
    kc[perm[-3:]] = np.nan                      # unused blocks: poison
    vc[perm[-3:]] = np.nan
    table = np.full((B, cols), 1 << 40, np.int64)
    for b in range(B):
        n = int(seq_lens[b])
        for j in range(-(-n // bs)):
            blk = perm[b * nbs + j]
            table[b, j] = blk
            m = min(bs, n - j * bs)
            kc[blk, :m] = k[b, :, j * bs: j * bs + m].transpose(1, 0, 2)
            vc[blk, :m] = v[b, :, j * bs: j * bs + m].transpose(1, 0, 2)
    return kc, vc, table


def _check_paged(q, k, v, seq_lens, bs, threads=2, **kw):
    rng = np.random.default_rng(bs)
    kc, vc, table = _paged(rng, k, v, seq_lens, bs)
    want, want_lse = reference.attention(q, k, v, key_lens=seq_lens, return_lse=True, **kw)
    with testing._threads(threads):
        got, lse = fastqkv.paged_attention(q, kc, vc, table, seq_lens, return_lse=True,
                                           backend="c", **kw)
    tol = 5e-6 if q.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)
    return got


PAGED = [
    # name, (B, Hq, Hkv, Lq, Lk, D), seq_lens, kwargs
    ("mha-decode", (3, 2, 2, 1, 70, 16), [70, 0, 33], dict(causal=True)),
    ("gqa4-decode", (2, 8, 2, 1, 100, 32), [100, 64], {}),
    ("gqa8-decode", (1, 16, 2, 1, 129, 64), [129], dict(causal=True)),
    ("gqa4-chunk-prefill", (2, 8, 2, 20, 90, 16), [90, 41], dict(causal=True)),
    ("gqa4-window", (2, 4, 1, 3, 80, 8), [80, 5], dict(causal=True, window=(9, 0))),
    ("mqa32-decode", (2, 32, 1, 1, 100, 32), [100, 61], {}),
    ("gqa16-chunk-prefill", (1, 32, 2, 3, 70, 16), [70], dict(causal=True)),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bs", [1, 3, 16, 64, "len"])
@pytest.mark.parametrize("name,shape,seq,kw", PAGED, ids=[p[0] for p in PAGED])
def test_paged_equals_dense(name, shape, seq, kw, bs, threads, isa):
    B, Hq, Hkv, Lq, Lk, D = shape
    bs = Lk if bs == "len" else bs
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, Hq, Lq, D), np.float32)
    k = rng.standard_normal((B, Hkv, Lk, D), np.float32)
    v = rng.standard_normal((B, Hkv, Lk, D), np.float32)
    _check_paged(q, k, v, np.array(seq, np.int64), bs, threads=threads, **kw)


@pytest.mark.parametrize("splits", [2, 5])
def test_paged_split_kv(splits, decode_hook):
    decode_hook(0, splits)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 8, 1, 32), np.float64)
    k = rng.standard_normal((2, 2, 300, 32), np.float64)
    v = rng.standard_normal((2, 2, 300, 32), np.float64)
    _check_paged(q, k, v, np.array([300, 17]), 16)


def test_chunked_prefill_equals_last_rows_of_full_prefill():
    rng = np.random.default_rng(9)
    L, C = 150, 37
    x = rng.standard_normal((1, 8, L, 32), np.float32)
    k = rng.standard_normal((1, 2, L, 32), np.float32)
    v = rng.standard_normal((1, 2, L, 32), np.float32)
    full = fastqkv.attention(x, k, v, causal=True, backend="c")
    kc, vc, table = _paged(rng, k, v, np.array([L]), 16)
    chunk = fastqkv.paged_attention(x[:, :, L - C:], kc, vc, table, np.array([L]), causal=True,
                                    backend="c")
    np.testing.assert_allclose(chunk, full[:, :, L - C:], atol=3e-6)


def test_paged_with_score_options_is_densified():
    rng = np.random.default_rng(10)
    q = rng.standard_normal((2, 4, 2, 16), np.float32)
    k = rng.standard_normal((2, 2, 40, 16), np.float32)
    v = rng.standard_normal((2, 2, 40, 16), np.float32)
    _check_paged(q, k, v, np.array([40, 11]), 4, softcap=3.0, causal=True)


def test_paged_blhd_layout():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 1, 8, 16), np.float32)          # (B, Lq, Hq, D)
    k = rng.standard_normal((2, 2, 50, 16), np.float32)
    v = rng.standard_normal((2, 2, 50, 16), np.float32)
    seq = np.array([50, 23])
    kc, vc, table = _paged(rng, k, v, seq, 8)
    got = fastqkv.paged_attention(q, kc, vc, table, seq, layout="blhd", backend="c")
    want = reference.attention(q.transpose(0, 2, 1, 3), k, v, key_lens=seq)
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3), atol=3e-6)


def test_module_checks_block_table():
    from fastqkv import _ckernels

    q = np.zeros((1, 2, 1, 8), np.float32)
    out = np.zeros_like(q)
    kc = np.zeros((4, 4, 1, 8), np.float32)
    lens = np.array([5], np.int64)
    for bad in (np.zeros((1, 2), np.int32), np.zeros((2, 2), np.int64), np.zeros(2, np.int64),
                np.zeros((1, 4), np.int64)[:, ::2]):
        with pytest.raises(ValueError, match="block_table"):
            _ckernels.attention(q, kc, kc, out, None, None, None, lens, None, 1.0, 0.0, -1, -1, 1,
                                1, bad, 4)
    with pytest.raises(ValueError, match="key_lens"):
        _ckernels.attention(q, kc, kc, out, None, None, None, np.array([9]), None, 1.0, 0.0, -1, -1,
                            1, 1, np.zeros((1, 2), np.int64), 4)


# ---------------------------------------------------------------------------
# float16 / bfloat16 storage

HALF_CASES = testing.generate_cases(dtypes=tuple(d.name for d in testing.half_dtypes()))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", HALF_CASES, ids=[c.name for c in HALF_CASES])
def test_half_generated_case(case, threads, isa):
    testing.check_case(case, backend="c", num_threads=threads)


@pytest.mark.parametrize("dt", testing.half_dtypes(), ids=lambda d: d.name)
def test_half_split_and_paged_decode(dt, isa, decode_hook):
    rng = np.random.default_rng(12)
    q = rng.standard_normal((2, 8, 1, 64)).astype(dt)
    k = rng.standard_normal((2, 2, 500, 64)).astype(dt)
    v = rng.standard_normal((2, 2, 500, 64)).astype(dt)
    seq = np.array([500, 123])
    want, want_lse = reference.attention(q, k, v, key_lens=seq, return_lse=True)
    kc, vc, table = _paged(rng, k, v, seq, 16)
    for splits in (1, 6):
        decode_hook(0, splits)
        for got, lse in (fastqkv.attention(q, k, v, key_lens=seq, return_lse=True, backend="c"),
                         fastqkv.paged_attention(q, kc, vc, table, seq, return_lse=True, backend="c")):
            assert got.dtype == dt and lse.dtype == np.float32
            testing.assert_close(got, want, dt, cond=8.0, what="out")
            testing.assert_close(lse, want_lse, dt, cond=8.0, what="lse")


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
