"""``fastqkv.attention`` inside a user's ``@numba.njit`` code (nopython mode).

Role: the Numba overload (``numba.extending.overload``) of
:func:`fastqkv.attention`.  Inside jitted code a call fills the problem
struct of the C API (``fastqkv_args``, 49 words of 8 bytes, see
``fastqkv/include/fastqkv/fastqkv_api.h``) in a buffer on the stack and
calls the C entry point ``attention`` of the table in the capsule
``fastqkv._ckernels._C_API`` directly: no Python object, no GIL, and no
allocation when ``out=`` is given.

Registration.  ``import fastqkv`` does not import numba.  An installed
fastqkv registers this module through Numba's extension entry point
(``[project.entry-points.numba_extensions] init = "fastqkv._njit:_init"``
in pyproject.toml), which Numba runs before its first compilation; a
source tree that is not installed needs ``import fastqkv._njit`` before the
first compilation of a function that calls ``fastqkv.attention``.

Arguments are those of :func:`fastqkv.attention`.  Compile-time constants
(they choose the types or the return value): ``layout``, ``return_lse`` and
``backend`` must be written as constants, and whether each optional array
(``mask``, ``bias``, ``key_lens``, ``alibi_slopes``, ``sinks``, ``out``) and
``scale``/``softcap``/``window`` is given or None must be known when the
function compiles (an Optional type is refused).  ``backend`` is ``"auto"``
or ``"c"``: both call the C entry point.  ``causal``, ``scale``,
``softcap`` and ``window`` may be run-time values.

Each call runs on the calling thread (``num_threads = 1``): call it inside
``numba.prange`` to run a batch of problems in parallel; the caller
parallelises.

Checks.  What Numba sees when it compiles (array dtypes and ranks, the
kinds of scalars, constants) and the shapes the struct cannot express
(batch, heads and lengths of q, k and v agreeing, mask/bias broadcasting,
ALiBi and sinks shapes, ``out``'s shape and overlap) are checked here, and
a failure runs the checks of :mod:`fastqkv._validate` on the same arguments
(in ``numba.objmode``, taking the GIL) to raise exactly the TypeError or
ValueError, with the message, that the Python call raises.  Every other
check is the C entry point's: a non-zero status raises ValueError
(``FASTQKV_EVALUE``), TypeError (``FASTQKV_ETYPE``), MemoryError or
KeyboardInterrupt with the message it wrote.  No value check is repeated
here.

Allocations: ``out`` (and ``lse``) with ``np.empty`` when not given; copies
where the C entry point cannot read an argument in place: q/k/v (or
``out``) with a non-unit last stride, a ``bias`` that is not in the
accumulation dtype.  ALiBi slopes, sinks and key_lens that need a
contiguous copy in the accumulation dtype (int64 for key_lens), e.g.
``(Hq,)`` slopes broadcast to ``(B, Hq)``, are built in the stack buffer up
to 512, 128 and 128 values, on the heap beyond.

Without the C extension (or with a build whose C API has another ABI
version), the overload compiles to a call that raises RuntimeError saying
why; it does not fall back to the Numba backend.  Storage is float32 or
float64: Numba cannot type bfloat16 arrays (ml_dtypes) and types but cannot
compile float16 arrays on the CPU.
Unaligned q/k/v arrays (Numba types them apart) and inputs that are not
arrays (lists, tensors) raise TypeError where the Python call copies or
converts them.
"""

from __future__ import annotations

import ctypes
import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from . import _api, _config, _dispatch, _validate

__all__ = ["entry_status"]

ABI_VERSION = 1                  # FASTQKV_API_VERSION this module fills the struct for
ARGS_WORDS = 49                  # FASTQKV_ARGS_WORDS
MESSAGE_BYTES = 512
# the stack frame of a call, in int64 words: the struct, the message, then
# scratch for ALiBi slopes, sinks and key_lens that need a contiguous copy
_MSG_AT = ARGS_WORDS
_ALIBI_AT = _MSG_AT + MESSAGE_BYTES // 8
_ALIBI_WORDS = 512
_SINKS_AT = _ALIBI_AT + _ALIBI_WORDS
_SINKS_WORDS = 128
_LENS_AT = _SINKS_AT + _SINKS_WORDS
_LENS_WORDS = 128
_FRAME_WORDS = _LENS_AT + _LENS_WORDS

# status codes of the C entry point
_OK, _ENOMEM, _EISA, _EVALUE, _EINTR, _ETYPE = range(6)
# storage dtype codes (FASTQKV_F32 ...)
_DTYPE_CODE = {"float32": 0, "float64": 1}

# the C entry point is linked under this name (llvmlite.binding.add_symbol),
# so that functions compiled with cache=True find it again in a new process
_SYMBOL = "fastqkv_c_api_attention_v%d" % ABI_VERSION

_entry = []                      # [(address or None, reason or None)] once looked up


def _lookup_entry():
    """``(address, None)`` of the C entry point ``attention``, or ``(None, reason)``."""
    from . import _c
    if _c._ckernels is None:
        return None, (f"the compiled module fastqkv._ckernels is not importable ({_c._IMPORT_ERROR}); "
                      "reinstall fastqkv with a C compiler to build it")
    capsule = getattr(_c._ckernels, "_C_API", None)
    if capsule is None:
        return None, "this build of fastqkv._ckernels has no C API (_C_API); rebuild fastqkv"
    get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    table = get(capsule, b"fastqkv._ckernels._C_API")
    version, size = (ctypes.c_int64 * 2).from_address(table)
    if version != ABI_VERSION:
        return None, (f"fastqkv C API version {version}, this module was built against version "
                      f"{ABI_VERSION}: reinstall fastqkv")
    if size < 32:
        return None, f"fastqkv C API table of {size} bytes has no attention entry"
    return ctypes.c_void_p.from_address(table + 24).value, None


_ENTRY_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_stand_in = []                   # keeps the callback below alive


def entry_status():
    """``(address, reason)``: the C entry point that jitted calls link to,
    or None and why it is missing.  The first call registers the symbol
    with LLVM: the entry point, or where it is missing a stand-in that
    fails with the reason (a function compiled with cache=True where the C
    API existed then raises instead of calling address 0)."""
    if not _entry:
        import llvmlite.binding as llvm
        addr, reason = _lookup_entry()
        symbol = addr
        if addr is None:
            text = ("fastqkv.attention inside @njit needs the C API of fastqkv._ckernels: "
                    + reason).encode()

            def stand_in(args, message, size):
                if size:
                    ctypes.memmove(message, text[:size - 1] + b"\0", min(len(text) + 1, size))
                return _EISA
            _stand_in.append(_ENTRY_TYPE(stand_in))
            symbol = ctypes.cast(_stand_in[0], ctypes.c_void_p).value
        llvm.add_symbol(_SYMBOL, symbol)
        _entry.append((addr, reason))
    return _entry[0]


def _init():
    """Numba's extension entry point: importing this module registered the
    overload (and linked the C entry point, for functions loaded from
    Numba's cache)."""


# ---------------------------------------------------------------------------
# code generation: the stack frame and the call

@intrinsic
def _frame(typingctx):
    """A pointer to ``_FRAME_WORDS`` int64 words on the caller's stack (in
    its entry block: one frame per function, not per loop iteration), left
    uninitialised: every call writes the words it passes (cgutils.alloca_once
    would zero 7 KB per call)."""
    def codegen(context, builder, signature, args):
        with builder.goto_entry_block():
            buf = builder.alloca(ir.ArrayType(ir.IntType(64), _FRAME_WORDS))
        return builder.bitcast(buf, ir.IntType(64).as_pointer())
    return types.CPointer(types.int64)(), codegen


@intrinsic
def _call_entry(typingctx, frame):
    """``attention(&frame[0], (char *)&frame[_MSG_AT], MESSAGE_BYTES)``."""
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.IntType(32), [i8p, i8p, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _SYMBOL)
        base = builder.bitcast(args[0], i8p)
        msg = builder.gep(base, [ir.Constant(i64, 8 * _MSG_AT)])
        return builder.call(fn, [base, msg, ir.Constant(i64, MESSAGE_BYTES)])
    return types.int32(frame), codegen


@intrinsic
def _keep_alive(typingctx, a, b, c, d, e, f, g, h):
    """Uses its arguments (borrowed: no reference counting): the copies made
    for the call live until here."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()
    return types.none(a, b, c, d, e, f, g, h), codegen


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


@register_jitable
def _decode(m):
    """The NUL-terminated UTF-8 message in the uint8 array ``m`` as a str."""
    s = ""
    i = 0
    n = m.size
    while i < n and m[i] != 0:
        c = np.int64(m[i])
        extra = 0
        if c >= 0xF0:
            c, extra = c & 0x07, 3
        elif c >= 0xE0:
            c, extra = c & 0x0F, 2
        elif c >= 0xC0:
            c, extra = c & 0x1F, 1
        i += 1
        while extra and i < n and m[i] != 0:
            c = (c << 6) | (np.int64(m[i]) & 0x3F)
            i += 1
            extra -= 1
        s += chr(c)
    return s


@register_jitable
def _raise_status(status, m):
    msg = _decode(m)
    if status == _EVALUE:
        raise ValueError(msg)
    if status == _ETYPE:
        raise TypeError(msg)
    if status == _ENOMEM:
        raise MemoryError(msg)
    if status == _EINTR:
        raise KeyboardInterrupt(msg)
    raise RuntimeError(msg)


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


# ---------------------------------------------------------------------------
# the overload

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
