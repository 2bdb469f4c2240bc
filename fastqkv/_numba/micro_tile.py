"""Micro-kernels of the tiled (prefill / encoder) kernel.

Contract: dense products on scratch tiles the caller has packed and padded;
they know nothing of masks, windows or threads, and read arrays through
their data pointers (the caller guarantees contiguity and bounds).

* ``_gemm_block`` (an intrinsic factory): the outer-product form of the C
  backend, an ``MR x width`` block of vector accumulators, one B row loaded
  and one A element broadcast per row and step, packed FMAs with no
  horizontal sum.  ``_qk_tile`` (``S = Q K^T`` from K^T panels ``Kp`` of
  ``NR`` keys, Q in place or packed per ``MR``-row block) and ``_pv_tile``
  (``O = alpha O + P V`` on V rows) drive it.
* Items of at most 8 rows (decode with options): ``_abt_tile`` (a 4 x 4
  block of dot products vectorised along the reduction) and ``_pv_rows``
  (``P V`` as 4-key SAXPYs over V rows).

``MR``, ``NR`` and the accumulator budget come from :mod:`.tuning`; on a
CPU with fewer registers a block is split into row groups that fit.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .tuning import ACC, MR, NR, UNROLL
from .vec import FASTMATH, _vec_ir


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
            vals, data, _, size, vl, vty, fma, const, splat = _vec_ir(context, builder, signature, args)
            _, aoff, ars, ats, _, boff, ldb, _, coff, ldc, kd, _, alo = vals
            nv = width // vl
            rows = max(1, min(MR, ACC // nv))

            def vptr(p, off):
                return builder.bitcast(builder.gep(p, [off]), vty.as_pointer())

            ap = builder.gep(data(0), [aoff])
            bp = builder.gep(data(4), [boff])
            cp = builder.gep(data(7), [coff])
            alp = builder.gep(data(11), [alo])
            nu = builder.udiv(kd, const(UNROLL))
            for r0 in range(0, MR, rows):
                rr = range(r0, min(MR, r0 + rows))
                acc = {(r, n): cgutils.alloca_once(builder, vty) for r in rr for n in range(nv)}
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
                            builder.store(ir.Constant(vty, None), acc[r, n])

                def step(t):
                    brow = builder.gep(bp, [builder.mul(t, ldb)])
                    bv = [builder.load(vptr(brow, const(n * vl)), align=size) for n in range(nv)]
                    toff = builder.mul(t, ats)
                    for r in rr:
                        x = splat(builder.load(builder.gep(arow[r], [toff])))
                        for n in range(nv):
                            builder.store(builder.call(fma, [x, bv[n], builder.load(acc[r, n])]), acc[r, n])

                with cgutils.for_range(builder, nu) as loop:
                    t0 = builder.mul(loop.index, const(UNROLL))
                    for u in range(UNROLL):
                        step(builder.add(t0, const(u)))
                tail = builder.mul(nu, const(UNROLL))
                with cgutils.for_range(builder, builder.sub(kd, tail)) as loop:
                    step(builder.add(tail, loop.index))
                for r in rr:
                    for n in range(nv):
                        builder.store(builder.load(acc[r, n]), vptr(crow[r], const(n * vl)), align=size)
            return context.get_dummy_value()

        return sig, codegen

    return gemm


_qk_block = _gemm_block(NR, False)

_pv_block = _gemm_block(NR, True)

_pv_block16 = _gemm_block(16, True)

_pv_block32 = _gemm_block(32, True)

_pv_block48 = _gemm_block(48, True)


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
