"""``fastqkv bench``: this machine's limits, the shape classes of the design
(section 3) over every available backend and the peers PyTorch SDPA and ONNX
Runtime, checked against the oracle, with auto's choice next to the fastest.

The shape list lives here (:func:`shape_classes`) so that the package does
not depend on the ``bench/`` folder; ``bench/cases.py`` re-exports it for the
pytest-benchmark suite, which also reuses :func:`make_inputs`,
:func:`prepare` and :func:`check`.

Optional pieces (rich, matplotlib, torch, onnxruntime, threadpoolctl,
ml_dtypes) are used when importable and skipped with one line otherwise.
ONNX models are encoded directly as protobuf bytes (a one-node graph), so the
``onnx`` package is not needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _dispatch, _problem, _validate, reference, testing

__all__ = ["BenchCase", "shape_classes", "make_inputs", "prepare", "check", "Skip",
           "measure_machine", "add_arguments", "main", "PEERS"]

PEERS = ("torch", "ort")
SIZES = ("full", "quick", "tiny")


class Skip(Exception):
    """A runner or case that cannot run here; the message says why."""


# ---------------------------------------------------------------------------
# shape classes (DESIGN section 3)

@dataclass(frozen=True)
class BenchCase:
    """One benchmark shape.  ``ragged`` is None, ``"key_lens"`` (per-sequence
    KV length) or ``"padding"`` (boolean key-padding mask); sequence ``b``
    then has ``Lk - b * Lk // (2 * B)`` keys."""
    name: str
    kind: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    causal: bool = True
    dtype: str = "float32"
    ragged: str | None = None

    @property
    def bound(self):
        """``"memory"`` (decode: K/V streamed once) or ``"compute"``."""
        return "memory" if self.kind == "decode" else "compute"

    def lengths(self):
        """Keys per sequence."""
        if self.ragged is None:
            return [self.Lk] * self.B
        return [self.Lk - (b * self.Lk) // (2 * self.B) for b in range(self.B)]

    def visible_pairs(self):
        """Visible (query, key) pairs summed over the batch (per head)."""
        tot = 0
        for lk in self.lengths():
            if self.causal:
                i = np.arange(self.Lq) + (lk - self.Lq)
                tot += int(np.clip(i + 1, 0, lk).sum())
            else:
                tot += self.Lq * lk
        return tot

    def flops(self):
        """4 * Hq * visible pairs * D (QK^T and PV, 2 flops per multiply-add)."""
        return 4.0 * self.Hq * self.visible_pairs() * self.D

    def kv_bytes(self):
        """Bytes of K and V that must be read (visible keys only)."""
        return float(sum(self.lengths()) * self.Hkv * 2 * self.D * np.dtype(_np_dtype(self.dtype)).itemsize)

    def describe(self):
        s = f"B{self.B} Hq{self.Hq}"
        if self.Hkv != self.Hq:
            s += f" Hkv{self.Hkv}"
        s += f" Lq{self.Lq} Lk{self.Lk} D{self.D} {self.dtype}"
        if self.causal:
            s += " causal"
        if self.ragged == "key_lens":
            s += " ragged key_lens"
        elif self.ragged == "padding":
            s += " key-padding mask"
        return s


def shape_classes(size="full"):
    """The benchmark cases: ``size`` is ``"full"`` (the design's shapes),
    ``"quick"`` (smaller, for a run under a minute) or ``"tiny"`` (smoke tests)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    C = BenchCase
    if size == "tiny":
        return [
            C("prefill-mha", "prefill", 1, 2, 2, 24, 24, 16),
            C("prefill-gqa", "prefill", 1, 4, 2, 24, 24, 16),
            C("encoder-pad", "encoder", 2, 2, 2, 16, 16, 8, causal=False, ragged="padding"),
            C("decode-gqa", "decode", 2, 4, 2, 1, 40, 16, ragged="key_lens"),
            C("chunked-prefill", "chunked", 1, 4, 2, 8, 40, 16),
            C("float64-prefill", "prefill", 1, 2, 2, 16, 16, 8, dtype="float64"),
            C("float16-decode", "decode", 2, 4, 2, 1, 40, 16, dtype="float16", ragged="key_lens"),
        ]
    if size == "quick":
        return [
            C("small-prefill-L64", "small", 1, 8, 8, 64, 64, 64),
            C("small-decode-L512", "decode", 1, 8, 2, 1, 512, 64),
            C("prefill-mha-L512", "prefill", 1, 8, 8, 512, 512, 128),
            C("prefill-gqa-L512", "prefill", 1, 32, 8, 512, 512, 128),
            C("encoder-bert-L128", "encoder", 2, 12, 12, 128, 128, 64, causal=False),
            C("encoder-bert-L256-pad", "encoder", 2, 12, 12, 256, 256, 64, causal=False, ragged="padding"),
            C("decode-gqa-4k", "decode", 2, 32, 8, 1, 4096, 128, ragged="key_lens"),
            C("chunked-prefill-64x1k", "chunked", 1, 32, 8, 64, 1024, 128),
            C("float64-prefill-L256", "prefill", 1, 8, 8, 256, 256, 128, dtype="float64"),
            C("float16-decode-2k", "decode", 2, 32, 8, 1, 2048, 128, dtype="float16", ragged="key_lens"),
            C("bfloat16-decode-2k", "decode", 2, 32, 8, 1, 2048, 128, dtype="bfloat16", ragged="key_lens"),
        ]
    return [
        C("small-prefill-L64", "small", 1, 8, 8, 64, 64, 64),
        C("small-decode-L512", "decode", 1, 8, 2, 1, 512, 64),
        C("prefill-mha-L1024", "prefill", 1, 16, 16, 1024, 1024, 128),
        C("prefill-mha-L2048", "prefill", 1, 16, 16, 2048, 2048, 128),
        C("prefill-gqa-L1024", "prefill", 1, 32, 8, 1024, 1024, 128),
        C("encoder-bert-L128", "encoder", 8, 12, 12, 128, 128, 64, causal=False),
        C("encoder-bert-L512-pad", "encoder", 8, 12, 12, 512, 512, 64, causal=False, ragged="padding"),
        C("decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, ragged="key_lens"),
        C("decode-gqa-32k", "decode", 2, 32, 8, 1, 32768, 128, ragged="key_lens"),
        C("chunked-prefill-128x4k", "chunked", 1, 32, 8, 128, 4096, 128),
        C("float64-prefill-L512", "prefill", 1, 8, 8, 512, 512, 128, dtype="float64"),
        C("float16-decode-4k", "decode", 4, 32, 8, 1, 4096, 128, dtype="float16", ragged="key_lens"),
        C("bfloat16-decode-4k", "decode", 4, 32, 8, 1, 4096, 128, dtype="bfloat16", ragged="key_lens"),
    ]


def _np_dtype(name):
    if name == "bfloat16":
        if _validate.BFLOAT16 is None:
            raise Skip("bfloat16 needs ml_dtypes (pip install ml_dtypes)")
        return _validate.BFLOAT16
    return np.dtype(name)


@dataclass
class Inputs:
    """Arrays and keyword options of one case, in fastqkv's ``bhld`` layout."""
    case: BenchCase
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict = field(default_factory=dict)
    oracle: tuple | None = None      # (kv heads, q heads, rows, reference out, cond, vmax)


def make_inputs(case, seed=0):
    """Random inputs for ``case`` (raises :class:`Skip` when its dtype cannot
    be created here)."""
    dt = _np_dtype(case.dtype)
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(dt)

    q = arr(case.B, case.Hq, case.Lq, case.D)
    k = arr(case.B, case.Hkv, case.Lk, case.D)
    v = arr(case.B, case.Hkv, case.Lk, case.D)
    kw = {"causal": case.causal}
    lens = np.array(case.lengths(), np.int64)
    if case.ragged == "key_lens":
        kw["key_lens"] = lens
    elif case.ragged == "padding":
        kw["mask"] = (np.arange(case.Lk)[None, :] < lens[:, None])[:, None, None, :]
    return Inputs(case, q, k, v, kw)


# ---------------------------------------------------------------------------
# runners: prepare(name, inputs, threads) -> (call, fetch, note)
#   call() runs once and returns the raw result; fetch(raw) -> bhld ndarray

def fastqkv_names():
    return list(_dispatch.BACKEND_MODULES)


def numpy_seconds(case):
    """A rough cost of the dense float64 oracle on ``case`` (seconds)."""
    dense = 4.0 * case.B * case.Hq * case.Lq * case.Lk * case.D
    moved = 8.0 * case.B * (case.Hq * case.Lk * 2 * case.D + 8 * case.Hq * case.Lq * case.Lk)
    return dense / 4e9 + moved / 2e9


def _prepare_fastqkv(name, inp, threads):
    from . import _api
    if name != "auto":
        info = _dispatch.backends()[name]
        if not info.available:
            raise Skip(f"not available ({info.reason})")
    p = _problem.plan_attention(inp.q, inp.k, inp.v, **inp.kwargs)
    try:
        _, chosen = _dispatch.resolve(name, p)
    except (ValueError, RuntimeError) as exc:
        raise Skip(str(exc)) from None
    out = np.empty(p.out.shape, p.dtype)
    q, k, v, kw = inp.q, inp.k, inp.v, inp.kwargs
    _dispatch.set_num_threads(threads)

    def call():
        return _api.attention(q, k, v, out=out, backend=name, **kw)

    return call, np.asarray, (f"-> {chosen}" if name == "auto" else "")


def _torch_tensor(torch, a):
    if a.dtype == _validate.BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _bool_mask(case):
    """(B|1, 1, Lq|1, Lk) boolean mask (True = attend) with bottom-right causal
    and the case's ragged lengths, or None when none is needed."""
    lens = np.array(case.lengths())[:, None, None, None]
    j = np.arange(case.Lk)
    m = None
    if case.ragged is not None:
        m = j < lens
    if case.causal and (case.Lq != case.Lk or case.ragged is not None):
        i = np.arange(case.Lq)[:, None]
        lk = lens if case.ragged is not None else case.Lk
        c = j <= i + (lk - case.Lq)
        m = c if m is None else (m & c)
    return None if m is None else np.ascontiguousarray(m.reshape((1,) * (4 - m.ndim) + m.shape))


def torch_sdpa(torch, q, k, v, **kw):
    """A callable running torch's SDPA on (B, Hq, Lq, D) tensors in its
    fastest form for the call, returning (B, Hq, Lq, Dv).  Grouped-query
    decode (Lq 1, Hq > Hkv, any mask shared by the heads) folds each KV head's
    query group into the query axis: one multi-head call of Hkv heads and Hq/Hkv
    rows, with no copy of K/V.  torch 2.13 on a 2-core Ice Lake VM, B8 Hq32 Hkv8
    Lk4096 D128: float32 21 ms folded against 49 ms with enable_gqa=True,
    bfloat16 15 against 204 ms.  Other GQA calls use enable_gqa=True."""
    B, Hq, Lq, _ = q.shape
    Hkv = k.shape[1]
    mask = kw.get("attn_mask")
    shape = () if mask is None else tuple(getattr(mask, "shape", (0, 0, 0)))   # CausalBias: no fold
    shared = mask is None or (len(shape) >= 2 and shape[-2] == 1 and (len(shape) < 3 or shape[-3] == 1))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if Hq != Hkv and Lq == 1 and not kw.get("is_causal") and shared:
        qf = q.reshape(B, Hkv, Hq // Hkv, q.shape[-1])

        def call():
            with torch.inference_mode():
                out = sdpa(qf, k, v, **kw)
            return out.reshape(B, Hq, 1, out.shape[-1])
        call.note = "query groups folded into the query axis"
        return call
    if Hq != Hkv:
        kw = dict(kw, enable_gqa=True)

    def call():
        with torch.inference_mode():
            return sdpa(q, k, v, **kw)
    return call


def _prepare_torch(inp, threads):
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    case = inp.case
    torch.set_num_threads(threads)
    q, k, v = (_torch_tensor(torch, a) for a in (inp.q, inp.k, inp.v))
    kw = {}
    mask = _bool_mask(case)
    note = ""
    if mask is not None:
        kw["attn_mask"] = torch.from_numpy(mask)
        if case.causal:
            note = "bottom-right causal as an explicit bool mask"
    elif case.causal:
        kw["is_causal"] = True
    call = torch_sdpa(torch, q, k, v, **kw)
    note = "; ".join(n for n in (note, getattr(call, "note", "")) if n)

    def fetch(t):
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    try:
        fetch(call())
    except TypeError as exc:
        raise Skip(f"torch {torch.__version__} SDPA rejects this call ({exc})") from None
    return call, fetch, note


# --- ONNX Runtime: a one-node com.microsoft graph, encoded as protobuf bytes

_ONNX_ELEM = {"float32": 1, "float16": 10, "int32": 6}


def _varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(num, payload):
    """A length-delimited protobuf field."""
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _pbint(num, value):
    return _varint(num << 3) + _varint(value)


def _onnx_attr(name, value):
    if isinstance(value, float):      # AttributeProto: name=1, f=2 (fixed32), i=3, type=20
        body = _pb(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _pbint(20, 1)
    else:
        body = _pb(1, name) + _pbint(3, int(value)) + _pbint(20, 2)
    return _pb(5, body)


def _onnx_value_info(name, elem, shape):
    dims = b"".join(_pb(1, _pbint(1, d)) for d in shape)              # Dimension.dim_value
    tensor = _pbint(1, _ONNX_ELEM[elem]) + _pb(2, dims)                # elem_type, shape
    return _pb(1, name) + _pb(2, _pb(1, tensor))                       # name, TypeProto.tensor_type


def onnx_model(op, inputs, outputs, attrs):
    """ModelProto bytes of one ``com.microsoft`` node.  ``inputs`` and
    ``outputs`` are ``(name, elem, shape)``; a name of ``""`` omits an
    optional input."""
    node = b"".join(_pb(1, n) for n, _, _ in inputs) + b"".join(_pb(2, n) for n, _, _ in outputs)
    node += _pb(3, "attn") + _pb(4, op) + b"".join(_onnx_attr(k, v) for k, v in attrs.items())
    node += _pb(7, "com.microsoft")
    graph = _pb(1, node) + _pb(2, "fastqkv_bench")
    graph += b"".join(_pb(11, _onnx_value_info(*x)) for x in inputs if x[0])
    graph += b"".join(_pb(12, _onnx_value_info(*x)) for x in outputs)
    opsets = _pb(8, _pb(1, "") + _pbint(2, 17)) + _pb(8, _pb(1, "com.microsoft") + _pbint(2, 1))
    return _pbint(1, 8) + _pb(2, "fastqkv") + _pb(7, graph) + opsets


def _bsh(a):
    """(B, H, L, D) -> contiguous (B, L, H*D)."""
    B, H, L, D = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(B, L, H * D)


def _prepare_ort(inp, threads):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    case = inp.case
    if case.dtype not in ("float32", "float16"):
        raise Skip(f"com.microsoft attention ops have no {case.dtype} CPU kernel")
    dt = case.dtype
    B, Hq, Hkv, Lq, Lk, D = case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D
    scale = float(1.0 / math.sqrt(D))
    note = ""
    G = Hq // Hkv
    fold = Lq == 1 and dt == "float32"

    def fetch(o):
        if fold:
            return o.reshape(B, G, Hkv, D).transpose(0, 2, 1, 3).reshape(B, Hq, 1, D)
        return o.reshape(B, Lq, Hq, D).transpose(0, 2, 1, 3)

    if fold or not case.causal:
        if fold:
            # one query position (bottom-right causal hides nothing): each KV
            # head's query group as the query rows of one head, K/V read in
            # place as (B, Hkv, Lk, D).  ORT 1.32, B8 Hq32 Hkv8 Lk4096 D128,
            # 2 threads: 31 ms, GroupQueryAttention 106 ms (it copies the past)
            qf = np.ascontiguousarray(inp.q.reshape(B, Hkv, G, D).transpose(0, 2, 1, 3))
            feeds = {"q": qf.reshape(B, G, Hkv * D), "k": np.ascontiguousarray(inp.k),
                     "v": np.ascontiguousarray(inp.v)}
            rows, heads, kshape = G, Hkv, (B, Hkv, Lk, D)
            note = "MultiHeadAttention, query groups folded into the query axis"
        else:
            if Hq != Hkv or dt != "float32":
                raise Skip("MultiHeadAttention runs float32 with Hq == Hkv only")
            feeds = {"q": _bsh(inp.q), "k": _bsh(inp.k), "v": _bsh(inp.v)}
            rows, heads, kshape = Lq, Hq, (B, Lk, Hq * D)
            note = "MultiHeadAttention"
        ins = [("q", dt, (B, rows, heads * D)), ("k", dt, kshape), ("v", dt, kshape)]
        if case.ragged is not None:
            feeds["kpm"] = (np.arange(Lk)[None, :] < np.array(case.lengths())[:, None]).astype(np.int32)
            ins += [("", dt, ()), ("kpm", "int32", (B, Lk))]
            note += " with key_padding_mask"
        outs = [("o", dt, (B, rows, heads * D))]
        model = onnx_model("MultiHeadAttention", ins, outs, {"num_heads": heads, "scale": scale})
    else:
        # GroupQueryAttention: always causal, bottom-right against the past.
        # The first keys are the past cache, the last Lq (per sequence) are new.
        if case.ragged == "padding":
            raise Skip("GroupQueryAttention takes no key-padding mask")
        lens = np.array(case.lengths())
        past = Lk - Lq
        if case.ragged == "key_lens" and Lq != 1:
            raise Skip("ragged key_lens are mapped onto GroupQueryAttention for Lq = 1 only")
        idx = lens[:, None] - Lq + np.arange(Lq)[None, :]                   # (B, Lq) new positions
        k_new = np.take_along_axis(inp.k, idx[:, None, :, None], axis=2)
        v_new = np.take_along_axis(inp.v, idx[:, None, :, None], axis=2)
        feeds = {"q": _bsh(inp.q), "k": _bsh(k_new), "v": _bsh(v_new),
                 "seqlens_k": (lens - 1).astype(np.int32), "total": np.array([lens.max()], np.int32)}
        ins = [("q", dt, (B, Lq, Hq * D)), ("k", dt, (B, Lq, Hkv * D)), ("v", dt, (B, Lq, Hkv * D))]
        if past:
            feeds["pk"] = np.ascontiguousarray(inp.k[:, :, :past])
            feeds["pv"] = np.ascontiguousarray(inp.v[:, :, :past])
            ins += [("pk", dt, (B, Hkv, past, D)), ("pv", dt, (B, Hkv, past, D))]
            note = "GroupQueryAttention; copies the past KV into present each call"
        else:
            ins += [("", dt, ()), ("", dt, ())]
            note = "GroupQueryAttention"
        ins += [("seqlens_k", "int32", (B,)), ("total", "int32", (1,))]
        outs = [("o", dt, (B, Lq, Hq * D)), ("pko", dt, (B, Hkv, Lk, D)), ("pvo", dt, (B, Hkv, Lk, D))]
        model = onnx_model("GroupQueryAttention", ins, outs,
                           {"num_heads": Hq, "kv_num_heads": Hkv, "scale": scale})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a peer that cannot build the op is skipped
        raise Skip(f"onnxruntime {ort.__version__} cannot build the model: {str(exc).splitlines()[0]}") from None

    def call():
        return sess.run(["o"], feeds)[0]

    return call, fetch, note


def prepare(name, inp, threads):
    """``(call, fetch, note)`` for runner ``name`` (a fastqkv backend, ``"auto"``,
    ``"torch"`` or ``"ort"``); raises :class:`Skip` with the reason."""
    if name == "torch":
        return _prepare_torch(inp, threads)
    if name == "ort":
        return _prepare_ort(inp, threads)
    return _prepare_fastqkv(name, inp, threads)


# ---------------------------------------------------------------------------
# oracle check on a subset of heads and rows

def _subset(inp, max_rows=64, max_work=2e8):
    """Index sets (kv heads, q heads, query rows) small enough for the oracle.
    Rows are a suffix, which keeps bottom-right alignment."""
    c = inp.case
    g = c.Hq // c.Hkv
    kvh = list(range(c.Hkv))
    rows = c.Lq
    if 4.0 * c.B * c.Hq * c.Lq * c.Lk * c.D > max_work:
        kvh = sorted({0, c.Hkv - 1})
        rows = min(c.Lq, max_rows)
    qh = [h for kv in kvh for h in range(kv * g, (kv + 1) * g)]
    return kvh, qh, slice(c.Lq - rows, c.Lq)


def check(inp, got):
    """None if ``got`` (bhld, the whole output) agrees with the oracle on a
    subset of heads and rows, else the mismatch message."""
    if inp.oracle is None:
        kvh, qh, rows = _subset(inp)
        kw = dict(inp.kwargs)
        q = inp.q[:, qh, rows]
        k, v = inp.k[:, kvh], inp.v[:, kvh]
        if "mask" in kw and kw["mask"].shape[2] != 1:
            kw["mask"] = kw["mask"][:, :, rows]
        ref = reference.attention(q, k, v, **kw)
        cond = testing._condition(q, k, 1.0 / math.sqrt(inp.case.D))
        vmax = max(1.0, float(np.abs(v.astype(np.float64)).max()))
        inp.oracle = (qh, rows, ref, cond, vmax)
    qh, rows, ref, cond, vmax = inp.oracle
    got = np.asarray(got)
    c = inp.case
    if got.shape != (c.B, c.Hq, c.Lq, c.D):
        return f"output shape {got.shape}, expected {(c.B, c.Hq, c.Lq, c.D)}"
    try:
        testing.assert_close(got[:, qh, rows], ref, np.dtype(_np_dtype(c.dtype)), cond=cond, vmax=vmax)
    except AssertionError as exc:
        return str(exc).split(". ")[0]
    return None


# ---------------------------------------------------------------------------
# machine limits

def _blas_limit(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def _gemm(n, dtype, runs):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    b = a.T.copy()
    a @ b
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    f = 2.0 * n ** 3
    return f / min(ts) / 1e9, f / statistics.median(ts) / 1e9


# MiB of the read bandwidth probe per bench size
_PROBE_MIB = {"full": 512, "quick": 256, "tiny": 16}


def _bandwidth(nbytes, threads, runs):
    """Read bandwidth (best, median GB/s) and how it was measured: a sum over
    ``nbytes`` split across ``threads`` threads of the C extension's probe
    (NumPy's own sum does not scale across Python threads: it reads at about
    one core's rate), or NumPy sums in Python threads without the extension."""
    a = np.ones(nbytes // 4, np.float32)
    try:
        from . import _ckernels
    except ImportError:
        _ckernels = None
    with contextlib.ExitStack() as stack:
        if _ckernels is not None and hasattr(_ckernels, "read_sum"):
            def read():
                _ckernels.read_sum(a, threads)
            how = f"float32 sum over {nbytes >> 20} MiB, {threads} threads of the C probe (4 vector accumulators each, software prefetch 8 KiB ahead)"
        else:
            parts = np.array_split(a, threads)
            ex = stack.enter_context(ThreadPoolExecutor(threads))

            def read():
                list(ex.map(np.sum, parts))
            how = (f"numpy float32 sum over {nbytes >> 20} MiB split across {threads} Python threads "
                   "(C probe unavailable: understates multi-core bandwidth)")
        read()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            read()
            ts.append(time.perf_counter() - t0)
    return a.nbytes / min(ts) / 1e9, a.nbytes / statistics.median(ts) / 1e9, how


def measure_machine(threads, size="full"):
    """sgemm/dgemm GFLOP/s (numpy matmul) and read bandwidth (a float32 sum on
    ``threads`` threads): ``{name: value}`` plus how each was measured."""
    n = {"full": 2048, "quick": 1024, "tiny": 256}[size]
    mib = _PROBE_MIB[size]
    runs = 5 if size != "tiny" else 2
    lim = _blas_limit(threads)
    try:
        s_best, s_med = _gemm(n, np.float32, runs)
        d_best, d_med = _gemm(n // 2 if size == "full" else n, np.float64, runs)
    finally:
        if lim is not None:
            lim.restore_original_limits()
    bw_best, bw_med, bw_how = _bandwidth(mib << 20, threads, runs)
    blas = f"{threads} BLAS threads (threadpoolctl)" if lim is not None else \
        "BLAS default threads (threadpoolctl not installed)"
    return {
        "sgemm_gflops": s_med, "sgemm_gflops_best": s_best,
        "dgemm_gflops": d_med, "dgemm_gflops_best": d_best,
        "bandwidth_gbs": bw_med, "bandwidth_gbs_best": bw_best,
        "sgemm_method": f"numpy float32 matmul {n}x{n}, median of {runs}, {blas}",
        "bandwidth_method": f"{bw_how}, median of {runs}",
    }


# ---------------------------------------------------------------------------
# timing

@dataclass
class _Timer:
    name: str
    call: object
    inner: int = 1
    samples: list = field(default_factory=list)
    spent: float = 0.0
    first_ms: float = 0.0

    def warm(self, target):
        t0 = time.perf_counter()
        raw = self.call()                      # first call: JIT compile, caches
        self.first_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        self.call()
        dt = max(time.perf_counter() - t1, 1e-7)
        self.inner = max(1, min(10000, int(target / dt)))
        return raw

    def sample(self):
        call, n = self.call, self.inner
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        dt = time.perf_counter() - t0
        self.spent += dt
        self.samples.append(dt / n)

    def stats(self):
        """Median ms and spread: half the interquartile range, in % of the median."""
        s = self.samples
        med = statistics.median(s)
        if len(s) < 2 or med <= 0:
            return med * 1e3, 0.0
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return med * 1e3, 50.0 * (q3 - q1) / med


# pause before each runner's block of samples (see run_case)
_SETTLE_S = {"full": 0.3, "quick": 0.1, "tiny": 0.0}
_PLAN = {  # repeats, seconds of samples per runner, target seconds per sample, cap per runner
    "full": (7, 1.0, 0.02, 6.0),
    "quick": (3, 0.15, 0.01, 1.0),
    "tiny": (2, 0.0, 0.001, 0.05),
}


def time_runner(t, size, repeats=None, frac=1.0):
    """Sample one warmed-up timer until it has ``frac`` of its ``repeats``
    samples and of its time budget."""
    rep, budget, _, cap = _PLAN[size]
    rep = math.ceil((repeats or rep) * frac)
    budget, cap = budget * frac, cap * frac
    while True:
        n = len(t.samples)
        if n >= 3 and t.spent >= cap:
            return
        if n >= rep and (t.spent >= budget or n >= 50):
            return
        t.sample()


# ---------------------------------------------------------------------------
# progress: rich when installed and stdout is a terminal, else plain lines

class _Progress:
    def __init__(self, total, want_bar):
        self.bar = None
        self.done = 0
        self.total = total
        if want_bar:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn)
            except ImportError:
                print("progress bar skipped: rich is not installed (pip install rich)")
            else:
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), transient=True)
                self.bar.start()
                self.task = self.bar.add_task("bench", total=total)

    def stage(self, text):
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def log(self, line):
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def advance(self, line):
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
        else:
            print(f"[{self.done}/{self.total}] {line}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------
# the run

def run_case(case, names, threads, size, progress, repeats=None):
    """Time every runner on one case and check it against the oracle."""
    res = {"case": asdict(case), "name": case.name, "describe": case.describe(), "bound": case.bound,
           "flops": case.flops(), "kv_bytes": case.kv_bytes(), "results": [], "skipped": []}
    try:
        inp = make_inputs(case)
    except Skip as exc:
        res["skipped"].append({"runner": "*", "reason": str(exc)})
        progress.log(f"{case.name}: skipped, {exc}")
        return res
    limit = {"full": 1.0, "quick": 0.3, "tiny": math.inf}[size]
    timers, meta = [], {}
    for name in names:
        progress.stage(f"{case.name}: {name} (warm-up, check)")
        if name == "numpy" and numpy_seconds(case) > limit:
            why = f"dense oracle would take ~{numpy_seconds(case):.1f} s per call"
            res["skipped"].append({"runner": name, "reason": why})
            progress.log(f"{case.name}: numpy skipped, {why}")
            continue
        try:
            call, fetch, note = prepare(name, inp, threads)
            t = _Timer(name, call)
            bad = check(inp, fetch(t.warm(_PLAN[size][2])))
        except Skip as exc:
            res["skipped"].append({"runner": name, "reason": str(exc)})
            progress.log(f"{case.name}: {name} skipped, {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one failing runner must not end the bench
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            res["skipped"].append({"runner": name, "reason": f"failed: {msg}"})
            progress.log(f"{case.name}: {name} FAILED, {msg}")
            continue
        if bad:
            progress.log(f"!!! MISMATCH {case.name} {name}: {bad}")
        timers.append(t)
        meta[name] = (note, bad)
    # Each runner is timed in a block of consecutive calls (interleaving single
    # calls would let one runtime's spinning thread pool slow the next); two
    # blocks per runner spread load changes of a shared machine over all.
    # Before a block the previous runner's worker threads are given _SETTLE_S
    # to stop spinning (OpenBLAS under the numpy oracle spins about 0.1 s
    # after a call, OpenMP pools up to its block time), so that they do not
    # take a core from the runner being timed.
    blocks = 1 if size == "tiny" else 2
    for b in range(blocks):
        for t in timers:
            progress.stage(f"{case.name}: timing {t.name} ({b + 1}/{blocks})")
            time.sleep(_SETTLE_S[size])
            time_runner(t, size, repeats, (b + 1) / blocks)
    for t in timers:
        ms, spread = t.stats()
        note, bad = meta[t.name]
        res["results"].append({
            "runner": t.name, "peer": t.name in PEERS, "ms": ms, "spread_pct": spread,
            "samples": len(t.samples), "calls_per_sample": t.inner, "first_call_ms": t.first_ms,
            "gflops": case.flops() / (ms * 1e-3) / 1e9,
            "gbs": case.kv_bytes() / (ms * 1e-3) / 1e9 if case.bound == "memory" else None,
            "check": "ok" if not bad else f"MISMATCH: {bad}", "note": note})
    res["auto"] = _auto_verdict(inp, res, {t.name: t for t in timers}, size, progress)
    progress.advance(f"{case.name}: " + ", ".join(f"{r['runner']} {r['ms']:.3g} ms" for r in res["results"]))
    return res


def _confirm(a, b, size, progress, rounds=4, per_block=3):
    """Re-time two runners in alternating blocks (so load changes hit both)
    and return their medians and ratio ``a / b``."""
    progress.stage(f"confirming {a.name} vs {b.name}")
    ta, tb = _Timer(a.name, a.call, a.inner), _Timer(b.name, b.call, b.inner)
    for _ in range(rounds):
        for t in (ta, tb):
            time.sleep(_SETTLE_S[size])
            for _ in range(per_block):
                t.sample()
    ma, mb = ta.stats()[0], tb.stats()[0]
    return {a.name + "_ms": ma, b.name + "_ms": mb, "ratio": ma / mb, "samples": rounds * per_block}


def _auto_verdict(inp, res, timers, size, progress):
    p = _problem.plan_attention(inp.q, inp.k, inp.v, **inp.kwargs)
    try:
        _, choice = _dispatch.resolve("auto", p)
    except (ValueError, RuntimeError) as exc:
        return {"choice": None, "reason": str(exc)}
    ms = {r["runner"]: r["ms"] for r in res["results"] if not r["peer"] and r["runner"] != "auto"}
    out = {"choice": choice, "auto_ms": next((r["ms"] for r in res["results"] if r["runner"] == "auto"), None)}
    if ms:
        fastest = min(ms, key=ms.get)
        out.update(fastest=fastest, fastest_ms=ms[fastest], choice_ms=ms.get(choice))
        if ms.get(choice) is not None:
            out["ratio"] = ms[choice] / ms[fastest]
            if out["ratio"] > 1.05 and size != "tiny":
                out["confirm"] = _confirm(timers[choice], timers[fastest], size, progress)
                out["ratio"] = out["confirm"]["ratio"]
            out["within_5pct"] = out["ratio"] <= 1.05
    peers = {r["runner"]: r["ms"] for r in res["results"] if r["peer"]}
    if peers:
        best = min(peers, key=peers.get)
        out.update(fastest_peer=best, fastest_peer_ms=peers[best])
    return out


def _best(machine, key):
    """The best run of a machine limit (on a shared machine the median moves
    with the neighbours' load; the best run is what the hardware delivered,
    the stricter yardstick); the median in results without it."""
    return machine.get(key + "_best", machine[key])


def _limit_for(case, machine):
    """The roofline of a case: the best run of its machine limit."""
    if case["bound"] == "memory":
        key, what = "bandwidth_gbs", "bw"
    elif case["case"]["dtype"] == "float64":
        key, what = "dgemm_gflops", "dgemm"
    else:
        key, what = "sgemm_gflops", "sgemm"
    return _best(machine, key), what


def format_table(results, machine):
    """The results table and the auto lines, as text."""
    peers = [p for p in PEERS if any(r["runner"] == p for c in results for r in c["results"])]
    head = (f"{'case':24s} {'backend':8s} {'ms':>9s} {'±%':>4s} {'GFLOP/s':>8s} {'GB/s':>6s} "
            f"{'%limit':>8s} " + " ".join(f"{'x ' + p:>8s}" for p in peers) + "  check")
    lines = [head, "-" * len(head)]
    for c in results:
        pm = {r["runner"]: r["ms"] for r in c["results"] if r["peer"]}
        for r in c["results"]:
            lim, what = _limit_for(c, machine)
            val = r["gbs"] if c["bound"] == "memory" else r["gflops"]
            gbs = f"{r['gbs']:6.1f}" if r["gbs"] is not None else f"{'':6s}"
            ratios = " ".join(f"{pm[p] / r['ms']:8.2f}" if p in pm and not r["peer"] else f"{'':8s}"
                              for p in peers)
            chk = r["check"] if not r["note"] else f"{r['check']} ({r['note']})"
            lines.append(f"{c['name']:24s} {r['runner']:8s} {r['ms']:9.3f} {min(r['spread_pct'], 999):4.0f} "
                         f"{r['gflops']:8.1f} {gbs} {100 * val / lim:5.0f}%{what[:2]:2s} {ratios}  {chk}")
        for s in c["skipped"]:
            lines.append(f"{c['name']:24s} {s['runner']:8s} skipped: {s['reason']}")
    lines.append("")
    lines.append("x PEER = PEER ms / backend ms (> 1: faster than the peer). %limit: of the best run of "
                 "sgemm (sg), dgemm (dg) or read bandwidth (bw). ±%: half the interquartile range of the samples.")
    lines.append("")
    for c in results:
        lines.append(auto_line(c))
    return "\n".join(lines)


def auto_line(c):
    a = c.get("auto") or {}
    if not a.get("choice"):
        return f"auto {c['name']}: no choice ({a.get('reason', 'no backend ran')})"
    s = f"auto {c['name']}: picks {a['choice']}"
    if a.get("auto_ms") is not None:
        s += f" (auto call {a['auto_ms']:.3f} ms)"
    if "fastest" in a:
        s += f"; fastest backend {a['fastest']} {a['fastest_ms']:.3f} ms"
        if "confirm" in a:
            cf = a["confirm"]
            s += (f"; re-timed alternately: {a['choice']} {cf[a['choice'] + '_ms']:.3f} ms vs "
                  f"{a['fastest']} {cf[a['fastest'] + '_ms']:.3f} ms, {a['choice']} "
                  f"{100 * (a['ratio'] - 1):+.1f} %: {'within 5 %' if a['within_5pct'] else 'NOT within 5 %'}")
        elif a.get("ratio") == 1.0:
            s += ": auto's choice is the fastest"
        elif "ratio" in a:
            s += (f"; {a['choice']} {a['choice_ms']:.3f} ms is {100 * (a['ratio'] - 1):.1f} % slower: "
                  f"{'within 5 %' if a['within_5pct'] else 'NOT within 5 %'}")
        else:
            s += f"; {a['choice']} was not measured"
    if "fastest_peer" in a:
        s += f"; fastest peer {a['fastest_peer']} {a['fastest_peer_ms']:.3f} ms"
    return s


def write_plot(path, results, machine):
    """A PNG: achieved GFLOP/s (compute-bound cases) and GB/s (decode) per
    backend, against the machine's limits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [("compute", "GFLOP/s", "gflops"), ("memory", "GB/s of K/V read", "gbs")]
    runners = []
    for c in results:
        for r in c["results"]:
            if r["runner"] not in runners:
                runners.append(r["runner"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(results) + 4), 9))
    for ax, (bound, label, key) in zip(axes, groups):
        cs = [c for c in results if c["bound"] == bound]
        width = 0.8 / max(1, len(runners))
        for i, name in enumerate(runners):
            xs, ys = [], []
            for j, c in enumerate(cs):
                r = next((r for r in c["results"] if r["runner"] == name), None)
                if r is not None and r[key] is not None:
                    xs.append(j + (i - (len(runners) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=name)
        if bound == "compute":
            ax.axhline(_best(machine, "sgemm_gflops"), color="k", ls="--",
                       label="sgemm (best run)")
            if any(c["case"]["dtype"] == "float64" for c in cs):
                ax.axhline(_best(machine, "dgemm_gflops"), color="gray", ls=":",
                           label="dgemm (best run)")
        else:
            ax.axhline(_best(machine, "bandwidth_gbs"), color="k", ls="--",
                       label="read bandwidth (best run)")
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([c["name"] for c in cs], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"fastqkv bench, {machine['threads']} threads, {machine.get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    from . import __version__
    v = {"fastqkv": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "numba"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - missing or broken: reported as not installed
            v[mod] = None
    return v


# ---------------------------------------------------------------------------
# command line

def add_arguments(p):
    """Options of ``fastqkv bench``."""
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (under a minute)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for smoke tests")
    p.add_argument("--threads", type=int, default=None, help="thread count (default: fastqkv.get_num_threads())")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="run only this runner (repeatable): a fastqkv backend, auto, torch or ort")
    p.add_argument("--case", action="append", metavar="SUBSTRING", help="run only cases whose name contains this")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch and ONNX Runtime")
    p.add_argument("--repeat", type=int, default=None, help="samples per runner (default by size)")
    p.add_argument("--json", metavar="PATH", help="write all results and machine info as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of each backend against the machine limits")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines, no progress bar")


def main(args):
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    threads = args.threads or _dispatch.get_num_threads()
    if threads < 1:
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    known = ["auto"] + fastqkv_names() + list(PEERS)
    names = args.backend or known
    bad = [n for n in names if n not in known]
    if bad:
        print(f"unknown backend(s): {', '.join(bad)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.no_peers:
        names = [n for n in names if n not in PEERS]
    names = [n for n in known if n in names]          # canonical order, no duplicates
    cases = [c for c in shape_classes(size) if not args.case or any(s in c.name for s in args.case)]
    if not cases:
        print(f"no case matches {args.case}; cases: {', '.join(c.name for c in shape_classes(size))}",
              file=sys.stderr)
        return 2
    old_threads = _dispatch._num_threads
    try:
        return _run(args, size, threads, names, cases)
    finally:
        _dispatch._num_threads = old_threads


def _run(args, size, threads, names, cases):
    print(f"fastqkv bench ({size}): {len(cases)} cases, runners {', '.join(names)}, {threads} threads")
    names = list(names)
    machine = {"threads": threads, "cpu": _cpu_name(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "versions": _versions(),
               "backends": {n: {"available": i.available, "reason": i.reason, "details": i.details}
                            for n, i in _dispatch.backends().items()}}
    for name, info in _dispatch.backends().items():
        if name in names and not info.available:
            print(f"backend {name} skipped: not available ({info.reason})")
            names.remove(name)
    for peer, module in (("torch", "torch"), ("ort", "onnxruntime")):
        if peer in names and machine["versions"][module] is None:
            print(f"peer {peer} skipped: {module} is not installed (pip install {module})")
            names.remove(peer)
    machine.update(measure_machine(threads, size))
    print(f"machine: {machine['cpu']}, {threads} threads")
    print(f"  sgemm {machine['sgemm_gflops']:.1f} GFLOP/s (best {machine['sgemm_gflops_best']:.1f}; "
          f"{machine['sgemm_method']}); dgemm {machine['dgemm_gflops']:.1f} GFLOP/s")
    print(f"  read bandwidth {machine['bandwidth_gbs']:.1f} GB/s (best {machine['bandwidth_gbs_best']:.1f}; "
          f"{machine['bandwidth_method']})")
    want_bar = not args.no_progress and sys.stdout.isatty()
    progress = _Progress(len(cases), want_bar)
    results = []
    t0 = time.perf_counter()
    try:
        for case in cases:
            if case.bound == "memory":
                # the read bandwidth of a shared machine drifts: probe it again
                # next to every memory-bound case; the best run of all is the roofline
                best, _med, _how = _bandwidth(_PROBE_MIB[size] << 20, threads, 3)
                machine["bandwidth_gbs_best"] = max(machine["bandwidth_gbs_best"], best)
            results.append(run_case(case, names, threads, size, progress, args.repeat))
    finally:
        progress.close()
    if any(c.bound == "memory" for c in cases):
        print(f"read bandwidth, best of the probes before and next to the memory-bound cases: "
              f"{machine['bandwidth_gbs_best']:.1f} GB/s")
    print()
    print(format_table(results, machine))
    print(f"\n{len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    mismatches = [(c["name"], r["runner"]) for c in results for r in c["results"] if r["check"] != "ok"]
    status = 0
    if mismatches:
        print("!!! MISMATCH against the oracle: " + ", ".join(f"{c} {r}" for c, r in mismatches))
        if any(r not in PEERS for _, r in mismatches):
            status = 1
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "size": size, "cases": results}, f, indent=1, default=str)
            print(f"wrote {args.json}")
        except OSError as exc:
            print(f"--json not written: {exc}")
            status = status or 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        else:
            try:
                write_plot(args.plot, results, machine)
                print(f"wrote {args.plot}")
            except OSError as exc:
                print(f"--plot not written: {exc}")
                status = status or 2
    return status
