"""LLVM vocabulary of the Numba kernels: intrinsics and codegen helpers.

Contract: everything here is either an ``@intrinsic`` / overload callable
from jitted code, or a codegen helper called inside another intrinsic's
``codegen``; none of it knows of tiles, masks or threads.

* array views: ``_as_c`` (a C-contiguous view, no check), ``_borrow`` (a
  view without its owner reference, so threads slicing shared inputs do not
  contend on one atomic reference count), ``_fill``;
* scalars: ``_bits_as_f32``, ``_maximum`` (``llvm.maximum``: NaN
  propagates, still vectorises), ``_fetch_add`` (the work queue's atomic);
* 16-bit storage (``KIND_*``): ``_f16_to_f32``, ``_bf16_to_f32``,
  ``_f32_to_f16``, ``_f32_to_bf16``, and ``_widen`` / ``_put`` / ``_dec``
  which decode or encode by ``kind``;
* 8-bit quantized storage (int8, float8 e4m3fn / e5m2, all seen as uint8
  bits): ``_q8_to_f32`` (by ``kind``) and ``_dec_factor`` (what a decoded
  element is short of its value: 256 for e4m3fn, folded into its scale);
  the one decoding rule is ``_dec8_ir``;
* codegen: ``_vec_ir`` and ``_stream_ir`` (the vector type, ``llvm.fmuladd``,
  broadcasts, data pointers of an intrinsic's arguments), ``_loader``
  (vector loads decoding 16-bit or 8-bit storage), ``_dec8_ir`` (8-bit codes
  to floats, scalars or vectors), ``_prefetch`` / ``_pf_row``,
  ``_reduce_plan`` (lanes of a transposed reduction) and ``_variants`` (one
  body per storage decode and width behind a switch).

Numerics: no ``fastmath=True``; :data:`FASTMATH` (``nsz``, ``arcp``,
``contract``, ``reassoc``) lets LLVM split sums into lanes and fuse
multiply-adds while ``-inf`` and NaN keep their IEEE meaning.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import cache  # noqa: F401  (before any jitted function: the package-wide cache stamp)
from .tuning import VBYTES

# LLVM fast-math flags allowed in fastqkv's kernels: never nnan / ninf.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

# `kind` argument: how 16-bit (uint16 bits) or 8-bit (uint8 bits) storage is decoded
KIND_FLOAT = 0
KIND_F16 = 1
KIND_BF16 = 2
KIND_I8 = 3             # int8
KIND_E4M3 = 4           # float8_e4m3fn, decoded as 2^-8 times its value
KIND_E5M2 = 5           # float8_e5m2
# storage bytes of an element by the loaders' `dec` name (None: the accumulation dtype's)
DEC_BYTES = {"f16": 2, "bf16": 2, "i8": 1, "e4m3": 1, "e5m2": 1}
# prefetch locality: into L1, as the C streaming kernel does
_PF_LOC = 3


@intrinsic
def _as_c(typingctx, arr):
    """View an array the caller knows to be C-contiguous as layout 'C', so
    loops over it vectorise (no check: the caller tests the strides)."""
    if not isinstance(arr, types.Array):
        return None
    ret = arr.copy(layout="C")

    def codegen(context, builder, signature, args):
        context.nrt.incref(builder, signature.args[0], args[0])
        return args[0]

    return ret(arr), codegen


@intrinsic
def _bits_as_f32(typingctx, x):
    """Reinterpret an int32's bits as a float32."""
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


# LLVM selects llvm.maximum for x86 from version 17 on; older LLVMs (the
# llvmlite of numba < 0.62) abort with "Cannot select ... fmaximum"
_LLVM_MAXIMUM = llvm_version_info >= (17,)


@intrinsic
def _maximum(typingctx, a, b):
    """IEEE ``maximum``: NaN if either is NaN, vectorisable: ``llvm.maximum``
    where LLVM lowers it, else compare-and-select."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lty = context.get_value_type(signature.return_type)
        x, y = args
        if not _LLVM_MAXIMUM:
            bigger = builder.select(builder.fcmp_ordered(">", x, y), x, y)
            return builder.select(builder.fcmp_unordered("uno", x, y), builder.fadd(x, y), bigger)
        name = "llvm.maximum.f32" if lty == ir.FloatType() else "llvm.maximum.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lty, [lty, lty]), name)
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def _fetch_add(typingctx, counters, index):
    """Atomically ``counters[index] += 1``; returns the old value (work queue)."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        one = ir.Constant(ir.IntType(64), 1)
        return builder.atomic_rmw("add", ptr, one, "seq_cst")

    return types.int64(counters, index), codegen


@intrinsic
def _borrow(typingctx, arr):
    """``arr`` without its reference to the owning memory block.  Views taken
    of it then skip Numba's atomic reference counting, which otherwise makes
    threads that slice the same input fight over one cache line.  Only for
    arrays that stay alive for the whole call (inputs, scratch)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        src = context.make_array(aryty)(context, builder, args[0])
        dst = context.make_array(aryty)(context, builder)
        for name in ("parent", "nitems", "itemsize", "data", "shape", "strides"):
            setattr(dst, name, getattr(src, name))
        dst.meminfo = cgutils.get_null_value(src.meminfo.type)
        return dst._getvalue()

    return arr(arr), codegen


@njit(nogil=True, cache=True)
def _fill(row, value):
    for j in range(row.shape[0]):
        row[j] = value


@intrinsic
def _f16_to_f32(typingctx, x):
    """IEEE half bits (uint16) -> float32 (exact; vcvtph2ps when vectorised)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_to_f32(typingctx, x):
    """bfloat16 bits (uint16) -> float32: the bits shifted to the top half."""
    if x != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        w = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(w, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16(typingctx, x):
    """float32 -> IEEE half bits, rounded to nearest even (LLVM fptrunc)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32 as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(nogil=True, cache=True, inline="always")
def _f32_to_bf16(x):
    """float32 -> bfloat16 bits, rounded to nearest even; NaN stays (quiet) NaN."""
    u = _f32_bits(x)
    if x != x:
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16(u >> np.uint32(16))


@intrinsic
def _q8_to_f32(typingctx, x, kind):
    """An 8-bit code (uint8 bits) -> float32 by ``kind``: int8, e4m3fn (2^-8
    times its value, see :func:`_dec_factor`) or e5m2 (exact); the three
    decodes and a select, so a loop over a row still vectorises."""
    if x != types.uint8 or not isinstance(kind, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        b, k = args
        k = context.cast(builder, k, signature.args[1], types.int64)
        f = ir.FloatType()
        i8, e4, e5 = (_dec8_ir(builder, b, dec, f) for dec in ("i8", "e4m3", "e5m2"))
        is_i8 = builder.icmp_signed("==", k, ir.Constant(ir.IntType(64), KIND_I8))
        is_e4 = builder.icmp_signed("==", k, ir.Constant(ir.IntType(64), KIND_E4M3))
        return builder.select(is_i8, i8, builder.select(is_e4, e4, e5))

    return types.float32(x, kind), codegen


@njit(nogil=True, cache=True, inline="always")
def _dec_factor(kind):
    """The factor a decoded 8-bit element of ``kind`` is short of its value
    (folded into its scale): 256 for e4m3fn, else 1."""
    return np.float32(256.0) if kind == KIND_E4M3 else np.float32(1.0)


def _widen(src, dst, n, kind):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_widen, jit_options={"cache": True})
def _widen_impl(src, dst, n, kind):
    """``dst[:n] = src[:n]`` in the accumulation dtype (decoding 16-bit or
    8-bit storage; e4m3fn short of :func:`_dec_factor`)."""
    if src.dtype == types.uint8:
        def impl(src, dst, n, kind):
            if kind == KIND_I8:
                for t in range(n):
                    dst[t] = _q8_to_f32(src[t], KIND_I8)
            elif kind == KIND_E4M3:
                for t in range(n):
                    dst[t] = _q8_to_f32(src[t], KIND_E4M3)
            else:
                for t in range(n):
                    dst[t] = _q8_to_f32(src[t], KIND_E5M2)
        return impl
    if src.dtype == types.uint16:
        def impl(src, dst, n, kind):
            if kind == KIND_F16:
                for t in range(n):
                    dst[t] = _f16_to_f32(src[t])
            else:
                for t in range(n):
                    dst[t] = _bf16_to_f32(src[t])
        return impl

    def impl(src, dst, n, kind):
        for t in range(n):
            dst[t] = src[t]
    return impl


def _put(dst, c, x, kind):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_put, jit_options={"cache": True})
def _put_impl(dst, c, x, kind):
    """``dst[c] = x`` rounded to the storage dtype (16-bit: encoded)."""
    if dst.dtype == types.uint16:
        def impl(dst, c, x, kind):
            if kind == KIND_F16:
                dst[c] = _f32_to_f16(x)
            else:
                dst[c] = _f32_to_bf16(x)
        return impl

    def impl(dst, c, x, kind):
        dst[c] = x
    return impl


def _dec(x, kind):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_dec, inline="always", jit_options={"cache": True})
def _dec_impl(x, kind):
    """A stored element in the accumulation dtype: floats as they are;
    16-bit bits decoded as float16 or bfloat16 (both decodes and a select,
    so a loop over a row still vectorises); 8-bit codes by :func:`_q8_to_f32`."""
    if x == types.uint8:
        return lambda x, kind: _q8_to_f32(x, kind)
    if x == types.uint16:
        def impl(x, kind):
            f = _f16_to_f32(x)
            g = _bf16_to_f32(x)
            return f if kind == KIND_F16 else g
        return impl
    return lambda x, kind: x


# ---------------------------------------------------------------------------
# codegen helpers of the vector intrinsics

def _vec_ir(context, builder, signature, args):
    """Codegen vocabulary of the vector intrinsics (element type of argument
    0): ``(vals, data, lt, size, vl, vty, fma, const, splat)`` - the arguments
    (integers cast to int64), ``data(i)`` the data pointer of array argument
    ``i``, the scalar type, its size, the lanes per vector, the vector type,
    ``llvm.fmuladd`` on vectors, an int64 constant and a broadcast."""
    i32 = ir.IntType(32)
    vals = [context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer) else v
            for v, t in zip(args, signature.args)]

    def data(i):
        return context.make_array(signature.args[i])(context, builder, vals[i]).data

    lt = context.get_value_type(signature.args[0].dtype)
    size = context.get_abi_sizeof(lt)
    vl = max(1, VBYTES // size)
    vty = ir.VectorType(lt, vl)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [vty, vty, vty]),
        "llvm.fmuladd.v%d%s" % (vl, "f32" if size == 4 else "f64"))

    def const(v):
        return ir.Constant(ir.IntType(64), v)

    def splat(v):
        e = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(i32, 0))
        return builder.shuffle_vector(e, ir.Constant(vty, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, vl), [0] * vl))

    return vals, data, lt, size, vl, vty, fma, const, splat


def _stream_ir(context, builder, signature, args, x=3):
    """Codegen vocabulary of the streaming micro-kernels (accumulation dtype
    of argument 0, storage dtype of argument 3): ``(vals, data, lt, size,
    vl, vty, load, fma, const, splat, xp, tp)`` - the arguments (integers as
    int64), ``data(i)`` the data pointer of array argument ``i``, the scalar type,
    its size, the lanes per vector and the vector type, ``load`` (see
    :func:`_loader`), ``llvm.fmuladd`` on vectors, an int64 constant and a
    broadcast (:func:`_vec_ir`), the byte pointer of the K/V array
    (argument ``x``) and the row table (argument ``x + 1``)."""
    vals, data, lt, size, vl, vty, fma, const, splat = _vec_ir(context, builder, signature, args)
    load = _loader(context, builder, lt, vl)
    xp = builder.bitcast(data(x), ir.IntType(8).as_pointer())
    return vals, data, lt, size, vl, vty, load, fma, const, splat, xp, data(x + 1)


def _loader(context, builder, lt, vl):
    """``load(p_i8, elem_off, dec) -> <vl x lt>``: ``vl`` stored elements at
    byte pointer ``p_i8`` plus ``elem_off`` elements - ``lt`` floats
    (``dec`` None), uint16 bits decoded as float16 (``dec`` "f16") or
    bfloat16 ("bf16"), or 8-bit codes decoded by :func:`_dec8_ir` ("i8",
    "e4m3", "e5m2") - in the accumulation type ``lt``."""
    i32 = ir.IntType(32)

    def load(p, off, dec):
        ste = DEC_BYTES.get(dec, context.get_abi_sizeof(lt))
        et = lt if dec is None else ir.IntType(8 * ste)
        vty = ir.VectorType(et, vl)
        ep = builder.gep(builder.bitcast(p, et.as_pointer()), [off])
        x = builder.load(builder.bitcast(ep, vty.as_pointer()), align=ste)
        if dec == "f16":
            return builder.fpext(builder.bitcast(x, ir.VectorType(ir.HalfType(), vl)), ir.VectorType(lt, vl))
        if dec == "bf16":
            w = builder.shl(builder.zext(x, ir.VectorType(i32, vl)),
                            ir.Constant(ir.VectorType(i32, vl), [16] * vl))
            return builder.bitcast(w, ir.VectorType(lt, vl))
        if ste == 1:
            return _dec8_ir(builder, x, dec, lt)
        return x

    return load


def _dec8_ir(builder, x, dec, lt):
    """8-bit codes ``x`` (an i8 or a vector of them) as ``lt`` (float32):
    ``dec`` "i8" signed integers; "e5m2" the float16 whose high byte they
    are (inf and NaN included); "e4m3" (float8_e4m3fn) 2^-8 times their
    value, exactly: sign to bit 15 and exponent and mantissa to bits 7..13
    of a float16 (subnormals included), and S.1111.111 (the only NaN; no
    inf) given a float16 NaN exponent."""
    vec = isinstance(x.type, ir.VectorType)

    def ty(t):
        return ir.VectorType(t, x.type.count) if vec else t

    def const(t, v):
        return ir.Constant(ty(t), [v] * x.type.count if vec else v)

    i16 = ir.IntType(16)
    if dec == "i8":
        return builder.sitofp(x, ty(lt))
    if dec == "e5m2":
        h = builder.shl(builder.zext(x, ty(i16)), const(i16, 8))
    else:
        h = builder.and_(builder.shl(builder.sext(x, ty(i16)), const(i16, 7)), const(i16, 0xBFFF))
        nan = builder.icmp_unsigned("==", builder.and_(h, const(i16, 0x3F80)), const(i16, 0x3F80))
        h = builder.select(nan, builder.or_(h, const(i16, 0x7C00)), h)
    return builder.fpext(builder.bitcast(h, ty(ir.HalfType())), ty(lt))


def _prefetch(builder, p):
    """``llvm.prefetch`` (read, locality ``_PF_LOC``, data) of the line at
    the byte pointer ``p``."""
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32]), "llvm.prefetch.p0")
    builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, _PF_LOC), ir.Constant(i32, 1)])


def _pf_row(builder, xp, tp, i, pd, pn, pb, own):
    """The row to prefetch while row ``i`` of the table is read: the row at
    byte offset ``tab[i + pd] + pb`` of ``x`` when ``i + pd < pn``, else
    ``own`` (a row that is read anyway)."""
    ok = builder.icmp_signed("<", builder.add(i, pd), pn)
    j = builder.select(ok, builder.add(i, pd), i)
    row = builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [j])), pb)])
    return builder.select(ok, row, own)


def _reduce_plan(vl):
    """Slots of the transposed reduction: ``slot[i]`` is the input vector
    whose lanes end up summed in lane ``i`` of the result."""
    labels = [[s] * vl for s in range(vl)]
    w = vl
    while w > 1:
        nxt = []
        for a, b in zip(labels[0::2], labels[1::2]):
            c = []
            for k in range(vl // w):
                c += a[k * w:k * w + w // 2] + b[k * w:k * w + w // 2]
            nxt.append(c)
        labels = nxt
        w //= 2
    return labels[0]


def _variants(builder, st, kind, nv, widths, emit):
    """Emit ``emit(dec, w)`` once per storage decode (``st`` uint16: float16
    and bfloat16; uint8: int8, e4m3fn and e5m2; chosen at run time by
    ``kind``; else none) and width ``w`` of ``widths`` (chosen by the
    run-time ``nv``; None: the only one), behind one switch."""
    i64 = ir.IntType(64)
    decs = {types.uint16: ((KIND_F16, "f16"), (KIND_BF16, "bf16")),
            types.uint8: ((KIND_I8, "i8"), (KIND_E4M3, "e4m3"), (KIND_E5M2, "e5m2"))}.get(st, ((KIND_FLOAT, None),))
    key = builder.mul(kind, ir.Constant(i64, 64))
    if nv is not None:
        key = builder.add(key, nv)
    end = builder.append_basic_block("variant.end")
    sw = builder.switch(key, end)
    for kd, dec in decs:
        for w in widths:
            blk = builder.append_basic_block("variant")
            sw.add_case(ir.Constant(i64, kd * 64 + w), blk)
            builder.position_at_end(blk)
            emit(dec, w)
            builder.branch(end)
    builder.position_at_end(end)
