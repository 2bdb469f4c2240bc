"""Bad and unusual input over every public function and every backend.

Extends tests/test_validation.py (no case is repeated from there).  Every bad
call must raise TypeError or ValueError whose message names the argument;
every unusual-but-valid call must give the oracle's answer.  The compiled
backends (c, numba) run the whole matrix in one child process per backend,
which reports one JSON record per case, so a crash fails the cases from the
crashing one on instead of killing pytest.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_subprocess as hs  # noqa: E402

BACKENDS = hs.available_backends()

f32, f64 = np.float32, np.float64
_rng = np.random.default_rng(7)


def _r(*shape, dtype=f32):
    return _rng.standard_normal(shape).astype(dtype)


Q, K, V = _r(2, 4, 3, 8), _r(2, 2, 5, 8), _r(2, 2, 5, 6)
OUT_SHAPE = (2, 4, 3, 6)


def _unaligned(a):
    """A C-contiguous copy of ``a`` whose data pointer is not aligned."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous
    return u


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _shared(n_total, *views):
    """Views (shape, offset) into one float32 buffer, for aliasing cases."""
    buf = np.zeros(n_total, f32)
    out = []
    for shape, off in views:
        out.append(buf[off:off + int(np.prod(shape))].reshape(shape))
    return out


_k_alias, _out_alias_k = _shared(400, ((2, 2, 5, 8), 0), (OUT_SHAPE, 16))
_v_alias, _out_alias_v = _shared(400, ((2, 2, 5, 6), 0), (OUT_SHAPE, 50))
_bias_buf = np.zeros(OUT_SHAPE, f32)

# varlen
CQ, CK = np.array([0, 2, 3]), np.array([0, 4, 5])
TQ, TK, TV = _r(3, 4, 8), _r(5, 2, 8), _r(5, 2, 6)
_tq_alias, _tout_alias = _shared(200, ((3, 4, 8), 0), ((3, 4, 6), 10))
# paged
KC, VC = _r(6, 4, 2, 8), _r(6, 4, 2, 6)
BT, SL = np.array([[0, 1], [2, 3]]), np.array([5, 8])
# merge
O4, L3 = _r(1, 2, 3, 4), _r(1, 2, 3)
# self-attention
X = _r(2, 5, 16)
WQ, WK, WV, WO = _r(16, 16), _r(16, 8), _r(16, 8), _r(16, 16)
W = (WQ, WK, WV, WO)

class _BadDLPack:
    """A DLPack producer whose export fails."""

    def __dlpack__(self, *a, **k):
        raise RuntimeError("export failed")

    def __dlpack_device__(self):
        return (1, 0)


class _BadArrayLike:
    def __array__(self, *a, **k):
        raise RuntimeError("no array for you")


A = "attention"
VL = "attention_varlen"
PG = "paged_attention"
MG = "merge_attention"
WT = "attention_weights"
SA = "self_attention"

# (id, function, args, kwargs, exception, text the message must contain)
BAD = [
    # -- attention: arrays
    ("q-longdouble", A, (Q.astype(np.longdouble), K, V), {}, TypeError, "q"),
    ("k-longdouble", A, (Q, K.astype(np.longdouble), V), {}, TypeError, "k"),
    ("v-uint8", A, (Q, K, V.astype(np.uint8)), {}, TypeError, "v"),
    ("q-0d", A, (np.float32(1.0), K, V), {}, ValueError, "q"),
    ("q-ragged-lists", A, ([[1.0], [1.0, 2.0]], K[0, 0], V[0, 0]), {}, TypeError, "q"),
    ("q-string", A, ("abc", K, V), {}, TypeError, "q"),
    ("q-bytes", A, (b"\x00" * 32, K, V), {}, TypeError, "q"),
    ("k-none", A, (Q, None, V), {}, TypeError, "k"),
    ("q-failing-dlpack", A, (_BadDLPack(), K, V), {}, TypeError, "q"),
    ("v-failing-array-protocol", A, (Q, K, _BadArrayLike()), {}, TypeError, "v"),
    ("v-dict", A, (Q, K, {}), {}, TypeError, "v"),
    ("q-f16-kv-f32", A, (Q.astype(np.float16), K, V), {}, TypeError, "dtype"),
    ("v-3d-qk-4d", A, (Q, K, V[0]), {}, ValueError, "dimensions"),
    ("kv-heads-zero", A, (Q, K[:, :0], V[:, :0]), {}, ValueError, "multiple"),
    ("kv-heads-exceed-q", A, (Q[:, :1], K, V), {}, ValueError, "multiple"),
    ("blhd-heads-not-divisible", A, (Q, K, V), {"layout": "blhd"}, ValueError, "multiple"),
    ("k-longer-than-v", A, (Q, np.concatenate([K, K], 2), V), {}, ValueError, "sequence length"),
    # -- mask / bias
    ("mask-3d-wrong", A, (Q, K, V), {"mask": np.ones((4, 3, 6), bool)}, ValueError, "mask"),
    ("mask-object", A, (Q, K, V), {"mask": np.array([object()] * 5)}, TypeError, "mask"),
    ("mask-ragged", A, (Q, K, V), {"mask": [[True], [True, False]]}, TypeError, "mask"),
    ("mask-float16", A, (Q, K, V), {"mask": np.ones(5, np.float16)}, TypeError, "mask"),
    ("mask-wrong-batch", A, (Q, K, V), {"mask": np.ones((3, 1, 1, 5), bool)}, ValueError, "mask"),
    ("bias-complex", A, (Q, K, V), {"bias": np.ones(5, np.complex64)}, TypeError, "bias"),
    ("bias-longdouble", A, (Q, K, V), {"bias": np.ones(5, np.longdouble)}, TypeError, "bias"),
    ("bias-5d", A, (Q, K, V), {"bias": np.ones((1, 1, 1, 1, 5), f32)}, ValueError, "bias"),
    ("bias-bool", A, (Q, K, V), {"bias": np.ones(5, bool)}, TypeError, "bias"),
    ("bias-wrong-lk", A, (Q, K, V), {"bias": np.ones(6, f32)}, ValueError, "bias"),
    ("bias-none-list", A, (Q, K, V), {"bias": [None] * 5}, TypeError, "bias"),
    # -- key_lens
    ("key-lens-nan", A, (Q, K, V), {"key_lens": np.array([np.nan, 1.0])}, TypeError, "key_lens"),
    ("key-lens-inf-list", A, (Q, K, V), {"key_lens": [float("inf"), 1]}, TypeError, "key_lens"),
    ("key-lens-2d", A, (Q, K, V), {"key_lens": np.array([[5], [5]])}, ValueError, "key_lens"),
    ("key-lens-scalar-b2", A, (Q, K, V), {"key_lens": np.int64(3)}, ValueError, "key_lens"),
    ("key-lens-bool", A, (Q, K, V), {"key_lens": np.array([True, True])}, TypeError, "key_lens"),
    ("key-lens-uint64-huge", A, (Q, K, V), {"key_lens": np.array([2**64 - 1, 1], np.uint64)},
     ValueError, "key_lens"),
    ("key-lens-int64-max", A, (Q, K, V), {"key_lens": np.array([2**63 - 1, 1])}, ValueError, "key_lens"),
    ("key-lens-string", A, (Q, K, V), {"key_lens": "35"}, TypeError, "key_lens"),
    ("key-lens-ragged", A, (Q, K, V), {"key_lens": [[5], [5, 1]]}, TypeError, "key_lens"),
    # -- scalars
    ("scale-complex", A, (Q, K, V), {"scale": 1j}, TypeError, "scale"),
    ("scale-0d-array", A, (Q, K, V), {"scale": np.array(0.5)}, TypeError, "scale"),
    ("scale-neg-inf", A, (Q, K, V), {"scale": float("-inf")}, ValueError, "scale"),
    ("scale-list", A, (Q, K, V), {"scale": [0.5]}, TypeError, "scale"),
    ("scale-np-nan", A, (Q, K, V), {"scale": np.float32("nan")}, ValueError, "scale"),
    ("softcap-inf", A, (Q, K, V), {"softcap": float("inf")}, ValueError, "softcap"),
    ("softcap-str", A, (Q, K, V), {"softcap": "1"}, TypeError, "softcap"),
    ("softcap-bool", A, (Q, K, V), {"softcap": True}, TypeError, "softcap"),
    ("window-none-left", A, (Q, K, V), {"window": (None, 0)}, TypeError, "window"),
    ("window-str", A, (Q, K, V), {"window": "ab"}, TypeError, "window"),
    ("window-single", A, (Q, K, V), {"window": [3]}, TypeError, "window"),
    ("window-set", A, (Q, K, V), {"window": {1, 2}}, TypeError, "window"),
    ("window-right-below", A, (Q, K, V), {"window": (0, -2)}, ValueError, "window"),
    ("window-float-array", A, (Q, K, V), {"window": np.array([1.0, 2.0])}, TypeError, "window"),
    ("causal-none", A, (Q, K, V), {"causal": None}, TypeError, "causal"),
    ("causal-int", A, (Q, K, V), {"causal": 1}, TypeError, "causal"),
    ("return-lse-none", A, (Q, K, V), {"return_lse": None}, TypeError, "return_lse"),
    ("layout-none", A, (Q, K, V), {"layout": None}, ValueError, "layout"),
    ("layout-upper", A, (Q, K, V), {"layout": "BHLD"}, ValueError, "layout"),
    ("alibi-inf", A, (Q, K, V), {"alibi_slopes": np.array([1, 1, 1, np.inf])}, ValueError, "alibi_slopes"),
    ("alibi-0d", A, (Q, K, V), {"alibi_slopes": np.float64(0.5)}, ValueError, "alibi_slopes"),
    ("alibi-complex", A, (Q, K, V), {"alibi_slopes": np.ones(4, complex)}, TypeError, "alibi_slopes"),
    ("alibi-wrong-batch", A, (Q, K, V), {"alibi_slopes": np.ones((3, 4))}, ValueError, "alibi_slopes"),
    # -- out=
    ("out-memoryview", A, (Q, K, V), {"out": memoryview(np.zeros(OUT_SHAPE, f32))}, TypeError, "out"),
    ("out-aliases-k", A, (Q, _k_alias, V), {"out": _out_alias_k}, ValueError, "out"),
    ("out-aliases-v", A, (Q, K, _v_alias), {"out": _out_alias_v}, ValueError, "out"),
    ("out-aliases-bias", A, (Q, K, V), {"bias": _bias_buf[..., :5], "out": _bias_buf}, ValueError, "out"),
    ("out-3d-for-4d", A, (Q, K, V), {"out": np.zeros(OUT_SHAPE[1:], f32)}, ValueError, "out"),
    ("out-float16", A, (Q, K, V), {"out": np.zeros(OUT_SHAPE, np.float16)}, TypeError, "out"),
    ("out-big-endian", A, (Q, K, V), {"out": np.zeros(OUT_SHAPE, ">f4")}, TypeError, "out"),
    ("out-readonly-flag", A, (Q, K, V), {"out": _readonly(np.zeros(OUT_SHAPE, f32))}, ValueError, "out"),
    ("backend-none", A, (Q, K, V), {"backend": None}, TypeError, "backend"),
    ("backend-empty", A, (Q, K, V), {"backend": ""}, ValueError, "backend"),
    ("backend-upper", A, (Q, K, V), {"backend": "C"}, ValueError, "backend"),
    # -- attention_varlen
    ("varlen-cu-none", VL, (TQ, TK, TV, None, CK), {}, TypeError, "cu_seqlens_q"),
    ("varlen-cu-nan", VL, (TQ, TK, TV, CQ, np.array([0, np.nan, 5])), {}, TypeError, "cu_seqlens_k"),
    ("varlen-cu-0d", VL, (TQ, TK, TV, np.int64(0), CK), {}, ValueError, "cu_seqlens_q"),
    ("varlen-cu-empty", VL, (TQ, TK, TV, np.array([], np.int64), CK), {}, ValueError, "cu_seqlens_q"),
    ("varlen-cu-bool", VL, (TQ, TK, TV, CQ.astype(bool), CK), {}, TypeError, "cu_seqlens_q"),
    ("varlen-cu-uint64-wrap", VL, (TQ, TK, TV, np.array([0, 2**64 - 1, 3], np.uint64), CK), {},
     ValueError, "cu_seqlens_q"),
    ("varlen-cu-huge-end", VL, (TQ, TK, TV, CQ, np.array([0, 4, 2**40])), {}, ValueError, "cu_seqlens_k"),
    ("varlen-bias", VL, (TQ, TK, TV, CQ, CK), {"bias": np.zeros(5, f32)}, ValueError, "bias"),
    ("varlen-out-shape", VL, (TQ, TK, TV, CQ, CK), {"out": np.zeros((3, 4, 8), f32)}, ValueError, "out"),
    ("varlen-out-aliases-q", VL, (_tq_alias, TK, TV, CQ, CK), {"out": _tout_alias}, ValueError, "out"),
    ("varlen-alibi-shape", VL, (TQ, TK, TV, CQ, CK), {"alibi_slopes": np.ones(3)}, ValueError, "alibi_slopes"),
    ("varlen-return-lse-str", VL, (TQ, TK, TV, CQ, CK), {"return_lse": "yes"}, TypeError, "return_lse"),
    ("varlen-q-int", VL, (TQ.astype(int), TK, TV, CQ, CK), {}, TypeError, "q"),
    ("varlen-v-rows", VL, (TQ, TK, TV[:4], CQ, CK), {}, ValueError, "v"),
    ("varlen-window-int", VL, (TQ, TK, TV, CQ, CK), {"window": 5}, TypeError, "window"),
    ("varlen-scale-nan-no-queries", VL, (TQ[:0], TK, TV, np.array([0, 0, 0]), CK),
     {"scale": float("nan")}, ValueError, "scale"),
    # -- paged_attention
    ("paged-table-huge-id", PG, (Q, KC, VC, np.array([[0, 2**40], [2, 3]]), SL), {}, ValueError, "block_table"),
    ("paged-table-uint64-huge", PG, (Q, KC, VC, np.array([[0, 2**64 - 1], [2, 3]], np.uint64), SL), {},
     ValueError, "block_table"),
    ("paged-table-1d", PG, (Q, KC, VC, BT[0], SL), {}, ValueError, "block_table"),
    ("paged-table-none", PG, (Q, KC, VC, None, SL), {}, TypeError, "block_table"),
    ("paged-table-ragged", PG, (Q, KC, VC, [[0, 1], [2]], SL), {}, TypeError, "block_table"),
    ("paged-seq-negative", PG, (Q, KC, VC, BT, np.array([-1, 8])), {}, ValueError, "seq_lens"),
    ("paged-seq-float", PG, (Q, KC, VC, BT, SL.astype(float)), {}, TypeError, "seq_lens"),
    ("paged-block-size-zero", PG, (Q, KC[:, :0], VC[:, :0], BT, np.array([0, 0])), {}, ValueError, "k_cache"),
    ("paged-k-cache-int", PG, (Q, KC.astype(int), VC, BT, SL), {}, TypeError, "k_cache"),
    ("paged-v-cache-dtype", PG, (Q, KC, VC.astype(f64), BT, SL), {}, TypeError, "v_cache"),
    ("paged-mask-shape", PG, (Q, KC, VC, BT, SL), {"mask": np.ones(7, bool)}, ValueError, "mask"),
    ("paged-layout", PG, (Q, KC, VC, BT, SL), {"layout": "hbld"}, ValueError, "layout"),
    ("paged-head-dim", PG, (Q[..., :4], KC, VC, BT, SL), {}, ValueError, "head dim"),
    ("paged-scale-nan", PG, (Q, KC, VC, BT, SL), {"scale": float("nan")}, ValueError, "scale"),
    # -- merge_attention
    ("merge-outs-none-item", MG, ([None], [L3]), {}, TypeError, "outs[0]"),
    ("merge-lses-none", MG, ([O4], None), {}, TypeError, "lses"),
    ("merge-outs-1d", MG, ([O4[0, 0, 0]], [L3[0, 0, :1]]), {}, ValueError, "outs[0]"),
    ("merge-outs-5d", MG, ([O4[None]], [L3]), {}, ValueError, "outs[0]"),
    ("merge-layout-none", MG, ([O4], [L3]), {"layout": None}, ValueError, "layout"),
    ("merge-lses-dtype-mix", MG, ([O4, O4], [L3, L3.astype(f64)]), {}, TypeError, "lses[1]"),
    ("merge-outs-int", MG, ([O4.astype(int)], [L3]), {}, TypeError, "outs[0]"),
    ("merge-blhd-lse-shape", MG, ([O4.transpose(0, 2, 1, 3)], [L3.transpose(0, 2, 1)]), {"layout": "blhd"},
     ValueError, "lses[0]"),
    ("merge-strings", MG, ("ab", "cd"), {}, TypeError, "outs[0]"),
    # -- attention_weights
    ("weights-k-none", WT, (Q, None), {}, TypeError, "k"),
    ("weights-k-int", WT, (Q, K.astype(int)), {}, TypeError, "k"),
    ("weights-bias-shape", WT, (Q, K), {"bias": np.ones(4, f32)}, ValueError, "bias"),
    ("weights-key-lens-range", WT, (Q, K), {"key_lens": np.array([9, 1])}, ValueError, "key_lens"),
    ("weights-layout", WT, (Q, K), {"layout": "x"}, ValueError, "layout"),
    ("weights-backend", WT, (Q, K), {"backend": "gpu"}, ValueError, "backend"),
    ("weights-ndim-mismatch", WT, (Q[0], K), {}, ValueError, "dimensions"),
    # -- self_attention
    ("self-x-int", SA, (X.astype(int),) + W, {"num_heads": 4}, TypeError, "x"),
    ("self-x-1d", SA, (X[0, 0],) + W, {"num_heads": 4}, ValueError, "x"),
    ("self-heads-bool", SA, (X,) + W, {"num_heads": True}, TypeError, "num_heads"),
    ("self-kv-heads-zero", SA, (X,) + W, {"num_heads": 4, "num_kv_heads": 0}, ValueError, "num_kv_heads"),
    ("self-kv-heads-exceed", SA, (X,) + W, {"num_heads": 4, "num_kv_heads": 8}, ValueError, "num_kv_heads"),
    ("self-wv-shape", SA, (X, WQ, WK, WV[:, :3], WO), {"num_heads": 4, "num_kv_heads": 2}, ValueError, "w_v"),
    ("self-wo-1d", SA, (X, WQ, WK, WV, WO[0]), {"num_heads": 4, "num_kv_heads": 2}, ValueError, "w_o"),
    ("self-wq-none", SA, (X, None, WK, WV, WO), {"num_heads": 4}, TypeError, "w_q"),
    ("self-mask-shape", SA, (X,) + W, {"num_heads": 4, "num_kv_heads": 2, "mask": np.ones(3, bool)},
     ValueError, "mask"),
    ("self-causal-str", SA, (X,) + W, {"num_heads": 4, "num_kv_heads": 2, "causal": "no"}, TypeError, "causal"),
    ("self-backend", SA, (X,) + W, {"num_heads": 4, "backend": "tpu"}, ValueError, "backend"),
    ("self-heads-huge", SA, (X,) + W, {"num_heads": 2**70}, ValueError, "w_q"),
    # -- process-wide settings
    ("threads-negative", "set_num_threads", (-3,), {}, ValueError, "num_threads"),
    ("threads-float", "set_num_threads", (2.5,), {}, TypeError, "num_threads"),
    ("set-backend-unknown", "set_backend", ("fpga",), {}, ValueError, "backend"),
    ("use-backend-int", "use_backend", (3,), {}, TypeError, "backend"),
]

_BF16 = testing.as_dtype("bfloat16")
if _BF16 is not None:
    BAD.append(("q-bf16-kv-f16", A, (Q.astype(_BF16), K.astype(np.float16), V.astype(np.float16)),
                {}, TypeError, "dtype"))

# functions without a backend= keyword
NO_BACKEND = {MG, "set_num_threads", "set_backend", "use_backend"}

# Unusual but valid input: (id, function, args, kwargs, text of an acceptable
# rejection or None).  The answer must equal the oracle's on the same call.
VALID = [
    ("negative-strides", A, (Q[:, :, ::-1], K[:, ::-1, ::-1], V[:, ::-1, ::-1]), {}, None),
    ("negative-last-stride", A, (Q[..., ::-1], K[..., ::-1], V[..., ::-1]), {}, None),
    ("zero-stride-keys", A, (Q, np.broadcast_to(K[:, :, :1], K.shape), np.broadcast_to(V[:, :, :1], V.shape)),
     {}, None),
    ("zero-stride-heads", A, (Q, np.broadcast_to(K[:, :1], K.shape), np.broadcast_to(V[:, :1], V.shape)),
     {"causal": True}, None),
    ("zero-stride-query", A, (np.broadcast_to(Q[:, :, :1], Q.shape), K, V), {}, None),
    ("unaligned-q", A, (_unaligned(Q), K, V), {}, None),
    ("unaligned-kv", A, (Q, _unaligned(K), _unaligned(V)), {"causal": True}, None),
    ("unaligned-bias", A, (Q, K, V), {"bias": _unaligned(_r(2, 4, 3, 5))}, None),
    ("unaligned-out", A, (Q, K, V), {"out": _unaligned(np.zeros(OUT_SHAPE, f32))}, None),
    ("big-endian", A, (Q.astype(">f4"), K.astype(">f4"), V.astype(">f4")), {"causal": True},
     "does not support"),
    ("fortran-order", A, (np.asfortranarray(Q), np.asfortranarray(K), np.asfortranarray(V)), {}, None),
    ("read-only-inputs", A, (_readonly(Q), _readonly(K), _readonly(V)), {"mask": _readonly(_r(3, 5) > 0)}, None),
    ("window-huge", A, (Q, K, V), {"window": (2**70, 2**70)}, "window"),
    ("window-int64-max", A, (Q, K, V), {"window": (2**63 - 1, 2**63 - 1)}, "window"),
    ("window-numpy-array", A, (Q, K, V), {"window": np.array([1, 2])}, None),
    ("mask-0d-true", A, (Q, K, V), {"mask": np.bool_(True)}, None),
    ("mask-0d-false", A, (Q, K, V), {"mask": np.bool_(False)}, None),
    ("mask-negative-strides", A, (Q, K, V), {"mask": (_r(2, 4, 3, 5) > 0)[:, ::-1, ::-1, ::-1]}, None),
    ("bias-negative-strides", A, (Q, K, V), {"bias": _r(2, 4, 3, 5)[..., ::-1]}, None),
    ("bias-lk1", A, (Q, K[:, :, :1], V[:, :, :1]), {"bias": _r(2, 4, 3, 1)}, None),
    ("lists-of-lists", A, (Q[0, 0].tolist(), K[0, 0].tolist(), V[0, 0].tolist()), {"causal": True}, None),
    ("key-lens-list", A, (Q, K, V), {"key_lens": [5, 0]}, None),
    ("key-lens-uint8", A, (Q, K, V), {"key_lens": np.array([2, 5], np.uint8)}, None),
    ("key-lens-scalar-b1", A, (Q[:1], K[:1], V[:1]), {"key_lens": 3}, None),
    ("out-negative-strides", A, (Q, K, V), {"out": np.zeros(OUT_SHAPE, f32)[:, ::-1, ::-1]}, None),
    ("out-every-other-element", A, (Q, K, V), {"out": np.zeros(OUT_SHAPE[:-1] + (12,), f32)[..., ::2]}, None),
    ("bias-0d", A, (Q, K, V), {"bias": np.float32(0.5)}, None),
    ("big-head-dims", A, (_r(1, 2, 3, 513), _r(1, 1, 7, 513), _r(1, 1, 7, 1025)), {"causal": True}, None),
    ("lk-zero-options", A, (Q, K[:, :, :0], V[:, :, :0]), {"mask": np.ones((2, 1, 1, 0), bool),
                                                            "key_lens": [0, 0], "causal": True}, None),
    ("lq-zero", A, (Q[:, :, :0], K, V), {"causal": True, "bias": np.zeros(5, f32)}, None),
    ("batch-zero-key-lens", A, (Q[:0], K[:0], V[:0]), {"key_lens": np.zeros(0, int)}, None),
    ("threads-300", "attention_threads", (Q, K, V), {"threads": 300}, "num_threads"),
    ("threads-huge", "attention_threads", (Q, K, V), {"threads": 2**70}, "num_threads"),
    ("threads-2**40", "attention_threads", (Q, K, V), {"threads": 2**40}, "num_threads"),
    ("threads-2**31", "attention_threads", (Q, K, V), {"threads": 2**31}, "num_threads"),
    ("varlen-noncontiguous-cu", VL, (TQ, TK, TV, np.array([0, 9, 2, 9, 3])[::2], np.array([0, 7, 4, 7, 5])[::2]),
     {"causal": True}, None),
    ("varlen-cu-int8", VL, (TQ, TK, TV, CQ.astype(np.int8), CK.astype(np.uint16)), {}, None),
    ("paged-unused-huge-ids", PG, (Q, KC, VC, np.array([[0, 2**62], [2, 3]]), np.array([4, 8])), {}, None),
    ("paged-table-fortran", PG, (Q, KC, VC, np.asfortranarray(BT), SL), {"causal": True}, None),
    ("merge-generator", MG, ((o for o in [O4, O4]), [L3, L3 - 1]), {}, None),
    ("weights-negative-strides", WT, (Q[:, :, ::-1], K[:, :, ::-1]), {"causal": True}, None),
    ("self-fortran-weights", SA, (X, np.asfortranarray(WQ), WK, WV, WO), {"num_heads": 4, "num_kv_heads": 2}, None),
]


# ---------------------------------------------------------------------------
# running one case (in this process or in a child)

class _Reject(Exception):
    pass


def _call(module, fn, args, kwargs, backend):
    kw = dict(kwargs)
    if fn == "attention_threads":
        threads = kw.pop("threads")
        try:
            with testing.threads(threads):
                return _call(module, A, args, kw, backend)
        except (TypeError, ValueError) as exc:
            if "num_threads" in str(exc):
                raise _Reject(exc) from exc
            raise
    if fn == "use_backend":
        with fastqkv.use_backend(*args):
            return None
    if module is fastqkv and fn not in NO_BACKEND and "backend" not in kw and backend is not None:
        kw["backend"] = backend
    return getattr(module, fn)(*args, **kw)


def run_bad(case, backend, module=fastqkv):
    """``(ok, detail)`` for one bad call."""
    cid, fn, args, kwargs, exc, text = case
    if fn.startswith("set_"):
        old = (fastqkv.get_num_threads(), fastqkv.get_backend())
    try:
        _call(module, fn, args, kwargs, backend)
    except (TypeError, ValueError) as e:
        if not isinstance(e, exc):
            return False, f"{cid}: raised {type(e).__name__} ({e}), expected {exc.__name__}"
        if text not in str(e):
            return False, f"{cid}: {type(e).__name__} message does not name {text!r}: {e}"
        return True, ""
    except BaseException as e:  # noqa: BLE001 - any other exception is the failure being reported
        return False, f"{cid}: raised {type(e).__name__} ({e}), expected {exc.__name__} naming {text!r}"
    finally:
        if fn.startswith("set_"):
            fastqkv.set_num_threads(old[0])
            fastqkv.set_backend(None if old[1] == "auto" else old[1])
    return False, f"{cid}: no exception, expected {exc.__name__} naming {text!r}"


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _bounds(fn, args, kwargs, want):
    """``(cond, vmax)`` of ``testing.assert_close`` for a valid call: the
    case's own bounds for the attention functions, the scores' condition for
    the weights, the projected scores' and the output projection's for
    self-attention, the size of the result for a merge."""
    size = max(1.0, float(np.nanmax(np.abs(want)))) if want.size else 1.0
    arrays = [np.asarray(a, dtype=np.float64) if isinstance(a, (list, tuple)) else a for a in args]
    if fn in (A, VL, PG, "attention_threads"):
        extra = {A: "attention", "attention_threads": "attention", VL: "attention_varlen",
                 PG: "paged_attention"}[fn]
        case = testing.Case(fn, *arrays[:3], kwargs, fn=extra, args=tuple(arrays[3:]))
        return testing.case_bounds(case)
    if fn == WT:
        return testing.condition_number(arrays[0], arrays[1], kwargs.get("scale")), 1.0
    if fn == SA:
        x, w_q, w_k = arrays[:3]
        d = w_k.shape[1] // kwargs.get("num_kv_heads", kwargs["num_heads"])
        return testing.condition_number(x @ w_q, x @ w_k, 1 / np.sqrt(d)) * np.sqrt(w_q.shape[1]), size
    return 1.0, size


def run_valid(case, backend):
    """``(ok, detail)`` for one valid call: same answer as the oracle, inputs untouched."""
    cid, fn, args, kwargs, reject_text = case
    ref_fn = A if fn == "attention_threads" else fn
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("threads", "out")}
    if fn == MG:  # generators are consumed: rebuild the arguments per call
        args = ([O4, O4],) + args[1:]
        got_args = ((o for o in [O4, O4]),) + args[1:]
    else:
        got_args = args
    saved = [np.array(a, copy=True) for a in args if isinstance(a, np.ndarray)]
    try:
        want = _first(getattr(reference, ref_fn)(*args, **ref_kwargs))
    except (TypeError, ValueError) as e:
        if reject_text and reject_text in str(e):
            want = e
        else:
            return False, f"{cid}: the oracle rejected a valid call: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        return False, f"{cid}: the oracle raised {type(e).__name__}: {e}"
    try:
        got = _first(_call(fastqkv, fn, got_args, kwargs, backend))
    except _Reject as e:
        if reject_text and reject_text in str(e):
            return True, ""
        return False, f"{cid}: rejected a valid setting: {e}"
    except (TypeError, ValueError) as e:
        if reject_text and reject_text in str(e):
            return True, ""
        return False, f"{cid}: rejected a valid call: {type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001
        return False, f"{cid}: raised {type(e).__name__}: {e}"
    if isinstance(want, Exception):
        return False, f"{cid}: the oracle rejected ({want}) but backend {backend!r} returned"
    if "out" in kwargs and got is not kwargs["out"]:
        return False, f"{cid}: the out= array was not returned"
    got, want = np.asarray(got), np.asarray(want)
    dtype = want.dtype if want.dtype.kind == "f" else np.dtype(f32)
    if want.dtype.byteorder == ">":
        dtype = want.dtype.newbyteorder("=")
    try:
        cond, vmax = _bounds(fn, args, ref_kwargs, want)
        testing.assert_close(got, want, dtype.name if dtype.name in testing.TOLERANCES else "float32",
                             cond=cond, vmax=vmax)
    except AssertionError as e:
        return False, f"{cid}: wrong answer on backend {backend!r}: {e}"
    after = [a for a in args if isinstance(a, np.ndarray)]
    for before, a in zip(saved, after):
        if not np.array_equal(before, a, equal_nan=True):
            return False, f"{cid}: an input was modified"
    return True, ""


def _cases():
    return [("bad", c[0]) for c in BAD] + [("valid", c[0]) for c in VALID]


def run_one(kind, cid, backend):
    if kind == "bad":
        return run_bad(next(c for c in BAD if c[0] == cid), backend)
    return run_valid(next(c for c in VALID if c[0] == cid), backend)


def child_main(backend):
    """Entry point of the child process: every case on ``backend``."""
    for kind, cid in _cases():
        try:
            ok, detail = run_one(kind, cid, backend)
        except BaseException as e:  # noqa: BLE001 - reported, not raised
            ok, detail = False, f"{cid}: harness error {type(e).__name__}: {e}"
        hs.emit({"kind": kind, "id": cid, "ok": ok, "detail": detail})
    hs.emit({"kind": "done", "id": "", "ok": True, "detail": ""})


_CHILD = {}


def _child_results(backend):
    """Run the whole matrix for ``backend`` in one child; cached per session."""
    if backend not in _CHILD:
        code = f"""
            import importlib.util, sys
            spec = importlib.util.spec_from_file_location("reliability_badinput", {__file__!r})
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.child_main({backend!r})
        """
        proc = hs.run_python(code, timeout=600)
        recs = {(r["kind"], r["id"]): r for r in hs.records(proc.stdout)}
        _CHILD[backend] = (proc, recs)
    return _CHILD[backend]


def _check(kind, cid, backend):
    if backend in hs.COMPILED:
        proc, recs = _child_results(backend)
        rec = recs.get((kind, cid))
        if rec is None:
            order = _cases()
            done = [c for c in order if c in recs]
            culprit = order[len(done)] if len(done) < len(order) else None
            pytest.fail(f"no result for {cid} on backend {backend!r}: the child stopped at case "
                        f"{culprit}.\n{hs.describe(proc)}")
        assert rec["ok"], rec["detail"]
    else:
        ok, detail = run_one(kind, cid, backend)
        assert ok, detail


def _params(ids, backends):
    return [pytest.param(cid, b, id=f"{cid}-{b}") for cid in ids for b in backends]


@pytest.mark.parametrize("cid,backend", _params([c[0] for c in BAD], BACKENDS))
def test_bad_input_rejected(cid, backend):
    _check("bad", cid, backend)


@pytest.mark.parametrize("cid,backend", _params([c[0] for c in VALID], BACKENDS + ["auto"]))
def test_unusual_valid_input(cid, backend):
    _check("valid", cid, backend)


_ORACLE_BAD = [c for c in BAD if c[1] in (A, VL, PG, MG, WT, SA) and not c[0].startswith(("backend", "weights-backend",
                                                                                             "self-backend"))]


@pytest.mark.parametrize("case", _ORACLE_BAD, ids=[c[0] for c in _ORACLE_BAD])
def test_oracle_rejects_the_same(case):
    """The oracle raises the same errors (its checks are the same code)."""
    ok, detail = run_bad(case, None, module=reference)
    assert ok, detail


def test_matrix_size():
    """The issue asks for at least 60 distinct bad calls over every public function."""
    assert len({c[0] for c in BAD}) == len(BAD) >= 60
    assert {c[1] for c in BAD} >= {A, VL, PG, MG, WT, SA}


def test_child_runs_every_case():
    """The child reached the end of the matrix for every compiled backend."""
    for backend in BACKENDS:
        if backend in hs.COMPILED:
            proc, recs = _child_results(backend)
            assert ("done", "") in recs, hs.describe(proc)
