"""Numba tile kernels and the parallel driver of the ``numba`` backend.

Importing this module imports numba; :mod:`fastqkv._numba` imports it on
first use only.  Structure (the C backend has the same one):

* :func:`driver` - builds (lazily, once) the ``@njit(parallel=True)``
  dispatcher :func:`_attention` for the two signatures below, loading them
  from Numba's on-disk cache when it is warm.
* ``_attention`` - ``prange`` over the threads; each thread allocates its
  padded scratch once and walks an interleaved share of the work items
  ``(batch, KV head, query tile)``, so causal work is spread evenly.
* ``_work_item`` - GQA packing: the query rows of *all* heads of one KV
  group for one query tile are packed into one tile, so each K/V tile is
  read once per group.  It walks the visible key tiles only (causal,
  ``key_lens`` and window bounds skip whole tiles) with a max-subtracted
  online softmax.
* micro-kernel ``_abt_tile`` (``S = Q K^T`` and ``O = alpha O + P V``) - ``2 x 4``
  register-blocked dot products over contiguous scratch (K tile row-major,
  V tile transposed), which LLVM vectorises; ``_exp`` is a float32 polynomial exp (Cephes
  coefficients, bits assembled with an integer->float bitcast) that
  vectorises where ``math.exp`` would not.

Numerics: no ``fastmath=True`` anywhere.  The micro-kernels and the row sums
use :data:`FASTMATH` (``nsz``, ``arcp``, ``contract``, ``reassoc``): it lets
LLVM split a dot product or a sum into vector lanes and fuse multiply-adds;
it leaves out ``nnan``/``ninf``, so ``-inf`` (masking) and NaN (bad input)
keep their IEEE meaning.  Row maxima use ``llvm.maximum``, which propagates
NaN and still vectorises.  Every global read by a kernel is a constant.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["driver", "run", "warmup", "cache_status", "FASTMATH", "SIGNATURES"]

# LLVM fast-math flags allowed in fastqkv's kernels: never nnan / ninf.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

# Work-item shape, tuned on an AMD EPYC (Zen 4, 32 KiB L1d, 1 MiB L2 per core):
# about ROWS packed query rows (heads of a group x query positions) per item
# and KEYS keys per K/V tile (a multiple of 4, the micro-kernel width).
ROWS = 64
KEYS = 64
DECODE_KEYS = 256

# bits of the `flags` argument
HAS_LSE = 1
HAS_MASK = 2
HAS_BIAS = 4
HAS_KEY_LENS = 8
HAS_ALIBI = 16


# ---------------------------------------------------------------------------
# scalar helpers

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
    """``c[:mp, :n4] = a[:mp, :kd] @ b[:n4, :kd].T``, or with ``accumulate``
    ``c[r] = alpha[r] * c[r] + ...``.  ``mp`` even, ``n4 % 4 == 0``; a 2 x 4
    block of dot products per step, each vectorised along ``kd``."""
    z = c.dtype.type(0)
    for r in range(0, mp, 2):
        al0 = alpha[r]
        al1 = alpha[r + 1]
        for j in range(0, n4, 4):
            s0 = z
            s1 = z
            s2 = z
            s3 = z
            t0 = z
            t1 = z
            t2 = z
            t3 = z
            for t in range(kd):
                x0 = a[r, t]
                x1 = a[r + 1, t]
                y0 = b[j, t]
                y1 = b[j + 1, t]
                y2 = b[j + 2, t]
                y3 = b[j + 3, t]
                s0 += x0 * y0
                s1 += x0 * y1
                s2 += x0 * y2
                s3 += x0 * y3
                t0 += x1 * y0
                t1 += x1 * y1
                t2 += x1 * y2
                t3 += x1 * y3
            if accumulate:
                s0 += al0 * c[r, j]
                s1 += al0 * c[r, j + 1]
                s2 += al0 * c[r, j + 2]
                s3 += al0 * c[r, j + 3]
                t0 += al1 * c[r + 1, j]
                t1 += al1 * c[r + 1, j + 1]
                t2 += al1 * c[r + 1, j + 2]
                t3 += al1 * c[r + 1, j + 3]
            c[r, j] = s0
            c[r, j + 1] = s1
            c[r, j + 2] = s2
            c[r, j + 3] = s3
            c[r + 1, j] = t0
            c[r + 1, j + 1] = t1
            c[r + 1, j + 2] = t2
            c[r + 1, j + 3] = t3


@njit(nogil=True, cache=True)
def _pv_tile_guarded(p, vt, o, alpha, mp, n, dvp):
    """Like :func:`_abt_tile` for P @ V but skips keys of probability 0, for V tiles that
    hold inf or NaN: an invisible key's value must not reach the output."""
    z = o.dtype.type(0)
    for r in range(mp):
        al = alpha[r]
        for c in range(dvp):
            acc = z
            for j in range(n):
                x = p[r, j]
                if x != 0:
                    acc += x * vt[c, j]
            o[r, c] = al * o[r, c] + acc


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _scale_max(row, lo, hi, sc):
    """``row[lo:hi] *= sc``; returns the NaN-propagating max of ``row[lo:hi]``."""
    mt = row.dtype.type(-np.inf)
    for j in range(lo, hi):
        x = row[j] * sc
        row[j] = x
        mt = _maximum(mt, x)
    return mt


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _exp_sum(row, n, m):
    """``row[:n] = exp(row[:n] - m)``; returns their sum."""
    acc = row.dtype.type(0)
    for j in range(n):
        x = _exp(row[j] - m)
        row[j] = x
        acc += x
    return acc


@njit(nogil=True, cache=True)
def _fill(row, lo, hi, value):
    for j in range(lo, hi):
        row[j] = value


# ---------------------------------------------------------------------------
# the tile loop of one work item

@njit(nogil=True, cache=True)
def _scores_general(row, n, j0, b, h, i, ip, sc, softcap, wl, wr, flags, mask, bias, alibi):
    """Scores of one row of a tile with every option: softcap, bias, ALiBi,
    window and mask, in that order; invisible keys become -inf.  Returns the
    row max."""
    T = row.dtype.type
    ninf = T(-np.inf)
    has_mask = (flags & HAS_MASK) != 0
    has_bias = (flags & HAS_BIAS) != 0
    has_alibi = (flags & HAS_ALIBI) != 0
    slope = alibi[b, h] if has_alibi else T(0)
    mt = ninf
    for jj in range(n):
        j = j0 + jj
        vis = True
        if wl >= 0 and j < ip - wl:
            vis = False
        if wr >= 0 and j > ip + wr:
            vis = False
        if has_mask and not mask[b, h, i, j]:
            vis = False
        if vis:
            x = row[jj] * sc
            if softcap > 0:
                x = softcap * math.tanh(x / softcap)
            if has_bias:
                x += bias[b, h, i, j]
            if has_alibi:
                x -= slope * T(abs(ip - j))
            row[jj] = x
            mt = _maximum(mt, x)
        else:
            row[jj] = ninf
    return mt


@njit(nogil=True, cache=True)
def _pack_k(k, b, kvh, j0, n, npad, d, ks):
    z = ks.dtype.type(0)
    for jj in range(n):
        for t in range(d):
            ks[jj, t] = k[b, kvh, j0 + jj, t]
    for jj in range(n, npad):
        for t in range(d):
            ks[jj, t] = z


@njit(nogil=True, cache=True)
def _pack_vt(v, b, kvh, j0, n, npad, dv, vt):
    """Transpose a V tile into ``vt[:dv, :npad]``; True if it holds inf/NaN."""
    z = vt.dtype.type(0)
    chk = z
    for jj in range(n):
        for c in range(dv):
            x = v[b, kvh, j0 + jj, c]
            vt[c, jj] = x
            chk += x * z
    for c in range(dv):
        for jj in range(n, npad):
            vt[c, jj] = z
    return not (chk == 0)


@njit(nogil=True, cache=True)
def _work_item(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr, flags,
               b, kvh, i0, i1, tk, qs, ks, vt, s, o, m, l, alpha):
    """Attention for query rows ``i0:i1`` of every head of KV head ``kvh``."""
    T = s.dtype.type
    ninf = T(-np.inf)
    Hq = q.shape[1]
    Lq = q.shape[2]
    Lk = k.shape[2]
    d = q.shape[3]
    dv = v.shape[3]
    dvp = vt.shape[0]
    g = Hq // k.shape[1]
    general = (flags & (HAS_MASK | HAS_BIAS | HAS_ALIBI)) != 0 or softcap > 0
    nq = i1 - i0
    M = g * nq
    mp = M + (M & 1)
    lkb = key_lens[b] if (flags & HAS_KEY_LENS) != 0 else Lk
    off = lkb - Lq                      # aligned position i' = i + off

    # pack the group's query rows: row r is head kvh*g + r // nq, query i0 + r % nq
    for r in range(M):
        h = kvh * g + r // nq
        i = i0 + r % nq
        for t in range(d):
            qs[r, t] = q[b, h, i, t]
        m[r] = ninf
        l[r] = 0
        for c in range(dvp):
            o[r, c] = 0
    for r in range(M, mp):
        for t in range(d):
            qs[r, t] = 0
        alpha[r] = 1
        for c in range(dvp):
            o[r, c] = 0

    # visible key range of the whole item; tiles outside it are skipped
    lo = 0
    hi = lkb
    if wl >= 0:
        lo = max(lo, i0 + off - wl)
    if wr >= 0:
        hi = min(hi, i1 - 1 + off + wr + 1)

    for j0 in range(lo, hi, tk):
        n = min(tk, hi - j0)
        npad = (n + 3) & ~3
        _pack_k(k, b, kvh, j0, n, npad, d, ks)
        bad_v = _pack_vt(v, b, kvh, j0, n, npad, dv, vt)
        _abt_tile(qs, ks, s, alpha, False, mp, npad, d)
        for r in range(M):
            row = s[r]
            h = kvh * g + r // nq
            i = i0 + r % nq
            ip = i + off
            if general:
                mt = _scores_general(row, n, j0, b, h, i, ip, sc, softcap, wl, wr, flags,
                                     mask, bias, alibi)
            else:
                a = 0
                e = n
                if wl >= 0:
                    a = min(max(ip - wl - j0, 0), n)
                if wr >= 0:
                    e = max(min(ip + wr + 1 - j0, n), 0)
                if e < a:
                    e = a
                _fill(row, 0, a, ninf)
                _fill(row, e, n, ninf)
                mt = _scale_max(row, a, e, sc)
            mo = m[r]
            mn = _maximum(mo, mt)
            ms = T(0) if mn == ninf else mn
            al = _exp(mo - ms)
            l[r] = l[r] * al + _exp_sum(row, n, ms)
            alpha[r] = al
            m[r] = mn
            _fill(row, n, npad, T(0))
        for r in range(M, mp):
            _fill(s[r], 0, npad, T(0))
        if bad_v:
            _pv_tile_guarded(s, vt, o, alpha, mp, n, dvp)
        else:
            _abt_tile(s, vt, o, alpha, True, mp, dvp, npad)

    has_lse = (flags & HAS_LSE) != 0
    for r in range(M):
        h = kvh * g + r // nq
        i = i0 + r % nq
        ll = l[r]
        if ll == 0:
            for c in range(dv):
                out[b, h, i, c] = 0
            if has_lse:
                lse[b, h, i] = ninf
        else:
            for c in range(dv):
                out[b, h, i, c] = o[r, c] / ll
            if has_lse:
                lse[b, h, i] = m[r] + math.log(ll)


def _attention_py(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr, flags,
                  tq, tk, nthreads):
    """Parallel driver: ``prange`` over threads, each with its own scratch,
    each walking work items ``t, t + nt, ...`` of ``(b, kv head, query tile)``."""
    B = q.shape[0]
    Lq = q.shape[2]
    Hkv = k.shape[1]
    d = q.shape[3]
    dv = v.shape[3]
    g = q.shape[1] // Hkv
    nqt = (Lq + tq - 1) // tq
    n_items = B * Hkv * nqt
    nt = max(1, min(nthreads, n_items))
    mpmax = g * tq + 1
    dvp = (dv + 3) & ~3
    tkp = (tk + 3) & ~3
    for t in prange(nt):
        qs = np.empty((mpmax, d), q.dtype)
        ks = np.empty((tkp, d), q.dtype)
        vt = np.zeros((dvp, tkp), q.dtype)
        s = np.empty((mpmax, tkp), q.dtype)
        o = np.empty((mpmax, dvp), q.dtype)
        m = np.empty(mpmax, q.dtype)
        l = np.empty(mpmax, q.dtype)
        alpha = np.ones(mpmax, q.dtype)
        for it in range(t, n_items, nt):
            qt = it % nqt
            rest = it // nqt
            kvh = rest % Hkv
            b = rest // Hkv
            i0 = qt * tq
            i1 = min(i0 + tq, Lq)
            _work_item(q, k, v, out, lse, mask, bias, key_lens, alibi, sc, softcap, wl, wr,
                       flags, b, kvh, i0, i1, tk, qs, ks, vt, s, o, m, l, alpha)


def _signature(dt):
    def arr(dtype, ndim, readonly):
        return types.Array(dtype, ndim, "A", readonly=readonly)
    i64 = types.int64
    return types.void(
        arr(dt, 4, True), arr(dt, 4, True), arr(dt, 4, True),      # q, k, v
        arr(dt, 4, False), arr(dt, 3, False),                      # out, lse
        arr(types.boolean, 4, True), arr(dt, 4, True),             # mask, bias
        arr(i64, 1, True), arr(dt, 2, True),                       # key_lens, alibi
        dt, dt, i64, i64, i64, i64, i64, i64)       # scale, softcap, wl, wr, flags, tq, tk, nthreads


SIGNATURES = {np.dtype(np.float32): _signature(types.float32),
              np.dtype(np.float64): _signature(types.float64)}

_driver = None


def driver():
    """The compiled parallel driver (both signatures; from the disk cache when warm)."""
    global _driver
    if _driver is None:
        _driver = njit(list(SIGNATURES.values()), parallel=True, nogil=True, cache=True)(_attention_py)
    return _driver


# ---------------------------------------------------------------------------
# Python side: dummies for absent options, tile sizes, the call

_DUMMIES = {}
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
    tq = min(tq, p.Lq)
    tk = DECODE_KEYS if g * tq <= 8 else KEYS
    tk = min(tk, (p.Lk + 3) & ~3)
    return tq, tk


def run(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) for a validated float32/float64 Problem."""
    dt = np.dtype(p.dtype)
    fn = driver()
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
    out = p.out
    tmp = None
    if not out.flags.aligned:   # possible only when Dv == 1
        tmp = np.empty(out.shape, dt)
        out = tmp
    tq, tk = tiles(p)
    T = dt.type
    n = max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        fn(p.q, p.k, p.v, out, args["lse"], args["mask"], args["bias"], args["key_lens"],
           args["alibi"], T(p.scale), T(p.softcap),
           int(p.window_left), int(p.window_right), flags, tq, tk, n)
    finally:
        numba.set_num_threads(old)
    if tmp is not None:
        p.out[...] = tmp


def warmup():
    """Compile (or load from the disk cache) every signature; returns :func:`cache_status`."""
    driver()
    return cache_status()


def cache_status():
    """``{"warm": bool | None, "signatures": n cached of N, "dir": path}`` from
    Numba's cache index of the driver (None when it cannot be read)."""
    from numba.core.caching import FunctionCache

    try:
        cache = FunctionCache(_attention_py)
        index = cache._cache_file._load_index()
        n = len(index)
        where = cache._cache_path
    except Exception as exc:  # noqa: BLE001 - private Numba API; report, never raise
        return {"warm": None, "signatures": f"unknown ({type(exc).__name__}: {exc})", "dir": None}
    return {"warm": n >= len(SIGNATURES), "signatures": f"{min(n, len(SIGNATURES))} of {len(SIGNATURES)}",
            "dir": where}
