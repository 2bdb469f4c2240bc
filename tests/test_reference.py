"""Self-tests of the oracle that do not trust the oracle."""

import math

import numpy as np
import pytest

import fastqkv
from fastqkv import reference as R
from fastqkv import testing


def loop_attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                   window=None, softcap=None, alibi=None, sinks=None):
    """Independent implementation: 4-D bhld float64 inputs, plain Python loops;
    a sink is one more term of the normaliser with no value."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    left, right = window if window is not None else (-1, -1)
    out = np.zeros((B, Hq, Lq, Dv))
    lse = np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        lkb = Lk if key_lens is None else int(key_lens[b])
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(Lq):
                ip = i + lkb - Lq
                terms = []
                for j in range(lkb):
                    if causal and j > ip:
                        continue
                    if left >= 0 and j < ip - left:
                        continue
                    if right >= 0 and j > ip + right:
                        continue
                    if mask is not None and not mask[b, h, i, j]:
                        continue
                    s = scale * sum(float(q[b, h, i, d]) * float(k[b, g, j, d]) for d in range(D))
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if bias is not None:
                        s += float(bias[b, h, i, j])
                    if alibi is not None:
                        s -= float(alibi[h]) * abs(ip - j)
                    if s != -math.inf:
                        terms.append((s, j))
                sink = -math.inf if sinks is None else float(sinks[h])
                if not terms:
                    lse[b, h, i] = sink
                    continue
                m = max(max(s for s, _ in terms), sink)
                tot = sum(math.exp(s - m) for s, _ in terms) + math.exp(sink - m)
                for s, j in terms:
                    out[b, h, i] += math.exp(s - m) / tot * v[b, g, j]
                lse[b, h, i] = m + math.log(tot)
    return out, lse


def test_hand_computed_single_query():
    q = np.array([[1.0, 0.0]])
    k = np.array([[1.0, 0.0], [0.0, 1.0]])
    v = np.array([[1.0, 2.0], [3.0, 4.0]])
    out, lse = R.attention(q, k, v, scale=1.0, return_lse=True)
    e = math.e
    w0, w1 = e / (e + 1), 1 / (e + 1)
    np.testing.assert_allclose(out, [[w0 * 1 + w1 * 3, w0 * 2 + w1 * 4]], rtol=1e-15)
    np.testing.assert_allclose(lse, [math.log(e + 1)], rtol=1e-15)


def test_hand_computed_causal_bottom_right():
    # Lq=1 against Lk=3 causal: the query is the last position and sees every key
    q = np.zeros((1, 2))
    k = np.zeros((3, 2))
    v = np.array([[3.0], [6.0], [9.0]])
    np.testing.assert_allclose(R.attention(q, k, v, causal=True), [[6.0]])
    # Lq=2 against Lk=3: row 0 sees keys 0-1, row 1 sees all three
    out = R.attention(np.zeros((2, 2)), k, v, causal=True)
    np.testing.assert_allclose(out, [[4.5], [6.0]])


def test_hand_computed_window_and_mask():
    q = np.zeros((3, 1))
    k = np.zeros((3, 1))
    v = np.array([[1.0], [10.0], [100.0]])
    np.testing.assert_allclose(R.attention(q, k, v, window=(0, 0)), v)
    np.testing.assert_allclose(R.attention(q, k, v, window=(1, 0)), [[1.0], [5.5], [55.0]])
    mask = np.array([[True, False, False], [False, False, False], [True, True, True]])
    out, lse = R.attention(q, k, v, mask=mask, return_lse=True)
    np.testing.assert_allclose(out, [[1.0], [0.0], [37.0]])
    assert np.isneginf(lse[1]) and np.isfinite(lse[[0, 2]]).all()


_LOOP_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (2, 1)},
    "key_lens": {"key_lens": np.array([3, 6])},
    "softcap": {"softcap": 2.0, "scale": 3.0},
    "bias": {"bias": "rand"},
    "mask": {"mask": "rand"},
    "alibi": {"alibi": np.array([0.5, 0.1, 0.3, 0.7]), "causal": True},
    "all": {"causal": True, "window": (3, -1), "key_lens": np.array([5, 6]), "softcap": 4.0,
            "bias": "rand", "mask": "rand", "alibi": np.array([0.2, 0.1, 0.3, 0.4])},
}


@pytest.mark.parametrize("name", sorted(_LOOP_CASES))
def test_matches_loop_implementation(name, rng):
    q = rng.standard_normal((2, 4, 4, 5))
    k = rng.standard_normal((2, 2, 6, 5))
    v = rng.standard_normal((2, 2, 6, 3))
    opts = dict(_LOOP_CASES[name])
    if opts.get("bias") == "rand":
        opts["bias"] = rng.standard_normal((2, 4, 4, 6))
    if opts.get("mask") == "rand":
        opts["mask"] = rng.random((2, 4, 4, 6)) < 0.7
    want_out, want_lse = loop_attention(q, k, v, **opts)
    if "alibi" in opts:
        opts["alibi_slopes"] = opts.pop("alibi")
    out, lse = R.attention(q, k, v, return_lse=True, **opts)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_weights_rows_sum_to_one(rng):
    q = rng.standard_normal((2, 4, 7, 8))
    k = rng.standard_normal((2, 2, 9, 8))
    mask = rng.random((2, 1, 7, 9)) < 0.6
    mask[0, 0, 3] = False
    w = R.attention_weights(q, k, mask=mask, causal=True)
    sums = w.sum(-1)
    visible_rows = (np.broadcast_to(mask, w.shape) & (np.tril(np.ones((7, 9)), 2) > 0)).any(-1)
    np.testing.assert_allclose(sums[visible_rows], 1.0, rtol=1e-12)
    assert (sums[~visible_rows] == 0).all() and (~visible_rows).any()
    # and the weights reproduce attention
    v = rng.standard_normal((2, 2, 9, 3))
    np.testing.assert_allclose(w @ np.repeat(v, 2, axis=1), R.attention(q, k, v, mask=mask, causal=True),
                               atol=1e-12)


def test_gqa_equals_repeated_kv(rng):
    q = rng.standard_normal((1, 8, 5, 4))
    k = rng.standard_normal((1, 2, 6, 4))
    v = rng.standard_normal((1, 2, 6, 4))
    np.testing.assert_allclose(R.attention(q, k, v, causal=True),
                               R.attention(q, np.repeat(k, 4, 1), np.repeat(v, 4, 1), causal=True),
                               rtol=1e-14)


def test_blhd_equals_transposed_bhld(rng):
    q = rng.standard_normal((2, 5, 4, 8))
    k = rng.standard_normal((2, 7, 2, 8))
    v = rng.standard_normal((2, 7, 2, 3))
    o1, l1 = R.attention(q, k, v, layout="blhd", causal=True, return_lse=True)
    o2, l2 = R.attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                         causal=True, return_lse=True)
    np.testing.assert_array_equal(o1, o2.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(l1, l2)


def test_key_lens_equals_slicing(rng):
    q = rng.standard_normal((2, 2, 3, 4))
    k = rng.standard_normal((2, 2, 10, 4))
    v = rng.standard_normal((2, 2, 10, 4))
    out = R.attention(q, k, v, key_lens=np.array([4, 10]), causal=True)
    np.testing.assert_allclose(out[0], R.attention(q[:1], k[:1, :, :4], v[:1, :, :4], causal=True)[0])
    np.testing.assert_allclose(out[1], R.attention(q[1:], k[1:], v[1:], causal=True)[0])


def test_varlen_equals_per_sequence_loop(rng):
    lq, lk = [3, 0, 1, 5], [4, 2, 6, 5]
    cq, ck = np.cumsum([0] + lq), np.cumsum([0] + lk)
    q = rng.standard_normal((cq[-1], 4, 8))
    k = rng.standard_normal((ck[-1], 2, 8))
    v = rng.standard_normal((ck[-1], 2, 6))
    out, lse = R.attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True)
    assert out.shape == (cq[-1], 4, 6) and lse.shape == (4, cq[-1])
    for b in range(4):
        if lq[b] == 0:
            continue
        o, l = R.attention(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                           layout="blhd", causal=True, return_lse=True)
        np.testing.assert_allclose(out[cq[b]:cq[b + 1]], o)
        np.testing.assert_allclose(lse[:, cq[b]:cq[b + 1]], l)


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_paged_equals_dense(rng, block_size):
    B, Hq, Hkv, Lq, D = 2, 4, 2, 2, 8
    seq = np.array([7, 12])
    maxb = -(-12 // block_size)
    k_dense = rng.standard_normal((B, maxb * block_size, Hkv, D))
    v_dense = rng.standard_normal((B, maxb * block_size, Hkv, D))
    nblocks = B * maxb + 3
    perm = rng.permutation(nblocks)[: B * maxb].reshape(B, maxb)
    kc = rng.standard_normal((nblocks, block_size, Hkv, D))
    vc = rng.standard_normal((nblocks, block_size, Hkv, D))
    for b in range(B):
        for t in range(maxb):
            kc[perm[b, t]] = k_dense[b, t * block_size:(t + 1) * block_size]
            vc[perm[b, t]] = v_dense[b, t * block_size:(t + 1) * block_size]
    q = rng.standard_normal((B, Hq, Lq, D))
    bt = perm.copy()
    bt[0, -(-7 // block_size):] = -1                      # unused entries are never read
    got = R.paged_attention(q, kc, vc, bt, seq, causal=True)
    want = R.attention(q, k_dense.transpose(0, 2, 1, 3), v_dense.transpose(0, 2, 1, 3),
                       key_lens=seq, causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_merge_of_two_halves_equals_whole(rng):
    q = rng.standard_normal((1, 2, 4, 8))
    k = rng.standard_normal((1, 2, 10, 8))
    v = rng.standard_normal((1, 2, 10, 5))
    o1, l1 = R.attention(q, k[:, :, :6], v[:, :, :6], return_lse=True)
    o2, l2 = R.attention(q, k[:, :, 6:], v[:, :, 6:], return_lse=True)
    o, lse = R.merge_attention([o1, o2], [l1, l2])
    ow, lw = R.attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(o, ow, rtol=1e-13)
    np.testing.assert_allclose(lse, lw, rtol=1e-13)


def test_merge_fully_masked_partials(rng):
    o1 = rng.standard_normal((3, 4))
    l1 = rng.standard_normal(3)
    dead = np.full((3, 4), np.nan)                         # never read
    o, lse = R.merge_attention([dead, o1], [np.full(3, -np.inf), l1])
    np.testing.assert_allclose(o, o1)
    np.testing.assert_allclose(lse, l1)
    o, lse = R.merge_attention([dead, dead], [np.full(3, -np.inf)] * 2)
    assert (o == 0).all() and np.isneginf(lse).all()


def test_huge_logits_do_not_overflow(rng):
    q = rng.standard_normal((4, 8)) * 1e4 / 8
    k = rng.standard_normal((6, 8))
    v = rng.standard_normal((6, 3))
    out, lse = R.attention(q, k, v, scale=1.0, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    s = q @ k.T
    np.testing.assert_allclose(lse, s.max(1) + np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)))
    out, lse = R.attention(q[:1] * 0 - 1e4, k, v, bias=np.zeros(6), scale=1.0, return_lse=True)
    assert np.isfinite(out).all()


def test_fully_masked_and_empty():
    q = np.ones((1, 2, 3, 4))
    k = np.ones((1, 2, 5, 4))
    v = np.ones((1, 2, 5, 4))
    out, lse = R.attention(q, k, v, mask=np.zeros(5, bool), return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()
    out, lse = R.attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert out.shape == (1, 2, 3, 4) and (out == 0).all() and np.isneginf(lse).all()
    out, lse = R.attention(q[:, :, :0], k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 4) and lse.shape == (1, 2, 0)
    assert R.attention(q[:0], k[:0], v[:0]).shape == (0, 2, 3, 4)


def test_nan_propagates_to_its_row_only(rng):
    q = rng.standard_normal((4, 3))
    k = rng.standard_normal((5, 3))
    v = rng.standard_normal((5, 2))
    q[2, 0] = np.nan
    out, lse = R.attention(q, k, v, return_lse=True)
    assert np.isnan(out[2]).all() and np.isnan(lse[2])
    assert np.isfinite(out[[0, 1, 3]]).all()
    # NaN in a key that no query may see stays out
    k2, v2 = k.copy(), v.copy()
    k2[4], v2[4] = np.nan, np.inf
    out = R.attention(q[[0]], k2, v2, key_lens=np.array([4]))
    assert np.isfinite(out).all()


def test_output_dtypes_follow_inputs(rng):
    for dt in [np.float32, np.float64] + testing.half_dtypes():
        q = rng.standard_normal((3, 4)).astype(dt)
        out, lse = R.attention(q, q, q, return_lse=True)
        assert out.dtype == dt
        assert lse.dtype == (np.float64 if dt == np.float64 else np.float32)


def test_self_attention_matches_manual(rng):
    x = rng.standard_normal((2, 5, 16))
    wq, wk, wv = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    wo = rng.standard_normal((16, 16))
    y = R.self_attention(x, wq, wk, wv, wo, num_heads=4, num_kv_heads=2, causal=True)
    q = (x @ wq).reshape(2, 5, 4, 4).transpose(0, 2, 1, 3)
    k = (x @ wk).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    v = (x @ wv).reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    o, _ = loop_attention(q, k, v, causal=True)
    np.testing.assert_allclose(y, o.transpose(0, 2, 1, 3).reshape(2, 5, 16) @ wo, rtol=1e-10)
    assert R.self_attention(x[0], wq, wk, wv, wo, num_heads=4, num_kv_heads=2).shape == (5, 16)


def test_out_argument_receives_result(rng):
    q = rng.standard_normal((2, 3, 4))
    out = np.full((2, 3, 4), np.nan)
    got = R.attention(q, q, q, out=out)
    assert got is out and np.isfinite(out).all()


def test_inputs_not_modified(rng):
    for case in testing.generate_cases(quick=True):
        testing.check_case(case, "numpy")
    assert fastqkv.reference.attention is R.attention


# ---------------------------------------------------------------------------
# attention sinks

def test_sinks_match_loop_implementation(rng):
    q = rng.standard_normal((2, 4, 5, 8))
    k = rng.standard_normal((2, 2, 9, 8))
    v = rng.standard_normal((2, 2, 9, 3))
    sinks = np.array([0.5, -2.0, 3.0, -np.inf])
    kl = np.array([9, 4])
    got, glse = R.attention(q, k, v, sinks=sinks, causal=True, key_lens=kl, return_lse=True)
    want, wlse = loop_attention(q, k, v, sinks=sinks, causal=True, key_lens=kl)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(glse, wlse, rtol=1e-12)


def test_sink_is_a_key_with_zero_value(rng):
    """A sink equals one more always-visible key whose score is the sink and
    whose value row is 0 (built here with a zero key and a bias column)."""
    q = rng.standard_normal((1, 3, 4, 6))
    k = rng.standard_normal((1, 3, 7, 6))
    v = rng.standard_normal((1, 3, 7, 5))
    sinks = rng.standard_normal(3) * 2
    k1 = np.concatenate([k, np.zeros((1, 3, 1, 6))], axis=2)
    v1 = np.concatenate([v, np.zeros((1, 3, 1, 5))], axis=2)
    bias = np.zeros((1, 3, 4, 8))
    bias[..., 7] = sinks[None, :, None]
    got, glse = R.attention(q, k, v, sinks=sinks, softcap=5.0, return_lse=True)
    # softcap applies to scale*q.k only; the extra key's q.k is 0, capped to 0
    want, wlse = R.attention(q, k1, v1, bias=bias, softcap=5.0, return_lse=True)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(glse, wlse, rtol=1e-13)


def test_sinks_merge_counts_the_sink_once(rng):
    q = rng.standard_normal((2, 4, 3, 8))
    k = rng.standard_normal((2, 2, 11, 8))
    v = rng.standard_normal((2, 2, 11, 5))
    sinks = rng.standard_normal(4)
    o1, l1 = R.attention(q, k[:, :, :4], v[:, :, :4], sinks=sinks, return_lse=True)
    o2, l2 = R.attention(q, k[:, :, 4:], v[:, :, 4:], return_lse=True)
    o, lse = R.merge_attention([o1, o2], [l1, l2])
    ow, lw = R.attention(q, k, v, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(o, ow, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(lse, lw, rtol=1e-13)


def test_sinks_fully_masked_rows_and_no_keys():
    q = np.ones((1, 2, 3, 4))
    k = np.ones((1, 2, 5, 4))
    v = np.ones((1, 2, 5, 4))
    sinks = np.array([1.5, -np.inf])
    out, lse = R.attention(q, k, v, mask=np.zeros(5, bool), sinks=sinks, return_lse=True)
    assert (out == 0).all()
    np.testing.assert_array_equal(lse, np.broadcast_to(sinks[None, :, None], (1, 2, 3)))
    out, lse = R.attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert (out == 0).all()
    np.testing.assert_array_equal(lse, np.broadcast_to(sinks[None, :, None], (1, 2, 3)))
    # -inf everywhere is no sink
    a = R.attention(q, k, v, sinks=np.full(2, -np.inf), return_lse=True)
    b = R.attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_sinks_weights_leave_the_sink_share_out(rng):
    q = rng.standard_normal((2, 3, 4))
    k = rng.standard_normal((2, 6, 4))
    sinks = np.array([0.3, -1.0])
    w = R.attention_weights(q, k, sinks=sinks)
    _, lse = R.attention(q, k, k, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(w.sum(-1), 1 - np.exp(sinks[:, None] - lse), rtol=1e-12)


def test_sinks_varlen_and_paged_follow_dense(rng):
    sinks = rng.standard_normal(4)
    seqs_q = [rng.standard_normal((n, 4, 8)) for n in (3, 0, 5)]
    seqs_k = [rng.standard_normal((n, 2, 8)) for n in (6, 4, 0)]
    q, cq = testing.varlen_pack(seqs_q)
    k, ck = testing.varlen_pack(seqs_k)
    out, lse = R.attention_varlen(q, k, k, cq, ck, causal=True, sinks=sinks, return_lse=True)
    o0, l0 = R.attention(seqs_q[0], seqs_k[0], seqs_k[0], layout="blhd", causal=True,
                         sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out[:3], o0, rtol=1e-13)
    np.testing.assert_allclose(lse[:, :3], l0, rtol=1e-13)
    assert (out[3:] == 0).all()                                   # the keyless sequence
    np.testing.assert_array_equal(lse[:, 3:], np.broadcast_to(sinks[:, None], (4, 5)))
