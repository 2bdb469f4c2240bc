"""Micro-kernels of the streaming (decode / paged / 16-bit / quantized) kernel.

Contract: K and V rows are read where they are - dense ``x[b, kvh, j]`` or
paged ``x[block, slot, kvh]`` - through a table of row byte offsets (one
per key of a chunk, plus a per-head base), decoded on load (float16:
vcvtph2ps, bfloat16: shift, int8 / float8: :func:`.vec._dec8_ir`; scales
of quantized rows are the caller's), and the rows read ``PF_BYTES`` later are
prefetched a line at a time beside the loads of the same columns.  They
know nothing of windows, softmax or threads.

* ``_sqk``: ``MRS`` rows x ``SQC`` keys of vector FMAs along D, then one
  transposed reduction gives the dot products in one vector (no horizontal
  sum per score).
* ``_spv``: ``O[MRS rows, NV_PV vectors]`` in registers over all keys of
  the chunk.
* ``_sqkt`` (the transposed path, rows in vector lanes): ``S^T`` for
  ``SKB`` keys, one broadcast K element per FMA of a vector of rows.
* ``_qk_direct`` / ``_pv_tail``: the columns past the vector blocks, and
  gathered chunks; ``_kv_row`` / ``_cursor`` / ``_step`` walk a row's keys
  through the block table.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .tuning import MRS, NV_PV, SKB, SQC
from .vec import (DEC_BYTES, FASTMATH, _as_c, _borrow, _dec, _dec8_ir, _pf_row, _prefetch, _reduce_plan,
                  _stream_ir, _variants)


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
            vals, data, lt, size, vl, vty, load, fma, const, _, xp, tp = _stream_ir(
                context, builder, signature, args)
            _, qoff, ldq, _, _, t0, c, base, dw, _, soff, lds, pd, pn, pb, kind = vals
            i32 = ir.IntType(32)

            def emit(dec, _):
                qp = builder.gep(data(0), [qoff])
                sp = builder.gep(data(9), [soff])
                ste = DEC_BYTES.get(dec, size)
                tc = builder.add(t0, c)
                krow = [builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [builder.add(tc, const(j))])), base)])
                        for j in range(SQC)]
                pk = [_pf_row(builder, xp, tp, builder.add(tc, const(j)), pd, builder.add(pn, t0), pb, krow[j])
                      for j in range(SQC)]
                qrow = [builder.gep(qp, [builder.mul(const(r), ldq)]) for r in range(MRS)]
                acc = [cgutils.alloca_once(builder, vty) for _ in range(MRS * SQC)]
                for a in acc:
                    builder.store(ir.Constant(vty, None), a)
                with cgutils.for_range(builder, builder.udiv(dw, const(vl))) as loop:
                    t = builder.mul(loop.index, const(vl))
                    tb = builder.mul(t, const(ste))
                    # a vector of storage narrower than a line: prefetch at line starts
                    line = (builder.icmp_signed("==", builder.and_(tb, const(63)), const(0))
                            if vl * ste < 64 else ir.Constant(ir.IntType(1), 1))
                    with builder.if_then(line):
                        for j in range(SQC):
                            _prefetch(builder, builder.gep(pk[j], [tb]))
                    kv = [load(krow[j], t, dec) for j in range(SQC)]
                    for r in range(MRS):
                        qv = builder.load(builder.bitcast(builder.gep(qrow[r], [t]), vty.as_pointer()), align=size)
                        for j in range(SQC):
                            a = acc[r * SQC + j]
                            builder.store(builder.call(fma, [qv, kv[j], builder.load(a)]), a)
                # transposed reductions: VL dot products (ids r*4 + j) per result vector
                n = MRS * SQC
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
                            r, j = divmod(g0 + i, SQC)
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
                    run = min(SQC, vl)
                    rt = ir.VectorType(lt, run)
                    for i in range(0, vl, run):
                        r, j = divmod(g0 + i, SQC)
                        part = builder.shuffle_vector(res, ir.Constant(vty, ir.Undefined),
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
    with ``w = nv`` vectors (``1 <= nv <= NV_PV``), ``P[r, c] = p.flat[poff + r*ldp + c*pcs]``,
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
            vals, data, _, size, vl, vty, load, fma, const, splat, xp, tp = _stream_ir(
                context, builder, signature, args, x=4)
            _, poff, ldp, pcs, _, _, t0, base, col, n, _, ooff, ldo, _, aoff, pd, pn, pb, nv, kind = vals

            def emit(dec, nv):
                pp = builder.gep(data(0), [poff])
                op = builder.gep(data(10), [ooff])
                ap = builder.gep(data(13), [aoff])
                orow = [builder.gep(op, [builder.mul(const(r), ldo)]) for r in range(MRS)]
                prow = [builder.gep(pp, [builder.mul(const(r), ldp)]) for r in range(MRS)]
                acc = {}
                for r in range(MRS):
                    av = splat(builder.load(builder.gep(ap, [const(r)])))
                    for k in range(nv):
                        a = acc[r, k] = cgutils.alloca_once(builder, vty)
                        ov = builder.load(builder.bitcast(builder.gep(orow[r], [const(k * vl)]), vty.as_pointer()),
                                          align=size)
                        builder.store(builder.fmul(ov, av), a)
                ste = DEC_BYTES.get(dec, size)
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
                    for r in range(MRS):
                        pv_ = splat(builder.load(builder.gep(prow[r], [builder.mul(cc, pcs)])))
                        for k in range(nv):
                            a = acc[r, k]
                            builder.store(builder.call(fma, [pv_, vb[k], builder.load(a)]), a)
                for r in range(MRS):
                    for k in range(nv):
                        builder.store(builder.load(acc[r, k]),
                                      builder.bitcast(builder.gep(orow[r], [const(k * vl)]), vty.as_pointer()),
                                      align=size)

            _variants(builder, signature.args[4].dtype, kind, nv, range(1, NV_PV + 1), emit)
            return context.get_dummy_value()

        return sig, codegen

    return pv


def _stream_qkt():
    """Intrinsic ``f(QT, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind)``:
    the transposed scores ``S[j, :w] = sum_{t < d} K_j[t] QT[t, :w]`` for
    ``j < SKB`` (overwritten) and ``w = nv`` vectors of rows (1 or 2),
    ``QT[t, x] = QT.flat[qoff + t*ldt + x]``, ``S[j, x] = s.flat[soff +
    j*ldt + x]``, ``K_j`` the row at byte offset ``tab[t0 + min(c + j, n -
    1)] + base`` of ``x``.  One broadcast K element per FMA of a vector of
    rows, two columns per step (bfloat16: both from one 32-bit load); at
    each line of the K rows it prefetches the same line of row ``tab[t0 + e
    + pd] + pb`` when ``e + pd < pn``."""

    @intrinsic
    def qkt(typingctx, QT, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind):
        if not all(isinstance(a, types.Array) for a in (QT, x, tab, s)) or QT.dtype != s.dtype:
            return None
        sig = types.void(QT, qoff, ldt, x, tab, t0, c, n, base, d, s, soff, pd, pn, pb, nv, kind)

        def codegen(context, builder, signature, args):
            vals, data, lt, size, vl, vty, load, fma, const, splat, xp, tp = _stream_ir(
                context, builder, signature, args)
            _, qoff, ldt, _, _, t0, c, n, base, d, _, soff, pd, pn, pb, nv, kind = vals
            i32 = ir.IntType(32)

            def element(row, t, dec):
                """element t of a stored row, in the accumulation type, broadcast"""
                if dec is None:
                    return splat(builder.load(builder.gep(builder.bitcast(row, lt.as_pointer()), [t])))
                if DEC_BYTES[dec] == 1:
                    return splat(_dec8_ir(builder, builder.load(builder.gep(row, [t])), dec, lt))
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
                return builder.bitcast(lo, vty), builder.bitcast(hi, vty)

            def emit(dec, nv):
                qp = builder.gep(data(0), [qoff])
                sp = builder.gep(data(10), [soff])
                ste = DEC_BYTES.get(dec, size)
                krow = []
                pk = []
                for j in range(SKB):
                    cj = builder.add(c, const(j))
                    e = builder.add(t0, builder.select(builder.icmp_signed("<", cj, n), cj,
                                                       builder.sub(n, const(1))))
                    row = builder.gep(xp, [builder.add(builder.load(builder.gep(tp, [e])), base)])
                    krow.append(row)
                    pk.append(_pf_row(builder, xp, tp, e, pd, builder.add(pn, t0), pb, row))
                acc = [[cgutils.alloca_once(builder, vty) for _ in range(nv)] for _ in range(SKB)]
                for a in acc:
                    for ai in a:
                        builder.store(ir.Constant(vty, None), ai)

                def qrow(t):
                    return [builder.load(builder.bitcast(builder.gep(qp, [builder.add(builder.mul(t, ldt),
                                                                                      const(i * vl))]),
                                                         vty.as_pointer()), align=size) for i in range(nv)]

                with cgutils.for_range(builder, builder.udiv(d, const(2))) as loop:
                    t = builder.mul(loop.index, const(2))
                    tb = builder.mul(t, const(ste))
                    with builder.if_then(builder.icmp_signed("==", builder.and_(tb, const(63)), const(0))):
                        for j in range(SKB):
                            _prefetch(builder, builder.gep(pk[j], [tb]))
                    q0 = qrow(t)
                    q1 = qrow(builder.add(t, const(1)))
                    for j in range(SKB):
                        x0, x1 = pair(krow[j], t, dec)
                        for i in range(nv):
                            a = acc[j][i]
                            builder.store(builder.call(fma, [x1, q1[i], builder.call(
                                fma, [x0, q0[i], builder.load(a)])]), a)
                with builder.if_then(builder.icmp_signed("==", builder.and_(d, const(1)), const(1))):
                    t = builder.sub(d, const(1))
                    q0 = qrow(t)
                    for j in range(SKB):
                        x0 = element(krow[j], t, dec)
                        for i in range(nv):
                            a = acc[j][i]
                            builder.store(builder.call(fma, [x0, q0[i], builder.load(a)]), a)
                for j in range(SKB):
                    for i in range(nv):
                        dst = builder.gep(sp, [builder.add(builder.mul(const(j), ldt), const(i * vl))])
                        builder.store(builder.load(acc[j][i]), builder.bitcast(dst, vty.as_pointer()), align=size)

            _variants(builder, signature.args[3].dtype, kind, nv, (1, 2), emit)
            return context.get_dummy_value()

        return sig, codegen

    return qkt


_sqk = _stream_qk()

_spv = _stream_pv()

_sqkt = _stream_qkt()


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _qk_direct(qs, x, bt, paged, b, kv0, hpi, c0, n, s, mp, d, dlo, kind):
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
        for hh in range(hpi):
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
def _pv_tail(p, poff, ldp, pcs, call, b, kvh, c0, n, o, alpha, r0, col):
    """Columns ``col:Dv`` (past the vector blocks) of ``O = alpha O + P V``
    for rows ``r0 .. r0+3``, ``P[r, c] = p[poff + r*ldp + c*pcs]``, the V
    rows of keys ``c0 .. c0+n-1`` of KV head ``kvh`` of batch ``b`` read
    where they are (``call``: a :class:`.StreamCall`)."""
    x, bt, paged, kind = call.v, call.bt, call.paged, call.kind
    dv = x.shape[3]
    bs = x.shape[1]
    for r in range(r0, r0 + MRS):
        al = alpha[r]
        for c in range(col, dv):
            o[r, c] *= al
    cl, slot, blk = _cursor(bt, paged, b, c0, bs)
    for jj in range(n):
        vj = _kv_row(x, paged, b, kvh, c0 + jj, blk, slot)
        for r in range(r0, r0 + MRS):
            pr = p[poff + r * ldp + jj * pcs]
            for c in range(col, dv):
                o[r, c] += pr * _dec(vj[c], kind)
        cl, slot, blk = _step(bt, paged, b, cl, slot, blk, bs)
