"""Linking and calling the C API's entry point from jitted code.

Role: find the ``attention`` entry of the capsule ``fastqkv._ckernels._C_API``
(or a stand-in that fails with the reason), register it with LLVM under a
fixed symbol so cached functions link it again in a new process, lay out
the stack frame of a call (the ``fastqkv_args`` struct, the message buffer,
scratch for contiguous copies), emit the call, and turn a status and its
message into the exception.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable


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
    from .. import _c
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

