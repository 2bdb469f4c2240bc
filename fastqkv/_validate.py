"""Every input check and every error message of fastqkv, in one place.

The public functions call into this module first; it turns user arguments into
a normalised :class:`Problem` (4-D ``(B, H, L, D)`` views, broadcast masks,
resolved defaults) that every backend trusts.  Nothing here copies an input
unless a kernel could not walk it (non-unit last stride, unaligned data, a
stride that is not a whole number of elements).

Bad input raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (shape,
range) naming the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from . import _config

__all__ = ["Problem", "plan_attention", "plan_simple"]


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is optional
        return None
    return np.dtype(ml_dtypes.bfloat16)


BFLOAT16 = _bfloat16()


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def acc_dtype(dtype):
    """The accumulation (and lse) dtype for a storage dtype."""
    return _F64 if dtype.char == "d" else _F32


def is_float_dtype(dtype):
    return dtype.char in "efd" or (BFLOAT16 is not None and dtype == BFLOAT16)


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


def _walkable(a):
    """Return ``a`` or a copy that a kernel can walk: aligned, unit last stride,
    every stride a whole number of elements."""
    flags = a.flags
    if flags.c_contiguous and flags.aligned:
        return a
    item = a.itemsize
    ok = flags.aligned
    if ok:
        for n, s in zip(a.shape, a.strides):
            if n > 1 and s % item:
                ok = False
                break
        if ok and a.ndim and a.shape[-1] > 1 and a.strides[-1] != item:
            ok = False
    return a if ok else _aligned_copy(a)


def _aligned_copy(a):
    """A C-contiguous copy in fresh (aligned) memory; ascontiguousarray would
    return an unaligned contiguous array unchanged."""
    return np.array(a, order="C", copy=True)


def _to_bhld(a, layout):
    """4-D (B, H, L, D) view of a 4-D/3-D/2-D input in `layout`."""
    if a.ndim == 4:
        return a if layout == "bhld" else a.transpose(0, 2, 1, 3)
    if a.ndim == 3:
        return a[None] if layout == "bhld" else a.transpose(1, 0, 2)[None]
    return a[None, None]


def _user_shape(B, H, L, D, ndim, layout):
    """Shape of an output (B, H, L, D) in the caller's ndim and layout."""
    if ndim == 4:
        return (B, H, L, D) if layout == "bhld" else (B, L, H, D)
    if ndim == 3:
        return (H, L, D) if layout == "bhld" else (L, H, D)
    return (L, D)


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


class Problem:
    """A validated attention call, normalised for the kernels.

    Arrays are 4-D ``(B, H, L, D)`` views (no copies unless needed to walk
    them); the last axis of q/k/v/out has unit stride.  ``mask`` and ``bias``
    are broadcast views of shape ``(B, Hq, Lq, Lk)`` (zero strides where the
    caller broadcast); ``bias`` and ``alibi`` are in the accumulation dtype.
    ``window_right`` already includes ``causal`` (causal means right = 0).
    ``key_lens`` is an int64 ``(B,)`` array or None (all ``Lk``).
    ``alibi`` is a contiguous ``(B, Hq)`` array or None.

    Paged KV (``block_table`` not None): ``k`` and ``v`` are the caches
    ``(num_blocks, block_size, Hkv, D)``; key ``j`` of batch ``b`` and KV
    head ``g`` is ``k[block_table[b, j // block_size], j % block_size, g]``;
    ``Lk = max_blocks * block_size`` and ``key_lens`` holds the sequence
    lengths (table entries past a sequence's last block are not read).
    A backend that lists ``"paged"`` in its ``FEATURES`` receives such
    problems; others get a dense gathered copy.
    """

    __slots__ = (
        "q", "k", "v", "out", "lse", "mask", "bias", "key_lens", "alibi",
        "scale", "softcap", "causal", "window_left", "window_right",
        "B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "dtype", "acc_dtype",
        "out_user", "lse_user", "copy_to", "return_lse", "layout", "ndim",
        "block_table", "block_size",
    )

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    @classmethod
    def _fast(cls, q, k, v, out, lse, mask, bias, key_lens, alibi, scale, softcap, causal,
              window_left, window_right, B, Hq, Hkv, Lq, Lk, D, Dv, dtype, acc_dtype, out_user,
              lse_user, copy_to, return_lse, layout, ndim):
        p = cls.__new__(cls)
        p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse; p.mask = mask  # noqa: E702
        p.bias = bias; p.key_lens = key_lens; p.alibi = alibi; p.scale = scale  # noqa: E702
        p.softcap = softcap; p.causal = causal; p.window_left = window_left  # noqa: E702
        p.window_right = window_right; p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq  # noqa: E702
        p.Lk = Lk; p.D = D; p.Dv = Dv; p.dtype = dtype; p.acc_dtype = acc_dtype  # noqa: E702
        p.out_user = out_user; p.lse_user = lse_user; p.copy_to = copy_to  # noqa: E702
        p.return_lse = return_lse; p.layout = layout; p.ndim = ndim  # noqa: E702
        p.block_table = None; p.block_size = None  # noqa: E702
        return p

    @property
    def group(self):
        """Query heads per KV head."""
        return self.Hq // self.Hkv

    @property
    def empty(self):
        return self.B == 0 or self.Hq == 0 or self.Lq == 0

    def result(self):
        """What the public function returns, after the kernel filled out/lse."""
        if self.copy_to is not None:
            self.copy_to[...] = self.out_user
            self.out_user = self.copy_to
        if self.return_lse:
            return self.out_user, self.lse_user
        return self.out_user

    def __repr__(self):
        opts = []
        for name in ("causal", "window_left", "window_right", "softcap"):
            opts.append(f"{name}={getattr(self, name)}")
        for name in ("mask", "bias", "key_lens", "alibi"):
            if getattr(self, name) is not None:
                opts.append(name)
        return (
            f"Problem(B={self.B}, Hq={self.Hq}, Hkv={self.Hkv}, Lq={self.Lq}, Lk={self.Lk}, "
            f"D={self.D}, Dv={self.Dv}, dtype={self.dtype}, scale={self.scale:.6g}, {', '.join(opts)})"
        )


def plan_attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                   window=None, softcap=None, alibi_slopes=None, layout="bhld",
                   return_lse=False, out=None):
    """Validate the arguments of :func:`fastqkv.attention`; return a Problem
    whose ``out`` (and ``lse``) are allocated and ready for a kernel."""
    check_layout(layout)
    q = _float_array(q, "q")
    k = _float_array(k, "k")
    v = _float_array(v, "v")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    ndim = q.ndim
    if ndim not in (2, 3, 4):
        raise ValueError(f"q must be 2-D, 3-D or 4-D, got {ndim}-D with shape {q.shape}")
    if k.ndim != ndim or v.ndim != ndim:
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got {q.ndim}, {k.ndim}, {v.ndim}"
        )
    q4, k4, v4 = _to_bhld(q, layout), _to_bhld(k, layout), _to_bhld(v, layout)
    B, Hq, Lq, D = q4.shape
    _, Hkv, Lk, Dk = k4.shape
    Dv = v4.shape[3]
    if k4.shape[0] != B or v4.shape[0] != B:
        raise ValueError(f"q, k and v must have the same batch size, got {B}, {k4.shape[0]}, {v4.shape[0]}")
    if v4.shape[1] != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {v4.shape[1]}")
    if v4.shape[2] != Lk:
        raise ValueError(f"k and v must have the same sequence length, got {Lk} and {v4.shape[2]}")
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
    dtype = q.dtype
    acc = acc_dtype(dtype)

    causal = check_bool(causal, "causal")
    return_lse = check_bool(return_lse, "return_lse")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = check_real(scale, "scale")
    if softcap is not None:
        softcap = check_real(softcap, "softcap", positive=True)
    else:
        softcap = 0.0
    wl, wr = check_window(window)
    if causal:
        wr = 0

    full = (B, Hq, Lq, Lk)
    if mask is not None:
        mask = as_array(mask, "mask")
        if mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be a boolean array (True = attend), got dtype {mask.dtype}; "
                "pass additive float masks as bias="
            )
        mask = _broadcast(mask, full, "mask")
    if bias is not None:
        bias = _float_array(bias, "bias")
        if bias.dtype != acc:
            bias = bias.astype(acc)
        bias = _broadcast(_walkable_any(bias), full, "bias")
    if key_lens is not None:
        kl = as_array(key_lens, "key_lens")
        if kl.ndim == 0 and B == 1:
            kl = kl.reshape(1)
        key_lens = int_array(kl, "key_lens", (B,))
        if B and (key_lens.min() < 0 or key_lens.max() > Lk):
            raise ValueError(f"key_lens must lie in [0, Lk={Lk}], got values in [{key_lens.min()}, {key_lens.max()}]")
    alibi = None
    if alibi_slopes is not None:
        a = _float_array(alibi_slopes, "alibi_slopes")
        if a.shape not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got {a.shape}")
        a = a.astype(acc)
        if not np.isfinite(a).all():
            raise ValueError("alibi_slopes must be finite")
        alibi = np.ascontiguousarray(np.broadcast_to(a, (B, Hq)))

    out_shape = _user_shape(B, Hq, Lq, Dv, ndim, layout)
    inputs = (("q", q), ("k", k), ("v", v), ("mask", mask), ("bias", bias))
    copy_to = None
    if out is not None:
        check_out(out, out_shape, dtype, inputs)
        out_user = out
        if Dv > 1 and (out.strides[-1] != out.itemsize or not out.flags.aligned):
            copy_to = out
            out_user = np.empty(out_shape, dtype)
    else:
        out_user = np.empty(out_shape, dtype)
    lse_user = None
    lse4 = None
    if return_lse:
        lse_user = np.empty(lse_shape(B, Hq, Lq, ndim), acc)
        lse4 = lse_user.reshape(B, Hq, Lq)

    return Problem._fast(
        _walkable(q4), _walkable(k4), _walkable(v4), _to_bhld(out_user, layout), lse4, mask,
        bias, key_lens, alibi, scale, softcap, causal, wl, wr, B, Hq, Hkv, Lq, Lk, D, Dv,
        dtype, acc, out_user, lse_user, copy_to, return_lse, layout, ndim)


def plan_simple(q, k, v, causal, scale, return_lse, out=None):
    """The per-call fast path of plan_attention for its commonest call:
    C-contiguous aligned 4-D ``bhld`` ndarrays of one dtype (float32 or
    float64), no mask/bias/key_lens/window/softcap/ALiBi, non-empty work, and
    either no ``out`` or a C-contiguous aligned writeable ``out`` of the right
    shape and dtype whose memory bounds are disjoint from q, k and v.

    Returns a ready Problem, or None whenever anything differs; the caller
    then runs :func:`plan_attention`, which does every check and raises."""
    nd = np.ndarray
    if type(q) is not nd or type(k) is not nd or type(v) is not nd:
        return None
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt or (dt is not _F32 and dt is not _F64):
        return None
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if (Bk != B or Bv != B or Hv != Hkv or Lv != Lk or Dk != D or not (B and Hq and Lq and Lk and D and Dv)
            or not Hkv or Hq % Hkv):
        return None
    if (causal is not True and causal is not False) or (return_lse is not True and return_lse is not False):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    fq, fk, fv = q.flags, k.flags, v.flags
    if not (fq.c_contiguous and fk.c_contiguous and fv.c_contiguous and fq.aligned and fk.aligned
            and fv.aligned):
        return None
    acc = _F64 if dt is _F64 else _F32
    if out is None:
        out = np.empty((B, Hq, Lq, Dv), dt)
    else:
        if type(out) is not nd or out.dtype != dt or out.shape != (B, Hq, Lq, Dv):
            return None
        fo = out.flags
        if not (fo.c_contiguous and fo.aligned and fo.writeable):
            return None
        # bounds only: disjoint extents cannot overlap (anything else takes
        # the full check of plan_attention)
        may_share = np.may_share_memory
        if may_share(out, q) or may_share(out, k) or may_share(out, v):
            return None
    lse = np.empty((B, Hq, Lq), acc) if return_lse else None
    return Problem._fast(q, k, v, out, lse, None, None, None, None, scale, 0.0, causal, -1,
                         0 if causal else -1, B, Hq, Hkv, Lq, Lk, D, Dv, dt, acc, out, lse, None,
                         return_lse, "bhld", 4)


def lse_shape(B, H, L, ndim):
    """Shape of the lse for outputs of rank ``ndim`` (any layout): (B, H, L),
    (H, L) or (L,)."""
    return (B, H, L)[4 - ndim:]


def _walkable_any(a):
    return a if a.flags.aligned else _aligned_copy(a)


def _broadcast(a, shape, name):
    if a.ndim > 4:
        raise ValueError(f"{name} must be broadcastable to (B, Hq, Lq, Lk) = {shape}, got {a.ndim}-D shape {a.shape}")
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name} must be broadcastable to (B, Hq, Lq, Lk) = {shape}, got shape {a.shape}") from None


# ---------------------------------------------------------------------------
# merge_attention

def plan_merge(outs, lses, layout):
    """Validate partial results; return 4-D bhld float views and output meta."""
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
    o4 = [_to_bhld(o, layout) for o in outs]
    B, H, L, _ = o4[0].shape
    want = lse_shape(B, H, L, o0.ndim)
    for i, x in enumerate(lses):
        if x.shape != want:
            raise ValueError(f"lses[{i}] must have shape {want}, got {x.shape}")
        if x.dtype != l0.dtype:
            raise TypeError(f"lses[{i}] must have dtype {l0.dtype} like lses[0], got {x.dtype}")
    l3 = [x.reshape(B, H, L) for x in lses]
    return o4, l3, (o0.dtype, l0.dtype, o0.shape, want)


def merge_result(out4, lse3, out_dtype, lse_dtype, out_shape, lse_user_shape, layout):
    """Arrange merged (B, H, L, Dv) / (B, H, L) results in the caller's shapes."""
    out = np.empty(out_shape, out_dtype)
    _to_bhld(out, layout)[...] = out4
    return out, lse3.astype(lse_dtype).reshape(lse_user_shape)


# ---------------------------------------------------------------------------
# attention_varlen

def check_options(causal, scale, window, softcap):
    """Check the scalar options of an attention call (plan_attention checks
    them per call; this is for callers where no per-call plan may run, e.g. a
    varlen batch without query rows)."""
    check_bool(causal, "causal")
    if scale is not None:
        check_real(scale, "scale")
    if softcap is not None:
        check_real(softcap, "softcap", positive=True)
    check_window(window)


def plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, mask, bias, key_lens, alibi_slopes,
                return_lse, out, causal=False, scale=None, window=None, softcap=None):
    """Validate a packed ragged batch.  Returns
    ``(q, k, v, cu_q, cu_k, alibi (B, Hq) or None, out, lse or None, return_lse)``."""
    for name, val in (("mask", mask), ("bias", bias), ("key_lens", key_lens)):
        if val is not None:
            raise ValueError(
                f"{name} is not supported by attention_varlen (ragged sequences have no dense "
                f"{name}); use cu_seqlens_k for lengths or call attention per sequence"
            )
    q = _float_array(q, "q")
    k = _float_array(k, "k")
    v = _float_array(v, "v")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
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
    acc = acc_dtype(q.dtype)
    alibi = None
    if alibi_slopes is not None:
        a = _float_array(alibi_slopes, "alibi_slopes")
        if a.shape not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("alibi_slopes must be finite")
        alibi = np.ascontiguousarray(np.broadcast_to(a.astype(acc), (B, Hq)))
    return_lse = check_bool(return_lse, "return_lse")
    check_options(causal, scale, window, softcap)
    shape = (Tq, Hq, v.shape[2])
    if out is None:
        out = np.empty(shape, q.dtype)
    else:
        check_out(out, shape, q.dtype, (("q", q), ("k", k), ("v", v)))
    out[...] = 0  # rows of empty-key sequences; rows of empty query spans do not exist
    lse = np.full((Hq, Tq), -np.inf, acc) if return_lse else None
    return q, k, v, cq, ck, alibi, out, lse, return_lse


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

class PagedPlan:
    __slots__ = ("k_cache", "v_cache", "block_table", "seq_lens", "block_size", "layout")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw[name])


def attach_pages(p, plan):
    """Turn a Problem validated against dense placeholders of the gathered
    cache into a paged Problem (see Problem)."""
    check_out_overlap(p.out_user, (("k_cache", plan.k_cache), ("v_cache", plan.v_cache)))
    p.k = _walkable(plan.k_cache)
    p.v = _walkable(plan.v_cache)
    p.block_table = plan.block_table
    p.block_size = plan.block_size
    return p


def paged_placeholders(plan, q_ndim_layout):
    """Zero-stride stand-ins with the shape of the gathered dense K/V."""
    B, nb = plan.block_table.shape
    Lk = nb * plan.block_size
    Hkv = plan.k_cache.shape[2]
    shapes = [(B, Lk, Hkv, c.shape[3]) for c in (plan.k_cache, plan.v_cache)]
    if q_ndim_layout == "bhld":
        shapes = [(b, h, L, d) for b, L, h, d in shapes]
    # one real row of zeros per array, so the placeholders are walkable as they are
    return [np.broadcast_to(np.zeros(s[3], plan.k_cache.dtype), s) for s in shapes]


def densify_pages(p):
    """Replace a paged Problem's caches by dense gathered (B, Hkv, Lk, D) copies."""
    bs = p.block_size
    kc, vc = p.k, p.v
    k = np.zeros((p.B, p.Hkv, p.Lk, kc.shape[3]), kc.dtype)
    v = np.zeros((p.B, p.Hkv, p.Lk, vc.shape[3]), vc.dtype)
    for b in range(p.B):
        n = int(p.key_lens[b])
        blocks = p.block_table[b, : -(-n // bs)]
        if n:
            k[b, :, :n] = kc[blocks].reshape(-1, p.Hkv, kc.shape[3])[:n].transpose(1, 0, 2)
            v[b, :, :n] = vc[blocks].reshape(-1, p.Hkv, vc.shape[3])[:n].transpose(1, 0, 2)
    p.k, p.v = k, v
    p.block_table = p.block_size = None
    return p


def plan_paged(q, k_cache, v_cache, block_table, seq_lens, *, layout, key_lens):
    """Validate the paged cache arguments (q itself is checked by plan_attention)."""
    check_layout(layout)
    if key_lens is not None:
        raise ValueError("key_lens is not accepted by paged_attention: seq_lens gives each sequence's length")
    q = _float_array(q, "q")
    kc = _float_array(k_cache, "k_cache")
    vc = _float_array(v_cache, "v_cache")
    if kc.dtype != q.dtype or vc.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {kc.dtype}, {vc.dtype}")
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
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D for paged_attention, got shape {q.shape}")
    B = q.shape[0]
    bt = as_array(block_table, "block_table")
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
    return PagedPlan(k_cache=kc, v_cache=vc, block_table=bt, seq_lens=sl, block_size=bs, layout=layout)


# ---------------------------------------------------------------------------
# self_attention

def plan_self_attention(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads):
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
