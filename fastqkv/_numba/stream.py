"""The streaming (decode / paged / 16-bit / quantized) kernel of the Numba backend.

Contract: ``_stream_py`` is the parallel driver compiled by
:func:`.launch.stream_driver` (float32, float64 or 16-bit storage, or
float32 queries over int8 / float8 K/V with their scales; without mask,
bias, ALiBi or softcap); it fills ``out`` (and ``lse``), K/V dense or a
paged cache read in place, all scratch cut from the caller's workspace
(sized by ``_stream_layout``).

* Work items ``(batch, group of hpi KV heads, query tile, KV split)``: the
  query rows of every head of a group are packed into one tile, so each
  K/V byte of a split is read once.
* A chunk of ``SKT`` keys that every row sees whole is read in place
  through row tables (``_row_table``; the next chunk's rows follow, for
  prefetch) by the micro-kernels of :mod:`.micro_stream`; items of at least
  a vector of rows keep their rows in vector lanes instead
  (``_stream_chunk_t``).  A chunk some row sees only in part (window) is
  gathered and widened into thread scratch and done row by row.
* Quantized K/V: on the row path the micro-kernels decode the 8-bit codes
  in registers, each decode serving a block of rows of the item's GQA group;
  the scales of a chunk's keys are gathered once (``_chunk_scales``) and
  multiply the dot products (``q . k_j`` times ``k_scale[j]``) and the
  probabilities before P.V (``p_j`` times ``v_scale[j]``; the row sums keep
  ``p_j``), never the elements.  Items on the transposed path (whose K
  elements are broadcast one by one, and whose V rows serve many row
  blocks) and gathered chunks dequantize the chunk once into their scratch
  (``_dequant_chunk``) and run the float kernels there.
* Splits write unnormalised partials ``(O, m, l)``; a second parallel pass
  merges them through their max / sum (``_merge_row``: exact; empty splits
  have ``m = -inf``, ``l = 0``) and counts the attention sink, once per
  row, there only (one split included).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload, register_jitable

from .call import HAS_KEY_LENS, HAS_LSE, HAS_SINKS, PAGED, Chunk, Partials, StreamCall, StreamScratch, _carve
from .micro_stream import _cursor, _pv_tail, _qk_direct, _spv, _sqk, _sqkt, _step
from .softmax import _exp, _sink_fold, _softmax_t, _softmax_tile, _window
from .tuning import MRS, NV_PV, PF_BYTES, SKB, SQC, VBYTES
from .vec import (FASTMATH, KIND_F16, KIND_FLOAT, KIND_I8, _as_c, _borrow, _dec_factor, _fetch_add, _fill, _maximum,
                  _put, _widen)


@njit(nogil=True, cache=True)
def _gather(x, bt, paged, b, kv0, hpi, c0, n, dst, kind):
    """``dst[hh, :n] = rows c0..c0+n-1 of (b, kv0 + hh)`` for ``hh < hpi``,
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
                for hh in range(hpi):
                    _widen(_as_c(x[blk, slot + jj, kv0 + hh]), dst[hh, j - c0 + jj], w, kind)
            j += run
    else:
        for jj in range(n):
            for hh in range(hpi):
                _widen(_as_c(x[b, kv0 + hh, c0 + jj]), dst[hh, jj], w, kind)
    z = dst.dtype.type(0)
    for hh in range(hpi):
        for jj in range(n, dst.shape[1]):
            row = dst[hh, jj]
            for t in range(w):
                row[t] = z


# Quantized calls only: the overloads below compile to an empty body in the
# drivers of other storage (``_quant_only``), which never call them.

def _quant_only(call):
    """Whether a :class:`.StreamCall` type is a quantized call's (8-bit K/V)."""
    return call[1].dtype == types.uint8


def _dequant_chunk(call, scr, b, kv0, hpi, c0, n):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_dequant_chunk, jit_options={"cache": True})
def _dequant_chunk_impl(call, scr, b, kv0, hpi, c0, n):
    """Keys ``c0 .. c0+n-1`` of KV heads ``kv0 .. kv0+hpi-1`` of batch ``b``
    of a quantized call dequantized into the scratch ``scr.ks`` / ``scr.vs``
    (rows ``n:`` zeroed), their scales left in ``scr.ksc`` / ``scr.vsc``."""
    if not _quant_only(call):
        return lambda call, scr, b, kv0, hpi, c0, n: None

    def impl(call, scr, b, kv0, hpi, c0, n):
        k, v, bt, paged, kind = call.k, call.v, call.bt, call.paged, call.kind
        ks, vs, ksc, vsc = scr.ks, scr.vs, scr.ksc, scr.vsc
        _chunk_scales(call, b, kv0, hpi, c0, n, ksc, vsc)
        _gather(k, bt, paged, b, kv0, hpi, c0, n, ks, kind)
        _gather(v, bt, paged, b, kv0, hpi, c0, n, vs, kind)
        d = ks.shape[2]
        dv = vs.shape[2]
        for hh in range(hpi):
            _scale_cols(ks.reshape(-1), hh * ks.shape[1] * d, 1, d, d, n, ksc[hh])
            _scale_cols(vs.reshape(-1), hh * vs.shape[1] * dv, 1, dv, dv, n, vsc[hh])
    return impl


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
def _pf_next(hpi, hh, n, nn, dist, kv0, hs):
    """Prefetch parameters ``(pd, pn, pb)`` of the micro-kernels while KV head
    ``kv0 + hh`` (``hs`` bytes per head) of a chunk of ``n`` keys is read,
    ``nn`` rows of the next chunk following in the table: ``dist`` rows on
    in the same head (one head per item), else the next head's rows, after
    the last head the first head's rows of the next chunk."""
    if hpi == 1:
        return dist, n + nn, (kv0 + hh) * hs
    if hh + 1 < hpi:
        return 0, n, (kv0 + hh + 1) * hs
    return n, n + nn, kv0 * hs


def _chunk_scales(call, b, kv0, hpi, c0, n, ksc, vsc):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_chunk_scales, jit_options={"cache": True})
def _chunk_scales_impl(call, b, kv0, hpi, c0, n, ksc, vsc):
    """``ksc[hh, c]`` and ``vsc[hh, c]``: the K and V scales of key ``c0 +
    c`` of KV head ``kv0 + hh`` of batch ``b`` (dense ``kscale[b, kvh, j]``,
    paged ``kscale[bt[b, j // bs], j % bs, kvh]``) times the kind's decode
    factor, for ``c < n`` only (scales past a sequence are never read)."""
    if not _quant_only(call):
        return lambda call, b, kv0, hpi, c0, n, ksc, vsc: None

    def impl(call, b, kv0, hpi, c0, n, ksc, vsc):
        ks, vs, bt, paged = call.kscale, call.vscale, call.bt, call.paged
        f = _dec_factor(call.kind)
        if paged:
            bs = call.k.shape[1]
            col, slot, blk = _cursor(bt, paged, b, c0, bs)
            for c in range(n):
                for hh in range(hpi):
                    ksc[hh, c] = ks[blk, slot, kv0 + hh] * f
                    vsc[hh, c] = vs[blk, slot, kv0 + hh] * f
                col, slot, blk = _step(bt, paged, b, col, slot, blk, bs)
        else:
            for hh in range(hpi):
                for c in range(n):
                    ksc[hh, c] = ks[b, kv0 + hh, c0 + c] * f
                    vsc[hh, c] = vs[b, kv0 + hh, c0 + c] * f
    return impl


def _scale_scores(call, x, off, ld, rows, n, f):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_scale_scores, jit_options={"cache": True})
def _scale_scores_impl(call, x, off, ld, rows, n, f):
    """:func:`_scale_cols` on ``rows`` score rows ``x[off + r*ld:]`` of a
    quantized call (columns: the chunk's keys)."""
    if not _quant_only(call):
        return lambda call, x, off, ld, rows, n, f: None
    return lambda call, x, off, ld, rows, n, f: _scale_cols(x, off, ld, 1, rows, n, f)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _scale_cols(x, off, ldr, ldc, rows, n, f):
    """``x[off + r*ldr + c*ldc] *= f[c]`` for ``r < rows``, ``c < n`` (one
    of the strides 1): the scores or probabilities of a chunk's keys, or
    the elements of its gathered rows, times the keys' scales."""
    if ldc == 1:
        for r in range(rows):
            row = x[off + r * ldr:off + r * ldr + n]
            for c in range(n):
                row[c] *= f[c]
    else:
        for c in range(n):
            fc = f[c]
            col = x[off + c * ldc:off + c * ldc + rows]
            for r in range(rows):
                col[r] *= fc


@register_jitable
def _sizes(q, k, v, paged):
    """``(Hq, Lq, D, Dv, Hkv, G)`` of a streaming call (K/V dense or paged)."""
    Hkv = k.shape[2] if paged else k.shape[1]
    return q.shape[1], q.shape[2], q.shape[3], v.shape[3], Hkv, q.shape[1] // Hkv


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
def _stream_chunk(call, scr, ch, M, mp, nq, ip0):
    """One chunk ``ch`` (a :class:`.Chunk`) of a :class:`.StreamCall` that
    every row sees whole, for the ``M`` rows (``mp`` padded) of the item in
    ``scr`` (:class:`.StreamScratch`; row r: query position ``ip0 + r % nq``
    aligned), K and V rows read in place through the row tables
    ``tab[ktab:]`` / ``tab[vtab:]``, which run on into the next chunk's
    ``nn`` rows.  The rows are prefetched in the order they are read:
    PF_BYTES ahead in a head's rows (one KV head per item), or, with several
    heads per item (token-major caches), the next head's rows of this chunk
    and after the last head the first head's rows of the next chunk."""
    k, v, bt, paged, wl, wr, sc, kind = call.k, call.v, call.bt, call.paged, call.wl, call.wr, call.sc, call.kind
    qs, s, m, l, alpha, tab, ksc, vsc = scr.qs, scr.s, scr.m, scr.l, scr.alpha, scr.tab, scr.ksc, scr.vsc
    b, kv0, hpi, c0, n, nn, ktab = ch.b, ch.kv0, ch.hpi, ch.c0, ch.n, ch.nn, ch.ktab
    d = qs.shape[2]
    mpmax = qs.shape[1]
    sktp = s.shape[2]
    npad = (n + 3) & ~3
    vl = VBYTES // s.itemsize
    dw = d - d % vl
    ks1, _, kpd, _ = _kv_steps(k, v, paged)
    for hh in range(hpi):
        kb = (kv0 + hh) * ks1
        pd, pn, pb = _pf_next(hpi, hh, n, nn, kpd, kv0, ks1)
        for r0 in range(0, mp, MRS):
            for c in range(0, npad, SQC):
                _sqk(qs, (hh * mpmax + r0) * d, d, k, tab, ktab, c, kb, dw, s,
                     (hh * mpmax + r0) * sktp + c, sktp, pd, pn if r0 == 0 else 0, pb, kind)
    if dw < d:
        _qk_direct(qs, k, bt, paged, b, kv0, hpi, c0, n, s, mp, d, dw, kind)
    sf = s.reshape(-1)
    for hh in range(hpi):
        _scale_scores(call, sf, hh * mpmax * sktp, sktp, M, n, ksc[hh])
        _softmax_tile(s[hh], M, n, npad, nq, ip0, c0, wl, wr, sc, False, m[hh], l[hh], alpha[hh])
        _scale_scores(call, sf, hh * mpmax * sktp, sktp, M, n, vsc[hh])
    for hh in range(hpi):
        _pv_head(sf, hh * mpmax * sktp, sktp, 1, call, scr, ch, hh, mp)


@njit(nogil=True, cache=True)
def _pv_head(p, poff, ldp, pcs, call, scr, ch, hh, mp):
    """``O = alpha O + P V`` of KV head ``kv0 + hh`` over the chunk ``ch``,
    rows ``0:mp`` in blocks of 4, ``P[r, c] = p[poff + r*ldp + c*pcs]``; V
    rows read in place through ``tab[vtab:]``, prefetched as
    :func:`_pf_next` says."""
    k, v, kind = call.k, call.v, call.kind
    o, alpha, tab = scr.o, scr.alpha, scr.tab
    b, kv0, hpi, c0, n, nn, vtab = ch.b, ch.kv0, ch.hpi, ch.c0, ch.n, ch.nn, ch.vtab
    _, vs1, _, vpd = _kv_steps(k, v, call.paged)
    mpmax = o.shape[1]
    dvl = o.shape[2]
    dv = v.shape[3]
    vl = VBYTES // p.itemsize
    vb = (kv0 + hh) * vs1
    pd, pn, pb = _pf_next(hpi, hh, n, nn, vpd, kv0, vs1)
    for r0 in range(0, mp, MRS):
        col = 0
        while col < dv - dv % vl:
            nv = min(NV_PV, (dv - col) // vl)
            _spv(p, poff + r0 * ldp, ldp, pcs, v, tab, vtab, vb, col, n, o, (hh * mpmax + r0) * dvl + col, dvl,
                 alpha, hh * mpmax + r0, pd, pn if r0 == 0 else 0, pb, nv, kind)
            col += nv * vl
        if col < dv:
            _pv_tail(p, poff, ldp, pcs, call, b, kv0 + hh, c0, n, o[hh], alpha[hh], r0, col)


@njit(nogil=True, cache=True)
def _stream_chunk_t(call, scr, ch, M, mp, ldt):
    """:func:`_stream_chunk` on the transposed path (items of at least
    :func:`_qkt_rows` rows): the rows of KV head ``hh`` sit in vector lanes
    (``QT[hh, t*ldt + r]``, ``ldt`` rows, a multiple of the vector), its
    scores are summed with one broadcast K element per FMA of a vector of
    rows (no reduction; each K row read once per chunk), the softmax runs
    across rows and P.V reads ``P^T`` through a column stride."""
    k, v, paged, sc, kind = call.k, call.v, call.paged, call.sc, call.kind
    QT, s, m, l, alpha, mx, tab = scr.QT, scr.s, scr.m, scr.l, scr.alpha, scr.mx, scr.tab
    kv0, hpi, n, nn, ktab = ch.kv0, ch.hpi, ch.n, ch.nn, ch.ktab
    d = k.shape[3]
    sktp = s.shape[2]
    mpmax = s.shape[1]
    vl = VBYTES // s.itemsize
    ks1, _, kpd, _ = _kv_steps(k, v, paged)
    sf = s.reshape(-1)
    for hh in range(hpi):
        kb = (kv0 + hh) * ks1
        pd, pn, pb = _pf_next(hpi, hh, n, nn, kpd, kv0, ks1)
        so = hh * mpmax * sktp
        for c in range(0, n, SKB):
            for v0 in range(0, ldt, 2 * vl):
                _sqkt(QT, hh * QT.shape[1] + v0, ldt, k, tab, ktab, c, n, kb, d, sf, so + c * ldt + v0,
                      pd, pn if v0 == 0 else 0, pb, min(2, (ldt - v0) // vl), kind)
        _softmax_t(sf[so:so + n * ldt], ldt, n, M, sc, m[hh], l[hh], alpha[hh], mx)
        _pv_head(sf, so, 1, ldt, call, scr, ch, hh, mp)


def _stream_chunk_dq(call, scr, b, kv0, hpi, c0, n, M, mp, ldt):  # pragma: no cover - replaced by the overload below
    raise NotImplementedError


@overload(_stream_chunk_dq, jit_options={"cache": True})
def _stream_chunk_dq_impl(call, scr, b, kv0, hpi, c0, n, M, mp, ldt):
    """:func:`_stream_chunk_t` on keys ``c0 .. c0+n-1`` of a quantized call,
    dequantized once into the scratch (:func:`_dequant_chunk`) and read
    there by the float kernels, rows through ``tab[0:]`` (K) and
    ``tab[2*sktp:]`` (V).  Compiled for 8-bit storage only: the other
    drivers get an empty body (they never call it)."""
    if not _quant_only(call):
        return lambda call, scr, b, kv0, hpi, c0, n, M, mp, ldt: None

    def impl(call, scr, b, kv0, hpi, c0, n, M, mp, ldt):
        ks, vs, tab = scr.ks, scr.vs, scr.tab
        _dequant_chunk(call, scr, b, kv0, hpi, c0, n)
        ks4 = ks.reshape((1,) + ks.shape)
        vs4 = vs.reshape((1,) + vs.shape)
        npad = (n + 3) & ~3
        vtab = 2 * ks.shape[1]
        _row_table(ks4, call.bt, False, 0, 0, n, npad, tab, 0)
        _row_table(vs4, call.bt, False, 0, 0, n, npad, tab, vtab)
        wide = StreamCall(call.q, ks4, vs4, call.key_lens, call.bt, call.kscale, call.vscale, call.sc, call.wl,
                          call.wr, call.flags & ~PAGED, KIND_FLOAT, False)
        _stream_chunk_t(wide, scr, Chunk(0, 0, hpi, 0, n, 0, 0, vtab), M, mp, ldt)
    return impl


@njit(nogil=True, cache=True)
def _qkt_rows(vl, kind):
    """Rows from which an item takes the transposed path: a vector of rows
    and at least 8 (as in the C kernel); never for float16, whose elements
    have no cheap broadcast."""
    if kind == KIND_F16:
        return 1 << 62
    return max(vl, 8)


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


@njit(nogil=True, cache=True)
def _stream_item(call, scr, part, b, kv0, hpi, i0, i1, sidx, split, skt):
    """Unnormalised attention of query rows ``i0:i1`` of every head of KV
    heads ``kv0 .. kv0+hpi-1`` over keys ``[sidx * split, (sidx + 1) *
    split)`` of batch ``b``, in chunks of ``skt`` keys, written as a partial
    to slot ``sidx`` of ``part`` (:class:`.Partials`); ``call`` a
    :class:`.StreamCall`.  Per KV head ``hh`` the scratch ``scr``
    (:class:`.StreamScratch`) ``qs[hh]``, ``s[hh]``, ``o[hh]``, ... holds
    its group's rows (row r: head ``r // nq``, query ``i0 + r % nq``);
    ``QT[hh]`` the same rows transposed, for the chunks that take the
    transposed path."""
    q, k, v, key_lens, bt, _, _, sc, wl, wr, flags, kind, paged = call
    qs, QT, ks, vs, s, o, m, l, alpha, mx, tab, ksc, vsc = scr
    po, pm, pl, nsmax = part
    T = s.dtype.type
    ninf = T(-np.inf)
    Hq, Lq, d, dv, Hkv, g = _sizes(q, k, v, paged)
    nq = i1 - i0
    M = g * nq
    mp = (M + 3) & ~3
    if paged or (flags & HAS_KEY_LENS) != 0:
        lkb = key_lens[b]
    else:
        lkb = k.shape[2]
    off = lkb - Lq
    for hh in range(hpi):
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
    vl = VBYTES // s.itemsize
    trans = M >= _qkt_rows(vl, kind)
    w = max(vl, MRS)
    ldt = (M + w - 1) // w * w
    if trans:
        for hh in range(hpi):
            for t in range(d):
                for r in range(ldt):
                    QT[hh, t * ldt + r] = qs[hh, r, t] if r < M else T(0)

    quant = kind >= KIND_I8
    lo = sidx * split
    hi = min(lkb, lo + split)
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    if wr >= 0:
        hi = min(hi, i1 - 1 + off + wr + 1)

    # row tables: K rows in tab[0:2*sktp], V rows in tab[2*sktp:4*sktp], the
    # current chunk's rows followed by the next chunk's (moved down when
    # that chunk comes)
    sktp = s.shape[2]
    ktab = 0
    vtab = 2 * sktp
    ready = False
    prev = 0
    for c0 in range(lo, hi, skt):
        n = min(skt, hi - c0)
        npad = (n + 3) & ~3
        # every row sees the whole chunk: no per-row ranges needed
        full = (wl < 0 or i1 - 1 + off - wl <= c0) and (wr < 0 or i0 + off + wr + 1 >= c0 + n)
        if full and quant and trans:    # dequantized once into the scratch, read there
            ready = False
            _stream_chunk_dq(call, scr, b, kv0, hpi, c0, n, M, mp, ldt)
        elif full:              # K and V rows read where they are
            if ready:
                for c in range(npad):
                    tab[ktab + c] = tab[ktab + prev + c]
                    tab[vtab + c] = tab[vtab + prev + c]
            else:
                _row_table(k, bt, paged, b, c0, n, npad, tab, ktab)
                _row_table(v, bt, paged, b, c0, n, npad, tab, vtab)
            nn = max(0, min(skt, hi - c0 - skt))
            if nn > 0:
                _row_table(k, bt, paged, b, c0 + skt, nn, (nn + 3) & ~3, tab, ktab + n)
                _row_table(v, bt, paged, b, c0 + skt, nn, (nn + 3) & ~3, tab, vtab + n)
            ready = nn > 0
            prev = n
            if quant:
                _chunk_scales(call, b, kv0, hpi, c0, n, ksc, vsc)
            ch = Chunk(b, kv0, hpi, c0, n, nn, ktab, vtab)
            if trans:
                _stream_chunk_t(call, scr, ch, M, mp, ldt)
            else:
                _stream_chunk(call, scr, ch, M, mp, nq, i0 + off)
        else:
            ready = False                   # rows see different keys: gathered, row by row
            if quant:
                _dequant_chunk(call, scr, b, kv0, hpi, c0, n)
            else:
                _gather(k, bt, paged, b, kv0, hpi, c0, n, ks, kind)
                _gather(v, bt, paged, b, kv0, hpi, c0, n, vs, kind)
            _qk_direct(qs, ks.reshape((1,) + ks.shape), bt, False, 0, 0, hpi, 0, n, s, mp, d, 0, KIND_FLOAT)
            for hh in range(hpi):
                sh = s[hh]
                _softmax_tile(sh, M, n, npad, nq, i0 + off, c0, wl, wr, sc, False, m[hh], l[hh],
                              alpha[hh])
                _pv_window(sh, vs[hh], o[hh], alpha[hh], M, n, dv, nq, i0 + off, c0, wl, wr)

    for hh in range(hpi):
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
def _merge_row(po, pm, pl, R0, ns, dst, kind, has_lse, lse, sinks, has_sinks, b, h, i):
    """Combine the ``ns`` partials of one output row (exact: weights
    ``exp(m_s - max m)``), the sink of head ``h`` counted once
    (:func:`.softmax._sink_fold`); no visible key: 0 and lse the sink
    (-inf without one); NaN propagates."""
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
            lse[b, h, i] = _sink_fold(mx, T(0), sinks, h, has_sinks)[1]
        return
    ll = T(0)
    for t in range(ns):
        w = _exp(pm[R0 + t] - mx)
        pm[R0 + t] = w
        ll += w * pl[R0 + t]
    f, x = _sink_fold(mx, ll, sinks, h, has_sinks)
    for c in range(dv):
        acc = T(0)
        for t in range(ns):
            acc += pm[R0 + t] * po[R0 + t, c]
        _put(dst, c, acc * f, kind)
    if has_lse:
        lse[b, h, i] = x


@njit(nogil=True, cache=True)
def _stream_layout(B, Hq, Lq, g, d, dv, qt, skt, hpi, nsmax):
    """Workspace of a streaming call: ``(partial rows, per-thread scratch)``
    sizes in elements."""
    mpmax = _scratch_rows(g * min(qt, Lq))
    sktp = _chunk_room(skt)
    dvp = (dv + 3) & ~3
    npart = B * Hq * Lq * nsmax
    per = hpi * (2 * mpmax * d + sktp * d + sktp * dv + mpmax * sktp + mpmax * dvp + 3 * mpmax + 2 * sktp) + mpmax
    return npart * (dv + 2), per


@register_jitable
def _chunk_room(skt):
    """Room of a score row (and of a row table) for a chunk of ``skt`` keys:
    a multiple of ``SKB``, the keys per block of the transposed score
    kernel (and of 4, those of the row path's)."""
    return (skt + SKB - 1) // SKB * SKB


@register_jitable
def _scratch_rows(M):
    """Scratch rows of an item of ``M`` query rows: a multiple of 4, and of
    16 from 8 rows on (the transposed path, which such items may take,
    keeps a vector of rows per key in a score row's room)."""
    return (M + 15) & ~15 if M >= 8 else (M + 3) & ~3


def _stream_py(q, k, v, out, lse, key_lens, bt, sinks, kscale, vscale, sc, wl, wr, flags, kind, qt, skt, hpi,
               split, nthreads, ws, queue):
    """Parallel driver of the streaming kernel: ``prange`` over threads taking
    work items ``(b, group of hpi KV heads, query tile, split)`` from an
    atomic counter, then a parallel merge of each row's split partials into
    ``out``/``lse``.  Batches have ``ceil(Lk_b / split)`` splits (at least
    one); ``queue`` holds 2 counters and ``B + 1`` prefix sums of the item
    counts, then ``4 * sktp`` row offsets per thread (:func:`_row_table`).

    Parameters (positional: this is the compiled signature,
    :data:`.launch.STREAM_SIGNATURES`): ``q``, ``k``, ``v``, ``key_lens``,
    ``bt``, ``kscale``, ``vscale``, ``sc``, ``wl``, ``wr``, ``flags``,
    ``kind`` as the fields of :class:`.StreamCall`; ``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq,
    when HAS_LSE) the results; ``sinks`` (Hq,) the sink logits when
    HAS_SINKS, counted in the merge only; ``qt`` query positions per work item;
    ``skt`` keys per chunk; ``hpi`` KV heads per item; ``split`` keys per
    KV split; ``nthreads`` threads at most; ``ws`` the workspace (partials,
    then per-thread scratch, :func:`_stream_layout`); ``queue`` as above."""
    paged = (flags & PAGED) != 0
    B = q.shape[0]
    Hq, Lq, d, dv, Hkv, g = _sizes(q, k, v, paged)
    hgroups = Hkv // hpi
    has_kl = paged or (flags & HAS_KEY_LENS) != 0
    nqt = (Lq + qt - 1) // qt
    nsmax = 1
    queue[0] = 0
    queue[1] = 0
    queue[2] = 0
    for b in range(B):
        lkb = key_lens[b] if has_kl else k.shape[2]
        ns = max(1, (lkb + split - 1) // split)
        nsmax = max(nsmax, ns)
        queue[3 + b] = queue[2 + b] + hgroups * nqt * ns
    n_items = queue[2 + B]
    psize, per = _stream_layout(B, Hq, Lq, g, d, dv, qt, skt, hpi, nsmax)
    npart = B * Hq * Lq * nsmax
    po = ws[:npart * dv].reshape((npart, dv))
    pm = ws[npart * dv:npart * dv + npart]
    pl = ws[npart * dv + npart:npart * dv + 2 * npart]
    mpmax = _scratch_rows(g * min(qt, Lq))
    sktp = _chunk_room(skt)
    dvp = (dv + 3) & ~3
    nt = max(1, min(nthreads, n_items))
    for t in prange(nt):
        mine, _ = _carve(ws, psize + t * per, per)
        at = 0
        x, at = _carve(mine, at, hpi * mpmax * d)
        qs = x.reshape((hpi, mpmax, d))
        x, at = _carve(mine, at, hpi * mpmax * d)
        QT = x.reshape((hpi, mpmax * d))
        x, at = _carve(mine, at, hpi * sktp * d)
        ks = x.reshape((hpi, sktp, d))
        x, at = _carve(mine, at, hpi * sktp * dv)
        vs = x.reshape((hpi, sktp, dv))
        x, at = _carve(mine, at, hpi * mpmax * sktp)
        s = x.reshape((hpi, mpmax, sktp))
        x, at = _carve(mine, at, hpi * mpmax * dvp)
        o = x.reshape((hpi, mpmax, dvp))
        x, at = _carve(mine, at, hpi * mpmax)
        m = x.reshape((hpi, mpmax))
        x, at = _carve(mine, at, hpi * mpmax)
        l = x.reshape((hpi, mpmax))
        x, at = _carve(mine, at, hpi * mpmax)
        alpha = x.reshape((hpi, mpmax))
        mx, at = _carve(mine, at, mpmax)
        x, at = _carve(mine, at, hpi * sktp)
        ksc = x.reshape((hpi, sktp))
        x, at = _carve(mine, at, hpi * sktp)
        vsc = x.reshape((hpi, sktp))
        tab = queue[4 + B + t * 4 * sktp:4 + B + (t + 1) * 4 * sktp]
        call = StreamCall(_borrow(q), _borrow(k), _borrow(v), _borrow(key_lens), _borrow(bt), _borrow(kscale),
                          _borrow(vscale), sc, wl, wr, flags, kind, paged)
        scr = StreamScratch(_borrow(qs), _borrow(QT), _borrow(ks), _borrow(vs), _borrow(s), _borrow(o),
                            _borrow(m), _borrow(l), _borrow(alpha), _borrow(mx), _borrow(tab), _borrow(ksc),
                            _borrow(vsc))
        part = Partials(_borrow(po), _borrow(pm), _borrow(pl), nsmax)
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
            qtile = rest % nqt
            kv0 = (rest // nqt) * hpi
            i0 = qtile * qt
            _stream_item(call, scr, part, b, kv0, hpi, i0, min(i0 + qt, Lq), sidx, split, skt)
    has_lse = (flags & HAS_LSE) != 0
    has_sinks = (flags & HAS_SINKS) != 0
    rows = B * Hq * Lq
    for t in prange(nt):
        for row in range(t, rows, nt):
            b = row // (Hq * Lq)
            h = (row // Lq) % Hq
            i = row % Lq
            lkb = key_lens[b] if has_kl else k.shape[2]
            ns = max(1, (lkb + split - 1) // split)
            _merge_row(po, pm, pl, row * nsmax, ns, _borrow(out)[b, h, i], kind, has_lse,
                       _borrow(lse), _borrow(sinks), has_sinks, b, h, i)
