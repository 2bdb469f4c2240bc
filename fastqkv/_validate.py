"""Every input check and every error message of fastqkv, in one place.

Contract: a ``check_*`` function raises ``TypeError`` (wrong kind or dtype) or
``ValueError`` (shape, range) naming the argument and what was expected, and
otherwise returns the checked arguments as NumPy arrays and Python scalars in
the caller's own shapes and layout.  Nothing here decides how a call is run
or normalises it for a kernel (that is :mod:`fastqkv._problem`), so the
planner and the oracle share these checks and their messages but not their
arithmetic.  No input is copied here, except to native byte order.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Tuple

import numpy as np

from . import _config

# The storage dtypes, by NumPy dtype name.  The 16-bit ones are read at half
# width; bfloat16 is ml_dtypes' type, recognised by its name so that importing
# fastqkv never imports ml_dtypes (a caller holding such an array already has).
HALF_DTYPES = ("float16", "bfloat16")
FLOAT_DTYPES = ("float32", "float64") + HALF_DTYPES
# Quantized KV storage (one byte per value, with float32 scales): int8 and
# ml_dtypes' float8 types, recognised by name like bfloat16.  The queries of
# such a call are float32, float16 or bfloat16.
QUANT_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
QUANT_Q_DTYPES = ("float32",) + HALF_DTYPES


def bfloat16():
    """The bfloat16 dtype, importing ml_dtypes on first use; None without it."""
    try:
        import ml_dtypes
    except ImportError:  # ml_dtypes is optional
        return None
    return np.dtype(ml_dtypes.bfloat16)


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def acc_dtype(dtype):
    """The accumulation (and lse) dtype for a storage dtype."""
    return _F64 if dtype.char == "d" else _F32


_NAMES: dict = {}


def storage_name(dtype):
    """``dtype.name`` (which NumPy builds anew, in microseconds, at each
    read), remembered per dtype: the name by which every backend looks a
    storage dtype up."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = dtype.name
    return name


def is_float_dtype(dtype):
    return storage_name(dtype) in FLOAT_DTYPES


def is_quant_dtype(dtype):
    return storage_name(dtype) in QUANT_DTYPES


def quant_dtype(name):
    """The NumPy dtype of a quantized storage name, importing ml_dtypes for
    the float8 ones; raises ImportError naming the package without it."""
    if name == "int8":
        return np.dtype(np.int8)
    try:
        import ml_dtypes
    except ImportError:  # ml_dtypes is optional
        raise ImportError(f"{name} needs ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(getattr(ml_dtypes, name))


def as_array(x, name):
    """View ``x`` as an ndarray without a copy where NumPy can."""
    if isinstance(x, np.ndarray):
        return x
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        if hasattr(x, "__dlpack__") and not hasattr(x, "__array__") and not hasattr(x, "__array_interface__"):
            a = np.from_dlpack(x)           # zero-copy view of a DLPack producer
        else:
            a = np.asarray(x)               # buffer protocol, __array_interface__, __array__
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name} must be an array-like of numbers, got {type(x).__name__}: {exc}") from None
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an object array from {type(x).__name__}")
    return a


def _float_array(x, name):
    a = as_array(x, name)
    if not is_float_dtype(a.dtype):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got dtype {a.dtype}"
        )
    if not a.dtype.isnative:                 # kernels read native byte order
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def _kv_array(x, name, q_dtype):
    """K or V (or a cache of them): q's float dtype, or a quantized dtype."""
    a = as_array(x, name)
    if is_quant_dtype(a.dtype):
        if storage_name(q_dtype) not in QUANT_Q_DTYPES:
            raise TypeError(f"{name} of dtype {a.dtype} (quantized) needs q of dtype "
                            f"{', '.join(QUANT_Q_DTYPES)}, got q {q_dtype}")
        return a
    return _float_array(a, name)


def _check_kv_dtypes(q, k, v, kname="k", vname="v"):
    """q/k/v dtypes: one float dtype, or quantized k and v of one dtype."""
    if is_quant_dtype(k.dtype) or is_quant_dtype(v.dtype):
        if k.dtype != v.dtype:
            raise TypeError(f"{kname} and {vname} must share one quantized dtype "
                            f"({', '.join(QUANT_DTYPES)}), got {k.dtype} and {v.dtype}")
        return True
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, {kname} and {vname} must share one dtype, got q {q.dtype}, {kname} {k.dtype}, {vname} {v.dtype}"
        )
    return False


def check_kv_scales(quantized, k_scale, v_scale, kv_dtype, want, per_head, kname="k"):
    """The scales of a quantized K/V: float32 arrays of shape ``want`` (one
    per stored token and head) or ``(Hkv,) = per_head``, or both None when
    K/V are not quantized.  Returns them as arrays (values are checked by
    :func:`check_scale_values` over the keys a call reads)."""
    if not quantized:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s is not None:
                raise TypeError(f"{name} is only for quantized {kname} and v "
                                f"({', '.join(QUANT_DTYPES)}), got {kname} of dtype {kv_dtype}")
        return None, None
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise TypeError(f"{kname} and v of dtype {kv_dtype} need {name}= (float32 scales; "
                            "fastqkv.quantize_kv returns them)")
        s = as_array(s, name)
        if s.dtype != _F32:
            raise TypeError(f"{name} must be a float32 array, got dtype {s.dtype}")
        if s.shape != tuple(want) and s.shape != tuple(per_head):
            raise ValueError(f"{name} must have shape {tuple(want)} (one scale per token and KV head) "
                             f"or {tuple(per_head)} (one per KV head), got {s.shape}")
        if not s.dtype.isnative:
            s = s.astype(s.dtype.newbyteorder("="))
        out.append(s)
    return tuple(out)


def check_scale_values(scales, parts):
    """Every scale a call reads must be finite and > 0: ``parts`` yields the
    read parts of each scale array (a scale array itself when all of it is
    read)."""
    for name, s in zip(("k_scale", "v_scale"), scales):
        for part in parts(s):
            if part.size == 0:
                continue
            lo, hi = part.min(), part.max()
            if not (lo > 0 and hi < np.inf):
                raise ValueError(f"{name} must be finite and > 0 for every key read, got values in [{lo}, {hi}]")


def bhld(a, layout):
    """The 4-D (B, H, L, D) view of a 4-D/3-D/2-D array in ``layout``."""
    if a.ndim == 4:
        return a if layout == "bhld" else a.transpose(0, 2, 1, 3)
    if a.ndim == 3:
        return a[None] if layout == "bhld" else a.transpose(1, 0, 2)[None]
    return a[None, None]


def user_shape(B, H, L, D, ndim, layout):
    """Shape of an output (B, H, L, D) in the caller's ndim and layout."""
    if ndim == 4:
        return (B, H, L, D) if layout == "bhld" else (B, L, H, D)
    if ndim == 3:
        return (H, L, D) if layout == "bhld" else (L, H, D)
    return (L, D)


def lse_shape(B, H, L, ndim):
    """Shape of the lse for outputs of rank ``ndim`` (any layout): (B, H, L),
    (H, L) or (L,)."""
    return (B, H, L)[4 - ndim:]


def check_layout(layout):
    if not isinstance(layout, str) or layout not in _config.LAYOUTS:
        raise ValueError(f"layout must be one of {_config.LAYOUTS}, got {layout!r}")


def check_bool(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__}")
    return bool(x)


def check_real(x, name, *, positive=False):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return x


def check_int(x, name, *, minimum=None):
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def int_array(x, name, shape=None):
    a = as_array(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


# Window sides at least this large can see every key of any array: they are
# stored as unbounded (-1) so that no bound overflows 64-bit arithmetic.
_WINDOW_UNBOUNDED = 1 << 62


def check_window(window):
    if window is None:
        return -1, -1
    if isinstance(window, np.ndarray):
        window = window.tolist() if window.ndim == 1 else window
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of integers, -1 = unbounded, got {window!r}")
    left = check_int(window[0], "window[0] (left)", minimum=-1)
    right = check_int(window[1], "window[1] (right)", minimum=-1)
    left = -1 if left >= _WINDOW_UNBOUNDED else left
    right = -1 if right >= _WINDOW_UNBOUNDED else right
    return left, right


def check_out_overlap(out, others, name="out"):
    for other_name, other in others:
        if other is None:
            continue
        if np.may_share_memory(out, other):
            try:
                overlap = np.shares_memory(out, other, max_work=_config.SHARES_MEMORY_MAX_WORK)
            except np.exceptions.TooHardError:
                overlap = True
            if overlap:
                raise ValueError(f"{name} must not overlap the input {other_name}")


def check_out(out, shape, dtype, others, name="out"):
    """Validate a caller's output array; returns it."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    check_out_overlap(out, others, name)
    return out


def check_broadcast(a, shape, name):
    """``a`` must broadcast to ``(B, Hq, Lq, Lk) = shape``."""
    if a.ndim > 4:
        raise ValueError(f"{name} must be broadcastable to (B, Hq, Lq, Lk) = {shape}, got {a.ndim}-D shape {a.shape}")
    # numpy.broadcast_to's rule, on the shapes alone
    for n, want in zip(a.shape[::-1], shape[::-1]):
        if n != want and n != 1:
            raise ValueError(f"{name} must be broadcastable to (B, Hq, Lq, Lk) = {shape}, got shape {a.shape}")


class Checked(NamedTuple):
    """The checked arguments of an attention call, in the caller's shapes."""

    q: np.ndarray                   # float arrays of one dtype, native byte order
    k: np.ndarray
    v: np.ndarray
    ndim: int                       # 2, 3 or 4
    dims: Tuple[int, ...]           # (B, Hq, Hkv, Lq, Lk, D, Dv)
    causal: bool
    return_lse: bool
    scale: Optional[float]          # None: the default 1/sqrt(D)
    softcap: Optional[float]        # None: off
    window: Tuple[int, int]         # (left, right), -1 = unbounded; causal not folded in
    mask: Optional[np.ndarray]      # bool, broadcastable to (B, Hq, Lq, Lk)
    bias: Optional[np.ndarray]      # float (any float dtype), broadcastable likewise
    key_lens: Optional[np.ndarray]  # int64 (B,) within [0, Lk]
    alibi: Optional[np.ndarray]     # float (Hq,) or (B, Hq), finite in the accumulation dtype
    sinks: Optional[np.ndarray]     # (Hq,) in the accumulation dtype, finite or -inf
    k_scale: Optional[np.ndarray] = None  # float32 k.shape[:-1] or (Hkv,); quantized K/V only
    v_scale: Optional[np.ndarray] = None


def check_attention(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes,
                    layout, return_lse, out, sinks=None, k_scale=None, v_scale=None):
    """Check the arguments of :func:`fastqkv.attention` (in its order);
    return :class:`Checked`."""
    check_layout(layout)
    q = _float_array(q, "q")
    k = _kv_array(k, "k", q.dtype)
    v = _kv_array(v, "v", q.dtype)
    quantized = _check_kv_dtypes(q, k, v)
    ndim = q.ndim
    if ndim not in (2, 3, 4):
        raise ValueError(f"q must be 2-D, 3-D or 4-D, got {ndim}-D with shape {q.shape}")
    if k.ndim != ndim or v.ndim != ndim:
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got {q.ndim}, {k.ndim}, {v.ndim}"
        )
    B, Hq, Lq, D = bhld(q, layout).shape
    Bk, Hkv, Lk, Dk = bhld(k, layout).shape
    Bv, Hv, Lv, Dv = bhld(v, layout).shape
    if Bk != B or Bv != B:
        raise ValueError(f"q, k and v must have the same batch size, got {B}, {Bk}, {Bv}")
    if Hv != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if Lv != Lk:
        raise ValueError(f"k and v must have the same sequence length, got {Lk} and {Lv}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if D == 0:
        raise ValueError("q and k must have a head dim > 0, got 0")
    if Dv == 0:
        raise ValueError("v must have a head dim > 0, got 0")
    if Hkv == 0 and Hq != 0 or Hkv and Hq % Hkv:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv})"
        )
    acc = acc_dtype(q.dtype)

    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    if scale is not None:
        scale = check_real(scale, "scale")
    if softcap is not None:
        softcap = check_real(softcap, "softcap", positive=True)
    window = check_window(window)

    full = (B, Hq, Lq, Lk)
    if mask is not None:
        mask = as_array(mask, "mask")
        if mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be a boolean array (True = attend), got dtype {mask.dtype}; "
                "pass additive float masks as bias="
            )
        check_broadcast(mask, full, "mask")
    if bias is not None:
        bias = _float_array(bias, "bias")
        check_broadcast(bias, full, "bias")
    if key_lens is not None:
        kl = as_array(key_lens, "key_lens")
        if kl.ndim == 0 and B == 1:
            kl = kl.reshape(1)
        key_lens = int_array(kl, "key_lens", (B,))
        if B and (key_lens.min() < 0 or key_lens.max() > Lk):
            raise ValueError(f"key_lens must lie in [0, Lk={Lk}], got values in [{key_lens.min()}, {key_lens.max()}]")
    alibi = None if alibi_slopes is None else check_alibi(alibi_slopes, B, Hq, acc)
    sinks = None if sinks is None else check_sinks(sinks, Hq, acc)
    k_scale, v_scale = check_kv_scales(quantized, k_scale, v_scale, k.dtype, k.shape[:-1], (Hkv,))
    if quantized:
        if key_lens is None:
            check_scale_values((k_scale, v_scale), lambda x: (x,))
        else:
            check_scale_values([scale_bhl(x, (B, Hkv, Lk), ndim, layout) for x in (k_scale, v_scale)],
                               lambda x: (x[b, :, :n] for b, n in enumerate(key_lens.tolist())))

    if out is not None:
        # a bias of another dtype is read through a converted copy: no overlap
        bias_read = bias if bias is not None and bias.dtype == acc and bias.flags.aligned else None
        check_out(out, user_shape(B, Hq, Lq, Dv, ndim, layout), q.dtype,
                  (("q", q), ("k", k), ("v", v), ("mask", mask), ("bias", bias_read)))
    return Checked(q, k, v, ndim, (B, Hq, Hkv, Lq, Lk, D, Dv), causal, return_lse, scale, softcap,
                   window, mask, bias, key_lens, alibi, sinks, k_scale, v_scale)


def scale_bhl(s, shape, ndim, layout):
    """The ``(B, Hkv, Lk) = shape`` view of a checked K/V scale array of a
    K of rank ``ndim``: one per token and head (``k.shape[:-1]`` in
    ``layout``) or one per KV head."""
    if s.ndim == ndim - 1:
        return np.broadcast_to(bhld(s[..., None], layout)[..., 0], shape)
    return np.broadcast_to(s[None, :, None], shape)


def check_sinks(sinks, Hq, acc):
    """Attention sinks: one logit per query head, as a C-contiguous ``(Hq,)``
    array in the accumulation dtype; each finite or -inf (no sink)."""
    s = _float_array(sinks, "sinks")
    if s.shape != (Hq,):
        raise ValueError(f"sinks must have shape ({Hq},): one logit per query head, got {s.shape}")
    s = np.ascontiguousarray(s, dtype=acc)
    if np.isnan(s).any() or (s == np.inf).any():
        raise ValueError("sinks must be finite (or -inf for a head without a sink), got NaN or +inf")
    return s


def check_alibi(alibi_slopes, B, Hq, acc):
    a = _float_array(alibi_slopes, "alibi_slopes")
    if a.shape not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got {a.shape}")
    if not np.isfinite(a.astype(acc)).all():
        raise ValueError("alibi_slopes must be finite")
    return a


def stand_in_v(k):
    """A zero-stride V of head dim 1 matching ``k``, so that the checks of an
    attention call can check ``(q, k)`` alone (attention_weights)."""
    k = as_array(k, "k")
    if not (is_float_dtype(k.dtype) or is_quant_dtype(k.dtype)):
        return k
    shape = list(k.shape)
    if shape:
        shape[-1] = 1
    return np.broadcast_to(np.zeros((), k.dtype), tuple(shape))


# ---------------------------------------------------------------------------
# shared-prefix attention

def check_shared_prefix(q, layout, causal, suffix_lens):
    """The queries of a shared-prefix call: 4-D; with ``causal`` every
    request's suffix must hold its ``Lq`` queries (``suffix_lens >= Lq``:
    the queries are the suffix's last positions, so they see the whole
    prefix).  The suffix itself is checked by its attention call.  Returns
    ``q`` as an array."""
    check_layout(layout)
    q = _float_array(q, "q")
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D (requests, ...) for a shared-prefix call, got shape {q.shape}")
    Lq = bhld(q, layout).shape[2]
    if check_bool(causal, "causal") and len(suffix_lens) and Lq and min(suffix_lens) < Lq:
        raise ValueError(
            f"with causal=True each request's queries are the last {Lq} positions of its suffix, "
            f"so every suffix length must be >= {Lq}, got {min(suffix_lens)}")
    return q


def check_prefix_kv(prefix_k, prefix_v, q, layout, Hkv, Dv):
    """The dense prefix of a shared-prefix call: ``prefix_k (Hkv, P, D)``
    and ``prefix_v (Hkv, P, Dv)`` (``"blhd"``: ``(P, Hkv, ...)``) of q's
    dtype, with the suffix's ``Hkv`` and ``Dv``.  Returns them as arrays."""
    pk = _float_array(prefix_k, "prefix_k")
    pv = _float_array(prefix_v, "prefix_v")
    if pk.dtype != q.dtype or pv.dtype != q.dtype:
        raise TypeError(f"prefix_k and prefix_v must have q's dtype {q.dtype}, got {pk.dtype} and {pv.dtype}")
    want = "(P, Hkv, D)" if layout == "blhd" else "(Hkv, P, D)"
    if pk.ndim != 3 or pv.ndim != 3:
        raise ValueError(f"prefix_k and prefix_v must be 3-D {want}, got shapes {pk.shape} and {pv.shape}")
    (_, hk, pl, d), (_, hv, plv, dv) = bhld(pk, layout).shape, bhld(pv, layout).shape
    D = q.shape[-1]
    if (hk, hv) != (Hkv, Hkv) or (pl != plv) or d != D or dv != Dv:
        raise ValueError(f"prefix_k and prefix_v must be {want} with Hkv={Hkv} (the suffix's), one P, "
                         f"D={D} and Dv={Dv}, got shapes {pk.shape} and {pv.shape}")
    return pk, pv


def check_prefix_blocks(prefix_blocks, prefix_len, k_cache):
    """The prefix of a paged shared-prefix call: ``prefix_blocks`` a 1-D
    int array of cache block ids holding keys ``0 .. prefix_len - 1``.
    Returns ``(prefix_blocks (1, n) int64, prefix_len (1,) int64)``, the
    block table and length of a one-sequence paged call."""
    pb = as_array(prefix_blocks, "prefix_blocks")
    if pb.dtype.kind not in "iu" or pb.ndim != 1:
        raise TypeError(f"prefix_blocks must be a 1-D integer array of block ids, got {pb.dtype} of shape {pb.shape}")
    n = check_int(prefix_len, "prefix_len", minimum=0)
    kc = as_array(k_cache, "k_cache")
    if kc.ndim != 4:
        raise ValueError(f"k_cache must be 4-D (num_blocks, block_size, Hkv, head_dim), got shape {kc.shape}")
    nblocks, bs = kc.shape[:2]
    if n > pb.shape[0] * bs:
        raise ValueError(f"prefix_len must be <= len(prefix_blocks) * block_size = {pb.shape[0] * bs}, got {n}")
    used = pb[: -(-n // bs)] if bs else pb[:0]
    if used.size and (used.min() < 0 or used.max() >= nblocks):
        raise ValueError(f"prefix_blocks must name blocks in [0, {nblocks}), got values in [{used.min()}, {used.max()}]")
    return np.ascontiguousarray(pb[None], dtype=np.int64), np.array([n], np.int64)


# ---------------------------------------------------------------------------
# merge_attention

def check_merge(outs, lses, layout):
    """Check partial results; return ``(outs, lses)`` as lists of float arrays."""
    check_layout(layout)
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError("outs and lses must be sequences (list or tuple) of arrays, one per partial")
    try:
        outs = list(outs)
        lses = list(lses)
    except TypeError:
        raise TypeError("outs and lses must be sequences (list or tuple) of arrays, one per partial") from None
    if not outs:
        raise ValueError("outs must hold at least one partial result")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have the same length, got {len(outs)} and {len(lses)}")
    outs = [_float_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    lses = [_float_array(x, f"lses[{i}]") for i, x in enumerate(lses)]
    o0, l0 = outs[0], lses[0]
    if o0.ndim not in (2, 3, 4):
        raise ValueError(f"outs[0] must be 2-D, 3-D or 4-D, got shape {o0.shape}")
    for i, o in enumerate(outs):
        if o.shape != o0.shape:
            raise ValueError(f"outs[{i}] must have shape {o0.shape} like outs[0], got {o.shape}")
        if o.dtype != o0.dtype:
            raise TypeError(f"outs[{i}] must have dtype {o0.dtype} like outs[0], got {o.dtype}")
    B, H, L, _ = bhld(o0, layout).shape
    want = lse_shape(B, H, L, o0.ndim)
    for i, x in enumerate(lses):
        if x.shape != want:
            raise ValueError(f"lses[{i}] must have shape {want}, got {x.shape}")
        if x.dtype != l0.dtype:
            raise TypeError(f"lses[{i}] must have dtype {l0.dtype} like lses[0], got {x.dtype}")
    return outs, lses


# ---------------------------------------------------------------------------
# attention_varlen

def check_options(causal, scale, window, softcap):
    """Check the scalar options of an attention call (check_attention checks
    them per call; this is for callers where no per-call check may run, e.g. a
    varlen batch without query rows)."""
    check_bool(causal, "causal")
    if scale is not None:
        check_real(scale, "scale")
    if softcap is not None:
        check_real(softcap, "softcap", positive=True)
    check_window(window)


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, mask, bias, key_lens, alibi_slopes,
                 return_lse, out, causal=False, scale=None, window=None, softcap=None,
                 sinks=None, k_scale=None, v_scale=None):
    """Check a packed ragged batch.  Returns ``(q, k, v, cu_q, cu_k, alibi or
    None, sinks or None, return_lse, k_scale, v_scale)`` with ``cu_q``/``cu_k``
    lists of ints, ``alibi`` the caller's ``(Hq,)`` or ``(B, Hq)`` slopes,
    ``sinks`` as :func:`check_sinks` returns them and the scales (quantized
    K/V) as :func:`check_kv_scales` does."""
    for name, val in (("mask", mask), ("bias", bias), ("key_lens", key_lens)):
        if val is not None:
            raise ValueError(
                f"{name} is not supported by attention_varlen (ragged sequences have no dense "
                f"{name}); use cu_seqlens_k for lengths or call attention per sequence"
            )
    q = _float_array(q, "q")
    k = _kv_array(k, "k", q.dtype)
    v = _kv_array(v, "v", q.dtype)
    quantized = _check_kv_dtypes(q, k, v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, head_dim) for attention_varlen, got shape {a.shape}")
    Tq, Hq, D = q.shape
    Tk, Hkv, Dk = k.shape
    if v.shape[:2] != (Tk, Hkv):
        raise ValueError(f"v must have shape ({Tk}, {Hkv}, Dv) like k, got {v.shape}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if D == 0 or v.shape[2] == 0:
        raise ValueError("q, k and v must have a head dim > 0")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv})")
    cq = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq)
    ck = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got {len(cq)} and {len(ck)}")
    B = len(cq) - 1
    alibi = None if alibi_slopes is None else check_alibi(alibi_slopes, B, Hq, acc_dtype(q.dtype))
    sinks = None if sinks is None else check_sinks(sinks, Hq, acc_dtype(q.dtype))
    scales = check_kv_scales(quantized, k_scale, v_scale, k.dtype, (Tk, Hkv), (Hkv,))
    if quantized:                            # cu_seqlens_k ends at Tk: every key is read
        check_scale_values(scales, lambda x: (x,))
    return_lse = check_bool(return_lse, "return_lse")
    check_options(causal, scale, window, softcap)
    if out is not None:
        check_out(out, (Tq, Hq, v.shape[2]), q.dtype, (("q", q), ("k", k), ("v", v)))
    return (q, k, v, cq, ck, alibi, sinks, return_lse) + scales


def scale_rows(scale, rows):
    """The scales of the key rows ``rows`` (a slice) of a packed K: rows of a
    ``(total_k, Hkv)`` array, per-head ``(Hkv,)`` scales whole; None stays."""
    return scale if scale is None or scale.ndim == 1 else scale[rows]


def _cu_seqlens(x, name, total):
    a = as_array(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length B + 1 >= 1, got shape {a.shape}")
    a = a.astype(np.int64)
    if a[0] != 0:
        raise ValueError(f"{name} must start at 0, got {a[0]}")
    if np.any(np.diff(a) < 0):
        raise ValueError(f"{name} must be non-decreasing")
    if a[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {a[-1]}")
    return [int(t) for t in a]


# ---------------------------------------------------------------------------
# paged_attention

class CheckedPages(NamedTuple):
    """The checked cache arguments of :func:`fastqkv.paged_attention`."""

    k_cache: np.ndarray        # (num_blocks, block_size, Hkv, D)
    v_cache: np.ndarray        # (num_blocks, block_size, Hkv, Dv)
    block_table: np.ndarray    # C-contiguous int64 (B, max_blocks)
    seq_lens: np.ndarray       # int64 (B,) within [0, max_blocks * block_size]
    block_size: int
    k_scale: Optional[np.ndarray] = None   # float32 (num_blocks, block_size, Hkv) or (Hkv,)
    v_scale: Optional[np.ndarray] = None


def check_paged(q, k_cache, v_cache, block_table, seq_lens, *, layout, key_lens, k_scale=None,
                v_scale=None, packed=False):
    """Check the paged cache arguments (q itself is checked by check_attention;
    ``packed``: q is ``(total_q, Hq, D)`` and B is block_table's rows, see
    :func:`check_packed_queries`)."""
    check_layout(layout)
    if key_lens is not None:
        raise ValueError("key_lens is not accepted by paged_attention: seq_lens gives each sequence's length")
    q = _float_array(q, "q")
    kc = _kv_array(k_cache, "k_cache", q.dtype)
    vc = _kv_array(v_cache, "v_cache", q.dtype)
    quantized = _check_kv_dtypes(q, kc, vc, "k_cache", "v_cache")
    if kc.ndim != 4 or vc.ndim != 4:
        raise ValueError(
            "k_cache and v_cache must be 4-D (num_blocks, block_size, Hkv, head_dim), "
            f"got shapes {kc.shape} and {vc.shape}"
        )
    if vc.shape[:3] != kc.shape[:3]:
        raise ValueError(f"v_cache must match k_cache in (num_blocks, block_size, Hkv) = {kc.shape[:3]}, got {vc.shape[:3]}")
    nblocks, bs = kc.shape[:2]
    if bs < 1:
        raise ValueError("k_cache must have block_size >= 1")
    if q.ndim != 4 and not packed:
        raise ValueError(f"q must be 4-D for paged_attention (3-D packed with cu_seqlens_q), got shape {q.shape}")
    bt = as_array(block_table, "block_table")
    B = bt.shape[0] if packed and bt.ndim == 2 else q.shape[0]
    if bt.dtype.kind not in "iu":
        raise TypeError(f"block_table must be an integer array, got dtype {bt.dtype}")
    if bt.ndim != 2 or bt.shape[0] != B:
        raise ValueError(f"block_table must have shape (B={B}, max_blocks), got {bt.shape}")
    bt = np.ascontiguousarray(bt, dtype=np.int64)
    sl = int_array(seq_lens, "seq_lens", (B,))
    cap = bt.shape[1] * bs
    if B and (sl.min() < 0 or sl.max() > cap):
        raise ValueError(f"seq_lens must lie in [0, max_blocks * block_size = {cap}], got [{sl.min()}, {sl.max()}]")
    for b in range(B):
        used = bt[b, : -(-int(sl[b]) // bs)]
        if used.size and (used.min() < 0 or used.max() >= nblocks):
            raise ValueError(
                f"block_table[{b}] must name blocks in [0, {nblocks}) for its first "
                f"{used.size} entries, got values in [{used.min()}, {used.max()}]"
            )
    scales = check_kv_scales(quantized, k_scale, v_scale, kc.dtype, kc.shape[:3], (kc.shape[2],),
                             "k_cache")
    if quantized:
        check_scale_values(scales, lambda x: _paged_parts(x, bt, sl, bs))
    return CheckedPages(kc, vc, bt, sl, bs, *scales)


def check_packed_queries(q, cu_seqlens_q, seq_lens, layout, mask, bias):
    """The packed queries of a paged call with ``cu_seqlens_q``: ``q
    (total_q, Hq, D)``, sequence ``b`` owning rows ``cu_seqlens_q[b] ..
    cu_seqlens_q[b+1]``, never more than its ``seq_lens[b]`` keys.  Returns
    ``(q, cu_q)`` with ``cu_q`` a list of ints."""
    for name, val in (("mask", mask), ("bias", bias)):
        if val is not None:
            raise ValueError(f"{name} is not supported with cu_seqlens_q (packed queries have no dense {name})")
    if layout != "bhld":
        raise ValueError("layout does not apply with cu_seqlens_q: packed q is (total_q, Hq, D) "
                         "and the caches are (num_blocks, block_size, Hkv, D)")
    q = _float_array(q, "q")
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D (total_q, Hq, head_dim) with cu_seqlens_q, got shape {q.shape}")
    cq = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    if len(cq) != len(seq_lens) + 1:
        raise ValueError(f"cu_seqlens_q must have length B + 1 = {len(seq_lens) + 1} (block_table rows + 1), got {len(cq)}")
    for b, n in enumerate(seq_lens.tolist()):
        if cq[b + 1] - cq[b] > n:
            raise ValueError(f"sequence {b} has {cq[b + 1] - cq[b]} queries but only {n} keys "
                             "(its queries are the last positions of its seq_lens keys)")
    return q, cq


def _paged_parts(s, bt, sl, bs):
    """The parts of a paged scale array ``s`` that a call reads: every used
    block whole but each sequence's last, which is read up to its length."""
    if s.ndim == 1:
        yield s
        return
    for b, n in enumerate(sl.tolist()):
        if n:
            nb = -(-n // bs)
            yield s[bt[b, : nb - 1]]
            yield s[bt[b, nb - 1], : n - (nb - 1) * bs]


# ---------------------------------------------------------------------------
# self_attention

def check_self_attention(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads):
    """Returns ``(x3, dtype, Hq, Hkv, D, Dv, squeeze)``."""
    x = _float_array(x, "x")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be (B, L, d_model) or (L, d_model), got shape {x.shape}")
    squeeze = x.ndim == 2
    x3 = x[None] if squeeze else x
    dm = x3.shape[2]
    Hq = check_int(num_heads, "num_heads", minimum=1)
    Hkv = Hq if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads", minimum=1)
    if Hq % Hkv:
        raise ValueError(f"num_heads ({Hq}) must be a multiple of num_kv_heads ({Hkv})")
    ws = {}
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        w = _float_array(w, name)
        if w.dtype != x.dtype:
            raise TypeError(f"{name} must have dtype {x.dtype} like x, got {w.dtype}")
        if w.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {w.shape}")
        ws[name] = w
    if ws["w_q"].shape[0] != dm or ws["w_q"].shape[1] % Hq or ws["w_q"].shape[1] == 0:
        raise ValueError(f"w_q must have shape (d_model={dm}, num_heads*head_dim), got {ws['w_q'].shape}")
    D = ws["w_q"].shape[1] // Hq
    if ws["w_k"].shape != (dm, Hkv * D):
        raise ValueError(f"w_k must have shape ({dm}, {Hkv * D}), got {ws['w_k'].shape}")
    if ws["w_v"].shape[0] != dm or ws["w_v"].shape[1] % Hkv or ws["w_v"].shape[1] == 0:
        raise ValueError(f"w_v must have shape (d_model={dm}, num_kv_heads*v_head_dim), got {ws['w_v'].shape}")
    Dv = ws["w_v"].shape[1] // Hkv
    if ws["w_o"].shape[0] != Hq * Dv:
        raise ValueError(f"w_o must have shape ({Hq * Dv}, d_out), got {ws['w_o'].shape}")
    return x3, x.dtype, Hq, Hkv, D, Dv, squeeze
