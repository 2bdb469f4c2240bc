"""Bad input raises TypeError/ValueError naming the argument, before any kernel runs."""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference

BACKENDS = [n for n, i in fastqkv.backends().items() if i.available]

f32 = np.float32
Q = np.zeros((2, 4, 3, 8), f32)
K = np.zeros((2, 2, 5, 8), f32)
V = np.zeros((2, 2, 5, 6), f32)


# (id, args, kwargs, exception, text the message must contain)
BAD_ATTENTION = [
    ("q-int", (Q.astype(np.int32), K, V), {}, TypeError, "q"),
    ("k-complex", (Q, K.astype(np.complex64), V), {}, TypeError, "k"),
    ("v-bool", (Q, K, V.astype(bool)), {}, TypeError, "v"),
    ("v-object", (Q, K, np.array([[object()]])), {}, TypeError, "v"),
    ("q-none", (None, K, V), {}, TypeError, "q"),
    ("mixed-dtypes", (Q, K.astype(np.float64), V), {}, TypeError, "dtype"),
    ("q-5d", (Q[None], K, V), {}, ValueError, "q"),
    ("q-1d", (Q[0, 0, 0], K[0, 0, 0], V[0, 0, 0]), {}, ValueError, "q"),
    ("ndim-mismatch", (Q, K[0], V), {}, ValueError, "dimensions"),
    ("batch-mismatch", (Q, K[:1], V[:1]), {}, ValueError, "batch"),
    ("heads-kv-mismatch", (Q, K, V[:, :1]), {}, ValueError, "heads"),
    ("len-kv-mismatch", (Q, K, V[:, :, :4]), {}, ValueError, "sequence length"),
    ("headdim-mismatch", (Q, K[..., :7], V), {}, ValueError, "head dim"),
    ("headdim-zero", (Q[..., :0], K[..., :0], V), {}, ValueError, "head dim"),
    ("v-headdim-zero", (Q, K, V[..., :0]), {}, ValueError, "v"),
    ("gqa-not-divisible", (Q[:, :3], K, V), {}, ValueError, "multiple"),
    ("layout-bad", (Q, K, V), {"layout": "bshd"}, ValueError, "layout"),
    ("mask-float", (Q, K, V), {"mask": np.ones((5,), f32)}, TypeError, "mask"),
    ("mask-int", (Q, K, V), {"mask": np.ones((5,), np.int8)}, TypeError, "mask"),
    ("mask-shape", (Q, K, V), {"mask": np.ones((4,), bool)}, ValueError, "mask"),
    ("mask-5d", (Q, K, V), {"mask": np.ones((1, 1, 1, 1, 5), bool)}, ValueError, "mask"),
    ("bias-int", (Q, K, V), {"bias": np.ones((5,), np.int64)}, TypeError, "bias"),
    ("bias-shape", (Q, K, V), {"bias": np.ones((3, 4), f32)}, ValueError, "bias"),
    ("key-lens-float", (Q, K, V), {"key_lens": np.array([1.0, 2.0])}, TypeError, "key_lens"),
    ("key-lens-shape", (Q, K, V), {"key_lens": np.array([1, 2, 3])}, ValueError, "key_lens"),
    ("key-lens-negative", (Q, K, V), {"key_lens": np.array([-1, 2])}, ValueError, "key_lens"),
    ("key-lens-too-long", (Q, K, V), {"key_lens": np.array([6, 2])}, ValueError, "key_lens"),
    ("scale-nan", (Q, K, V), {"scale": float("nan")}, ValueError, "scale"),
    ("scale-inf", (Q, K, V), {"scale": float("inf")}, ValueError, "scale"),
    ("scale-str", (Q, K, V), {"scale": "0.5"}, TypeError, "scale"),
    ("scale-bool", (Q, K, V), {"scale": True}, TypeError, "scale"),
    ("softcap-zero", (Q, K, V), {"softcap": 0.0}, ValueError, "softcap"),
    ("softcap-negative", (Q, K, V), {"softcap": -1.0}, ValueError, "softcap"),
    ("softcap-nan", (Q, K, V), {"softcap": float("nan")}, ValueError, "softcap"),
    ("window-int", (Q, K, V), {"window": 4}, TypeError, "window"),
    ("window-triple", (Q, K, V), {"window": (1, 2, 3)}, TypeError, "window"),
    ("window-below-minus-one", (Q, K, V), {"window": (-2, 0)}, ValueError, "window"),
    ("window-float", (Q, K, V), {"window": (1.5, 0)}, TypeError, "window"),
    ("causal-str", (Q, K, V), {"causal": "yes"}, TypeError, "causal"),
    ("return-lse-int", (Q, K, V), {"return_lse": 1}, TypeError, "return_lse"),
    ("alibi-shape", (Q, K, V), {"alibi_slopes": np.ones(3)}, ValueError, "alibi_slopes"),
    ("alibi-nan", (Q, K, V), {"alibi_slopes": np.full(4, np.nan)}, ValueError, "alibi_slopes"),
    ("alibi-int", (Q, K, V), {"alibi_slopes": np.ones(4, int)}, TypeError, "alibi_slopes"),
    ("sinks-shape", (Q, K, V), {"sinks": np.ones(2, f32)}, ValueError, "sinks"),
    ("sinks-per-batch", (Q, K, V), {"sinks": np.ones((2, 4), f32)}, ValueError, "sinks"),
    ("sinks-nan", (Q, K, V), {"sinks": np.array([0, np.nan, 0, 0])}, ValueError, "sinks"),
    ("sinks-plus-inf", (Q, K, V), {"sinks": np.array([0, np.inf, 0, 0])}, ValueError, "sinks"),
    ("sinks-int", (Q, K, V), {"sinks": np.ones(4, int)}, TypeError, "sinks"),
    ("out-list", (Q, K, V), {"out": [[0.0]]}, TypeError, "out"),
    ("out-dtype", (Q, K, V), {"out": np.zeros((2, 4, 3, 6), np.float64)}, TypeError, "out"),
    ("out-shape", (Q, K, V), {"out": np.zeros((2, 4, 3, 8), f32)}, ValueError, "out"),
    ("out-readonly", (Q, K, V), {"out": np.broadcast_to(np.zeros((), f32), (2, 4, 3, 6))}, ValueError, "out"),
    ("backend-unknown", (Q, K, V), {"backend": "cuda"}, ValueError, "backend"),
    ("backend-int", (Q, K, V), {"backend": 3}, TypeError, "backend"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_ATTENTION, ids=[c[0] for c in BAD_ATTENTION])
def test_bad_attention_input(backend, case):
    name, args, kwargs, exc, text = case
    with pytest.raises(exc, match=text):
        fastqkv.attention(*args, **{"backend": backend, **kwargs})
    if not name.startswith("backend"):  # the oracle raises the same errors
        with pytest.raises(exc, match=text):
            reference.attention(*args, **kwargs)


def test_out_overlapping_input_rejected():
    buf = np.zeros((2, 4, 3, 8), f32)
    with pytest.raises(ValueError, match="overlap"):
        fastqkv.attention(buf, K, np.zeros((2, 2, 5, 8), f32), out=buf)
    packed = np.zeros((2, 4, 3, 16), f32)               # out interleaved with q in one buffer
    fastqkv.attention(packed[..., :8], K, np.zeros((2, 2, 5, 8), f32), out=packed[..., 8:])


CQ = np.array([0, 2, 3])
TQ = np.zeros((3, 4, 8), f32)
TK = np.zeros((5, 2, 8), f32)
TV = np.zeros((5, 2, 6), f32)
CK = np.array([0, 4, 5])

BAD_VARLEN = [
    ("cu-float", (TQ, TK, TV, CQ.astype(float), CK), {}, TypeError, "cu_seqlens_q"),
    ("cu-start", (TQ, TK, TV, np.array([1, 2, 3]), CK), {}, ValueError, "start at 0"),
    ("cu-decreasing", (TQ, TK, TV, CQ, np.array([0, 5, 4])), {}, ValueError, "non-decreasing"),
    ("cu-end", (TQ, TK, TV, CQ, np.array([0, 4, 4])), {}, ValueError, "end"),
    ("cu-len-mismatch", (TQ, TK, TV, CQ, np.array([0, 5])), {}, ValueError, "same length"),
    ("cu-2d", (TQ, TK, TV, CQ[None], CK), {}, ValueError, "cu_seqlens_q"),
    ("q-4d", (TQ[None], TK, TV, CQ, CK), {}, ValueError, "3-D"),
    ("mask-given", (TQ, TK, TV, CQ, CK), {"mask": np.ones(5, bool)}, ValueError, "mask"),
    ("key-lens-given", (TQ, TK, TV, CQ, CK), {"key_lens": np.ones(2, int)}, ValueError, "key_lens"),
    ("varlen-gqa", (np.zeros((3, 3, 8), f32), TK, TV, CQ, CK), {}, ValueError, "multiple"),
    ("varlen-dtype", (TQ, TK.astype(np.float64), TV, CQ, CK), {}, TypeError, "dtype"),
    ("varlen-sinks-shape", (TQ, TK, TV, CQ, CK), {"sinks": np.zeros(2, f32)}, ValueError, "sinks"),
]


KC = np.zeros((6, 4, 2, 8), f32)
VC = np.zeros((6, 4, 2, 6), f32)
BT = np.array([[0, 1], [2, 3]])
SL = np.array([5, 8])

BAD_PAGED = [
    ("cache-3d", (Q, KC[0], VC, BT, SL), {}, ValueError, "k_cache"),
    ("cache-mismatch", (Q, KC, VC[:, :3], BT, SL), {}, ValueError, "v_cache"),
    ("table-float", (Q, KC, VC, BT.astype(float), SL), {}, TypeError, "block_table"),
    ("table-shape", (Q, KC, VC, BT[:1], SL), {}, ValueError, "block_table"),
    ("table-out-of-range", (Q, KC, VC, np.array([[0, 9], [2, 3]]), SL), {}, ValueError, "block_table"),
    ("table-negative-used", (Q, KC, VC, np.array([[0, -1], [2, 3]]), SL), {}, ValueError, "block_table"),
    ("seq-too-long", (Q, KC, VC, BT, np.array([5, 9])), {}, ValueError, "seq_lens"),
    ("seq-shape", (Q, KC, VC, BT, np.array([5])), {}, ValueError, "seq_lens"),
    ("paged-key-lens", (Q, KC, VC, BT, SL), {"key_lens": SL}, ValueError, "key_lens"),
    ("paged-dtype", (Q, KC.astype(np.float64), VC, BT, SL), {}, TypeError, "dtype"),
    ("paged-q-3d", (Q[0], KC, VC, BT, SL), {}, ValueError, "q"),
]


BAD_SERVING = [("attention_varlen",) + c for c in BAD_VARLEN] + [("paged_attention",) + c for c in BAD_PAGED]


@pytest.mark.parametrize("fn,args,kwargs,exc,text", [(c[0],) + c[2:] for c in BAD_SERVING],
                         ids=[f"{c[0]}-{c[1]}" for c in BAD_SERVING])
def test_bad_varlen_and_paged_input(fn, args, kwargs, exc, text):
    for module in (fastqkv, reference):
        with pytest.raises(exc, match=text):
            getattr(module, fn)(*args, **kwargs)


def test_paged_unused_table_entries_not_checked():
    bt = np.array([[0, 1], [2, -7]])
    out = fastqkv.paged_attention(Q, KC, VC, bt, np.array([5, 3]))
    assert np.isfinite(out).all()


O = np.zeros((1, 2, 3, 4), f32)
L3 = np.zeros((1, 2, 3), f32)
BAD_MERGE = [
    ("outs-array", (O, [L3]), TypeError, "sequences"),
    ("outs-empty", ([], []), ValueError, "at least one"),
    ("len-mismatch", ([O, O], [L3]), ValueError, "same length"),
    ("shape-mismatch", ([O, O[:, :1]], [L3, L3]), ValueError, r"outs\[1\]"),
    ("lse-shape", ([O], [L3[..., :2]]), ValueError, r"lses\[0\]"),
    ("dtype-mismatch", ([O, O.astype(np.float64)], [L3, L3]), TypeError, r"outs\[1\]"),
    ("lse-int", ([O], [L3.astype(int)]), TypeError, r"lses\[0\]"),
]


@pytest.mark.parametrize("args,exc,text", [c[1:] for c in BAD_MERGE], ids=[c[0] for c in BAD_MERGE])
def test_bad_merge_input(args, exc, text):
    for fn in (fastqkv.merge_attention, reference.merge_attention):
        with pytest.raises(exc, match=text):
            fn(*args)


X = np.zeros((2, 5, 16), f32)
WQ, WK, WV, WO = (np.zeros(s, f32) for s in ((16, 16), (16, 8), (16, 8), (16, 16)))
BAD_SELF = [
    ("x-4d", (X[None], WQ, WK, WV, WO), {"num_heads": 4}, ValueError, "x"),
    ("heads-zero", (X, WQ, WK, WV, WO), {"num_heads": 0}, ValueError, "num_heads"),
    ("heads-float", (X, WQ, WK, WV, WO), {"num_heads": 4.0}, TypeError, "num_heads"),
    ("kv-heads-not-divisor", (X, WQ, WK, WV, WO), {"num_heads": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
    ("wq-shape", (X, WQ[:8], WK, WV, WO), {"num_heads": 4}, ValueError, "w_q"),
    ("wk-shape", (X, WQ, WK, WV, WO), {"num_heads": 4}, ValueError, "w_k"),
    ("wo-shape", (X, WQ, WK[:, :4], WV[:, :4], WO[:8]), {"num_heads": 4, "num_kv_heads": 1}, ValueError, "w_o"),
    ("w-dtype", (X, WQ.astype(np.float64), WK, WV, WO), {"num_heads": 4}, TypeError, "w_q"),
]


@pytest.mark.parametrize("args,kwargs,exc,text", [c[1:] for c in BAD_SELF], ids=[c[0] for c in BAD_SELF])
def test_bad_self_attention_input(args, kwargs, exc, text):
    for fn in (fastqkv.self_attention, reference.self_attention):
        with pytest.raises(exc, match=text):
            fn(*args, **kwargs)


def test_bad_weights_input():
    with pytest.raises(TypeError, match="q"):
        fastqkv.attention_weights(Q.astype(int), K)
    with pytest.raises(ValueError, match="mask"):
        fastqkv.attention_weights(Q, K, mask=np.ones(3, bool))


def test_bad_thread_counts():
    with pytest.raises(ValueError, match="num_threads"):
        fastqkv.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        fastqkv.set_num_threads("2")
