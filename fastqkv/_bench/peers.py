"""The peers: PyTorch SDPA and ONNX Runtime, each in its fastest form for a
call.

Contract: :func:`prepare_torch` and :func:`prepare_ort` turn an
:class:`~.inputs.Inputs` into ``(call, fetch, note)``: ``call()`` runs the
peer once and returns its raw result, ``fetch(raw)`` gives the ``bhld``
ndarray to check, ``note`` says how the peer was called.  A peer that is not
installed, or cannot express the case, raises :class:`~.cases.Skip` with one
line of reason.  Both frameworks are imported on first use only.
"""

from __future__ import annotations

import math

import numpy as np

from .cases import Skip
from .onnx_model import onnx_model

PEERS = ("torch", "ort")

# the module each peer needs, for the one-line skip when it is missing
PEER_MODULES = {"torch": ("torch",), "ort": ("onnxruntime", "onnx")}


def missing_module(peer):
    """The first module ``peer`` needs that is not installed, or None."""
    import importlib.util
    for mod in PEER_MODULES[peer]:
        try:
            if importlib.util.find_spec(mod) is None:
                return mod
        except (ImportError, ValueError):     # a module set to None in sys.modules
            return mod
    return None


# ---------------------------------------------------------------------------
# PyTorch SDPA

def torch_tensor(torch, a):
    """A torch view of ndarray ``a`` (bfloat16: the same bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bool_mask(case):
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
    query group into the query axis: one multi-head call of Hkv heads and
    Hq/Hkv rows, with no copy of K/V, several times faster than
    enable_gqa=True (docs/tuning.md, "Benchmarks").  Other GQA calls use
    enable_gqa=True."""
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


def prepare_torch(inp, threads):
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    case = inp.case
    torch.set_num_threads(threads)
    q, k, v = (torch_tensor(torch, a) for a in (inp.q, inp.k, inp.v))
    kw = {}
    mask = bool_mask(case)
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


# ---------------------------------------------------------------------------
# ONNX Runtime: one com.microsoft node

def _bsh(a):
    """(B, H, L, D) -> contiguous (B, L, H*D)."""
    B, H, L, D = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(B, L, H * D)


def ort_form(case):
    """The ORT operator form of ``case``: ``"folded"`` (one query position:
    MultiHeadAttention with the query groups folded into the query axis),
    ``"mha"`` (MultiHeadAttention, not causal) or ``"gqa"``
    (GroupQueryAttention, causal)."""
    if case.Lq == 1 and case.dtype == "float32":
        return "folded"
    return "gqa" if case.causal else "mha"


def ort_model(inp, form=None):
    """``(model bytes, feeds, fetch, note)`` of ``inp`` in ORT ``form``
    (default :func:`ort_form`); raises :class:`~.cases.Skip` where the
    operator cannot express the case."""
    case = inp.case
    if case.dtype not in ("float32", "float16"):
        raise Skip(f"com.microsoft attention ops have no {case.dtype} CPU kernel")
    form = form or ort_form(case)
    dt = case.dtype
    B, Hq, Hkv, Lq, Lk, D = case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D
    scale = float(1.0 / math.sqrt(D))
    G = Hq // Hkv
    fold = form == "folded"

    def fetch(o):
        if fold:
            return o.reshape(B, G, Hkv, D).transpose(0, 2, 1, 3).reshape(B, Hq, 1, D)
        return o.reshape(B, Lq, Hq, D).transpose(0, 2, 1, 3)

    if form in ("folded", "mha"):
        if fold:
            # one query position (bottom-right causal hides nothing): each KV
            # head's query group as the query rows of one head, K/V read in
            # place as (B, Hkv, Lk, D); GroupQueryAttention copies the past
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
        return onnx_model("MultiHeadAttention", ins, outs, {"num_heads": heads, "scale": scale}), \
            feeds, fetch, note
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
    return model, feeds, fetch, note


def prepare_ort(inp, threads, form=None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    try:
        model, feeds, fetch, note = ort_model(inp, form)
    except ImportError:
        raise Skip("onnx is not installed (pip install onnx)") from None
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
