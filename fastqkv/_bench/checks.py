"""Checks of benchmark results against the oracle, and the bench's one use
of the planner.

Contract: :func:`check` compares a runner's whole ``bhld`` output with the
oracle (``fastqkv.reference``) on a subset of heads and rows small enough for
the dense oracle, within the tolerance table of ``fastqkv.testing``, and
returns None or the mismatch message.  :func:`plan` is the only place the
bench package reaches into the planner (``plan_attention``); every other
module asks it.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _problem, reference, testing
from .cases import np_dtype


def plan(inp, **options):
    """The planned problem of ``inp``'s arrays and options (``options``
    override or add keyword options, e.g. ``out=``)."""
    return _problem.plan_attention(inp.q, inp.k, inp.v, **dict(inp.kwargs, **options))


def _subset(inp, max_rows=64, max_work=2e8):
    """Index sets (kv heads, q heads, query rows) small enough for the oracle.
    Rows are a suffix, which keeps bottom-right alignment."""
    c = inp.case
    g = c.Hq // c.Hkv
    kvh = list(range(c.Hkv))
    rows = c.Lq
    if 4.0 * c.B * c.Hq * c.Lq * c.Lk * c.D > max_work:
        kvh = sorted({0, c.Hkv - 1})
        rows = min(c.Lq, max_rows)
    qh = [h for kv in kvh for h in range(kv * g, (kv + 1) * g)]
    return kvh, qh, slice(c.Lq - rows, c.Lq)


def check(inp, got):
    """None if ``got`` (bhld, the whole output) agrees with the oracle on a
    subset of heads and rows, else the mismatch message."""
    if inp.oracle is None:
        kvh, qh, rows = _subset(inp)
        kw = dict(inp.kwargs)
        q = inp.q[:, qh, rows]
        k, v = inp.k[:, kvh], inp.v[:, kvh]
        for name in ("k_scale", "v_scale"):
            if name in kw:
                kw[name] = kw[name][:, kvh]
        if "mask" in kw and kw["mask"].shape[2] != 1:
            kw["mask"] = kw["mask"][:, :, rows]
        ref = reference.attention(q, k, v, **kw)
        if "k_scale" in kw:
            k = k.astype(np.float64) * kw["k_scale"][..., None]
            v = v.astype(np.float64) * kw["v_scale"][..., None]
        cond = testing.condition_number(q, k, 1.0 / math.sqrt(inp.case.D))
        vmax = max(1.0, float(np.abs(v.astype(np.float64)).max()))
        inp.oracle = (qh, rows, ref, cond, vmax)
    qh, rows, ref, cond, vmax = inp.oracle
    got = np.asarray(got)
    c = inp.case
    if got.shape != (c.B, c.Hq, c.Lq, c.D):
        return f"output shape {got.shape}, expected {(c.B, c.Hq, c.Lq, c.D)}"
    try:
        testing.assert_close(got[:, qh, rows], ref, np_dtype(c.dtype), cond=cond, vmax=vmax)
    except AssertionError as exc:
        return str(exc).split(". ")[0]
    return None
