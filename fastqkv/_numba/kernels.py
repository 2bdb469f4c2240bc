"""Numba tile kernels and the parallel driver of the ``numba`` backend.

Importing this module imports numba; :mod:`fastqkv._numba` imports it on
first use only.  Structure (the C backend has the same one):

* :func:`driver` - builds (lazily, once per dtype) the
  ``@njit(parallel=True)`` dispatcher of ``_attention_py`` for the float32
  or float64 signature, loading it from Numba's on-disk cache when warm.
* ``_attention_py`` - ``prange`` over the threads; each thread allocates its
  padded scratch once and takes work items ``(batch, KV head, query tile)``
  from an atomic counter (costliest first), so causal or ragged work and a
  core shared with another process balance out.
* ``_work_item`` - GQA packing: the query rows of *all* heads of one KV
  group for one query tile are packed into one tile, so each K/V tile is
  read once per group.  It walks the visible key tiles only (causal,
  ``key_lens`` and window bounds skip whole tiles) with a max-subtracted
  online softmax (``_softmax_tile``).
* Packing: when a KV head serves several query tiles, its K tiles (as K^T
  panels of ``NR`` keys, ``_pack_kp``) and V rows are packed once per call
  (``_pack_head``); otherwise each item packs its tiles into thread scratch.
* micro-kernels of items of more than 8 rows (prefill, encoder):
  ``_qk_tile`` / ``_pv_tile`` over ``_gemm_block``, an intrinsic that emits
  the outer-product form in LLVM vector types: an ``MR x NR`` block of
  register accumulators, one B row loaded and one A element broadcast per
  row and step, packed FMAs with no horizontal sum.  ``S = Q K^T`` reads
  the K^T panels and Q, in place when an item holds one query head with
  unit-stride rows (else packed per ``MR``-row block); ``O = alpha O + P V``
  reads V rows as they are packed, so V is never transposed.
* Small items (decode with options) keep ``_abt_tile`` (a ``4 x 4`` block
  of dot products vectorised along the reduction) with K and V rows read in
  place when contiguous, and ``P V`` as 4-key SAXPYs over V rows
  (``_pv_rows``).
* ``_exp`` is a float32 polynomial exp (Cephes coefficients, exponent bits
  assembled with an int->float bitcast) that vectorises where ``math.exp``
  would not; float64 uses ``math.exp``.
* ``_borrow`` drops the owner reference from array views inside the work
  loops, so threads slicing the same inputs do not contend on one atomic
  reference count.
* A key-padding mask (broadcast over heads and queries) is read as
  per-batch key lengths when that means the same (``_key_padding``), so
  padded tiles are skipped rather than masked.
* The streaming kernel (``_stream_py``, see its section) serves decode
  (``Lq <= STREAM_MAX_LQ``), paged KV caches and float16/bfloat16 storage
  when there is no mask, bias, ALiBi or softcap: work items
  ``(batch, KV head, query tile, KV split)``, K and V rows read once, in
  order, in place through row tables by 4 x 4 QK blocks (transposed
  reductions) and 4-row PV register tiles, rows prefetched PF_BYTES ahead;
  items of at least a vector of rows (MQA, large GQA groups, multi-token
  steps) keep those rows in vector lanes instead (``_stream_chunk_t``:
  broadcast K elements against Q^T, no reduction, softmax across rows);
  splits merged exactly through their max / sum in the same call.
  Anything else with a paged cache is gathered densely, and 16-bit inputs
  with those options are widened to float32, for the tiled kernel.

Numerics: no ``fastmath=True`` anywhere.  The micro-kernels and the row sums
use :data:`FASTMATH` (``nsz``, ``arcp``, ``contract``, ``reassoc``): it lets
LLVM split a dot product or a sum into vector lanes and fuse multiply-adds;
it leaves out ``nnan``/``ninf``, so ``-inf`` (masking) and NaN (bad input)
keep their IEEE meaning.  ``_gemm_block`` emits ``llvm.fmuladd`` and plain
multiplies only, no fast-math flags.  Row maxima use ``llvm.maximum``, which propagates
NaN and still vectorises.  Every global read by a kernel is a constant.
Invisible keys get weight exactly 0; a V tile holding inf/NaN that some row
cannot see in full is multiplied key by key over each row's visible keys
(``_pv_visible``), so an invisible value never leaks while a visible one
reaches the row even behind a weight of 0 (0 * NaN is NaN, as in the oracle).
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from .._validate import BFLOAT16, Problem, densify_pages

__all__ = ["driver", "stream_driver", "run", "uses_stream", "warmup", "cache_status", "release_workspace", "FASTMATH", "SIGNATURES"]

# LLVM fast-math flags allowed in fastqkv's kernels: never nnan / ninf.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

# Work-item shape, tuned on an AMD EPYC (Zen 4, 32 KiB L1d, 1 MiB L2 per core):
# about ROWS packed query rows (heads of a group x query positions) per item
# and KEYS keys per K/V tile (best a multiple of NR, the K panel width);
# DECODE_KEYS when an item has at most 8 rows (decode: per-tile overheads
# dominate).  Read by the Python wrapper only, so tests can shrink them to
# exercise many tiles without recompiling.
ROWS = 64
KEYS = 512
DECODE_KEYS = 1024
# Without a window (no causal), up to 2 * ROWS query rows of a KV group are
# one item when there are at least MIN_HEADS_WHOLE (batch, KV head) pairs
# to share out: K and V are packed once, in the item, and each K^T panel
# serves twice the rows.  Measured on Ice Lake (encoder B8 H12 L128 D64,
# 1 thread): about 10 % faster than two items over prepacked K/V.
MIN_HEADS_WHOLE = 8
# multiply-adds (about 30 us) below which one more thread costs more than it brings
MIN_WORK_PER_THREAD = 1 << 21
# streaming kernel: query positions up to STREAM_MAX_LQ (without mask, bias,
# ALiBi or softcap) take it; STREAM_KEYS keys per chunk (a multiple of 4);
# decode splits of at least SPLIT_MIN_KEYS keys, about ITEMS_PER_THREAD work
# items per thread; FORCE_SPLIT > 0 forces the keys per split (tests).
STREAM_MAX_LQ = 16
STREAM_KEYS = 128
# keys per chunk of a one-position decode (every row sees every key of its
# range, so no chunk is ever gathered): each chunk costs a fixed overhead
# (softmax and micro-kernel calls per head and row block).  Measured on an
# Intel Ice Lake Xeon, B8 Hq32 Hkv8 Lk4096 and B1 Lk32768 D128, 2 threads,
# in turns with the read probe: float32 78/73 % with 128 keys, 80/78 % with
# 512, 79-81/76-77 % with 1024-2048; bfloat16 67/61 % -> 72/68 % -> 71-73/67-68 %
DECODE_STREAM_KEYS = 512
# keys per chunk when a work item holds every KV head of a token-major cache
TOKEN_MAJOR_KEYS = 32
SPLIT_MIN_KEYS = 512
ITEMS_PER_THREAD = 8
FORCE_SPLIT = 0

# bits of the `flags` argument
HAS_LSE = 1
HAS_MASK = 2
HAS_BIAS = 4
HAS_KEY_LENS = 8
HAS_ALIBI = 16


# ---------------------------------------------------------------------------
# scalar helpers

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


@intrinsic
def _maximum(typingctx, a, b):
    """IEEE ``maximum``: NaN if either is NaN (``llvm.maximum``, vectorisable)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lty = context.get_value_type(signature.return_type)
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


_F = np.float32
_EXP_LO = _F(-87.33)            # below: the result is flushed to 0
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_HALF = _F(0.5)
_ONE = _F(1.0)
_ZERO = _F(0.0)
_E0 = _F(1.9875691500e-4)
_E1 = _F(1.3981999507e-3)
_E2 = _F(8.3334519073e-3)
_E3 = _F(4.1665795894e-2)
_E4 = _F(1.6666665459e-1)
_E5 = _F(5.0000001201e-1)


@njit(nogil=True, cache=True)
def _expf(x):
    """exp for float32 ``x <= 0`` (or NaN), within ~1 ulp; 0 below -87.33."""
    xc = x if x >= _EXP_LO else _EXP_LO
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = _E0
    p = p * r + _E1
    p = p * r + _E2
    p = p * r + _E3
    p = p * r + _E4
    p = p * r + _E5
    y = p * r * r + r + _ONE
    y = y * _bits_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    if x < _EXP_LO:
        y = _ZERO
    if x != x:
        y = x
    return y


def _exp(x):  # pragma: no cover - replaced by the overload below
    return math.exp(x)


@overload(_exp, jit_options={"cache": True})
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _expf(x)
    return lambda x: math.exp(x)


# ---------------------------------------------------------------------------
# micro-kernels (know nothing of tiling, masks or threads)

@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _abt_tile(a, b, c, alpha, accumulate, mp, n4, kd):
    """``c[:mp, :n4] = a[:mp, :kd] @ b[:n4, :kd].T``, or
    with ``accumulate`` ``c[r] = alpha[r] * c[r] + ...``.  ``mp`` and ``n4``
    are multiples of 4: a 4 x 4 block of dot products per step, each
    vectorised along ``kd`` (16 vector accumulators)."""
    z = c.dtype.type(0)
    for r in range(0, mp, 4):
        for j in range(0, n4, 4):
            s00 = s01 = s02 = s03 = z
            s10 = s11 = s12 = s13 = z
            s20 = s21 = s22 = s23 = z
            s30 = s31 = s32 = s33 = z
            for t in range(kd):
                x0 = a[r, t]
                x1 = a[r + 1, t]
                x2 = a[r + 2, t]
                x3 = a[r + 3, t]
                y0 = b[j, t]
                y1 = b[j + 1, t]
                y2 = b[j + 2, t]
                y3 = b[j + 3, t]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            _store4(c, r, j, alpha[r], accumulate, s00, s01, s02, s03)
            _store4(c, r + 1, j, alpha[r + 1], accumulate, s10, s11, s12, s13)
            _store4(c, r + 2, j, alpha[r + 2], accumulate, s20, s21, s22, s23)
            _store4(c, r + 3, j, alpha[r + 3], accumulate, s30, s31, s32, s33)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _store4(c, r, j, al, accumulate, s0, s1, s2, s3):
    if accumulate:
        s0 += al * c[r, j]
        s1 += al * c[r, j + 1]
        s2 += al * c[r, j + 2]
        s3 += al * c[r, j + 3]
    c[r, j] = s0
    c[r, j + 1] = s1
    c[r, j + 2] = s2
    c[r, j + 3] = s3


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _pv_rows(p, vs, o, alpha, rows, n, dvp):
    """``o[r] = alpha[r] * o[r] + p[r, :n] @ vs[:n]`` for ``r < rows`` as
    SAXPYs over V rows, four keys per pass over ``o[r]`` (for few rows: no V
    transpose needed)."""
    for r in range(rows):
        al = alpha[r]
        if al != 1:
            orow = o[r]
            for c in range(dvp):
                orow[c] *= al
    n4 = n & ~3
    for j in range(0, n4, 4):
        v0 = vs[j]
        v1 = vs[j + 1]
        v2 = vs[j + 2]
        v3 = vs[j + 3]
        for r in range(rows):
            x0 = p[r, j]
            x1 = p[r, j + 1]
            x2 = p[r, j + 2]
            x3 = p[r, j + 3]
            orow = o[r]
            for c in range(dvp):
                orow[c] += x0 * v0[c] + x1 * v1[c] + x2 * v2[c] + x3 * v3[c]
    for j in range(n4, n):
        vj = vs[j]
        for r in range(rows):
            x = p[r, j]
            orow = o[r]
            for c in range(dvp):
                orow[c] += x * vj[c]


@njit(nogil=True, cache=True)
def _pv_visible(p, v2, transposed, o, alpha, rows, n, dvp, nq, ip0, j0, wl, wr, has_mask, mask,
                b, h0, i0):
    """``O = alpha O + P V`` for a V tile holding inf or NaN, key by key over
    each row's *visible* keys only (window and mask; row r is head
    ``h0 + r // nq``, query ``i0 + r % nq``).  An invisible key's value never
    leaks; a visible key's non-finite value reaches the row even when its
    weight is 0 (0 * NaN is NaN, as in the oracle).  ``v2`` is ``vt[c, j]``
    when ``transposed``, else ``vs[j, c]``."""
    for r in range(rows):
        a, e = _window(ip0 + r % nq, j0, n, wl, wr)
        h = h0 + r // nq
        i = i0 + r % nq
        al = alpha[r]
        for c in range(dvp):
            o[r, c] *= al
        for j in range(a, e):
            if has_mask and not mask[b, h, i, j0 + j]:
                continue
            x = p[r, j]
            for c in range(dvp):
                o[r, c] += x * (v2[c, j] if transposed else v2[j, c])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _scores_options(row, j0, ip, sc, softcap, has_bias, brow, slope, has_mask, mrow):
    """Scores of ``row`` (keys ``j0, j0 + 1, ...``; ``brow`` and ``mrow`` are
    aligned with it) with the options, in the oracle's order: scale, softcap,
    bias, ALiBi, mask.  One vectorisable pass per option."""
    T = row.dtype.type
    ninf = T(-np.inf)
    lo = 0
    hi = row.shape[0]
    for j in range(lo, hi):
        row[j] = row[j] * sc
    if softcap > 0:
        for j in range(lo, hi):
            row[j] = softcap * math.tanh(row[j] / softcap)
    if has_bias:
        for j in range(lo, hi):
            row[j] += brow[j]
    if slope != 0:
        for j in range(lo, hi):
            row[j] -= slope * T(abs(ip - j0 - j))
    if has_mask:
        for j in range(lo, hi):
            if not mrow[j]:
                row[j] = ninf


@njit(nogil=True, cache=True, inline="always")
def _window(ip, j0, n, wl, wr):
    """``(a, e)``: keys ``j0 + a .. j0 + e - 1`` of a tile of ``n`` are inside
    the window of aligned query position ``ip`` (``e <= a``: none)."""
    a = 0
    e = n
    if wl >= 0:
        a = min(max(ip - wl - j0, 0), n)
    if wr >= 0:
        e = max(min(ip + wr + 1 - j0, n), 0)
    return a, e


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _softmax_tile(s, rows, n, npad, nq, ip0, j0, wl, wr, sc, scored, m, l, alpha):
    """Online-softmax step for the rows of a score tile ``s[:rows, :n]``
    (row r: aligned query position ``ip0 + r % nq``).  Unless ``scored`` (the
    options pass already wrote final scores), scale and mask to the window
    first.  Updates the running max ``m``, sum ``l``, the rescale factor
    ``alpha`` of the output rows, and leaves ``exp(s - m)`` in ``s`` (zero in
    columns ``n:npad``).  NaN scores propagate; rows with no visible key so
    far keep ``m = -inf``, ``l = 0``."""
    T = s.dtype.type
    ninf = T(-np.inf)
    zero = T(0)
    for r in range(rows):
        mt = ninf
        if scored:
            for j in range(n):
                mt = _maximum(mt, s[r, j])
        else:
            a, e = _window(ip0 + r % nq, j0, n, wl, wr)
            for j in range(n):
                x = s[r, j] * sc
                x = x if j >= a and j < e else ninf
                s[r, j] = x
                mt = _maximum(mt, x)
        mo = m[r]
        mn = _maximum(mo, mt)
        ms = zero if mn == ninf else mn
        al = _exp(mo - ms)
        acc = zero
        for j in range(n):
            x = _exp(s[r, j] - ms)
            s[r, j] = x
            acc += x
        for j in range(n, npad):
            s[r, j] = zero
        l[r] = l[r] * al + acc
        alpha[r] = al
        m[r] = mn


@njit(nogil=True, cache=True)
def _fill(row, value):
    for j in range(row.shape[0]):
        row[j] = value


# ---------------------------------------------------------------------------
# register-blocked micro-kernels of the wide (prefill / encoder) path
#
# Outer-product form, as in the C backend: C[r, :w] (+)= sum_t A[r, t] B[t, :w]
# for a block of MR rows and w columns held in vector registers; each step
# loads the B row once and broadcasts one A element per row.  The vectors
# are LLVM vector types built in an intrinsic, so the hot loop is packed
# FMAs (vfmadd231ps zmm on AVX-512) with no horizontal reduction.
#   QK:  A = Q packed per row block (qs[blk][t][MR]), B = K^T panel
#        (kp[panel][t][NR]), C = the score tile.
#   PV:  A = P (the score tile, row stride lds), B = V rows, C = O, first
#        scaled by alpha[r].
# Tuned on an Intel Ice Lake Xeon (AVX-512, 32 vector registers, 48 KiB
# L1d): MR = 6 rows x NR = 64 float32 columns = 24 zmm accumulators.  On a
# CPU with narrower vectors a block is split into row groups that fit
# _ACC accumulators (still correct, not tuned).

def _vector_shape():
    """``(vector bytes, vector accumulators)`` for the CPU Numba compiles for."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        feats = config.CPU_FEATURES
    elif config.CPU_NAME:
        feats = ""
    else:
        import llvmlite.binding as llb
        feats = llb.get_host_cpu_features().flatten()
    feats = feats.split(",")
    if "+avx512f" in feats:
        return 64, 24
    if "+avx" in feats:
        return 32, 12
    return 16, 12


_VBYTES, _ACC = _vector_shape()
MR = 6                        # rows per register block
NR = 4 * _VBYTES // 4         # keys per K panel = columns per PV block (64 on AVX-512)
_UNROLL = 4                   # steps per loop iteration


def _vec_ir(context, builder, signature, args):
    """Codegen vocabulary of the vector intrinsics (element type of argument
    0): ``(vals, data, lt, size, vl, vt, fma, const, splat)`` - the arguments
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
    vl = max(1, _VBYTES // size)
    vt = ir.VectorType(lt, vl)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vt, [vt, vt, vt]),
        "llvm.fmuladd.v%d%s" % (vl, "f32" if size == 4 else "f64"))

    def const(v):
        return ir.Constant(ir.IntType(64), v)

    def splat(v):
        e = builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(i32, 0))
        return builder.shuffle_vector(e, ir.Constant(vt, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, vl), [0] * vl))

    return vals, data, lt, size, vl, vt, fma, const, splat


def _gemm_block(width, scale_c):
    """Intrinsic ``f(a, aoff, ars, ats, b, boff, ldb, c, coff, ldc, kd, alpha, alo)``:
    for ``r < MR``, ``C[r, :width] = sum_{t < kd} A[r, t] * B[t, :width]``
    (with ``scale_c``: ``alpha[alo + r] * C[r, :width] + ...``), where
    ``A[r, t] = a.flat[aoff + r*ars + t*ats]``, ``B[t, x] = b.flat[boff + t*ldb + x]``,
    ``C[r, x] = c.flat[coff + r*ldc + x]``.  Arrays are read through their
    data pointers: the caller guarantees contiguity and bounds."""

    @intrinsic
    def gemm(typingctx, a, aoff, ars, ats, b, boff, ldb, c, coff, ldc, kd, alpha, alo):
        arrs = (a, b, c, alpha)
        if not all(isinstance(x, types.Array) for x in arrs) or len({x.dtype for x in arrs}) != 1:
            return None
        ints = (aoff, ars, ats, boff, ldb, coff, ldc, kd, alo)
        if not all(isinstance(x, types.Integer) for x in ints):
            return None
        sig = types.void(a, aoff, ars, ats, b, boff, ldb, c, coff, ldc, kd, alpha, alo)

        def codegen(context, builder, signature, args):
            vals, data, _, size, vl, vt, fma, const, splat = _vec_ir(context, builder, signature, args)
            _, aoff, ars, ats, _, boff, ldb, _, coff, ldc, kd, _, alo = vals
            nv = width // vl
            rows = max(1, min(MR, _ACC // nv))

            def vptr(p, off):
                return builder.bitcast(builder.gep(p, [off]), vt.as_pointer())

            ap = builder.gep(data(0), [aoff])
            bp = builder.gep(data(4), [boff])
            cp = builder.gep(data(7), [coff])
            alp = builder.gep(data(11), [alo])
            nu = builder.udiv(kd, const(_UNROLL))
            for r0 in range(0, MR, rows):
                rr = range(r0, min(MR, r0 + rows))
                acc = {(r, n): cgutils.alloca_once(builder, vt) for r in rr for n in range(nv)}
                arow = {r: builder.gep(ap, [builder.mul(const(r), ars)]) for r in rr}
                crow = {r: builder.gep(cp, [builder.mul(const(r), ldc)]) for r in rr}
                for r in rr:
                    if scale_c:
                        av = splat(builder.load(builder.gep(alp, [const(r)])))
                    for n in range(nv):
                        if scale_c:
                            x = builder.load(vptr(crow[r], const(n * vl)), align=size)
                            builder.store(builder.fmul(x, av), acc[r, n])
                        else:
                            builder.store(ir.Constant(vt, None), acc[r, n])

                def step(t):
                    brow = builder.gep(bp, [builder.mul(t, ldb)])
                    bv = [builder.load(vptr(brow, const(n * vl)), align=size) for n in range(nv)]
                    toff = builder.mul(t, ats)
                    for r in rr:
                        x = splat(builder.load(builder.gep(arow[r], [toff])))
                        for n in range(nv):
                            builder.store(builder.call(fma, [x, bv[n], builder.load(acc[r, n])]), acc[r, n])

                with cgutils.for_range(builder, nu) as loop:
                    t0 = builder.mul(loop.index, const(_UNROLL))
                    for u in range(_UNROLL):
                        step(builder.add(t0, const(u)))
                tail = builder.mul(nu, const(_UNROLL))
                with cgutils.for_range(builder, builder.sub(kd, tail)) as loop:
                    step(builder.add(tail, loop.index))
                for r in rr:
                    for n in range(nv):
                        builder.store(builder.load(acc[r, n]), vptr(crow[r], const(n * vl)), align=size)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


_qk_block = _gemm_block(NR, False)
# O = alpha O + P V on NR columns, and on the 16, 32, 48 of a narrower rest
_pv_block = _gemm_block(NR, True)
_pv_block16 = _gemm_block(16, True)
_pv_block32 = _gemm_block(32, True)
_pv_block48 = _gemm_block(48, True)


# ---------------------------------------------------------------------------
# packing: K and V tiles of `tk` keys aligned at multiples of `tk`

@njit(nogil=True, cache=True)
def _pack_k(k, b, kvh, j0, n, ks):
    """``ks[:n] = k[b, kvh, j0:j0+n]``; rows ``n:`` zero."""
    k = _borrow(k)
    z = ks.dtype.type(0)
    for jj in range(ks.shape[0]):
        dst = ks[jj]
        if jj < n:
            src = k[b, kvh, j0 + jj]
            for t in range(dst.shape[0]):
                dst[t] = src[t]
        else:
            for t in range(dst.shape[0]):
                dst[t] = z


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _nonfinite(x, rows, cols):
    """True if ``x[:rows, :cols]`` holds inf or NaN (vectorised: sums x * 0)."""
    z = x.dtype.type(0)
    chk = z
    for r in range(rows):
        row = x[r]
        for c in range(cols):
            chk += row[c] * z
    return not (chk == 0)


@njit(nogil=True, cache=True)
def _pack_v(v, b, kvh, j0, n, vs, check):
    """``vs[:n, :dv] = v[b, kvh, j0:j0+n]`` (columns ``dv:`` stay zero); with
    ``check``, True if those values hold inf or NaN."""
    v = _borrow(v)
    dv = v.shape[3]
    for jj in range(n):
        src = v[b, kvh, j0 + jj]
        dst = vs[jj]
        for c in range(dv):
            dst[c] = src[c]
    return check and _nonfinite(vs, n, dv)


@njit(nogil=True, cache=True)
def _pack_kp(k, b, kvh, j0, n, kp):
    """K^T in panels of NR keys for :data:`_qk_block`:
    ``kp.flat[p*d*NR + t*NR + x] = k[b, kvh, j0 + p*NR + x, t]`` for keys
    ``< n``, zero for the rest of the last panel.  One panel row (NR keys
    of one column) at a time: contiguous stores, which measured faster than
    four keys' scattered stores per column."""
    z = kp.dtype.type(0)
    src = _borrow(k)[b, kvh]
    dst = kp.reshape(kp.size)
    d = src.shape[1]
    for p in range(0, n, NR):
        w = min(NR, n - p)
        for t in range(d):
            row = dst[p * d + t * NR:p * d + t * NR + NR]
            for x in range(w):
                row[x] = src[j0 + p + x, t]
            for x in range(w, NR):
                row[x] = z


@njit(nogil=True, cache=True)
def _pack_head(k, v, b, kvh, lkb, tk, kp, vp, bad):
    """Pack the keys ``< lkb`` of one KV head once for all its query tiles:
    K^T panels to ``kp[b, kvh, tile]``, V rows (columns ``dv:`` zero) to
    ``vp[b, kvh, tile]``, ``bad[b, kvh, tile]`` = the V tile holds inf/NaN."""
    k, v, kp, vp, bad = _borrow(k), _borrow(v), _borrow(kp), _borrow(vp), _borrow(bad)
    dv = v.shape[3]
    for tile in range((lkb + tk - 1) // tk):
        j0 = tile * tk
        n = min(tk, lkb - j0)
        _pack_kp(k, b, kvh, j0, n, kp[b, kvh, tile])
        vt = vp[b, kvh, tile]
        vt[:, dv:] = 0
        bad[b, kvh, tile] = _pack_v(v, b, kvh, j0, n, vt, True)


@njit(nogil=True, cache=True)
def _qk_tile(q, qoff, qrs, nfull, qs, kp, s, alpha, mp, npad, d):
    """``s[:mp, :npad] = Q K^T`` from K^T panels and Q: rows ``< nfull``
    read in place (row ``r`` at ``q.flat[qoff + r*qrs:][:d]``), the others
    packed per MR-row block (``qs.flat[r0*d + t*MR + i]`` = row ``r0 + i``)."""
    lds = s.shape[1]
    for p in range(0, npad, NR):
        for r in range(0, mp, MR):
            if r < nfull:
                _qk_block(q, qoff + r * qrs, qrs, 1, kp, p * d, NR, s, r * lds + p, lds, d, alpha, 0)
            else:
                _qk_block(qs, r * d, 1, MR, kp, p * d, NR, s, r * lds + p, lds, d, alpha, 0)


@njit(nogil=True, cache=True)
def _pv_tile(s, vb, o, alpha, mp, n, dvp):
    """``o[r] = alpha[r] * o[r] + s[r, :n] @ vb[:n]`` for ``r < mp``
    (``dvp`` a multiple of 16; ``vb`` rows contiguous)."""
    lds = s.shape[1]
    ldv = vb.strides[0] // vb.itemsize
    ldo = o.shape[1]
    for c in range(0, dvp, NR):
        w = min(NR, dvp - c)
        for r in range(0, mp, MR):
            if w == NR:
                _pv_block(s, r * lds, lds, 1, vb, c, ldv, o, r * ldo + c, ldo, n, alpha, r)
            elif w == 48:
                _pv_block48(s, r * lds, lds, 1, vb, c, ldv, o, r * ldo + c, ldo, n, alpha, r)
            elif w == 32:
                _pv_block32(s, r * lds, lds, 1, vb, c, ldv, o, r * ldo + c, ldo, n, alpha, r)
            else:
                _pv_block16(s, r * lds, lds, 1, vb, c, ldv, o, r * ldo + c, ldo, n, alpha, r)


# ---------------------------------------------------------------------------
# the tile loop of one work item

@njit(nogil=True, cache=True)
def _work_item(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr, flags,
               b, kvh, i0, i1, tk, prepacked, kp, vp, bad, qs, ks, vs, s, o, m, l, alpha):
    """Attention for query rows ``i0:i1`` of every head of KV head ``kvh``.
    Items of more than 8 rows (and every item when K/V are prepacked) take
    the register-blocked micro-kernels (``_qk_tile`` / ``_pv_tile``: Q in
    place or packed per MR-row block, K^T panels of NR keys); smaller ones (decode with
    options) the 4 x 4 dot-product blocks of ``_abt_tile`` with K and V rows
    read in place when they are contiguous."""
    q, k, v, out, lse, mask, bias = (_borrow(q), _borrow(k), _borrow(v), _borrow(out), _borrow(lse),
                                     _borrow(mask), _borrow(bias))
    kp, vp, bad, qs, ks, vs = _borrow(kp), _borrow(vp), _borrow(bad), _borrow(qs), _borrow(ks), _borrow(vs)
    s, o, m, l, alpha = _borrow(s), _borrow(o), _borrow(m), _borrow(l), _borrow(alpha)
    T = s.dtype.type
    ninf = T(-np.inf)
    Lq = q.shape[2]
    Lk = k.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    dvp = o.shape[1]
    g = q.shape[1] // k.shape[1]
    has_mask = (flags & HAS_MASK) != 0
    has_bias = (flags & HAS_BIAS) != 0
    has_alibi = (flags & HAS_ALIBI) != 0
    options = has_mask or has_bias or has_alibi or softcap > 0
    nq = i1 - i0
    M = g * nq
    wide = prepacked or M > 8
    mr = MR if wide else 4
    mp = (M + mr - 1) // mr * mr
    kw = NR if wide else 4              # key padding of a tile
    lkb = key_lens[b] if (flags & HAS_KEY_LENS) != 0 else Lk
    off = lkb - Lq                      # aligned position i' = i + off
    item = q.itemsize
    # K and V rows contiguous (and V rows as long as o's): small items can
    # read K/V tiles where they are instead of copying them to scratch
    rows_c = (k.strides[3] == item and k.strides[2] == d * item and v.strides[3] == item
              and v.strides[2] == dv * item and dv == dvp)

    # wide items of one query head with unit-stride Q rows read their whole
    # MR-row blocks of Q in place; the rest is packed
    inplace = (wide and g == 1 and q.strides[3] == item and q.strides[2] % item == 0
               and q.strides[1] % item == 0 and q.strides[0] % item == 0)
    nfull = M // MR * MR if inplace else 0
    qrs = q.strides[2] // item
    qoff = (b * q.strides[0] + kvh * q.strides[1]) // item + i0 * qrs
    # pack the group's query rows: row r is head kvh*g + r // nq, query
    # i0 + r % nq; wide items store them per MR-row block, t-major
    qf = qs.reshape(qs.size)
    for r in range(mp):
        if wide:
            at = (r // MR) * MR * d + r % MR
            if nfull <= r < M:
                src = q[b, kvh * g + r // nq, i0 + r % nq]
                for t in range(d):
                    qf[at + t * MR] = src[t]
            elif r >= M:
                for t in range(d):
                    qf[at + t * MR] = 0
        else:
            dst = qs[r]
            if r < M:
                src = q[b, kvh * g + r // nq, i0 + r % nq]
                for t in range(d):
                    dst[t] = src[t]
            else:
                _fill(dst, T(0))
        m[r] = ninf
        l[r] = 0
        alpha[r] = 1
        _fill(o[r], T(0))

    # visible key range of the whole item; tiles outside it are skipped
    lo = 0
    hi = lkb
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    if wr >= 0:
        hi = min(hi, i1 - 1 + off + wr + 1)

    for j0 in range((lo // tk) * tk, hi, tk):
        tile = j0 // tk
        n = min(tk, hi - j0)
        npad = (n + kw - 1) // kw * kw
        bad_v = False
        direct = False
        # a tile every row sees in full needs no guard: 0 * inf is then
        # NaN in the oracle too (a visible key whose weight underflows)
        full = not has_mask and (wl < 0 or i1 - 1 + off - wl <= j0) and \
            (wr < 0 or i0 + off + wr + 1 >= j0 + n)
        if prepacked:
            vt = vp[b, kvh, tile]
            bad_v = bad[b, kvh, tile]
            _qk_tile(q, qoff, qrs, nfull, qs, kp[b, kvh, tile], s, alpha, mp, npad, d)
        elif wide:
            vt = vs
            _pack_kp(k, b, kvh, j0, n, ks)
            bad_v = _pack_v(v, b, kvh, j0, n, vs, not full)
            _qk_tile(q, qoff, qrs, nfull, qs, ks, s, alpha, mp, npad, d)
        else:
            vt = vs
            direct = full and n == npad and rows_c
            if direct:                  # K and V rows read in place
                _abt_tile(qs, _as_c(k[b, kvh, j0:j0 + n]), s, alpha, False, mp, npad, d)
            else:
                _pack_k(k, b, kvh, j0, n, ks)
                bad_v = _pack_v(v, b, kvh, j0, n, vs, not full)
                _abt_tile(qs, ks, s, alpha, False, mp, npad, d)
        if options:
            for r in range(M):
                row = s[r]
                h = kvh * g + r // nq
                i = i0 + r % nq
                ip = i + off
                a, e = _window(ip, j0, n, wl, wr)
                _fill(row[:a], ninf)
                _fill(row[e:n], ninf)
                brow = bias[b, h, i, j0 + a:j0 + e] if has_bias else bias[0, 0, 0]
                mrow = mask[b, h, i, j0 + a:j0 + e] if has_mask else mask[0, 0, 0]
                slope = alibi[b, h] if has_alibi else T(0)
                _scores_options(row[a:e], j0 + a, ip, sc, softcap, has_bias, brow, slope,
                                has_mask, mrow)
        _softmax_tile(s, M, n, npad, nq, i0 + off, j0, wl, wr, sc, options, m, l, alpha)
        for r in range(M, mp):
            _fill(s[r, :npad], T(0))
        if bad_v:
            _pv_visible(s, vt, False, o, alpha, M, n, dvp, nq, i0 + off, j0, wl, wr,
                        has_mask, mask, b, kvh * g, i0)
        elif wide:
            _pv_tile(s, vt, o, alpha, mp, n, dvp)
        elif direct:
            _pv_rows(s, _as_c(v[b, kvh, j0:j0 + n]), o, alpha, M, n, dvp)
        else:
            _pv_rows(s, vs, o, alpha, M, n, dvp)

    has_lse = (flags & HAS_LSE) != 0
    for r in range(M):
        h = kvh * g + r // nq
        i = i0 + r % nq
        ll = l[r]
        dst = out[b, h, i]
        if ll == 0:
            for c in range(dv):
                dst[c] = 0
            if has_lse:
                lse[b, h, i] = ninf
        else:
            inv = T(1) / ll
            for c in range(dv):
                dst[c] = o[r, c] * inv
            if has_lse:
                lse[b, h, i] = m[r] + math.log(ll)


@njit(nogil=True, cache=True, inline="always")
def _dims(g, tq, dv, tk):
    """Scratch dimensions ``(rows, V row length, keys per tile, score row
    length)``."""
    tkp = (tk + NR - 1) // NR * NR
    return (g * tq + 11) // 12 * 12, (dv + 15) & ~15, tkp, tkp + 16


@njit(nogil=True, cache=True)
def _layout(B, Hkv, Lq, Lk, g, d, dv, tq, tk, nt):
    """Workspace sizes of a call: ``(per thread, packed K, packed V,
    flags)`` in elements; the packed parts are 0 unless query tiles share
    KV heads.  Rows are padded to a multiple of 12 (4 and MR), V rows to
    16 columns, tiles to whole K panels; score rows get one spare cache
    line (fewer L1 set conflicts between the rows of a block)."""
    nqt = (Lq + tq - 1) // tq
    mpmax, dvp, tkp, lds = _dims(g, tq, dv, tk)
    per = _a16(mpmax * d) + tkp * d + tkp * dvp + mpmax * lds + mpmax * dvp + 3 * _a16(mpmax)
    if nqt <= 1:
        return per, 0, 0, 0
    ntile = (Lk + tk - 1) // tk
    return per, B * Hkv * ntile * tkp * d, B * Hkv * ntile * tkp * dvp, B * Hkv * ntile


@njit(nogil=True, cache=True, inline="always")
def _a16(n):
    """``n`` rounded up to 16 elements (64 bytes or more)."""
    return (n + 15) & ~15


@njit(nogil=True, cache=True, inline="always")
def _carve(ws, at, n):
    """``ws[at:at+n]`` and ``at + n``."""
    return ws[at:at + n], at + n


@njit(nogil=True, cache=True, inline="always")
def _carve16(ws, at, n):
    """``ws[at:at+n]`` and the next start, rounded up to 16 elements: with
    ``ws`` 64-byte aligned, every scratch array starts on a cache line."""
    return ws[at:at + n], at + _a16(n)


def _attention_py(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr, flags,
                  tq, tk, nthreads, ws, wsb, queue):
    """Parallel driver.  When a KV head serves several query tiles, its K
    (as K^T panels) and V tiles are packed once first, in parallel over ``(b, kv
    head)``; otherwise each tile is packed by the work item that uses it.
    Then ``prange`` over threads, each with its own scratch, taking work
    items ``(b, kv head, query tile)`` from an atomic counter, costliest
    first, so ragged or causal work and a busy core balance out.  All
    scratch lives in the caller's workspace ``ws`` / ``wsb`` (sized by
    :func:`_layout`), so a steady loop of calls allocates nothing."""
    B = q.shape[0]
    Lq = q.shape[2]
    Hkv = k.shape[1]
    Lk = k.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    g = q.shape[1] // Hkv
    nqt = (Lq + tq - 1) // tq
    n_items = B * Hkv * nqt
    nt = max(1, min(nthreads, n_items))
    mpmax, dvp, tkp, lds = _dims(g, tq, dv, tk)
    ntile = (Lk + tk - 1) // tk
    per, nkp, nvp, nbad = _layout(B, Hkv, Lq, Lk, g, d, dv, tq, tk, nt)
    prepacked = nkp > 0
    if prepacked:
        kp = ws[:nkp].reshape((B, Hkv, ntile, tkp, d))
        vp = ws[nkp:nkp + nvp].reshape((B, Hkv, ntile, tkp, dvp))
        bad = wsb[:nbad].reshape((B, Hkv, ntile))
    else:
        kp = ws[:1].reshape((1, 1, 1, 1, 1))
        vp = ws[:1].reshape((1, 1, 1, 1, 1))
        bad = wsb[:1].reshape((1, 1, 1))
    queue[0] = 0                        # next pack job
    queue[1] = 0                        # next work item
    if prepacked:
        for t in prange(nt):
            while True:
                it = _fetch_add(queue, 0)
                if it >= B * Hkv:
                    break
                b = it // Hkv
                lkb = key_lens[b] if (flags & HAS_KEY_LENS) != 0 else Lk
                _pack_head(k, v, b, it % Hkv, lkb, tk, kp, vp, bad)
    for t in prange(nt):
        mine, _ = _carve16(ws, nkp + nvp + t * per, per)
        at = 0
        x, at = _carve16(mine, at, mpmax * d)
        qs = x.reshape((mpmax, d))
        x, at = _carve16(mine, at, tkp * d)
        ks = x.reshape((tkp, d))
        x, at = _carve16(mine, at, tkp * dvp)
        vs = x.reshape((tkp, dvp))
        vs[:, dv:] = 0                  # padding columns of V rows stay zero
        x, at = _carve16(mine, at, mpmax * lds)
        s = x.reshape((mpmax, lds))
        x, at = _carve16(mine, at, mpmax * dvp)
        o = x.reshape((mpmax, dvp))
        m, at = _carve16(mine, at, mpmax)
        l, at = _carve16(mine, at, mpmax)
        alpha, at = _carve16(mine, at, mpmax)
        while True:
            it = _fetch_add(queue, 1)
            if it >= n_items:
                break
            qt = nqt - 1 - it // (B * Hkv)      # last (costliest when causal) query tiles first
            rest = it % (B * Hkv)
            i0 = qt * tq
            _work_item(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr,
                       flags, rest // Hkv, rest % Hkv, i0, min(i0 + tq, Lq), tk, prepacked,
                       kp, vp, bad, qs, ks, vs, s, o, m, l, alpha)


# ---------------------------------------------------------------------------
# the streaming (decode / paged / half-width) kernel
#
# One work item = (batch, KV head, query tile, KV split): the query rows of
# every head of the group are packed into one tile, so each K/V byte of a
# split is read once.  A chunk of ``tk`` keys that every row sees whole is
# read in place (dense, paged, float16/bfloat16) through a table of row
# byte offsets by the register-tiled micro-kernels below, with the next
# chunk's rows prefetched; a chunk some row sees only in part (window) is
# gathered and widened into thread scratch and done row by row.
# Splits write unnormalised partials (o, m, l); a second parallel pass merges
# them through their max / sum (exact; empty splits have m = -inf, l = 0).

# `kind` argument: how 16-bit storage is decoded
KIND_FLOAT = 0
KIND_F16 = 1
KIND_BF16 = 2
# extra `flags` bit of the streaming driver
PAGED = 32


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


def _widen(src, dst, n, kind):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_widen, jit_options={"cache": True})
def _widen_impl(src, dst, n, kind):
    """``dst[:n] = src[:n]`` in the accumulation dtype (decoding 16-bit storage)."""
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


@njit(nogil=True, cache=True)
def _gather(x, bt, paged, b, kv0, nh, c0, n, dst, kind):
    """``dst[hh, :n] = rows c0..c0+n-1 of (b, kv0 + hh)`` for ``hh < nh``,
    widened to the accumulation dtype; dense ``x[b, kvh, j]`` or paged
    ``x[bt[b, j // bs], j % bs, kvh]``.  Token by token, heads inner, so a
    token-major cache is read in address order.  Rows have unit stride (or
    one element), so they are walked as C arrays (vectorised).  Rows ``n:``
    are zeroed."""
    x = _borrow(x)
    dst = _borrow(dst)
    w = dst.shape[2]
    if paged:
        bs = x.shape[1]
        j = c0
        while j < c0 + n:
            blk = bt[b, j // bs]
            slot = j % bs
            run = min(bs - slot, c0 + n - j)
            for jj in range(run):
                for hh in range(nh):
                    _widen(_as_c(x[blk, slot + jj, kv0 + hh]), dst[hh, j - c0 + jj], w, kind)
            j += run
    else:
        for jj in range(n):
            for hh in range(nh):
                _widen(_as_c(x[b, kv0 + hh, c0 + jj]), dst[hh, jj], w, kind)
    z = dst.dtype.type(0)
    for hh in range(nh):
        for jj in range(n, dst.shape[1]):
            row = dst[hh, jj]
            for t in range(w):
                row[t] = z


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _pv_window(p, vc, o, alpha, M, n, dv, nq, ip0, c0, wl, wr):
    """``O = alpha O + P V`` for a chunk some row sees only in part: key by
    key over each row's visible keys, so an invisible value never leaks."""
    for r in range(M):
        a, e = _window(ip0 + r % nq, c0, n, wl, wr)
        al = alpha[r]
        orow = o[r]
        if al != 1:
            for c in range(dv):
                orow[c] *= al
        for j in range(a, e):
            x = p[r, j]
            vj = vc[j]
            for c in range(dv):
                orow[c] += x * vj[c]


@njit(nogil=True, cache=True, inline="always")
def _kv_row(x, paged, b, kvh, j, blk, slot):
    """Row ``j`` of KV head ``kvh`` of batch ``b`` as a C array (rows have
    unit stride): dense ``x[b, kvh, j]`` or, paged, slot ``slot`` of block
    ``blk`` (the caller walks the block table, see :func:`_cursor`)."""
    if paged:
        return _as_c(x[blk, slot, kvh])
    return _as_c(x[b, kvh, j])


@njit(nogil=True, cache=True, inline="always")
def _cursor(bt, paged, b, j, bs):
    """``(table column, slot, block)`` of key ``j``: one division per chunk,
    then :func:`_step` per key."""
    if not paged:
        return 0, 0, 0
    col = j // bs
    return col, j - col * bs, bt[b, col]


@njit(nogil=True, cache=True, inline="always")
def _step(bt, paged, b, col, slot, blk, bs):
    """The cursor of the next key."""
    if not paged:
        return col, slot, blk
    slot += 1
    if slot == bs:
        slot = 0
        col += 1
        if col < bt.shape[1]:
            blk = bt[b, col]
    return col, slot, blk


def _dec(x, kind):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_dec, inline="always", jit_options={"cache": True})
def _dec_impl(x, kind):
    """A stored element in the accumulation dtype: floats as they are;
    16-bit bits decoded as float16 or bfloat16 (both decodes and a select,
    so a loop over a row still vectorises)."""
    if x == types.uint16:
        def impl(x, kind):
            f = _f16_to_f32(x)
            g = _bf16_to_f32(x)
            return f if kind == KIND_F16 else g
        return impl
    return lambda x, kind: x


# Register-tiled micro-kernels of the streaming kernel, as in the C backend's
# attn_stream.inc: K/V rows are read in place through a table of byte offsets
# (one per key of a chunk, plus a per-head base), decoded on load (float16:
# vcvtph2ps, bfloat16: shift), and the rows read PF_BYTES later are
# prefetched a line at a time next to the loads of the same columns.
#   QK: 4 rows x 4 keys of vector FMAs along d, then one transposed
#       reduction (two shuffles and an add per pair and level) gives the 16
#       dot products in one vector (AVX-512 float32) - no horizontal sum per
#       score.
#   PV: O[4 rows, w columns] in registers over all keys of the chunk.

SQ_ROWS = 4                   # query rows per QK / PV block (scratch rows are padded to 4)
SQ_KEYS = 4                   # keys per QK block
SPV_NV = 4                    # vectors per PV block row (64 float32 columns on AVX-512)
# the transposed path (rows in vector lanes), as in the C streaming kernel:
# keys per block of its score kernel (2 x SQT_KEYS vector accumulators)
SQT_KEYS = 8 if _VBYTES == 64 else 4
# software prefetch: PF_BYTES of K (V) rows ahead of the row being read,
# into L1 (locality 3), as the C streaming kernel does (FQ_SPF_BYTES)
PF_BYTES = 8192
_PF_LOC = 3


def _stream_ir(context, builder, signature, args, x=3):
    """Codegen vocabulary of the streaming micro-kernels (accumulation dtype
    of argument 0, storage dtype of argument 3): ``(vals, data, lt, size,
    vl, vt, load, fma, const, splat, xp, tp)`` - the arguments (integers as
    int64), ``data(i)`` the data pointer of array argument ``i``, the scalar type,
    its size, the lanes per vector and the vector type, ``load`` (see
    :func:`_loader`), ``llvm.fmuladd`` on vectors, an int64 constant and a
    broadcast (:func:`_vec_ir`), the byte pointer of the K/V array
    (argument ``x``) and the row table (argument ``x + 1``)."""
    vals, data, lt, size, vl, vt, fma, const, splat = _vec_ir(context, builder, signature, args)
    load = _loader(context, builder, lt, vl)
    xp = builder.bitcast(data(x), ir.IntType(8).as_pointer())
    return vals, data, lt, size, vl, vt, load, fma, const, splat, xp, data(x + 1)


def _loader(context, builder, lt, vl):
    """``load(p_i8, elem_off, dec) -> <vl x lt>``: ``vl`` stored elements at
    byte pointer ``p_i8`` plus ``elem_off`` elements - ``lt`` floats
    (``dec`` None) or uint16 bits decoded as float16 (``dec`` "f16") or
    bfloat16 ("bf16") - in the accumulation type ``lt``."""
    i16 = ir.IntType(16)
    i32 = ir.IntType(32)

    def load(p, off, dec):
        if dec is None:
            et = lt
        else:
            et = i16
        vt = ir.VectorType(et, vl)
        ep = builder.gep(builder.bitcast(p, et.as_pointer()), [off])
        x = builder.load(builder.bitcast(ep, vt.as_pointer()), align=2 if dec else context.get_abi_sizeof(lt))
        if dec == "f16":
            return builder.fpext(builder.bitcast(x, ir.VectorType(ir.HalfType(), vl)), ir.VectorType(lt, vl))
        if dec == "bf16":
            w = builder.shl(builder.zext(x, ir.VectorType(i32, vl)),
                            ir.Constant(ir.VectorType(i32, vl), [16] * vl))
            return builder.bitcast(w, ir.VectorType(lt, vl))
        return x

    return load


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
    and bfloat16, chosen at run time by ``kind``; else none) and width
    ``w`` of ``widths`` (chosen by the run-time ``nv``; None: the only one),
    behind one switch."""
    i64 = ir.IntType(64)
    decs = ((KIND_F16, "f16"), (KIND_BF16, "bf16")) if st == types.uint16 else ((KIND_FLOAT, None),)
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


def _stream_qk():
    """Intrinsic ``f(q, qoff, ldq, x, tab, t0, c, base, dw, s, soff, lds, pd, pn, pb)``:
    ``S[r, j] = sum_{t < dw} Q[r, t] K_j[t]`` for ``r < 4``, ``j < 4``
    (overwritten), ``Q[r, t] = q.flat[qoff + r*ldq + t]``,
    ``S[r, j] = s.flat[soff + r*lds + j]``, ``K_j`` the row at byte offset
    ``tab[t0 + c + j] + base`` of ``x`` (``dw`` a multiple of the vector
    width).  Next to the loads of K_j it prefetches the same columns of the
    row ``tab[t0 + c + j + pd] + pb`` when ``c + j + pd < pn``."""

    @intrinsic
    def qk(typingctx, q, qoff, ldq, x, tab, t0, c, base, dw, s, soff, lds, pd, pn, pb, kind):
        if not all(isinstance(a, types.Array) for a in (q, x, tab, s)) or q.dtype != s.dtype:
            return None
        sig = types.void(q, qoff, ldq, x, tab, t0, c, base, dw, s, soff, lds, pd, pn, pb, kind)

        def codegen(context, builder, signature, args):
            vals, data, lt, size, vl, vt, load, fma, const, _, xp, tp = _stream_ir(
                context, builder, signature, args)
            _, qoff, ldq, _, _, t0, c, base, dw, _, soff, lds, pd, pn, pb, kind = vals
            i32 = ir.IntType(32)

            def emit(dec, _):
                qp = builder.gep(data(0), [qoff])
                sp = builder.gep(data(9), [soff])
                ste = 2 if dec else size
                tc = builder.add(t0, c)
                krow = [builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [builder.add(tc, const(j))])), base)])
                        for j in range(SQ_KEYS)]
                pk = [_pf_row(builder, xp, tp, builder.add(tc, const(j)), pd, builder.add(pn, t0), pb, krow[j])
                      for j in range(SQ_KEYS)]
                qrow = [builder.gep(qp, [builder.mul(const(r), ldq)]) for r in range(SQ_ROWS)]
                acc = [cgutils.alloca_once(builder, vt) for _ in range(SQ_ROWS * SQ_KEYS)]
                for a in acc:
                    builder.store(ir.Constant(vt, None), a)
                with cgutils.for_range(builder, builder.udiv(dw, const(vl))) as loop:
                    t = builder.mul(loop.index, const(vl))
                    tb = builder.mul(t, const(ste))
                    # a vector of storage narrower than a line: prefetch at line starts
                    line = (builder.icmp_signed("==", builder.and_(tb, const(63)), const(0))
                            if vl * ste < 64 else ir.Constant(ir.IntType(1), 1))
                    with builder.if_then(line):
                        for j in range(SQ_KEYS):
                            _prefetch(builder, builder.gep(pk[j], [tb]))
                    kv = [load(krow[j], t, dec) for j in range(SQ_KEYS)]
                    for r in range(SQ_ROWS):
                        qv = builder.load(builder.bitcast(builder.gep(qrow[r], [t]), vt.as_pointer()), align=size)
                        for j in range(SQ_KEYS):
                            a = acc[r * SQ_KEYS + j]
                            builder.store(builder.call(fma, [qv, kv[j], builder.load(a)]), a)
                # transposed reductions: VL dot products (ids r*4 + j) per result vector
                n = SQ_ROWS * SQ_KEYS
                g = min(vl, n)
                slot = _reduce_plan(g) if g == vl else None
                for g0 in range(0, n, g):
                    if slot is None:        # fewer dot products than lanes: plain sums
                        sums = []
                        for i in range(g):
                            v = builder.load(acc[g0 + i])
                            tot = builder.extract_element(v, ir.Constant(i32, 0))
                            for e in range(1, vl):
                                tot = builder.fadd(tot, builder.extract_element(v, ir.Constant(i32, e)))
                            sums.append(tot)
                        for i, tot in enumerate(sums):
                            r, j = divmod(g0 + i, SQ_KEYS)
                            builder.store(tot, builder.gep(sp, [builder.add(builder.mul(const(r), lds), const(j))]))
                        continue
                    vecs = [None] * vl
                    for i in range(vl):
                        vecs[slot[i]] = builder.load(acc[g0 + i])
                    w = vl
                    while w > 1:
                        h = w // 2
                        lo = []
                        hi = []
                        for k in range(vl // w):
                            lo += [k * w + e for e in range(h)] + [vl + k * w + e for e in range(h)]
                            hi += [k * w + h + e for e in range(h)] + [vl + k * w + h + e for e in range(h)]
                        mlo = ir.Constant(ir.VectorType(i32, vl), lo)
                        mhi = ir.Constant(ir.VectorType(i32, vl), hi)
                        vecs = [builder.fadd(builder.shuffle_vector(a, b, mlo), builder.shuffle_vector(a, b, mhi))
                                for a, b in zip(vecs[0::2], vecs[1::2])]
                        w = h
                    res = vecs[0]
                    run = min(SQ_KEYS, vl)
                    rt = ir.VectorType(lt, run)
                    for i in range(0, vl, run):
                        r, j = divmod(g0 + i, SQ_KEYS)
                        part = builder.shuffle_vector(res, ir.Constant(vt, ir.Undefined),
                                                      ir.Constant(ir.VectorType(i32, run), list(range(i, i + run))))
                        dst = builder.gep(sp, [builder.add(builder.mul(const(r), lds), const(j))])
                        builder.store(part, builder.bitcast(dst, rt.as_pointer()), align=size)

            _variants(builder, signature.args[3].dtype, kind, None, (0,), emit)
            return context.get_dummy_value()

        return sig, codegen

    return qk


def _stream_pv():
    """Intrinsic ``f(p, poff, ldp, pcs, x, tab, t0, base, col, n, o, ooff, ldo, alpha, aoff, pd, pn, pb)``:
    for ``r < 4``, ``O[r, :w] = alpha[aoff + r] * O[r, :w] + sum_{c < n} P[r, c] V_c[col:col + w]``
    with ``w = nv`` vectors (``1 <= nv <= SPV_NV``), ``P[r, c] = p.flat[poff + r*ldp + c*pcs]``,
    ``O[r, x] = o.flat[ooff + r*ldo + x]`` and ``V_c`` the row at byte
    offset ``tab[t0 + c] + base`` of ``x``.  With key ``c`` it prefetches
    the same columns of row ``tab[t0 + c + pd] + pb`` when ``c + pd < pn``."""

    @intrinsic
    def pv(typingctx, p, poff, ldp, pcs, x, tab, t0, base, col, n, o, ooff, ldo, alpha, aoff, pd, pn,
           pb, nv, kind):
        if not all(isinstance(a, types.Array) for a in (p, x, tab, o, alpha)):
            return None
        if len({p.dtype, o.dtype, alpha.dtype}) != 1:
            return None
        sig = types.void(p, poff, ldp, pcs, x, tab, t0, base, col, n, o, ooff, ldo, alpha, aoff, pd, pn,
                         pb, nv, kind)

        def codegen(context, builder, signature, args):
            vals, data, _, size, vl, vt, load, fma, const, splat, xp, tp = _stream_ir(
                context, builder, signature, args, x=4)
            _, poff, ldp, pcs, _, _, t0, base, col, n, _, ooff, ldo, _, aoff, pd, pn, pb, nv, kind = vals

            def emit(dec, nv):
                pp = builder.gep(data(0), [poff])
                op = builder.gep(data(10), [ooff])
                ap = builder.gep(data(13), [aoff])
                orow = [builder.gep(op, [builder.mul(const(r), ldo)]) for r in range(SQ_ROWS)]
                prow = [builder.gep(pp, [builder.mul(const(r), ldp)]) for r in range(SQ_ROWS)]
                acc = {}
                for r in range(SQ_ROWS):
                    av = splat(builder.load(builder.gep(ap, [const(r)])))
                    for k in range(nv):
                        a = acc[r, k] = cgutils.alloca_once(builder, vt)
                        ov = builder.load(builder.bitcast(builder.gep(orow[r], [const(k * vl)]), vt.as_pointer()),
                                          align=size)
                        builder.store(builder.fmul(ov, av), a)
                ste = 2 if dec else size
                with cgutils.for_range(builder, n) as loop:
                    cc = loop.index
                    with builder.if_then(builder.icmp_signed("<", builder.add(cc, pd), pn)):
                        frow = builder.gep(xp, [builder.add(builder.load(builder.gep(
                            tp, [builder.add(builder.add(t0, cc), pd)])), pb)])
                        for i in range(-(-nv * vl * ste // 64)):
                            _prefetch(builder, builder.gep(frow, [builder.add(builder.mul(col, const(ste)),
                                                                              const(64 * i))]))
                    vrow = builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [builder.add(t0, cc)])), base)])
                    vb = [load(vrow, builder.add(col, const(k * vl)), dec) for k in range(nv)]
                    for r in range(SQ_ROWS):
                        pv_ = splat(builder.load(builder.gep(prow[r], [builder.mul(cc, pcs)])))
                        for k in range(nv):
                            a = acc[r, k]
                            builder.store(builder.call(fma, [pv_, vb[k], builder.load(a)]), a)
                for r in range(SQ_ROWS):
                    for k in range(nv):
                        builder.store(builder.load(acc[r, k]),
                                      builder.bitcast(builder.gep(orow[r], [const(k * vl)]), vt.as_pointer()),
                                      align=size)

            _variants(builder, signature.args[4].dtype, kind, nv, range(1, SPV_NV + 1), emit)
            return context.get_dummy_value()

        return sig, codegen

    return pv


def _stream_qkt():
    """Intrinsic ``f(qt, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind)``:
    the transposed scores ``S[j, :w] = sum_{t < d} K_j[t] QT[t, :w]`` for
    ``j < SQT_KEYS`` (overwritten) and ``w = nv`` vectors of rows (1 or 2),
    ``QT[t, x] = qt.flat[qoff + t*ldt + x]``, ``S[j, x] = s.flat[soff +
    j*ldt + x]``, ``K_j`` the row at byte offset ``tab[t0 + min(c + j, n -
    1)] + base`` of ``x``.  One broadcast K element per FMA of a vector of
    rows, two columns per step (bfloat16: both from one 32-bit load); at
    each line of the K rows it prefetches the same line of row ``tab[t0 + e
    + pd] + pb`` when ``e + pd < pn``."""

    @intrinsic
    def qkt(typingctx, qt, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind):
        if not all(isinstance(a, types.Array) for a in (qt, x, tab, s)) or qt.dtype != s.dtype:
            return None
        sig = types.void(qt, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind)

        def codegen(context, builder, signature, args):
            vals, data, lt, size, vl, vt, load, fma, const, splat, xp, tp = _stream_ir(
                context, builder, signature, args)
            _, qoff, ldt, _, _, t0, c, n, base, d, _, soff, pd, pn, pb, nv, kind = vals
            i32 = ir.IntType(32)

            def element(row, t, dec):
                """element t of a stored row, in the accumulation type, broadcast"""
                if dec is None:
                    return splat(builder.load(builder.gep(builder.bitcast(row, lt.as_pointer()), [t])))
                h = builder.load(builder.gep(builder.bitcast(row, ir.IntType(16).as_pointer()), [t]), align=2)
                if dec == "f16":
                    return splat(builder.fpext(builder.bitcast(h, ir.HalfType()), lt))
                w = builder.shl(builder.zext(h, i32), ir.Constant(i32, 16))
                return splat(builder.bitcast(w, lt))

            def pair(row, t, dec):
                """elements t and t+1, broadcast (bfloat16: one 32-bit load, the
                low half is element t)"""
                if dec != "bf16":
                    return element(row, t, dec), element(row, builder.add(t, const(1)), dec)
                ivt = ir.VectorType(i32, vl)
                w = builder.load(builder.bitcast(builder.gep(row, [builder.mul(t, const(2))]), i32.as_pointer()),
                                 align=2)
                e = builder.insert_element(ir.Constant(ivt, ir.Undefined), w, ir.Constant(i32, 0))
                wv = builder.shuffle_vector(e, ir.Constant(ivt, ir.Undefined),
                                            ir.Constant(ir.VectorType(i32, vl), [0] * vl))
                lo = builder.shl(wv, ir.Constant(ivt, [16] * vl))
                hi = builder.and_(wv, ir.Constant(ivt, [-0x10000] * vl))
                return builder.bitcast(lo, vt), builder.bitcast(hi, vt)

            def emit(dec, nv):
                qp = builder.gep(data(0), [qoff])
                sp = builder.gep(data(10), [soff])
                ste = 2 if dec else size
                krow = []
                pk = []
                for j in range(SQT_KEYS):
                    cj = builder.add(c, const(j))
                    e = builder.add(t0, builder.select(builder.icmp_signed("<", cj, n), cj,
                                                       builder.sub(n, const(1))))
                    row = builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [e])), base)])
                    krow.append(row)
                    pk.append(_pf_row(builder, xp, tp, e, pd, builder.add(pn, t0), pb, row))
                acc = [[cgutils.alloca_once(builder, vt) for _ in range(nv)] for _ in range(SQT_KEYS)]
                for a in acc:
                    for ai in a:
                        builder.store(ir.Constant(vt, None), ai)

                def qrow(t):
                    return [builder.load(builder.bitcast(builder.gep(qp, [builder.add(builder.mul(t, ldt),
                                                                                      const(i * vl))]),
                                                         vt.as_pointer()), align=size) for i in range(nv)]

                with cgutils.for_range(builder, builder.udiv(d, const(2))) as loop:
                    t = builder.mul(loop.index, const(2))
                    tb = builder.mul(t, const(ste))
                    with builder.if_then(builder.icmp_signed("==", builder.and_(tb, const(63)), const(0))):
                        for j in range(SQT_KEYS):
                            _prefetch(builder, builder.gep(pk[j], [tb]))
                    q0 = qrow(t)
                    q1 = qrow(builder.add(t, const(1)))
                    for j in range(SQT_KEYS):
                        x0, x1 = pair(krow[j], t, dec)
                        for i in range(nv):
                            a = acc[j][i]
                            builder.store(builder.call(fma, [x1, q1[i], builder.call(
                                fma, [x0, q0[i], builder.load(a)])]), a)
                with builder.if_then(builder.icmp_signed("==", builder.and_(d, const(1)), const(1))):
                    t = builder.sub(d, const(1))
                    q0 = qrow(t)
                    for j in range(SQT_KEYS):
                        x0 = element(krow[j], t, dec)
                        for i in range(nv):
                            a = acc[j][i]
                            builder.store(builder.call(fma, [x0, q0[i], builder.load(a)]), a)
                for j in range(SQT_KEYS):
                    for i in range(nv):
                        dst = builder.gep(sp, [builder.add(builder.mul(const(j), ldt), const(i * vl))])
                        builder.store(builder.load(acc[j][i]), builder.bitcast(dst, vt.as_pointer()), align=size)

            _variants(builder, signature.args[3].dtype, kind, nv, (1, 2), emit)
            return context.get_dummy_value()

        return sig, codegen

    return qkt


_sqk = _stream_qk()
_spv = _stream_pv()
_sqkt = _stream_qkt()


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _qk_direct(qs, x, bt, paged, b, kv0, nh, c0, n, s, mp, d, dlo, kind):
    """``s[hh, :mp, :n] (+)= qs[hh, :mp, dlo:d] @ K[kv0 + hh, c0:c0+n, dlo:d].T``
    (``dlo > 0``: added to ``s``, the rest of the dot products past the
    vector micro-kernel's columns) reading K rows where they are, token by
    token, heads inner (address order for token-major caches, in order per
    head for bhld); four query rows per pass."""
    x = _borrow(x)
    z = s.dtype.type(0)
    bs = x.shape[1]
    col, slot, blk = _cursor(bt, paged, b, c0, bs)
    for jj in range(n):
        j = c0 + jj
        for hh in range(nh):
            krow = _kv_row(x, paged, b, kv0 + hh, j, blk, slot)
            qh = qs[hh]
            for r in range(0, mp, 4):
                q0 = qh[r]
                q1 = qh[r + 1]
                q2 = qh[r + 2]
                q3 = qh[r + 3]
                s0 = s1 = s2 = s3 = z
                if dlo > 0:
                    s0 = s[hh, r, jj]
                    s1 = s[hh, r + 1, jj]
                    s2 = s[hh, r + 2, jj]
                    s3 = s[hh, r + 3, jj]
                for t in range(dlo, d):
                    y = _dec(krow[t], kind)
                    s0 += q0[t] * y
                    s1 += q1[t] * y
                    s2 += q2[t] * y
                    s3 += q3[t] * y
                s[hh, r, jj] = s0
                s[hh, r + 1, jj] = s1
                s[hh, r + 2, jj] = s2
                s[hh, r + 3, jj] = s3
        col, slot, blk = _step(bt, paged, b, col, slot, blk, bs)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _pv_tail(p, poff, ldp, pcs, x, bt, paged, b, kvh, c0, n, o, alpha, r0, col, dv, kind):
    """Columns ``col:dv`` (past the vector blocks) of ``O = alpha O + P V``
    for rows ``r0 .. r0+3``, ``P[r, c] = p[poff + r*ldp + c*pcs]``, V rows
    read where they are."""
    x = _borrow(x)
    bs = x.shape[1]
    for r in range(r0, r0 + SQ_ROWS):
        al = alpha[r]
        for c in range(col, dv):
            o[r, c] *= al
    cl, slot, blk = _cursor(bt, paged, b, c0, bs)
    for jj in range(n):
        vj = _kv_row(x, paged, b, kvh, c0 + jj, blk, slot)
        for r in range(r0, r0 + SQ_ROWS):
            pr = p[poff + r * ldp + jj * pcs]
            for c in range(col, dv):
                o[r, c] += pr * _dec(vj[c], kind)
        cl, slot, blk = _step(bt, paged, b, cl, slot, blk, bs)


@njit(nogil=True, cache=True)
def _row_table(x, bt, paged, b, c0, n, npad, tab, t0):
    """``tab[t0 + c]`` = byte offset in ``x`` of the row of key ``c0 + c``
    of KV head 0 of batch ``b`` (dense ``x[b, 0, j]``, paged
    ``x[bt[b, j // bs], j % bs, 0]``) for ``c < n``; entries ``n:npad``
    repeat the last row (a full block of keys for the QK micro-kernel, whose
    extra columns the softmax overwrites; :func:`_stream_item` puts the next
    chunk's rows there when there is one)."""
    if paged:
        bs = x.shape[1]
        s0 = x.strides[0]
        s1 = x.strides[1]
        for c in range(n):
            j = c0 + c
            col = j // bs
            tab[t0 + c] = bt[b, col] * s0 + (j - col * bs) * s1
    else:
        s2 = x.strides[2]
        at = b * x.strides[0] + c0 * s2
        for c in range(n):
            tab[t0 + c] = at + c * s2
    for c in range(n, npad):
        tab[t0 + c] = tab[t0 + n - 1]


@njit(nogil=True, cache=True)
def _pf_next(nh, hh, n, nn, dist, kv0, hs):
    """Prefetch parameters ``(pd, pn, pb)`` of the micro-kernels while KV head
    ``kv0 + hh`` (``hs`` bytes per head) of a chunk of ``n`` keys is read,
    ``nn`` rows of the next chunk following in the table: ``dist`` rows on
    in the same head (one head per item), else the next head's rows, after
    the last head the first head's rows of the next chunk."""
    if nh == 1:
        return dist, n + nn, (kv0 + hh) * hs
    if hh + 1 < nh:
        return 0, n, (kv0 + hh + 1) * hs
    return n, n + nn, kv0 * hs


@njit(nogil=True, cache=True)
def _stream_chunk(qs, k, v, bt, paged, b, kv0, nh, c0, n, nn, tab, kt, vt, s, o, alpha,
                  m, l, M, mp, nq, ip0, wl, wr, sc, kind):
    """One chunk of keys ``c0 .. c0+n-1`` that every row sees whole, K and V
    rows read in place through the row tables ``tab[kt:]`` / ``tab[vt:]``,
    which run on into the next chunk's ``nn`` rows.  The rows are prefetched
    in the order they are read: PF_BYTES ahead in a head's rows (one KV head
    per item), or, with several heads per item (token-major caches), the
    next head's rows of this chunk and after the last head the first head's
    rows of the next chunk."""
    d = qs.shape[2]
    mpmax = qs.shape[1]
    tkp = s.shape[2]
    npad = (n + 3) & ~3
    vl = _VBYTES // s.itemsize
    dw = d - d % vl
    ks1, vs1, kpd, vpd = _kv_steps(k, v, paged)
    for hh in range(nh):
        kb = (kv0 + hh) * ks1
        pd, pn, pb = _pf_next(nh, hh, n, nn, kpd, kv0, ks1)
        for r0 in range(0, mp, SQ_ROWS):
            for c in range(0, npad, SQ_KEYS):
                _sqk(qs, (hh * mpmax + r0) * d, d, k, tab, kt, c, kb, dw, s,
                     (hh * mpmax + r0) * tkp + c, tkp, pd, pn if r0 == 0 else 0, pb, kind)
    if dw < d:
        _qk_direct(qs, k, bt, paged, b, kv0, nh, c0, n, s, mp, d, dw, kind)
    for hh in range(nh):
        _softmax_tile(s[hh], M, n, npad, nq, ip0, c0, wl, wr, sc, False, m[hh], l[hh], alpha[hh])
    sf = s.reshape(-1)
    for hh in range(nh):
        _pv_head(sf, hh * mpmax * tkp, tkp, 1, v, bt, paged, b, kv0, nh, hh, c0, n, nn, tab, vt, vs1, vpd,
                 o, alpha, mp, kind)


@register_jitable
def _kv_steps(k, v, paged):
    """``(ks1, vs1, kpd, vpd)``: the byte step between KV heads of K and V,
    and the prefetch distances in rows (PF_BYTES of rows)."""
    ks1 = k.strides[2] if paged else k.strides[1]
    vs1 = v.strides[2] if paged else v.strides[1]
    kpd = max(1, PF_BYTES // max(1, k.shape[3] * k.itemsize))
    vpd = max(1, PF_BYTES // max(1, v.shape[3] * v.itemsize))
    return ks1, vs1, kpd, vpd


@njit(nogil=True, cache=True)
def _pv_head(p, poff, ldp, pcs, v, bt, paged, b, kv0, nh, hh, c0, n, nn, tab, vt, vs1, vpd, o, alpha,
             mp, kind):
    """``O = alpha O + P V`` of KV head ``kv0 + hh`` over a chunk, rows
    ``0:mp`` in blocks of 4, ``P[r, c] = p[poff + r*ldp + c*pcs]``; V rows
    read in place through ``tab[vt:]``, prefetched as :func:`_pf_next` says."""
    mpmax = o.shape[1]
    dvl = o.shape[2]
    dv = v.shape[3]
    vl = _VBYTES // p.itemsize
    vb = (kv0 + hh) * vs1
    pd, pn, pb = _pf_next(nh, hh, n, nn, vpd, kv0, vs1)
    for r0 in range(0, mp, SQ_ROWS):
        col = 0
        while col < dv - dv % vl:
            nv = min(SPV_NV, (dv - col) // vl)
            _spv(p, poff + r0 * ldp, ldp, pcs, v, tab, vt, vb, col, n, o, (hh * mpmax + r0) * dvl + col, dvl,
                 alpha, hh * mpmax + r0, pd, pn if r0 == 0 else 0, pb, nv, kind)
            col += nv * vl
        if col < dv:
            _pv_tail(p, poff, ldp, pcs, v, bt, paged, b, kv0 + hh, c0, n, o[hh], alpha[hh], r0, col, dv, kind)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _softmax_t(st, ldt, n, rows, sc, m, l, alpha, mx):
    """:func:`_softmax_tile` on a transposed tile (``st[c*ldt + r]``: key
    ``c``, row ``r``) that rows ``0:rows`` see whole, lane-wise across rows;
    ``mx``: scratch of ``rows``."""
    T = st.dtype.type
    ninf = T(-np.inf)
    zero = T(0)
    for r in range(rows):
        mx[r] = ninf
    for c in range(n):
        sr = st[c * ldt:c * ldt + rows]
        for r in range(rows):
            x = sr[r] * sc
            sr[r] = x
            mx[r] = _maximum(mx[r], x)
    for r in range(rows):
        mo = m[r]
        mn = _maximum(mo, mx[r])
        ms = zero if mn == ninf else mn
        al = _exp(mo - ms)
        l[r] = l[r] * al
        alpha[r] = al
        m[r] = mn
        mx[r] = ms
    for c in range(n):
        sr = st[c * ldt:c * ldt + rows]
        for r in range(rows):
            x = _exp(sr[r] - mx[r])
            sr[r] = x
            l[r] += x


@njit(nogil=True, cache=True)
def _stream_chunk_t(qt, k, v, bt, paged, b, kv0, nh, c0, n, nn, tab, kt, vt, s, o, alpha,
                    m, l, mx, M, mp, ldt, sc, kind):
    """:func:`_stream_chunk` on the transposed path (items of at least
    :func:`_qkt_rows` rows): the rows of KV head ``hh`` sit in vector lanes
    (``qt[hh, t*ldt + r]``), its scores are summed with one broadcast K
    element per FMA of a vector of rows (no reduction; each K row read once
    per chunk), the softmax runs across rows and P.V reads ``P^T`` through
    a column stride."""
    d = k.shape[3]
    tkp = s.shape[2]
    mpmax = s.shape[1]
    vl = _VBYTES // s.itemsize
    ks1, vs1, kpd, vpd = _kv_steps(k, v, paged)
    sf = s.reshape(-1)
    for hh in range(nh):
        kb = (kv0 + hh) * ks1
        pd, pn, pb = _pf_next(nh, hh, n, nn, kpd, kv0, ks1)
        so = hh * mpmax * tkp
        for c in range(0, n, SQT_KEYS):
            for v0 in range(0, ldt, 2 * vl):
                _sqkt(qt, hh * qt.shape[1] + v0, ldt, k, tab, kt, c, n, kb, d, sf, so + c * ldt + v0,
                      pd, pn if v0 == 0 else 0, pb, min(2, (ldt - v0) // vl), kind)
        _softmax_t(sf[so:so + n * ldt], ldt, n, M, sc, m[hh], l[hh], alpha[hh], mx)
        _pv_head(sf, so, 1, ldt, v, bt, paged, b, kv0, nh, hh, c0, n, nn, tab, vt, vs1, vpd, o, alpha, mp, kind)


@njit(nogil=True, cache=True)
def _qkt_rows(vl, kind):
    """Rows from which an item takes the transposed path: a vector of rows
    and at least 8 (as in the C kernel); never for float16, whose elements
    have no cheap broadcast."""
    if kind == KIND_F16:
        return 1 << 62
    return max(vl, 8)


@njit(nogil=True, cache=True)
def _stream_item(q, k, v, key_lens, bt, sc, wl, wr, flags, kind, b, kv0, nh, i0, i1, sidx, split,
                 nsmax, tk, qs, qt, ks, vs, s, o, m, l, alpha, mx, po, pm, pl, tab):
    """Unnormalised attention of query rows ``i0:i1`` of every head of KV
    heads ``kv0 .. kv0+nh-1`` over keys ``[sidx * split, (sidx + 1) *
    split)`` of batch ``b``, written as a partial ``(po, pm, pl)`` in slot
    ``sidx``.  Per KV head ``hh`` the scratch ``qs[hh]``, ``s[hh]``,
    ``o[hh]``, ... holds its group's rows (row r: head ``r // nq``, query
    ``i0 + r % nq``); ``qt[hh]`` the same rows transposed, for the chunks
    that take the transposed path."""
    q, k, v, key_lens, bt = _borrow(q), _borrow(k), _borrow(v), _borrow(key_lens), _borrow(bt)
    qs, qt, ks, vs, s, o = _borrow(qs), _borrow(qt), _borrow(ks), _borrow(vs), _borrow(s), _borrow(o)
    m, l, alpha, po, pm, pl = _borrow(m), _borrow(l), _borrow(alpha), _borrow(po), _borrow(pm), _borrow(pl)
    mx = _borrow(mx)
    tab = _borrow(tab)
    T = s.dtype.type
    ninf = T(-np.inf)
    paged = (flags & PAGED) != 0
    Hq = q.shape[1]
    Lq = q.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    Hkv = k.shape[2] if paged else k.shape[1]
    g = Hq // Hkv
    nq = i1 - i0
    M = g * nq
    mp = (M + 3) & ~3
    if paged or (flags & HAS_KEY_LENS) != 0:
        lkb = key_lens[b]
    else:
        lkb = k.shape[2]
    off = lkb - Lq
    for hh in range(nh):
        for r in range(mp):
            dst = qs[hh, r]
            if r < M:
                _widen(q[b, (kv0 + hh) * g + r // nq, i0 + r % nq], dst, d, kind)
            else:
                _fill(dst, T(0))
            m[hh, r] = ninf
            l[hh, r] = 0
            alpha[hh, r] = 1
            _fill(o[hh, r, :dv], T(0))
    # the transposed path: rows in lanes, ldt of them (a multiple of the
    # vector, at least mp)
    vl = _VBYTES // s.itemsize
    trans = M >= _qkt_rows(vl, kind)
    w = max(vl, SQ_ROWS)
    ldt = (M + w - 1) // w * w
    if trans:
        for hh in range(nh):
            for t in range(d):
                for r in range(ldt):
                    qt[hh, t * ldt + r] = qs[hh, r, t] if r < M else T(0)

    lo = sidx * split
    hi = min(lkb, lo + split)
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    if wr >= 0:
        hi = min(hi, i1 - 1 + off + wr + 1)

    # row tables: K rows in tab[0:2*tkp], V rows in tab[2*tkp:4*tkp], the
    # current chunk's rows followed by the next chunk's (moved down when
    # that chunk comes)
    tkp = s.shape[2]
    kt = 0
    vt = 2 * tkp
    ready = False
    prev = 0
    for c0 in range(lo, hi, tk):
        n = min(tk, hi - c0)
        npad = (n + 3) & ~3
        # every row sees the whole chunk: no per-row ranges needed
        full = (wl < 0 or i1 - 1 + off - wl <= c0) and (wr < 0 or i0 + off + wr + 1 >= c0 + n)
        if full:                # K and V rows read where they are
            if ready:
                for c in range(npad):
                    tab[kt + c] = tab[kt + prev + c]
                    tab[vt + c] = tab[vt + prev + c]
            else:
                _row_table(k, bt, paged, b, c0, n, npad, tab, kt)
                _row_table(v, bt, paged, b, c0, n, npad, tab, vt)
            nn = max(0, min(tk, hi - c0 - tk))
            if nn > 0:
                _row_table(k, bt, paged, b, c0 + tk, nn, (nn + 3) & ~3, tab, kt + n)
                _row_table(v, bt, paged, b, c0 + tk, nn, (nn + 3) & ~3, tab, vt + n)
            ready = nn > 0
            prev = n
            if trans:
                _stream_chunk_t(qt, k, v, bt, paged, b, kv0, nh, c0, n, nn, tab, kt, vt, s, o, alpha,
                                m, l, mx, M, mp, ldt, sc, kind)
            else:
                _stream_chunk(qs, k, v, bt, paged, b, kv0, nh, c0, n, nn, tab, kt, vt,
                              s, o, alpha, m, l, M, mp, nq, i0 + off, wl, wr, sc, kind)
        else:
            ready = False                   # rows see different keys: gathered, row by row
            _gather(k, bt, paged, b, kv0, nh, c0, n, ks, kind)
            _gather(v, bt, paged, b, kv0, nh, c0, n, vs, kind)
            _qk_direct(qs, ks.reshape((1,) + ks.shape), bt, False, 0, 0, nh, 0, n, s, mp, d, 0, KIND_FLOAT)
            for hh in range(nh):
                sh = s[hh]
                _softmax_tile(sh, M, n, npad, nq, i0 + off, c0, wl, wr, sc, False, m[hh], l[hh],
                              alpha[hh])
                _pv_window(sh, vs[hh], o[hh], alpha[hh], M, n, dv, nq, i0 + off, c0, wl, wr)

    for hh in range(nh):
        for r in range(M):
            h = (kv0 + hh) * g + r // nq
            i = i0 + r % nq
            R = ((b * Hq + h) * Lq + i) * nsmax + sidx
            dst = po[R]
            src = o[hh, r]
            for c in range(dv):
                dst[c] = src[c]
            pm[R] = m[hh, r]
            pl[R] = l[hh, r]


@njit(nogil=True, cache=True)
def _merge_row(po, pm, pl, R0, ns, dst, kind, has_lse, lse, b, h, i):
    """Combine the ``ns`` partials of one output row (exact: weights
    ``exp(m_s - max m)``); no visible key: 0 and lse -inf; NaN propagates."""
    T = po.dtype.type
    ninf = T(-np.inf)
    mx = ninf
    for t in range(ns):
        mx = _maximum(mx, pm[R0 + t])
    dv = po.shape[1]
    if mx == ninf:
        for c in range(dv):
            _put(dst, c, T(0), kind)
        if has_lse:
            lse[b, h, i] = ninf
        return
    ll = T(0)
    for t in range(ns):
        w = _exp(pm[R0 + t] - mx)
        pm[R0 + t] = w
        ll += w * pl[R0 + t]
    for c in range(dv):
        acc = T(0)
        for t in range(ns):
            acc += pm[R0 + t] * po[R0 + t, c]
        _put(dst, c, acc / ll, kind)
    if has_lse:
        lse[b, h, i] = mx + math.log(ll)


@njit(nogil=True, cache=True)
def _stream_layout(B, Hq, Lq, g, d, dv, tq, tk, nh, nsmax):
    """Workspace of a streaming call: ``(partial rows, per-thread scratch)``
    sizes in elements."""
    mpmax = _scratch_rows(g * min(tq, Lq))
    tkp = _chunk_room(tk)
    dvp = (dv + 3) & ~3
    npart = B * Hq * Lq * nsmax
    per = nh * (2 * mpmax * d + tkp * d + tkp * dv + mpmax * tkp + mpmax * dvp + 3 * mpmax) + mpmax
    return npart * (dv + 2), per


@register_jitable
def _chunk_room(tk):
    """Room of a score row (and of a row table) for a chunk of ``tk`` keys:
    a multiple of ``SQT_KEYS``, the keys per block of the transposed score
    kernel (and of 4, those of the row path's)."""
    return (tk + SQT_KEYS - 1) // SQT_KEYS * SQT_KEYS


@register_jitable
def _scratch_rows(M):
    """Scratch rows of an item of ``M`` query rows: a multiple of 4, and of
    16 from 8 rows on (the transposed path, which such items may take,
    keeps a vector of rows per key in a score row's room)."""
    return (M + 15) & ~15 if M >= 8 else (M + 3) & ~3


def _stream_py(q, k, v, out, lse, key_lens, bt, sc, wl, wr, flags, kind, tq, tk, nh, split,
               nthreads, ws, queue):
    """Parallel driver of the streaming kernel: ``prange`` over threads taking
    work items ``(b, group of nh KV heads, query tile, split)`` from an
    atomic counter, then a parallel merge of each row's split partials into
    ``out``/``lse``.  Batches have ``ceil(Lk_b / split)`` splits (at least
    one); ``queue`` holds 2 counters and ``B + 1`` prefix sums of the item
    counts, then ``4 * tkp`` row offsets per thread (:func:`_row_table`)."""
    paged = (flags & PAGED) != 0
    B = q.shape[0]
    Hq = q.shape[1]
    Lq = q.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    Hkv = k.shape[2] if paged else k.shape[1]
    g = Hq // Hkv
    nhg = Hkv // nh
    has_kl = paged or (flags & HAS_KEY_LENS) != 0
    nqt = (Lq + tq - 1) // tq
    nsmax = 1
    queue[0] = 0
    queue[1] = 0
    queue[2] = 0
    for b in range(B):
        lkb = key_lens[b] if has_kl else k.shape[2]
        ns = max(1, (lkb + split - 1) // split)
        nsmax = max(nsmax, ns)
        queue[3 + b] = queue[2 + b] + nhg * nqt * ns
    n_items = queue[2 + B]
    part, per = _stream_layout(B, Hq, Lq, g, d, dv, tq, tk, nh, nsmax)
    npart = B * Hq * Lq * nsmax
    po = ws[:npart * dv].reshape((npart, dv))
    pm = ws[npart * dv:npart * dv + npart]
    pl = ws[npart * dv + npart:npart * dv + 2 * npart]
    mpmax = _scratch_rows(g * min(tq, Lq))
    tkp = _chunk_room(tk)
    dvp = (dv + 3) & ~3
    nt = max(1, min(nthreads, n_items))
    for t in prange(nt):
        mine, _ = _carve(ws, part + t * per, per)
        at = 0
        x, at = _carve(mine, at, nh * mpmax * d)
        qs = x.reshape((nh, mpmax, d))
        x, at = _carve(mine, at, nh * mpmax * d)
        qtr = x.reshape((nh, mpmax * d))
        x, at = _carve(mine, at, nh * tkp * d)
        ks = x.reshape((nh, tkp, d))
        x, at = _carve(mine, at, nh * tkp * dv)
        vs = x.reshape((nh, tkp, dv))
        x, at = _carve(mine, at, nh * mpmax * tkp)
        s = x.reshape((nh, mpmax, tkp))
        x, at = _carve(mine, at, nh * mpmax * dvp)
        o = x.reshape((nh, mpmax, dvp))
        x, at = _carve(mine, at, nh * mpmax)
        m = x.reshape((nh, mpmax))
        x, at = _carve(mine, at, nh * mpmax)
        l = x.reshape((nh, mpmax))
        x, at = _carve(mine, at, nh * mpmax)
        alpha = x.reshape((nh, mpmax))
        mx, at = _carve(mine, at, mpmax)
        tab = queue[4 + B + t * 4 * tkp:4 + B + (t + 1) * 4 * tkp]
        while True:
            it = _fetch_add(queue, 1)
            if it >= n_items:
                break
            b = 0
            while queue[3 + b] <= it:
                b += 1
            rest = it - queue[2 + b]
            lkb = key_lens[b] if has_kl else k.shape[2]
            ns = max(1, (lkb + split - 1) // split)
            sidx = rest % ns
            rest //= ns
            qt = rest % nqt
            kv0 = (rest // nqt) * nh
            i0 = qt * tq
            _stream_item(q, k, v, key_lens, bt, sc, wl, wr, flags, kind, b, kv0, nh, i0,
                         min(i0 + tq, Lq), sidx, split, nsmax, tk, qs, qtr, ks, vs, s, o, m, l,
                         alpha, mx, po, pm, pl, tab)
    has_lse = (flags & HAS_LSE) != 0
    rows = B * Hq * Lq
    for t in prange(nt):
        for row in range(t, rows, nt):
            b = row // (Hq * Lq)
            h = (row // Lq) % Hq
            i = row % Lq
            lkb = key_lens[b] if has_kl else k.shape[2]
            ns = max(1, (lkb + split - 1) // split)
            _merge_row(po, pm, pl, row * nsmax, ns, _borrow(out)[b, h, i], kind, has_lse,
                       _borrow(lse), b, h, i)


def _signature(dt):
    def arr(dtype, ndim, readonly):
        return types.Array(dtype, ndim, "A", readonly=readonly)
    i64 = types.int64
    return types.void(
        arr(dt, 4, True), arr(dt, 4, True), arr(dt, 4, True),      # q, k, v
        arr(dt, 4, False), arr(dt, 3, False),                      # out, lse
        arr(types.boolean, 4, True), arr(dt, 4, True),             # mask, bias
        arr(i64, 1, True), arr(dt, 2, True),                       # key_lens, alibi
        dt, dt, i64, i64, i64, i64, i64, i64,       # scale, softcap, wl, wr, flags, tq, tk, nthreads
        types.Array(dt, 1, "C"), types.Array(types.boolean, 1, "C"),   # workspace
        types.Array(i64, 1, "C"))                                       # work queue


SIGNATURES = {np.dtype(np.float32): _signature(types.float32),
              np.dtype(np.float64): _signature(types.float64)}


def _stream_signature(st):
    def arr(dtype, ndim, readonly):
        return types.Array(dtype, ndim, "A", readonly=readonly)
    acc = types.float64 if st == types.float64 else types.float32
    i64 = types.int64
    return types.void(
        arr(st, 4, True), arr(st, 4, True), arr(st, 4, True),      # q, k, v (or the caches)
        arr(st, 4, False), arr(acc, 3, False),                     # out, lse
        arr(i64, 1, True), arr(i64, 2, True),                      # key_lens, block_table
        acc, i64, i64, i64, i64,                                   # scale, wl, wr, flags, kind
        i64, i64, i64, i64, i64,                                   # tq, tk, heads per item, split, nthreads
        types.Array(acc, 1, "C"), types.Array(i64, 1, "C"))        # workspace, queue


# storage dtype -> streaming signature; float16 and bfloat16 share the uint16 one
STREAM_SIGNATURES = {np.dtype(np.float32): _stream_signature(types.float32),
                     np.dtype(np.float64): _stream_signature(types.float64),
                     np.dtype(np.uint16): _stream_signature(types.uint16)}
_stream_drivers = {}


def stream_driver(dtype):
    """The compiled streaming driver for float32, float64 or 16-bit (uint16
    bits) storage; compiled or loaded from the disk cache on first use."""
    dtype = np.dtype(dtype)
    fn = _stream_drivers.get(dtype)
    if fn is None:
        with _drivers_lock:
            fn = _stream_drivers.get(dtype)
            if fn is None:
                fn = njit([STREAM_SIGNATURES[dtype]], parallel=True, nogil=True, cache=True)(_stream_py)
                _stream_drivers[dtype] = fn
    return fn

_drivers = {}
_drivers_lock = threading.Lock()


def driver(dtype):
    """The compiled parallel driver for float32 or float64 inputs: one
    signature per dtype, compiled (or loaded from the disk cache) on first
    use, so a float32 user never pays for the float64 code."""
    dtype = np.dtype(dtype)
    fn = _drivers.get(dtype)
    if fn is None:
        with _drivers_lock:
            fn = _drivers.get(dtype)
            if fn is None:
                fn = njit([SIGNATURES[dtype]], parallel=True, nogil=True, cache=True)(_attention_py)
                _drivers[dtype] = fn
    return fn


# ---------------------------------------------------------------------------
# Python side: dummies for absent options, tile sizes, the call

_DUMMIES = {}
_BT_DUMMY = np.zeros((1, 1), np.int64)
# Problem attribute -> flag bit; absent ones are passed as dummies
_OPTIONAL = (("lse", HAS_LSE), ("mask", HAS_MASK), ("bias", HAS_BIAS),
             ("key_lens", HAS_KEY_LENS), ("alibi", HAS_ALIBI))


def _dummies(dt):
    d = _DUMMIES.get(dt)
    if d is None:
        d = dict(
            lse=np.zeros((1, 1, 1), dt),
            mask=np.ones((1, 1, 1, 1), np.bool_),
            bias=np.zeros((1, 1, 1, 1), dt),
            key_lens=np.zeros(1, np.int64),
            alibi=np.zeros((1, 1), dt),
        )
        _DUMMIES[dt] = d
    return d


def tiles(p):
    """``(tq, tk)``: query positions per work item and keys per K/V tile."""
    g = p.Hq // p.Hkv
    tq = max(1, ROWS // g)
    if p.window_left < 0 and p.window_right < 0 and p.Lq <= 2 * tq and p.B * p.Hkv >= MIN_HEADS_WHOLE:
        tq = p.Lq       # no window to skip tiles by: one item per head (encoder L128)
    tq = min(tq, p.Lq)
    tk = DECODE_KEYS if g * tq <= 8 else KEYS
    tk = min(tk, (p.Lk + 3) & ~3)
    return tq, tk


_local = threading.local()


def _workspace(dt, nfloat, nbool, nqueue=2):
    """This thread's workspace (grown on demand, kept between calls, so a
    steady loop allocates nothing): ``(floats of dtype dt, bools, queue)``.
    It holds about the size of K and V of the largest multi-tile call;
    :func:`release_workspace` frees it."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    ws = bufs.get(dt)
    if ws is None or ws.shape[0] < nfloat:
        ws = bufs[dt] = _aligned(max(nfloat, 1), dt)
    wsb = bufs.get("bool")
    if wsb is None or wsb.shape[0] < nbool:
        wsb = bufs["bool"] = np.empty(max(nbool, 1), np.bool_)
    queue = bufs.get("queue")
    if queue is None or queue.shape[0] < nqueue:
        queue = bufs["queue"] = np.zeros(max(nqueue, 2), np.int64)
    return ws, wsb, queue


def _aligned(n, dt, align=64):
    """An empty 1-d array of ``n`` elements of ``dt`` starting on an
    ``align``-byte boundary (vector loads of the micro-kernels then do not
    straddle cache lines)."""
    dt = np.dtype(dt)
    raw = np.empty(n * dt.itemsize + align, np.uint8)
    at = -raw.ctypes.data % align
    return raw[at:at + n * dt.itemsize].view(dt)


def release_workspace():
    """Free the calling thread's kernel workspace."""
    _local.bufs = {}


def _key_padding(p):
    """A key-padding mask (broadcast over heads and queries) seen as lengths.

    Returns None, or ``(lens, exact)``: keys ``>= lens[b]`` are masked for
    every query of batch ``b`` (their tiles are then skipped, not masked),
    and ``exact`` says the mask is nothing more than that.  Only when
    lengths cannot change the meaning of anything else: no ``key_lens``
    (they would move the bottom-right alignment), no window, causal or
    ALiBi.  The mask is read, never copied.
    """
    m = p.mask
    if (m is None or p.key_lens is not None or p.alibi is not None
            or p.window_left >= 0 or p.window_right >= 0
            or m.strides[1] != 0 or m.strides[2] != 0 or p.Lk == 0):
        return None
    rows = m[:, 0, 0, :]                                  # (B, Lk) view
    any_true = rows.any(axis=1)
    last = p.Lk - np.argmax(rows[:, ::-1], axis=1)        # 1 + index of the last True
    lens = np.where(any_true, last, 0).astype(np.int64)
    if (lens == p.Lk).all():
        return None
    exact = bool(np.array_equal(rows, np.arange(p.Lk)[None, :] < lens[:, None]))
    return lens, exact


def _call_threads(n, fn, *args):
    """``fn(*args)`` (a parallel driver whose ``prange`` loops run at most
    ``n`` iterations) with Numba's pool at least ``n`` threads wide.  A wider
    pool is left as it is: each ``numba.set_num_threads`` costs microseconds
    (on an Ice Lake Xeon, in turns: a decode B1 Hq8 Hkv2 L512 D64 call took
    93 us with a narrowing to 1 thread and a restore around it, 87 us
    without; prefill B1 H2 L32: 85 against 77 us)."""
    old = numba.get_num_threads()
    if old >= n:
        fn(*args)
        return
    numba.set_num_threads(n)
    try:
        fn(*args)
    finally:
        numba.set_num_threads(old)


def _threads_for(num_threads, items, work):
    """No more threads than work items, and none woken for tiny calls."""
    n = min(int(num_threads), numba.config.NUMBA_NUM_THREADS, items, 1 + work // MIN_WORK_PER_THREAD)
    return max(1, n)


def _half_kind(dt):
    if dt == np.float16:
        return KIND_F16
    if BFLOAT16 is not None and dt == BFLOAT16:
        return KIND_BF16
    return KIND_FLOAT


def _has_options(p):
    return p.mask is not None or p.bias is not None or p.alibi is not None or p.softcap > 0


def uses_stream(p):
    """Whether :func:`run` sends ``p`` to the streaming kernel (decode,
    paged caches, 16-bit storage) rather than the tiled prefill kernel."""
    if _has_options(p):
        return False
    return p.block_table is not None or _half_kind(np.dtype(p.dtype)) != KIND_FLOAT or p.Lq <= STREAM_MAX_LQ


def run(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) for a validated Problem: the streaming
    kernel when :func:`uses_stream`, else the tiled kernel (paged caches are
    then gathered and 16-bit inputs widened to float32 first)."""
    if uses_stream(p):
        _run_stream(p, num_threads)
        return
    if p.block_table is not None:
        densify_pages(p)
    if _half_kind(np.dtype(p.dtype)) != KIND_FLOAT:
        _run_widened(p, num_threads)
    else:
        _run_general(p, num_threads)


def _run_widened(p, num_threads):
    """A 16-bit problem with options on the float32 tiled kernel, through
    float32 copies of q/k/v; the result is rounded to the input dtype."""
    f32 = np.dtype(np.float32)
    w = Problem(**{name: getattr(p, name) for name in Problem.__slots__})
    w.q, w.k, w.v = (x.astype(f32) for x in (p.q, p.k, p.v))
    w.out = np.empty(p.out.shape, f32)
    w.dtype = f32
    _run_general(w, num_threads)
    p.out[...] = w.out


def heads_per_item(p):
    """KV heads per streaming work item: 1 when each head's K rows lie
    together (bhld), all of them when the cache is token-major (paged
    caches, blhd), so that a token's K/V for every head is read in one
    contiguous run."""
    if p.block_table is not None:
        return p.Hkv
    k = p.k
    if p.Hkv > 1 and p.Lk > 1 and abs(k.strides[1]) < abs(k.strides[2]):
        return p.Hkv
    return 1


def split_keys(p, num_threads, tq, tk, nh=1):
    """Keys per KV split of a streaming call: splits only for decode-like
    calls (Lq <= STREAM_MAX_LQ), sized so that there are about
    ITEMS_PER_THREAD work items per thread and at least SPLIT_MIN_KEYS keys
    per split; ``FORCE_SPLIT`` (tests) overrides."""
    lk = p.Lk
    if FORCE_SPLIT:
        return int(FORCE_SPLIT)
    if p.Lq > STREAM_MAX_LQ:
        return max(1, lk)
    nqt = -(-p.Lq // tq)
    total = int(p.key_lens.sum()) if p.key_lens is not None else p.B * lk
    target = ITEMS_PER_THREAD * max(1, int(num_threads))
    split = max(SPLIT_MIN_KEYS, -(-total * (p.Hkv // nh) * nqt // target))
    # as many splits as that needs, of equal length (the longest sequence's
    # last split is then not a sliver beside a few long items)
    split = -(-lk // -(-lk // split))
    split = -(-split // tk) * tk
    return max(1, min(split, lk))


def _run_stream(p, num_threads):
    dt = np.dtype(p.dtype)
    kind = _half_kind(dt)
    st = np.dtype(np.uint16) if kind != KIND_FLOAT else dt
    acc = np.dtype(p.acc_dtype)
    fn = stream_driver(st)
    dm = _dummies(acc)
    q, k, v, out = p.q, p.k, p.v, p.out
    tmp = None
    if not out.flags.aligned:   # possible only when Dv == 1
        tmp = np.empty(out.shape, dt)
        out = tmp
    if kind != KIND_FLOAT:
        q, k, v, out = (x.view(np.uint16) for x in (q, k, v, out))
    flags = 0
    lse = dm["lse"]
    if p.lse is not None:
        flags |= HAS_LSE
        lse = p.lse
    key_lens = dm["key_lens"]
    if p.key_lens is not None:
        flags |= HAS_KEY_LENS
        key_lens = p.key_lens
    bt = _BT_DUMMY
    if p.block_table is not None:
        flags |= PAGED
        bt = p.block_table
    g = p.Hq // p.Hkv
    tq = min(p.Lq, max(1, ROWS // g))
    nh = heads_per_item(p)
    tk = TOKEN_MAJOR_KEYS if nh > 1 else (DECODE_STREAM_KEYS if p.Lq == 1 else STREAM_KEYS)
    split = split_keys(p, num_threads, tq, tk, nh)
    nqt = -(-p.Lq // tq)
    # plain Python over the lengths: a small decode call is over in tens of
    # microseconds, and each NumPy call on a tiny array costs several
    lens = p.key_lens.tolist() if p.key_lens is not None else [p.Lk] * p.B
    ns = [max(1, -(-x // split)) for x in lens]
    items = sum(ns) * (p.Hkv // nh) * nqt
    work = p.Hq * p.Lq * sum(lens) * (p.D + p.Dv)
    n = _threads_for(num_threads, items, work)
    part, per = _stream_layout.py_func(p.B, p.Hq, p.Lq, g, p.D, p.Dv, tq, tk, nh, max(ns))
    ws, _, queue = _workspace(acc, part + n * per, 0, 4 + p.B + n * 4 * _chunk_room(tk))
    _call_threads(n, fn, q, k, v, out, lse, key_lens, bt, acc.type(p.scale), int(p.window_left),
                  int(p.window_right), flags, kind, tq, tk, nh, split, n, ws, queue)
    if tmp is not None:
        p.out[...] = tmp


def _run_general(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) for a validated float32/float64 Problem
    on the tiled kernel."""
    dt = np.dtype(p.dtype)
    fn = driver(dt)
    dm = _dummies(dt)
    flags = 0
    args = {}
    for name, bit in _OPTIONAL:
        a = getattr(p, name)
        if a is None:
            a = dm[name]
        else:
            flags |= bit
        args[name] = a
    key_lens = _key_padding(p)
    if key_lens is not None:
        flags |= HAS_KEY_LENS
        args["key_lens"] = key_lens[0]
        if key_lens[1]:
            flags &= ~HAS_MASK
    out = p.out
    tmp = None
    if not out.flags.aligned:   # possible only when Dv == 1
        tmp = np.empty(out.shape, dt)
        out = tmp
    tq, tk = tiles(p)
    T = dt.type
    # no more threads than work items, and none woken for tiny calls
    items = p.B * p.Hkv * -(-p.Lq // tq)
    work = p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv)
    n = min(int(num_threads), numba.config.NUMBA_NUM_THREADS, items, 1 + work // MIN_WORK_PER_THREAD)
    n = max(1, n)
    g = p.Hq // p.Hkv
    per, nkp, nvp, nbad = _layout(p.B, p.Hkv, p.Lq, p.Lk, g, p.D, p.Dv, tq, tk, n)
    ws, wsb, queue = _workspace(dt, nkp + nvp + n * per, nbad)
    _call_threads(n, fn, p.q, p.k, p.v, out, args["lse"], args["mask"], args["bias"], args["key_lens"],
                  args["alibi"], T(p.scale), T(p.softcap),
                  int(p.window_left), int(p.window_right), flags, tq, tk, n, ws, wsb, queue)
    if tmp is not None:
        p.out[...] = tmp


def warmup():
    """Compile (or load from the disk cache) every signature; returns :func:`cache_status`."""
    for dt in SIGNATURES:
        driver(dt)
    for dt in STREAM_SIGNATURES:
        stream_driver(dt)
    return cache_status()


def cache_status():
    """``{"warm": bool | None, "signatures": n cached of N, "dir": path}`` from
    Numba's cache index of the driver (None when it cannot be read)."""
    from numba.core.caching import FunctionCache

    try:
        n = 0
        where = None
        for fn in (_attention_py, _stream_py):
            cache = FunctionCache(fn)
            n += len(cache._cache_file._load_index())
            where = cache._cache_path
    except Exception as exc:  # noqa: BLE001 - private Numba API; report, never raise
        return {"warm": None, "signatures": f"unknown ({type(exc).__name__}: {exc})", "dir": None}
    total = len(SIGNATURES) + len(STREAM_SIGNATURES)
    return {"warm": n >= total, "signatures": f"{min(n, total)} of {total}", "dir": where}
