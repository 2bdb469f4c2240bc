"""Runners: one name -> one prepared call, for fastqkv's backends, ``auto``
and the peers.

Contract: :func:`prepare` ``(name, inputs, threads)`` returns ``(call, fetch,
note)``: ``call()`` runs once and returns the raw result, ``fetch(raw)`` the
``bhld`` ndarray for :func:`~.checks.check`, ``note`` how it ran (for
``auto``: the backend it resolved to).  A runner that cannot run the case
raises :class:`~.cases.Skip`.  Nothing here times anything.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _dispatch
from .cases import Skip
from .checks import plan
from .peers import prepare_ort, prepare_torch


def fastqkv_names():
    return list(_dispatch.BACKEND_MODULES)


# seconds per call above which the dense numpy oracle is not timed, per size
NUMPY_LIMIT_S = {"full": 1.0, "quick": 0.3, "tiny": math.inf}


def numpy_seconds(case):
    """A rough cost of the dense float64 oracle on ``case`` (seconds)."""
    dense = 4.0 * case.B * case.Hq * case.Lq * case.Lk * case.D
    moved = 8.0 * case.B * (case.Hq * case.Lk * 2 * case.D + 8 * case.Hq * case.Lq * case.Lk)
    return dense / 4e9 + moved / 2e9


def check_numpy_cost(case, size):
    """:class:`~.cases.Skip` when the dense oracle would be too slow to time
    on ``case`` at bench ``size``."""
    if numpy_seconds(case) > NUMPY_LIMIT_S[size]:
        raise Skip(f"dense oracle would take ~{numpy_seconds(case):.1f} s per call")


def resolve(name, inp):
    """The backend ``name`` (a fastqkv backend or ``"auto"``) runs ``inp``
    with, and the planned problem; :class:`~.cases.Skip` when none can."""
    p = plan(inp)
    try:
        _, chosen = _dispatch.resolve(name, p)
    except (ValueError, RuntimeError) as exc:
        raise Skip(str(exc)) from None
    return chosen, p


def _prepare_fastqkv(name, inp, threads):
    from .. import _api
    if name != "auto":
        info = _dispatch.backends()[name]
        if not info.available:
            raise Skip(f"not available ({info.reason})")
    chosen, p = resolve(name, inp)
    out = np.empty(p.out.shape, p.dtype)
    q, k, v, kw = inp.q, inp.k, inp.v, inp.kwargs
    _dispatch.set_num_threads(threads)

    def call():
        return _api.attention(q, k, v, out=out, backend=name, **kw)

    return call, np.asarray, (f"-> {chosen}" if name == "auto" else "")


def prepare(name, inp, threads):
    """``(call, fetch, note)`` for runner ``name`` (a fastqkv backend, ``"auto"``,
    ``"torch"`` or ``"ort"``); raises :class:`~.cases.Skip` with the reason."""
    if name in ("torch", "ort") and inp.case.kv is not None:
        raise Skip(f"takes no {inp.case.kv} K/V cache")
    if name == "torch":
        return prepare_torch(inp, threads)
    if name == "ort":
        return prepare_ort(inp, threads)
    return _prepare_fastqkv(name, inp, threads)
