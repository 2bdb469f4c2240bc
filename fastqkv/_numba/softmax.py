"""Softmax and score options of the Numba kernels.

Contract: functions of one score tile (or one row of it) and the running
softmax state ``m`` (row max), ``l`` (row sum), ``alpha`` (the factor
``exp(m_old - m_new)`` of the output rows); they read no inputs and know no
threads.

* ``_exp``: float32 polynomial exp (Cephes coefficients, exponent bits
  assembled with an int->float bitcast) that vectorises where ``math.exp``
  would not; float64 keeps ``math.exp``.
* ``_window``: the keys of a tile inside a query position's window.
* ``_scores_options``: scale, softcap, bias, ALiBi and mask on a score row,
  in the oracle's order.
* ``_softmax_tile`` (rows of ``S``) and ``_softmax_t`` (the transposed path:
  ``S^T``, rows in vector lanes): one online-softmax step, ``exp(S - m)``
  left in place.  Row maxima use ``_maximum``, so NaN scores propagate;
  rows with no visible key keep ``m = -inf``, ``l = 0``.
* ``_sink_fold``: the end of a row: its normaliser and lse from ``m`` and
  ``l``, with the row's attention sink counted once.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .vec import FASTMATH, _bits_as_f32, _maximum


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


@njit(nogil=True, cache=True, inline="always")
def _sink_fold(m, l, sinks, h, has_sinks):
    """``(f, lse)`` of an output row of query head ``h`` with running max
    ``m`` and sum ``l``: ``out = f * O`` and its log-sum-exp, the sink logit
    ``s = sinks[h]`` (when ``has_sinks``; else -inf, no sink) counted once as
    one more key of value 0: ``M = max(m, s)``, ``a = exp(m - M)``,
    ``L = l a + exp(s - M)``, ``f = a / L``, ``lse = M + log(L)``.  A row
    without a visible key gets ``f = 0`` and ``lse = s``; ``lse`` is -inf
    only when there is neither a visible key nor a sink (``out`` is then
    0).  NaN in ``m`` propagates.  Without a sink ``f = 1 / l`` and ``lse =
    m + log(l)`` exactly."""
    T = sinks.dtype.type
    ninf = T(-np.inf)
    s = sinks[h] if has_sinks else ninf
    mx = _maximum(m, s)
    if mx == ninf:
        return T(0), ninf
    a = _exp(m - mx)
    ll = l * a + _exp(s - mx)
    return a / ll, T(mx + math.log(ll))
