"""Arrays for a benchmark case.

Contract: :func:`make_inputs` turns a :class:`~.cases.BenchCase` into seeded
random ``q, k, v`` (or, for planning, uninitialised ones) in fastqkv's
``bhld`` layout plus the keyword options that express the case (``causal``,
``key_lens`` or a key-padding ``mask``; ``k_scale``/``v_scale`` with K/V
quantized by :func:`fastqkv.quantize_kv` for a case with ``kv``); it raises
:class:`~.cases.Skip` when the case's dtypes cannot be created here.
:func:`paged_copy` lays dense K/V out as a shuffled paged cache.  Nothing here
times or checks anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cases import BenchCase, np_dtype


@dataclass
class Inputs:
    """Arrays and keyword options of one case, in fastqkv's ``bhld`` layout."""
    case: BenchCase
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict = field(default_factory=dict)
    oracle: tuple | None = None      # (q heads, rows, reference out, cond, vmax), see checks.check


def make_inputs(case, seed=0, fill=True):
    """Random inputs for ``case`` (``fill`` false: q, k and v uninitialised,
    for planning only); raises :class:`~.cases.Skip` when its dtype cannot
    be created here."""
    dt = np_dtype(case.dtype)
    rng = np.random.default_rng(seed)

    def arr(*shape):
        if not fill:
            return np.empty(shape, dt)
        return rng.standard_normal(shape, dtype=np.float32).astype(dt)

    q = arr(case.B, case.Hq, case.Lq, case.D)
    k = arr(case.B, case.Hkv, case.Lk, case.D)
    v = arr(case.B, case.Hkv, case.Lk, case.D)
    kw = {"causal": case.causal}
    if case.kv is not None:
        kvt = np_dtype(case.kv)                   # Skip without ml_dtypes
        if fill:
            from .._quant import quantize_kv
            (k, kw["k_scale"]), (v, kw["v_scale"]) = (quantize_kv(x, case.kv) for x in (k, v))
        else:
            k, v = k.astype(kvt), v.astype(kvt)
            kw["k_scale"] = kw["v_scale"] = np.ones(k.shape[:-1], np.float32)
    lens = np.array(case.lengths(), np.int64)
    if case.ragged == "key_lens":
        kw["key_lens"] = lens
    elif case.ragged == "padding":
        kw["mask"] = (np.arange(case.Lk)[None, :] < lens[:, None])[:, None, None, :]
    return Inputs(case, q, k, v, kw)


def paged_copy(k, v, block, rng):
    """``(k_cache, v_cache, block_table)``: caches of shape
    ``(num_blocks, block, Hkv, D)`` holding the dense ``(B, Hkv, Lk, D)`` k/v
    in shuffled blocks (``Lk`` a multiple of ``block``), and the table."""
    B, Hkv, Lk, _ = k.shape
    nb = Lk // block
    perm = rng.permutation(B * nb)

    def pages(x):
        c = np.empty((B * nb, block, Hkv, x.shape[3]), x.dtype)
        c[perm] = x.reshape(B, Hkv, nb, block, x.shape[3]).transpose(0, 2, 3, 1, 4).reshape(
            B * nb, block, Hkv, x.shape[3])
        return c

    return pages(k), pages(v), perm.reshape(B, nb).astype(np.int64)
