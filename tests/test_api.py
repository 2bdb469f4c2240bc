"""The public functions built on the dispatched kernel agree with the oracle."""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference as R
from fastqkv import testing

BACKENDS = [n for n, i in fastqkv.backends().items() if i.available]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_weights(rng, backend):
    q = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
    mask = rng.random((2, 1, 6, 9)) < 0.7
    mask[0, 0, 2] = False
    kw = dict(mask=mask, causal=True, key_lens=np.array([9, 7]), softcap=3.0)
    w = fastqkv.attention_weights(q, k, backend=backend, **kw)
    want = R.attention_weights(q, k, **kw)
    assert w.shape == want.shape == (2, 4, 6, 9) and w.dtype == np.float32
    testing.assert_close(w, want, np.float32, cond=testing.condition_number(q, k))
    assert fastqkv.attention_weights(q[0, 0], k[0, 0], backend=backend).shape == (6, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention(rng, backend):
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) / 4 for s in ((32, 32), (32, 16), (32, 16), (32, 32))]
    y = fastqkv.self_attention(x, *ws, num_heads=4, num_kv_heads=2, causal=True, backend=backend)
    want = R.self_attention(x, *ws, num_heads=4, num_kv_heads=2, causal=True)
    assert y.dtype == np.float32 and y.shape == (2, 7, 32)
    # scores of head dim 8 from the projections; the output projection sums 32 terms
    cond = testing.condition_number(x @ ws[0], x @ ws[1], 1 / np.sqrt(8)) * np.sqrt(32)
    testing.assert_close(y, want, np.float32, cond=cond, vmax=np.abs(want).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen(rng, backend):
    case = testing.generate_cases(dtypes=("float32",), kinds=("varlen",))[0]
    o, _ = testing.check_case(case, backend)
    cq = case.args[0]
    assert case.name.endswith("mqa4-causal-empty") and cq[3] > cq[2]
    assert (o[cq[2]:cq[3]] == 0).all()                    # sequence with no keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged(rng, backend):
    kc = rng.standard_normal((9, 4, 2, 8)).astype(np.float32)
    vc = rng.standard_normal((9, 4, 2, 8)).astype(np.float32)
    bt = np.array([[3, 1, 7], [0, 8, -1]])
    sl = np.array([11, 6])
    q = rng.standard_normal((2, 4, 2, 8)).astype(np.float32)
    testing.check_case(testing.Case("paged", q, kc, vc, {"causal": True}, fn="paged_attention", args=(bt, sl)),
                       backend)


def test_merge(rng):
    o1, o2 = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    l1, l2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    got = fastqkv.merge_attention([o1, o2], [l1, l2])
    want = R.merge_attention([o1, o2], [l1, l2])
    np.testing.assert_array_equal(got[0], want[0])
    # blhd: lse stays (B, H, L)
    ob = fastqkv.merge_attention([o1.transpose(0, 2, 1, 3), o2.transpose(0, 2, 1, 3)], [l1, l2],
                                 layout="blhd")
    np.testing.assert_allclose(ob[0], want[0].transpose(0, 2, 1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_work_and_zero_keys(backend):
    q = np.ones((2, 4, 3, 8), np.float32)
    k = np.ones((2, 2, 5, 8), np.float32)
    out, lse = fastqkv.attention(q[:0], k[:0], k[:0], return_lse=True, backend=backend)
    assert out.shape == (0, 4, 3, 8) and lse.shape == (0, 4, 3)
    out, lse = fastqkv.attention(q[:, :, :0], k, k, return_lse=True, backend=backend)
    assert out.shape == (2, 4, 0, 8)
    out, lse = fastqkv.attention(q, k[:, :, :0], k[:, :, :0], return_lse=True, backend=backend)
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_types(rng, backend):
    q = rng.standard_normal((3, 5, 8))
    out = fastqkv.attention(q, q, q, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (3, 5, 8)
    out, lse = fastqkv.attention(q, q, q, return_lse=True, backend=backend)
    assert lse.shape == (3, 5) and lse.dtype == np.float64


def test_array_likes_are_accepted(rng):
    q = rng.standard_normal((3, 4))
    out = fastqkv.attention(q.tolist(), q.tolist(), q.tolist())
    np.testing.assert_allclose(out, R.attention(q, q, q))
    mv = memoryview(np.ascontiguousarray(q.astype(np.float32)))
    assert fastqkv.attention(mv, mv, mv).dtype == np.float32


class _DLPackOnly:
    """An array producer that speaks DLPack and nothing else."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_producers_are_viewed_without_copy(rng):
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    out = fastqkv.attention(_DLPackOnly(q), _DLPackOnly(q), _DLPackOnly(q))
    testing.assert_close(out, R.attention(q, q, q), np.float32, cond=testing.condition_number(q, q))
    assert np.shares_memory(fastqkv._validate.as_array(_DLPackOnly(q), "q"), q)


def test_warmup_reports_available_backends():
    done = fastqkv.warmup()
    assert "numpy" in done
    assert set(done) <= {n for n, i in fastqkv.backends().items() if i.available}


def test_non_native_byte_order_inputs(rng):
    q = rng.standard_normal((2, 3, 5, 4))
    want = R.attention(q, q, q, causal=True)
    for backend in BACKENDS:
        got = fastqkv.attention(q.astype(">f8"), q, q.astype(">f8"), causal=True, backend=backend)
        testing.assert_close(got, want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_matches_full_path(rng, dtype):
    q = rng.standard_normal((2, 4, 9, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 11, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, 11, 8)).astype(dtype)
    for causal in (False, True):
        o1, l1 = fastqkv.attention(q, k, v, causal=causal, return_lse=True, scale=0.3)
        o2, l2 = fastqkv.attention(q, k, v, causal=causal, return_lse=True, scale=0.3,
                                   out=np.empty_like(o1))
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(l1, l2)
        assert o1.dtype == dtype and l1.dtype == (np.float64 if dtype == np.float64 else np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float64"] + [d.name for d in testing.half_dtypes()])
def test_merge_matches_oracle_on_edge_rows(dtype, rng):
    """fastqkv's merge (in the lse precision) against the oracle's (float64):
    three partials, rows with a -inf partial whose output is NaN (not read),
    all -inf, a NaN lse, huge lse gaps."""
    dt = testing.as_dtype(dtype)
    acc = np.float64 if dtype == "float64" else np.float32
    outs = [rng.standard_normal((2, 3, 4, 5)).astype(dt) for _ in range(3)]
    lses = [(rng.standard_normal((2, 3, 4)) * 3).astype(acc) for _ in range(3)]
    lses[0][0, 0, 0] = -np.inf
    outs[0][0, 0, 0] = np.nan
    for x in lses:
        x[0, 1, 1] = -np.inf
    lses[2][1, 2, 3] = np.nan
    lses[1][1, 0, 0] = 1e4
    for layout in ("bhld", "blhd"):
        o = [x if layout == "bhld" else x.transpose(0, 2, 1, 3) for x in outs]
        got, glse = fastqkv.merge_attention(o, lses, layout=layout)
        want, wlse = R.merge_attention(o, lses, layout=layout)
        assert got.dtype == want.dtype and glse.dtype == wlse.dtype
        testing.assert_close(got, want, dt, cond=2, vmax=4)
        testing.assert_close(glse, wlse, dt, cond=1e4)


def test_paged_packed_queries_bad_input(rng):
    kc = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    table = np.array([[0, 1, 2], [3, 4, 5]])
    q = rng.standard_normal((5, 4, 8)).astype(np.float32)
    call = lambda cu, lens=(12, 9), **kw: fastqkv.paged_attention(  # noqa: E731
        q, kc, kc, table, np.array(lens), cu_seqlens_q=np.array(cu), **kw)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        call([0, 4, 3])
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the packed length 5, got 6"):
        call([0, 2, 6])
    with pytest.raises(ValueError, match="cu_seqlens_q must have length B \\+ 1 = 3"):
        call([0, 5])
    with pytest.raises(ValueError, match="sequence 1 has 4 queries but only 3 keys"):
        call([0, 1, 5], lens=(12, 3))
    with pytest.raises(ValueError, match=r"seq_lens must lie in \[0, max_blocks \* block_size = 12\]"):
        call([0, 1, 5], lens=(13, 9))
    with pytest.raises(ValueError, match="mask is not supported with cu_seqlens_q"):
        call([0, 1, 5], mask=np.ones((2, 4, 1, 12), bool))
    with pytest.raises(ValueError, match="layout does not apply"):
        call([0, 1, 5], layout="blhd")
    with pytest.raises(ValueError, match="q must be 3-D"):
        fastqkv.paged_attention(q[None], kc, kc, table, np.array([12, 9]), cu_seqlens_q=[0, 1, 5])
    got, lse = call([0, 1, 5], return_lse=True, causal=True)
    want, wlse = R.paged_attention(q, kc, kc, table, np.array([12, 9]), cu_seqlens_q=np.array([0, 1, 5]),
                                   causal=True, return_lse=True)
    testing.assert_close(got, want, np.float32, cond=10, vmax=3)
    assert lse.shape == (4, 5)
