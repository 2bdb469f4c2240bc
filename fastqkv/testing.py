"""Test support for fastqkv and for libraries that embed it.

* :func:`generate_cases` - the one case generator: odd sizes, strided and
  transposed views, GQA ratios 1/4/8, every option, fully masked rows, huge
  logits, NaN.
* :data:`TOLERANCES` - the one tolerance table (per dtype).
* :func:`check_case` - the one comparison driver: runs a backend on a case
  with a NaN-poisoned output, compares out and lse with the oracle, checks
  that the inputs were not modified; raises ``AssertionError`` that prints
  the whole case.
* :func:`assert_close` - the error metric, usable on its own.

Embedders can validate their own build with::

    from fastqkv import testing
    for case in testing.generate_cases():
        testing.check_case(case, "auto")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from . import _api, _dispatch, _validate, reference

__all__ = ["TOLERANCES", "Case", "generate_cases", "check_case", "assert_close",
           "half_dtypes", "make_case"]

# Relative precision expected of a backend, per storage dtype.  The allowed
# error of an output element is  tol * cond * max|v|,  where cond bounds how
# much the scores can be perturbed by rounding (see _condition); the lse gets
# tol * cond.  float16/bfloat16 include the rounding of the output itself.
TOLERANCES = {
    "float64": 1e-12,
    "float32": 4e-6,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}


def half_dtypes():
    """The half-width dtypes this installation can create (bfloat16 needs ml_dtypes)."""
    out = [np.dtype(np.float16)]
    if _validate.BFLOAT16 is not None:
        out.append(_validate.BFLOAT16)
    return out


@dataclass
class Case:
    """One attention call: arrays, keyword options, and how to lay out ``out``."""
    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict = field(default_factory=dict)
    out_strided: bool = False

    def describe(self):
        def arr(a):
            return f"shape={a.shape} dtype={a.dtype} strides={a.strides}"
        opts = []
        for key, val in self.kwargs.items():
            if isinstance(val, np.ndarray):
                opts.append(f"{key}=<{arr(val)}>")
            else:
                opts.append(f"{key}={val!r}")
        return (f"case {self.name}: q <{arr(self.q)}>, k <{arr(self.k)}>, v <{arr(self.v)}>, "
                f"{', '.join(opts) or 'no options'}, out {'strided' if self.out_strided else 'contiguous'}")

    def __repr__(self):
        return f"Case({self.name})"


def _strided(rng, shape, dtype, how):
    """A random array of ``shape`` viewed through non-trivial strides."""
    shape = tuple(shape)
    if how == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if how == "transposed":  # memory (B, L, H, D), viewed as (B, H, L, D)
        base = rng.standard_normal((shape[0], shape[2], shape[1], shape[3])).astype(dtype)
        return base.transpose(0, 2, 1, 3)
    if how == "sliced":  # every other row of a larger buffer, offset head dim
        big = rng.standard_normal(shape[:-2] + (2 * shape[-2], shape[-1] + 3)).astype(dtype)
        return big[..., ::2, 1:shape[-1] + 1]
    raise ValueError(how)


def make_case(name, rng, B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=np.float32, strides="contiguous",
              out_strided=False, **kwargs):
    """Build a 4-D ``bhld`` case with random inputs; ``kwargs`` go to attention."""
    Dv = D if Dv is None else Dv
    q = _strided(rng, (B, Hq, Lq, D), dtype, strides)
    k = _strided(rng, (B, Hkv, Lk, D), dtype, strides)
    v = _strided(rng, (B, Hkv, Lk, Dv), dtype, strides)
    return Case(name, q, k, v, kwargs, out_strided)


def generate_cases(quick=False, seed=0, dtypes=("float32", "float64")):
    """The case list (deterministic for a seed).  ``quick`` keeps a subset
    that still touches every option."""
    rng = np.random.default_rng(seed)
    cases = []
    for dt in dtypes:
        cases.extend(_cases_for(np.dtype(dt) if dt != "bfloat16" else _validate.BFLOAT16, rng, quick))
    return cases


def _cases_for(dtype, rng, quick):
    n = dtype.name
    c = []
    add = c.append

    def mk(name, *shape, **kw):
        add(make_case(f"{n}-{name}", rng, *shape, dtype=dtype, **kw))

    # sizes: (B, Hq, Hkv, Lq, Lk, D[, Dv])
    mk("tiny", 1, 1, 1, 1, 1, 1)
    mk("odd-D3", 2, 2, 2, 7, 7, 3)
    mk("D80-L113", 1, 2, 2, 113, 113, 80)
    mk("gqa4-causal", 1, 8, 2, 33, 33, 64, causal=True)
    mk("gqa8-decode", 2, 8, 1, 1, 300, 128, causal=True)
    mk("mqa-chunk-causal", 1, 4, 1, 16, 129, 32, causal=True)
    mk("mqa32-decode", 2, 32, 1, 1, 70, 24, key_lens=np.array([70, 3]))
    mk("Dv-ne-D", 1, 4, 2, 9, 21, 16, 24)
    mk("transposed-gqa4", 2, 4, 1, 17, 40, 16, strides="transposed", causal=True)
    mk("sliced", 1, 2, 2, 13, 29, 8, strides="sliced")
    mk("out-strided", 1, 2, 1, 11, 19, 8, out_strided=True)
    kl = np.array([0, 5, 64], dtype=np.int64)
    mk("key-lens", 3, 4, 2, 6, 64, 32, key_lens=kl)
    mk("key-lens-causal", 3, 4, 2, 6, 64, 32, key_lens=kl, causal=True)
    mk("window", 1, 2, 1, 40, 40, 16, window=(5, 3))
    mk("window-causal-chunk", 1, 2, 2, 9, 50, 16, window=(7, -1), causal=True)
    mk("softcap", 1, 2, 2, 10, 30, 16, softcap=5.0, scale=2.0)
    mk("alibi", 2, 4, 2, 12, 31, 16, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), causal=True)
    pad = np.ones((2, 1, 1, 45), bool)
    pad[0, ..., 30:] = False
    pad[1, ..., :] = False                      # every row of batch 1 fully masked
    mk("mask-key-padding", 2, 4, 4, 20, 45, 64, mask=pad)
    full = rng.random((1, 2, 15, 23)) < 0.6
    full[0, 1, 4, :] = False                    # one fully masked row
    mk("mask-full", 1, 2, 1, 15, 23, 8, mask=full)
    mk("mask-2d", 1, 2, 2, 15, 23, 8, mask=rng.random((15, 23)) < 0.5)
    mk("bias-broadcast", 1, 4, 2, 7, 26, 16, bias=rng.standard_normal((1, 4, 1, 26)))
    bias = rng.standard_normal((7, 26))
    bias[3, :] = -np.inf                        # a row masked through the bias
    mk("bias-2d-neginf", 1, 4, 2, 7, 26, 16, bias=bias)
    c.append(_huge_logits(n, rng, dtype))
    c.extend(_nan_cases(n, rng, dtype))
    c.extend(_layout_cases(n, rng, dtype))
    if not quick:
        mk("big-prefill-causal", 1, 4, 1, 150, 150, 128, causal=True)
        mk("everything", 2, 8, 2, 21, 70, 32, causal=True, window=(30, -1), softcap=20.0,
           key_lens=np.array([70, 40]), mask=rng.random((2, 1, 21, 70)) < 0.8,
           bias=rng.standard_normal((1, 8, 21, 70)), alibi_slopes=rng.random(8),
           strides="transposed", out_strided=True)
        mk("long-decode-gqa8", 1, 16, 2, 1, 1000, 64)
        mk("L113-D1", 1, 1, 1, 113, 113, 1, causal=True)
    return c


def _huge_logits(n, rng, dtype):
    case = make_case(f"{n}-huge-logits", rng, 1, 2, 1, 9, 33, 16, dtype=dtype)
    case.q = (case.q.astype(np.float64) * 300).astype(dtype)   # scores of order 1e4
    return case


def _nan_cases(n, rng, dtype):
    out = []
    c1 = make_case(f"{n}-nan-q-row", rng, 1, 2, 2, 5, 12, 8, dtype=dtype)
    c1.q[0, 1, 2, 3] = np.nan                                   # NaN row 2 of head 1
    out.append(c1)
    c2 = make_case(f"{n}-nan-masked-kv", rng, 1, 2, 1, 5, 12, 8, dtype=dtype, causal=True)
    c2.k[0, 0, 11, 0] = np.nan                                  # only the last query sees key 11
    c2.v[0, 0, 10, 0] = np.inf                                  # keys 10/11 hidden from rows < 4
    out.append(c2)
    c3 = make_case(f"{n}-nan-beyond-key-lens", rng, 2, 2, 1, 4, 16, 8, dtype=dtype,
                   key_lens=np.array([10, 16]))
    c3.k[0, 0, 12:] = np.nan
    c3.v[0, 0, 12:] = np.nan
    out.append(c3)
    c4 = make_case(f"{n}-nan-k-mqa-decode", rng, 1, 16, 1, 1, 40, 8, dtype=dtype)
    c4.k[0, 0, 5, 2] = np.nan                                   # every query head sees it
    out.append(c4)
    return out


def _layout_cases(n, rng, dtype):
    out = []
    q = rng.standard_normal((2, 13, 4, 16)).astype(dtype)
    k = rng.standard_normal((2, 21, 2, 16)).astype(dtype)
    v = rng.standard_normal((2, 21, 2, 12)).astype(dtype)
    out.append(Case(f"{n}-blhd", q, k, v, {"layout": "blhd", "causal": True}))
    out.append(Case(f"{n}-blhd-3d", q[0], k[0], v[0], {"layout": "blhd"}, out_strided=True))
    out.append(Case(f"{n}-bhld-3d", q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                    v[0].transpose(1, 0, 2), {"causal": True}))
    out.append(Case(f"{n}-2d", q[0, :, 0], k[0, :, 0], v[0, :, 0], {"window": (3, 3)}))
    return out


# ---------------------------------------------------------------------------
# comparison

def _condition(q, k, scale):
    """Bound on ``|scale * q.k|`` summed in magnitude: rounding perturbs a
    score by about eps times this, so errors are measured against it."""
    qa = np.abs(np.nan_to_num(q.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    ka = np.abs(np.nan_to_num(k.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    if qa.size == 0 or ka.size == 0:
        return 1.0
    return max(1.0, abs(scale) * qa.reshape(-1, qa.shape[-1]).sum(1).max() * ka.max())


def _num_keys(case):
    """Lk of a case in its layout (keys axis of k)."""
    k = case.k
    if k.ndim == 4 and case.kwargs.get("layout", "bhld") == "blhd":
        return k.shape[1]
    if k.ndim == 3 and case.kwargs.get("layout", "bhld") == "blhd":
        return k.shape[0]
    return k.shape[-2]


def _magnitude(a):
    """Largest finite |value| of an optional array (0 for None)."""
    if a is None:
        return 0.0
    a = np.abs(np.asarray(a, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def assert_close(actual, expected, dtype, *, cond=1.0, vmax=1.0, what="out", context=""):
    """Assert ``actual`` matches the oracle's ``expected`` within the table's
    tolerance for ``dtype``: NaN, +inf and -inf at the same places, finite
    values within ``tol * cond * vmax``."""
    tol = TOLERANCES[np.dtype(dtype).name]
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}. {context}")
    for label, fa, fe in (("NaN", np.isnan(a), np.isnan(e)),
                          ("+inf", np.isposinf(a), np.isposinf(e)),
                          ("-inf", np.isneginf(a), np.isneginf(e))):
        if not np.array_equal(fa, fe):
            bad = np.argwhere(fa != fe)[:5].tolist()
            raise AssertionError(f"{what}: {label} positions differ from the oracle at {bad}. {context}")
    fin = np.isfinite(e)
    if fin.any():
        err = np.abs(a[fin] - e[fin]).max()
        bound = tol * cond * max(vmax, 1e-300)
        if not err <= bound:
            idx = np.argwhere(fin)[np.argmax(np.abs(a[fin] - e[fin]))].tolist()
            raise AssertionError(
                f"{what}: max abs error {err:.3e} exceeds {bound:.3e} (tol {tol:g} x cond {cond:.3g} "
                f"x scale {vmax:.3g}) at {idx}: got {a[tuple(idx)]!r}, oracle {e[tuple(idx)]!r}. {context}")


@contextlib.contextmanager
def _threads(n):
    if n is None:
        yield
        return
    old = _dispatch.get_num_threads()
    _dispatch.set_num_threads(n)
    try:
        yield
    finally:
        _dispatch.set_num_threads(old)


def _out_for(case, shape, dtype):
    if case.out_strided:
        big = np.empty(shape[:-1] + (2 * shape[-1] + 1,), dtype)
        big[...] = np.nan
        return big[..., 1::2][..., : shape[-1]]
    out = np.empty(shape, dtype)
    out[...] = np.nan
    return out


def check_case(case, backend="auto", num_threads=None):
    """Run ``case`` on ``backend`` and compare with the oracle (raises AssertionError)."""
    kw = dict(case.kwargs)
    ref_out, ref_lse = reference.attention(case.q, case.k, case.v, return_lse=True, **kw)
    saved = [np.array(x, copy=True) for x in (case.q, case.k, case.v)]
    saved_kw = {key: np.array(val, copy=True) for key, val in kw.items() if isinstance(val, np.ndarray)}
    out = _out_for(case, ref_out.shape, ref_out.dtype)
    with _threads(num_threads):
        got, lse = _api.attention(case.q, case.k, case.v, return_lse=True, out=out,
                                  backend=backend, **kw)
    ctx = f"backend={backend!r} threads={num_threads}; {case.describe()}"
    if got is not out:
        raise AssertionError(f"attention did not return the out= array. {ctx}")
    scale = kw.get("scale") or 1.0 / np.sqrt(case.q.shape[-1])
    cond = _condition(case.q, case.k, scale)
    if kw.get("softcap"):
        cond = min(cond, max(1.0, 2 * kw["softcap"]))
    cond += _magnitude(kw.get("bias"))                           # bias is rounded with the score
    if kw.get("alibi_slopes") is not None:
        cond += _magnitude(kw["alibi_slopes"]) * (case.k.shape[-2] + case.q.shape[-2])
    cond += np.sqrt(_num_keys(case))                             # rounding of sums over the keys
    vfin = np.abs(case.v[np.isfinite(case.v)].astype(np.float64))
    vmax = max(1.0, vfin.max()) if vfin.size else 1.0
    assert_close(got, ref_out, case.q.dtype, cond=cond, vmax=vmax, what="out", context=ctx)
    assert_close(lse, ref_lse, case.q.dtype, cond=cond + _magnitude(ref_lse), what="lse", context=ctx)
    if lse.dtype != ref_lse.dtype:
        raise AssertionError(f"lse dtype {lse.dtype} != {ref_lse.dtype}. {ctx}")
    for name, before, after in zip("qkv", saved, (case.q, case.k, case.v)):
        if not np.array_equal(before, after, equal_nan=True):
            raise AssertionError(f"input {name} was modified. {ctx}")
    for key, before in saved_kw.items():
        if not np.array_equal(before, kw[key], equal_nan=True):
            raise AssertionError(f"input {key} was modified. {ctx}")
