"""The Numba overload of :func:`fastqkv.attention` (see the package docstring).

Role: at compile time, read the argument types, refuse what the struct
cannot express (with the Python call's own error, through
:mod:`fastqkv._validate` in ``objmode``), and build the implementation that
fills the struct (:mod:`fastqkv._njit.fill`) and calls the entry point
(:mod:`fastqkv._njit.entry`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .. import _api, _config, _dispatch, _validate
from .entry import (_ALIBI_AT, _DTYPE_CODE, _FRAME_WORDS, _MSG_AT, _OK, ARGS_WORDS, _call_entry,
                    _frame, _keep_alive, _raise_status, entry_status)
from .fill import (_as_float, _bias_fn, _const, _copy_back_fn, _is_none, _lse_fn, _mask_fn, _nan,
                   _not_nan, _not_zero, _out_fn, _overlap_fn, _pair, _put_view_fn, _result_fn,
                   _shape_fns, _true, _unbounded, _vector_fn, _walkable, _zero)


# ---------------------------------------------------------------------------
# Python's checks, for the messages

def _python_error(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes,
                  sinks, layout, return_lse, out, backend):
    """``(kind, message)`` of the first check of the Python call that fails:
    kind 0 none, 1 ValueError, 2 TypeError."""
    try:
        _dispatch._check_name(backend, "backend")
        _validate.check_attention(q, k, v, causal, mask, bias, key_lens, scale, window, softcap,
                                  alibi_slopes, layout, return_lse, out, sinks)
    except ValueError as exc:
        return 1, str(exc)
    except TypeError as exc:
        return 2, str(exc)
    return 0, ""


@numba.njit
def _python_check(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes,
                  sinks, layout, return_lse, out, backend, else_kind, else_message):
    """Raise what the Python call raises; if it raises nothing, raise
    ``else_message`` as ValueError (1) or TypeError (2), or return (0)."""
    with numba.objmode(kind="int64", msg="unicode_type"):
        kind, msg = _python_error(q, k, v, causal, mask, bias, key_lens, scale, window, softcap,
                                  alibi_slopes, sinks, layout, return_lse, out, backend)
    if kind == 0:
        kind, msg = else_kind, else_message
    if kind == 1:
        raise ValueError(msg)
    if kind == 2:
        raise TypeError(msg)


# ---------------------------------------------------------------------------
# the overload

def _float_array(ty, ndims):
    return isinstance(ty, types.Array) and ty.ndim in ndims and str(ty.dtype) in _DTYPE_CODE


def _real(ty):
    return isinstance(ty, (types.Integer, types.Float)) and not isinstance(ty, types.Boolean)


def _refusal(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes, sinks,
             layout, return_lse, out, backend):
    """None when the struct can be filled for these argument types; else
    ``(kind, message)``: raise what the Python call raises for these
    arguments, or if it raises nothing, ``message`` as a TypeError (kind 2)
    or ValueError (kind 1): what a jitted call cannot take."""
    opt = [name for name, ty in (
        ("mask", mask), ("bias", bias), ("key_lens", key_lens), ("alibi_slopes", alibi_slopes),
        ("sinks", sinks), ("out", out), ("scale", scale), ("softcap", softcap), ("window", window))
        if isinstance(ty, types.Optional)]
    if opt:
        return 2, f"whether {opt[0]} is None must be known at compile time (got an Optional type)"
    try:
        layout_v, lse_v, backend_v = _const(layout), _const(return_lse), _const(backend)
    except KeyError as exc:
        return 2, f"layout, return_lse and backend must be compile-time constants, got {exc.args[0]}"
    arrays_ok = (all(_float_array(t, (2, 3, 4)) and t.aligned for t in (q, k, v))
                 and q.dtype == k.dtype == v.dtype and q.ndim == k.ndim == v.ndim)
    if not arrays_ok:
        return 2, "q, k and v must be aligned arrays of one dtype, float32 or float64"
    if layout_v not in _config.LAYOUTS or not isinstance(lse_v, bool):
        return 2, "layout or return_lse is not accepted"
    if backend_v not in ("auto", "c"):
        return 1, f"backend must be 'auto' or 'c' (the C entry point), got {backend_v!r}"
    if not isinstance(causal, types.Type):
        causal = numba.typeof(causal)                 # omitted: its default
    accepted = {
        "causal": isinstance(causal, types.Boolean),
        "scale": _is_none(scale) or _real(scale),
        "softcap": _is_none(softcap) or _real(softcap),
        "window": _is_none(window) or (isinstance(window, types.BaseTuple) and len(window) == 2
                                       and all(_real(t) and isinstance(t, types.Integer) for t in window)),
        "mask": _is_none(mask) or (isinstance(mask, types.Array) and mask.dtype == types.boolean
                                   and mask.ndim <= 4),
        "bias": _is_none(bias) or _float_array(bias, (0, 1, 2, 3, 4)),
        "alibi_slopes": _is_none(alibi_slopes) or _float_array(alibi_slopes, (1, 2)),
        "sinks": _is_none(sinks) or _float_array(sinks, (1,)),
        "key_lens": _is_none(key_lens) or (isinstance(key_lens, types.Integer) and _real(key_lens))
        or (isinstance(key_lens, types.Array) and isinstance(key_lens.dtype, types.Integer)
            and key_lens.ndim <= 1),
        "out": _is_none(out) or (isinstance(out, types.Array) and out.dtype == q.dtype and out.mutable
                                 and out.ndim == q.ndim),
    }
    refused = [name for name, ok in accepted.items() if not ok]
    if refused:
        return 2, f"{refused[0]} has a type that is not accepted here"
    return None


def _refuse_impl(refusal, q, return_lse):
    """An implementation that raises (see :func:`_refusal`); it returns, on
    paper, what the call would, so that the caller's code still types."""
    else_kind, else_msg = refusal
    else_msg = "fastqkv.attention inside @njit: " + else_msg
    ndim = q.ndim if isinstance(q, types.Array) else 4
    dt = q.dtype if isinstance(q, types.Array) and isinstance(q.dtype, types.Number) else types.float64
    dt = np.dtype(str(dt))
    zeros = (0,) * ndim
    try:
        with_lse = _const(return_lse) is True
    except KeyError:
        with_lse = False
    result = _result_fn(with_lse)

    def impl(q, k, v, causal=False, mask=None, bias=None, key_lens=None, scale=None, window=None,
             softcap=None, alibi_slopes=None, sinks=None, layout="bhld", return_lse=False, out=None,
             backend="auto"):
        _python_check(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes,
                      sinks, layout, return_lse, out, backend, else_kind, else_msg)
        return result(np.empty(zeros, dt), np.empty(zeros[1:], dt))
    return impl


@overload(_api.attention, prefer_literal=True)
def _attention_overload(q, k, v, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                        window=None, softcap=None, alibi_slopes=None, sinks=None, layout="bhld",
                        return_lse=False, out=None, backend="auto"):
    refusal = _refusal(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi_slopes,
                       sinks, layout, return_lse, out, backend)
    if refusal is not None:
        return _refuse_impl(refusal, q, return_lse)
    addr, reason = entry_status()
    if addr is None:
        message = "fastqkv.attention inside @njit needs the C API of fastqkv._ckernels: " + reason

        def missing(q, k, v, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                    window=None, softcap=None, alibi_slopes=None, sinks=None, layout="bhld",
                    return_lse=False, out=None, backend="auto"):
            raise RuntimeError(message)
        return missing
    return _make_impl(q, mask, bias, key_lens, scale, window, softcap, alibi_slopes, sinks,
                      _const(layout), _const(return_lse), out)


def _make_impl(q, mask, bias, key_lens, scale, window, softcap, alibi_slopes, sinks, layout,
               with_lse, out):
    """The implementation for these (accepted) argument types."""
    dtype = np.dtype(str(q.dtype))
    acc = _validate.acc_dtype(dtype)
    code = _DTYPE_CODE[dtype.name]
    blhd = layout == "blhd"
    put_view = _put_view_fn(q.ndim, blhd)
    user_shape, lse_shape = _shape_fns(q.ndim, blhd)
    has_out = not _is_none(out)
    put_mask = _mask_fn(not _is_none(mask))
    put_bias = _bias_fn(bias, acc)
    put_lens = _vector_fn(key_lens, "key_lens", np.dtype(np.int64))
    put_alibi = _vector_fn(alibi_slopes, "alibi_slopes", acc)
    put_sinks = _vector_fn(sinks, "sinks", acc)
    get_out = _out_fn(out, user_shape)
    make_lse = _lse_fn(with_lse, lse_shape, acc)
    bias_read = not _is_none(bias) and np.dtype(str(bias.dtype)) == acc
    disjoint = _overlap_fn(has_out, not _is_none(mask), bias_read)
    copy_back = _copy_back_fn(has_out)
    result = _result_fn(with_lse)
    scale_of, scale_ok = (_nan, _true) if _is_none(scale) else (_as_float, _not_nan)
    softcap_of, softcap_ok = (_zero, _true) if _is_none(softcap) else (_as_float, _not_zero)
    window_of = _unbounded if _is_none(window) else _pair

    def impl(q, k, v, causal=False, mask=None, bias=None, key_lens=None, scale=None, window=None,
             softcap=None, alibi_slopes=None, sinks=None, layout="bhld", return_lse=False, out=None,
             backend="auto"):
        fp = _frame()
        frame = numba.carray(fp, _FRAME_WORDS)
        w = frame[:ARGS_WORDS]
        q4 = _walkable(q)
        k4 = _walkable(k)
        v4 = _walkable(v)
        B, Hq, Lq, D = put_view(w, 9, q4)
        Bk, Hkv, Lk, Dk = put_view(w, 14, k4)
        Bv, Hv, Lv, Dv = put_view(w, 19, v4)
        s = scale_of(scale)
        c = softcap_of(softcap)
        wl, wr = window_of(window)
        # what the struct cannot say (one B, Lk, ...; NaN scale and 0
        # softcap mean "default" and "off") and the shapes read here
        ok = Bk == B and Bv == B and Hv == Hkv and Lv == Lk and Dk == D
        ok = ok and scale_ok(s) and softcap_ok(c) and put_mask(w, mask, B, Hq, Lq, Lk)
        bias_ok, bias_k = put_bias(w, bias, B, Hq, Lq, Lk)
        lens_ok, lens_k = put_lens(w, frame, key_lens, B, Hq)
        alibi_ok, alibi_k = put_alibi(w, frame, alibi_slopes, B, Hq)
        sinks_ok, sinks_k = put_sinks(w, frame, sinks, B, Hq)
        out_ok, out_user, out_k = get_out(out, q, B, Hq, Lq, Dv)
        if not (ok and bias_ok and lens_ok and alibi_ok and sinks_ok and out_ok):
            fault, fault_msg = 1, "fastqkv.attention inside @njit: the shapes do not fit together"
        elif not disjoint(out, q, k, v, mask, bias):
            fault, fault_msg = 0, ""                # extents overlap: Python's exact test decides
        else:
            fault, fault_msg = -1, ""
        if fault >= 0:
            _python_check(q, k, v, causal, mask, bias, key_lens, scale, window, softcap,
                          alibi_slopes, sinks, layout, return_lse, out, backend, fault, fault_msg)
        put_view(w, 24, out_k)
        lse = make_lse(w, B, Hq, Lq)
        w[0] = 8 * ARGS_WORDS
        w[1] = code
        w[2] = B
        w[3] = Hq
        w[4] = Hkv
        w[5] = Lq
        w[6] = Lk
        w[7] = D
        w[8] = Dv
        wf = w.view(np.float64)
        wf[43] = s
        wf[44] = c
        w[45] = 1 if causal else 0
        w[46] = wl
        w[47] = wr
        w[48] = 1
        status = _call_entry(fp)
        _keep_alive(q4, k4, v4, out_k, bias_k, lens_k, alibi_k, sinks_k)
        if status != _OK:
            _raise_status(status, frame[_MSG_AT:_ALIBI_AT].view(np.uint8))
        copy_back(out, out_k)
        return result(out_user, lse)
    return impl


# functions loaded from Numba's cache call the entry point by its symbol
entry_status()

