"""The tiled (prefill / encoder) kernel of the Numba backend.

Contract: ``_attention_py`` is the parallel driver compiled by
:func:`.launch.driver` (float32 / float64, every option: mask, bias, ALiBi,
softcap, window, key lengths, sinks, lse); it fills ``out`` (and ``lse``) from
validated inputs, all scratch cut from the caller's workspace (sized by
``_layout``).

* ``_attention_py``: ``prange`` over the threads; each takes work items
  ``(batch, KV head, query tile)`` from an atomic counter, costliest first,
  so causal or ragged work and a busy core balance out.  When a KV head
  serves several query tiles its K tiles (as K^T panels of ``NR`` keys) and
  V rows are packed once per call (``_pack_head``); otherwise each item
  packs its tiles into thread scratch.
* ``_work_item``: GQA packing - the query rows of every head of one KV
  group for one query tile form one tile, so each K/V tile is read once per
  group; it walks the visible key tiles only (causal, key lengths and
  window bounds skip whole tiles) with an online softmax.
* Invisible keys get weight exactly 0; a V tile holding inf/NaN that some
  row cannot see in full goes key by key over each row's visible keys
  (``_pv_visible``), so an invisible value never leaks while a visible one
  reaches the row even behind a weight of 0 (0 * NaN is NaN, as in the
  oracle).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .call import (HAS_ALIBI, HAS_BIAS, HAS_KEY_LENS, HAS_LSE, HAS_MASK, HAS_SINKS, PackedKV, TileCall,
                   TileScratch, _a16, _carve16)
from .micro_tile import _abt_tile, _pv_rows, _pv_tile, _qk_tile
from .softmax import _scores_options, _sink_fold, _softmax_tile, _window
from .tuning import MR, NR
from .vec import FASTMATH, _as_c, _borrow, _fetch_add, _fill


# ---------------------------------------------------------------------------
# packing: K and V tiles of `kt` keys aligned at multiples of `kt`

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
def _pack_head(k, v, b, kvh, lkb, kt, kp, vp, bad):
    """Pack the keys ``< lkb`` of one KV head once for all its query tiles:
    K^T panels to ``kp[b, kvh, tile]``, V rows (columns ``dv:`` zero) to
    ``vp[b, kvh, tile]``, ``bad[b, kvh, tile]`` = the V tile holds inf/NaN."""
    k, v, kp, vp, bad = _borrow(k), _borrow(v), _borrow(kp), _borrow(vp), _borrow(bad)
    dv = v.shape[3]
    for tile in range((lkb + kt - 1) // kt):
        j0 = tile * kt
        n = min(kt, lkb - j0)
        _pack_kp(k, b, kvh, j0, n, kp[b, kvh, tile])
        vtile = vp[b, kvh, tile]
        vtile[:, dv:] = 0
        bad[b, kvh, tile] = _pack_v(v, b, kvh, j0, n, vtile, True)


# ---------------------------------------------------------------------------
# the work item and the driver

@njit(nogil=True, cache=True)
def _pv_visible(p, vs, o, alpha, rows, n, dvp, nq, ip0, j0, call, b, h0, i0):
    """``O = alpha O + P V`` for a V tile ``vs[j, c]`` holding inf or NaN,
    key by key over each row's *visible* keys only (window and mask of
    ``call``; row r is head ``h0 + r // nq``, query ``i0 + r % nq``).  An
    invisible key's value never leaks; a visible key's non-finite value
    reaches the row even when its weight is 0 (0 * NaN is NaN, as in the
    oracle)."""
    wl, wr, mask = call.wl, call.wr, call.mask
    has_mask = (call.flags & HAS_MASK) != 0
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
                o[r, c] += x * vs[j, c]


@njit(nogil=True, cache=True)
def _work_item(call, pkv, scr, b, kvh, i0, i1, kt):
    """Attention for query rows ``i0:i1`` of every head of KV head ``kvh`` of
    batch ``b``, key tiles of ``kt`` keys; ``call`` a :class:`.TileCall`,
    ``pkv`` the :class:`.PackedKV`, ``scr`` the thread's :class:`.TileScratch`.
    Items of more than 8 rows (and every item when K/V are prepacked) take
    the register-blocked micro-kernels (``_qk_tile`` / ``_pv_tile``: Q in
    place or packed per MR-row block, K^T panels of NR keys); smaller ones (decode with
    options) the 4 x 4 dot-product blocks of ``_abt_tile`` with K and V rows
    read in place when they are contiguous."""
    q, k, v, out, lse, mask, bias, key_lens, alibi, sinks, sc, softcap, wl, wr, flags = call
    prepacked, kp, vp, bad = pkv
    qs, ks, vs, s, o, m, l, alpha = scr
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

    for j0 in range((lo // kt) * kt, hi, kt):
        tile = j0 // kt
        n = min(kt, hi - j0)
        npad = (n + kw - 1) // kw * kw
        bad_v = False
        direct = False
        # a tile every row sees in full needs no guard: 0 * inf is then
        # NaN in the oracle too (a visible key whose weight underflows)
        full = not has_mask and (wl < 0 or i1 - 1 + off - wl <= j0) and \
            (wr < 0 or i0 + off + wr + 1 >= j0 + n)
        if prepacked:
            vtile = vp[b, kvh, tile]
            bad_v = bad[b, kvh, tile]
            _qk_tile(q, qoff, qrs, nfull, qs, kp[b, kvh, tile], s, alpha, mp, npad, d)
        elif wide:
            vtile = vs
            _pack_kp(k, b, kvh, j0, n, ks)
            bad_v = _pack_v(v, b, kvh, j0, n, vs, not full)
            _qk_tile(q, qoff, qrs, nfull, qs, ks, s, alpha, mp, npad, d)
        else:
            vtile = vs
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
            _pv_visible(s, vtile, o, alpha, M, n, dvp, nq, i0 + off, j0, call, b, kvh * g, i0)
        elif wide:
            _pv_tile(s, vtile, o, alpha, mp, n, dvp)
        elif direct:
            _pv_rows(s, _as_c(v[b, kvh, j0:j0 + n]), o, alpha, M, n, dvp)
        else:
            _pv_rows(s, vs, o, alpha, M, n, dvp)

    has_lse = (flags & HAS_LSE) != 0
    has_sinks = (flags & HAS_SINKS) != 0
    for r in range(M):
        h = kvh * g + r // nq
        i = i0 + r % nq
        f, x = _sink_fold(m[r], l[r], sinks, h, has_sinks)
        dst = out[b, h, i]
        if x == ninf:                   # neither a visible key nor a sink: 0, whatever O holds
            for c in range(dv):
                dst[c] = 0
        else:
            for c in range(dv):
                dst[c] = o[r, c] * f
        if has_lse:
            lse[b, h, i] = x


@njit(nogil=True, cache=True, inline="always")
def _dims(g, qt, dv, kt):
    """Scratch dimensions ``(rows, V row length, keys per tile, score row
    length)``."""
    ktp = (kt + NR - 1) // NR * NR
    return (g * qt + 11) // 12 * 12, (dv + 15) & ~15, ktp, ktp + 16


@njit(nogil=True, cache=True)
def _layout(B, Hkv, Lq, Lk, g, d, dv, qt, kt, nt):
    """Workspace sizes of a call: ``(per thread, packed K, packed V,
    flags)`` in elements; the packed parts are 0 unless query tiles share
    KV heads.  Rows are padded to a multiple of 12 (4 and MR), V rows to
    16 columns, tiles to whole K panels; score rows get one spare cache
    line (fewer L1 set conflicts between the rows of a block)."""
    nqt = (Lq + qt - 1) // qt
    mpmax, dvp, ktp, lds = _dims(g, qt, dv, kt)
    per = _a16(mpmax * d) + ktp * d + ktp * dvp + mpmax * lds + mpmax * dvp + 3 * _a16(mpmax)
    if nqt <= 1:
        return per, 0, 0, 0
    ntile = (Lk + kt - 1) // kt
    return per, B * Hkv * ntile * ktp * d, B * Hkv * ntile * ktp * dvp, B * Hkv * ntile


def _attention_py(q, k, v, out, lse, mask, bias, key_lens, alibi, sinks, sc, softcap, wl, wr, flags,
                  qt, kt, nthreads, ws, wsb, queue):
    """Parallel driver.  When a KV head serves several query tiles, its K
    (as K^T panels) and V tiles are packed once first, in parallel over ``(b, kv
    head)``; otherwise each tile is packed by the work item that uses it.
    Then ``prange`` over threads, each with its own scratch, taking work
    items ``(b, kv head, query tile)`` from an atomic counter, costliest
    first, so ragged or causal work and a busy core balance out.  All
    scratch lives in the caller's workspace ``ws`` / ``wsb`` (sized by
    :func:`_layout`), so a steady loop of calls allocates nothing.

    Parameters (positional: this is the compiled signature,
    :data:`.launch.SIGNATURES`): ``q`` ... ``flags`` as the fields of
    :class:`.TileCall`; ``qt`` query positions per work item; ``kt`` keys
    per K/V tile; ``nthreads`` threads at most; ``ws`` the float workspace
    (64-byte aligned), ``wsb`` the bool workspace (the packed V tiles'
    inf/NaN flags); ``queue`` two int64 counters (pack jobs, work items)."""
    B = q.shape[0]
    Lq = q.shape[2]
    Hkv = k.shape[1]
    Lk = k.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    g = q.shape[1] // Hkv
    nqt = (Lq + qt - 1) // qt
    n_items = B * Hkv * nqt
    nt = max(1, min(nthreads, n_items))
    mpmax, dvp, ktp, lds = _dims(g, qt, dv, kt)
    ntile = (Lk + kt - 1) // kt
    per, nkp, nvp, nbad = _layout(B, Hkv, Lq, Lk, g, d, dv, qt, kt, nt)
    prepacked = nkp > 0
    if prepacked:
        kp = ws[:nkp].reshape((B, Hkv, ntile, ktp, d))
        vp = ws[nkp:nkp + nvp].reshape((B, Hkv, ntile, ktp, dvp))
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
                _pack_head(k, v, b, it % Hkv, lkb, kt, kp, vp, bad)
    for t in prange(nt):
        mine, _ = _carve16(ws, nkp + nvp + t * per, per)
        at = 0
        x, at = _carve16(mine, at, mpmax * d)
        qs = x.reshape((mpmax, d))
        x, at = _carve16(mine, at, ktp * d)
        ks = x.reshape((ktp, d))
        x, at = _carve16(mine, at, ktp * dvp)
        vs = x.reshape((ktp, dvp))
        vs[:, dv:] = 0                  # padding columns of V rows stay zero
        x, at = _carve16(mine, at, mpmax * lds)
        s = x.reshape((mpmax, lds))
        x, at = _carve16(mine, at, mpmax * dvp)
        o = x.reshape((mpmax, dvp))
        m, at = _carve16(mine, at, mpmax)
        l, at = _carve16(mine, at, mpmax)
        alpha, at = _carve16(mine, at, mpmax)
        call = TileCall(_borrow(q), _borrow(k), _borrow(v), _borrow(out), _borrow(lse), _borrow(mask),
                        _borrow(bias), _borrow(key_lens), _borrow(alibi), _borrow(sinks), sc, softcap, wl, wr,
                        flags)
        pkv = PackedKV(prepacked, _borrow(kp), _borrow(vp), _borrow(bad))
        scr = TileScratch(_borrow(qs), _borrow(ks), _borrow(vs), _borrow(s), _borrow(o), _borrow(m),
                          _borrow(l), _borrow(alpha))
        while True:
            it = _fetch_add(queue, 1)
            if it >= n_items:
                break
            qtile = nqt - 1 - it // (B * Hkv)      # last (costliest when causal) query tiles first
            rest = it % (B * Hkv)
            i0 = qtile * qt
            _work_item(call, pkv, scr, rest // Hkv, rest % Hkv, i0, min(i0 + qt, Lq), kt)
