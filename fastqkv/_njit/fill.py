"""Filling the ``fastqkv_args`` struct from the arrays of a jitted call.

Role: for each argument, a jitted function (chosen per argument type at
compile time) that writes its pointer, element strides or absence into the
stack frame of :mod:`fastqkv._njit.entry`: q/k/v/out views (layout and rank
normalised to ``(B, H, L, D)``), masks and biases broadcast to
``(B, Hq, Lq, Lk)`` with zero strides, contiguous copies of ALiBi slopes,
sinks and key_lens (in the frame's scratch, on the heap beyond it), ``out``
and ``lse`` allocation, overlap of ``out`` with the inputs, and the result.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import types
from numba.extending import register_jitable

from .entry import _ALIBI_AT, _ALIBI_WORDS, _LENS_AT, _LENS_WORDS, _SINKS_AT, _SINKS_WORDS


# ---------------------------------------------------------------------------
# argument types known at compile time

def _const(ty):
    """The value of a compile-time constant argument type (an omitted
    argument arrives as its default value); raises KeyError otherwise."""
    if ty is None or isinstance(ty, (bool, str, int, float)):
        return ty
    if isinstance(ty, types.Omitted):
        return ty.value
    if isinstance(ty, types.NoneType):
        return None
    if isinstance(ty, types.Literal):
        return ty.literal_value
    raise KeyError(ty)


def _is_none(ty):
    try:
        return _const(ty) is None
    except KeyError:
        return False


# ---------------------------------------------------------------------------
# filling the struct

@register_jitable
def _walkable(a):
    """``a``, or a C-contiguous copy when its last axis has a non-unit stride."""
    if a.shape[a.ndim - 1] > 1 and a.strides[a.ndim - 1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a


@functools.lru_cache(maxsize=None)
def _put_view_fn(ndim, blhd):
    """``put(w, at, a)``: pointer and the 4 element strides of the
    ``(B, H, L, D)`` view of ``a`` (as :func:`fastqkv._validate.bhld`) at
    ``w[at:at + 5]``; returns that view's shape."""
    # the caller's axis for each of (B, H, L, D); -1: a new axis of size 1
    a0, a1, a2, a3 = {4: (0, 2, 1, 3) if blhd else (0, 1, 2, 3),
                      3: (-1, 1, 0, 2) if blhd else (-1, 0, 1, 2),
                      2: (-1, -1, 0, 1)}[ndim]

    @register_jitable
    def put(w, at, a):
        shape, strides, item = a.shape, a.strides, a.itemsize
        w[at] = a.ctypes.data
        w[at + 1] = strides[a0] // item if a0 >= 0 else 0
        w[at + 2] = strides[a1] // item if a1 >= 0 else 0
        w[at + 3] = strides[a2] // item
        w[at + 4] = strides[a3] // item
        return (shape[a0] if a0 >= 0 else 1), (shape[a1] if a1 >= 0 else 1), shape[a2], shape[a3]
    return put


@functools.lru_cache(maxsize=None)
def _shape_fns(ndim, blhd):
    """``user(B, H, L, D)`` and ``lse(B, H, L)``: the shapes of
    :func:`fastqkv._validate.user_shape` and :func:`fastqkv._validate.lse_shape`."""
    if ndim == 4:
        user = (lambda B, H, L, D: (B, L, H, D)) if blhd else (lambda B, H, L, D: (B, H, L, D))
        lse = lambda B, H, L: (B, H, L)  # noqa: E731
    elif ndim == 3:
        user = (lambda B, H, L, D: (L, H, D)) if blhd else (lambda B, H, L, D: (H, L, D))
        lse = lambda B, H, L: (H, L)  # noqa: E731
    else:
        user = lambda B, H, L, D: (L, D)  # noqa: E731
        lse = lambda B, H, L: (L,)  # noqa: E731
    return register_jitable(user), register_jitable(lse)


@register_jitable
def _put_broadcast(w, at, a, B, Hq, Lq, Lk):
    """Pointer and element strides of ``a`` broadcast to ``(B, Hq, Lq, Lk)``
    (0 on broadcast axes) at ``w[at:at + 5]``; False if it does not broadcast."""
    full = (B, Hq, Lq, Lk)
    w[at] = a.ctypes.data
    for i in range(4):
        w[at + 1 + i] = 0
    lead = 4 - a.ndim
    for j in range(a.ndim):
        n = a.shape[j]
        if n != 1:
            if n != full[lead + j]:
                return False
            w[at + 1 + lead + j] = a.strides[j] // a.itemsize
    return True


@register_jitable
def _put_absent(w, at, n):
    for i in range(at, at + n):
        w[i] = 0


@register_jitable
def _extent(a):
    """Byte range ``[lo, hi)`` that ``a``'s elements span (lo == hi: empty)."""
    lo = a.ctypes.data
    hi = lo
    for j in range(a.ndim):
        n = a.shape[j]
        if n == 0:
            return lo, lo
        s = a.strides[j] * (n - 1)
        if s < 0:
            lo += s
        else:
            hi += s
    return lo, hi + a.itemsize


@register_jitable
def _disjoint(a, lo, hi):
    alo, ahi = _extent(a)
    return lo == hi or alo == ahi or ahi <= lo or hi <= alo


@functools.lru_cache(maxsize=None)
def _contiguous_fn(ty, acc, at, cap):
    """``get(frame, a, n) -> (pointer, keep)``: ``a`` (of type ``ty``, 1-D
    or 2-D) as ``n`` contiguous values of ``acc``: ``a`` itself when it is
    that already, else a copy (``(m,)`` repeated ``n / m`` times, or the
    rows of a 2-D array) in the frame's scratch ``frame[at:at + cap]`` or,
    beyond ``cap`` words, on the heap; ``keep`` holds the copy."""
    same = np.dtype(str(ty.dtype)) == acc
    two_d = ty.ndim == 2
    cap_values = cap * 8 // np.dtype(acc).itemsize

    @register_jitable
    def get(frame, a, n):
        item = a.itemsize
        if two_d:
            rows, cols = a.shape[0], a.shape[1]
            inplace = (rows * cols == n and (cols <= 1 or a.strides[1] == item)
                       and (rows <= 1 or a.strides[0] == cols * item))
        else:
            rows, cols = 1, a.shape[0]
            inplace = cols == n and (cols <= 1 or a.strides[0] == item)
        if same and inplace:
            return a.ctypes.data, frame[at:at].view(acc)
        if n <= cap_values:
            buf = frame[at:at + cap].view(acc)[:n]
        else:
            buf = np.empty(n, acc)
        if two_d:
            for r in range(rows):
                for j in range(cols):
                    buf[r * cols + j] = a[r, j]
        elif cols:
            for i in range(n):
                buf[i] = a[i % cols]
        return buf.ctypes.data, buf
    return get


# ---------------------------------------------------------------------------
# per-option pieces of the implementation, chosen when it compiles

@register_jitable
def _true(*args):
    return True


@register_jitable
def _nan(x):
    return np.nan


@register_jitable
def _zero(x):
    return 0.0


@register_jitable
def _as_float(x):
    return float(x)


@register_jitable
def _not_nan(x):
    return x == x


@register_jitable
def _not_zero(x):
    return x != 0.0


@register_jitable
def _unbounded(window):
    return -1, -1


@register_jitable
def _pair(window):
    return window[0], window[1]


@functools.lru_cache(maxsize=None)
def _mask_fn(has):
    if not has:
        @register_jitable
        def absent(w, mask, B, Hq, Lq, Lk):
            _put_absent(w, 30, 5)
            return True
        return absent
    return register_jitable(lambda w, mask, B, Hq, Lq, Lk: _put_broadcast(w, 30, mask, B, Hq, Lq, Lk))


@functools.lru_cache(maxsize=None)
def _bias_fn(bias, acc):
    """``put(w, bias, B, Hq, Lq, Lk) -> (ok, bias in acc or None)``."""
    if _is_none(bias):
        @register_jitable
        def absent(w, bias, B, Hq, Lq, Lk):
            _put_absent(w, 35, 5)
            return True, None
        return absent
    if np.dtype(str(bias.dtype)) == acc:
        return register_jitable(lambda w, bias, B, Hq, Lq, Lk: (
            _put_broadcast(w, 35, bias, B, Hq, Lq, Lk), bias))

    @register_jitable
    def converted(w, bias, B, Hq, Lq, Lk):
        b = bias.astype(acc)
        return _put_broadcast(w, 35, b, B, Hq, Lq, Lk), b
    return converted


@functools.lru_cache(maxsize=None)
def _vector_fn(ty, what, acc):
    """``put(w, frame, a, B, Hq) -> (ok, keep)``: the argument ``what``
    (``"key_lens"`` (B,) or a scalar when B == 1, ``"alibi_slopes"`` (Hq,)
    or (B, Hq), ``"sinks"`` (Hq,)) as the contiguous array of ``acc`` the
    struct points to (``(B, Hq)`` for the slopes), its word set; ``ok``
    False on a shape the Python call refuses."""
    word, at, cap, batch, heads = {
        "key_lens": (40, _LENS_AT, _LENS_WORDS, True, False),
        "alibi_slopes": (41, _ALIBI_AT, _ALIBI_WORDS, True, True),
        "sinks": (42, _SINKS_AT, _SINKS_WORDS, False, True)}[what]
    if _is_none(ty):
        @register_jitable
        def absent(w, frame, a, B, Hq):
            w[word] = 0
            return True, None
        return absent
    if isinstance(ty, types.Integer) or ty.ndim == 0:
        value = register_jitable((lambda x: x) if isinstance(ty, types.Integer) else (lambda x: x[()]))

        @register_jitable
        def scalar(w, frame, a, B, Hq):
            keep = frame[at:at + 1]
            keep[0] = value(a)
            w[word] = keep.ctypes.data
            return B == 1, keep
        return scalar
    get = _contiguous_fn(ty, acc, at, cap)
    two_d = ty.ndim == 2

    @register_jitable
    def put(w, frame, a, B, Hq):
        if two_d:
            ok = a.shape[0] == B and a.shape[1] == Hq
        else:
            ok = a.shape[0] == (Hq if heads else B)
        if not ok:
            return False, None
        w[word], keep = get(frame, a, (B if batch else 1) * (Hq if heads else 1))
        return True, keep
    return put


@functools.lru_cache(maxsize=None)
def _out_fn(out, user_shape):
    """``get(out, q, B, Hq, Lq, Dv) -> (ok, out_user, out for the kernel)``."""
    if _is_none(out):
        @register_jitable
        def fresh(out, q, B, Hq, Lq, Dv):
            o = np.empty(user_shape(B, Hq, Lq, Dv), q.dtype)
            return True, o, o
        return fresh

    @register_jitable
    def given(out, q, B, Hq, Lq, Dv):
        return out.shape == user_shape(B, Hq, Lq, Dv), out, _walkable(out)
    return given


@functools.lru_cache(maxsize=None)
def _lse_fn(with_lse, lse_shape, acc):
    if not with_lse:
        @register_jitable
        def absent(w, B, Hq, Lq):
            w[29] = 0
            return None
        return absent

    @register_jitable
    def fresh(w, B, Hq, Lq):
        lse = np.empty(lse_shape(B, Hq, Lq), acc)
        w[29] = lse.ctypes.data
        return lse
    return fresh


@functools.lru_cache(maxsize=None)
def _overlap_fn(has_out, has_mask, bias_read):
    """``disjoint(out, q, k, v, mask, bias)``: no input's bytes can overlap
    ``out``'s (the bounds test of numpy.may_share_memory)."""
    if not has_out:
        return _true
    mask_ok = _disjoint if has_mask else _true
    bias_ok = _disjoint if bias_read else _true

    @register_jitable
    def disjoint(out, q, k, v, mask, bias):
        lo, hi = _extent(out)
        return (_disjoint(q, lo, hi) and _disjoint(k, lo, hi) and _disjoint(v, lo, hi)
                and mask_ok(mask, lo, hi) and bias_ok(bias, lo, hi))
    return disjoint


@functools.lru_cache(maxsize=None)
def _copy_back_fn(has_out):
    if not has_out:
        return _true

    @register_jitable
    def copy_back(out, out_k):
        if out_k.ctypes.data != out.ctypes.data:
            out[...] = out_k
        return True
    return copy_back


@functools.lru_cache(maxsize=None)
def _result_fn(with_lse):
    if with_lse:
        return register_jitable(lambda out, lse: (out, lse))
    return register_jitable(lambda out, lse: out)

