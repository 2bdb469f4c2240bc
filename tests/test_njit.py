"""``fastqkv.attention`` inside ``@numba.njit`` (fastqkv._njit): against the
oracle over the option set, the Python call's errors and messages, calls in
``prange``, no allocation in a steady loop with ``out=``, and the
registration through Numba's extension entry point.

Each distinct set of argument types compiles the caller anew (seconds on a
slow machine), so the callers below pass every option as an argument and
the cases are chosen to cover the options with few type sets."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import fastqkv  # noqa: E402
from fastqkv import _njit, reference, testing  # noqa: E402  (_njit: registers the overload)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_subprocess as hs  # noqa: E402

pytestmark = pytest.mark.skipif(_njit.entry_status()[0] is None,
                                reason=f"no C entry point: {_njit.entry_status()[1]}")


@numba.njit
def _call_bhld(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi, sinks, out):
    return fastqkv.attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens,
                             scale=scale, window=window, softcap=softcap, alibi_slopes=alibi,
                             sinks=sinks, return_lse=True, out=out)


@numba.njit
def _call_blhd(q, k, v, causal, mask, bias, key_lens, scale, window, softcap, alibi, sinks, out):
    return fastqkv.attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens,
                             scale=scale, window=window, softcap=softcap, alibi_slopes=alibi,
                             sinks=sinks, layout="blhd", return_lse=True, out=out)


@numba.njit
def _call_plain(q, k, v):
    return fastqkv.attention(q, k, v)


_NAMES = ("causal", "mask", "bias", "key_lens", "scale", "window", "softcap", "alibi_slopes", "sinks")


def _run_jitted(case, out):
    kw = dict(case.kwargs)
    layout = kw.pop("layout", "bhld")
    args = [kw.pop(name, None) for name in _NAMES]
    args[0] = bool(args[0])
    args[5] = (-1, -1) if args[5] is None else tuple(args[5])     # the same as window=None
    assert not kw, kw
    caller = _call_blhd if layout == "blhd" else _call_bhld
    return caller(case.q, case.k, case.v, *args, out)


# the testing module's cases that cover the options with few type sets
_CASES = {
    "float32": ("tiny", "gqa4-causal", "gqa8-decode", "mqa32-decode", "transposed-gqa4", "sliced",
                "out-strided", "window-causal-chunk", "softcap", "alibi", "mask-2d",
                "mask-key-padding", "bias-broadcast", "bias-2d-neginf", "blhd", "blhd-3d",
                "bhld-3d", "2d", "sinks-softcap-alibi-window", "decode-sinks-gqa4-ragged-causal",
                "nan-beyond-key-lens"),
    "float64": ("gqa4-causal", "alibi", "blhd", "sinks-softcap-alibi-window",
                "decode-sinks-gqa4-ragged-causal"),
}


def _cases():
    out = []
    for dtype, names in _CASES.items():
        cases = {c.name: c for c in testing.generate_cases(quick=True, dtypes=(dtype,),
                                                           kinds=("dense", "decode"))}
        out += [cases[f"{dtype}-{name}"] for name in names]
    return out


def _check(case, got, lse, out):
    ref_out, ref_lse = case.call(reference, return_lse=True)
    assert got is out or out is None
    cond, vmax = testing.case_bounds(case)
    testing.assert_close(got, ref_out, case.q.dtype, cond=cond, vmax=vmax, context=case.describe())
    testing.assert_close(lse, ref_lse, case.q.dtype, cond=cond, vmax=1.0, what="lse",
                         context=case.describe())


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_against_the_oracle(case):
    ref_out = case.call(reference)
    out = testing._out_for(case, ref_out.shape, ref_out.dtype)
    got, lse = _run_jitted(case, out)
    _check(case, got, lse, out)


def _conversions_case(rng):
    """Arguments the overload copies into its stack frame: (Hq,) slopes and
    sinks of another float dtype, int32 key_lens; a float32 bias of a
    float64 call (a heap copy), a 4-D mask."""
    c = testing.make_case("float64-conversions", rng, 3, 4, 2, 6, 20, 16, dtype=np.float64,
                          causal=True)
    c.kwargs.update(key_lens=np.array([20, 7, 0], np.int32),
                    alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
                    sinks=np.array([0.5, -1.0, 2.0, -np.inf], np.float32),
                    bias=rng.standard_normal((1, 4, 6, 1)).astype(np.float32),
                    mask=rng.random((3, 1, 6, 20)) < 0.8, softcap=8.0)
    return c


def test_copies_and_conversions_against_the_oracle(rng):
    case = _conversions_case(rng)
    got, lse = _run_jitted(case, None)
    _check(case, got, lse, None)
    # (B, Hq) slopes, float64: read in place
    case.kwargs["alibi_slopes"] = rng.random((3, 4))
    got, lse = _run_jitted(case, None)
    _check(case, got, lse, None)


def test_without_options_returns_a_fresh_array(rng):
    case = testing.make_case("float32-plain", rng, 2, 4, 2, 3, 10, 8)
    got = _call_plain(case.q, case.k, case.v)
    assert got.shape == (2, 4, 3, 8) and got.dtype == np.float32
    cond, vmax = testing.case_bounds(case)
    testing.assert_close(got, case.call(reference), np.float32, cond=cond, vmax=vmax)


def test_scalar_key_lens(rng):
    @numba.njit
    def call(q, k, v, n):
        return fastqkv.attention(q, k, v, key_lens=n, causal=True)

    case = testing.make_case("float32-key-lens", rng, 1, 4, 1, 2, 12, 8)
    case.kwargs.update(key_lens=5, causal=True)
    got = call(case.q, case.k, case.v, 5)
    cond, vmax = testing.case_bounds(case)
    testing.assert_close(got, case.call(reference), np.float32, cond=cond, vmax=vmax)


# ---------------------------------------------------------------------------
# errors: the Python call's exception and message

def _python_and_jitted_errors(jitted, *args, **kw):
    """The (type, message) that ``fastqkv.attention(*args, **kw)`` and
    ``jitted(*args)`` raise."""
    got = []
    for fn in (lambda: fastqkv.attention(*args[:3], **kw), lambda: jitted(*args)):
        with pytest.raises((ValueError, TypeError)) as exc:
            fn()
        got.append((exc.type, str(exc.value)))
    return got


_OPTIONS = ("causal", "mask", "bias", "key_lens", "scale", "window", "softcap", "alibi_slopes",
            "sinks", "out")


def _bad_values(rng):
    """(what, q, k, v, options) of calls of one type set that fail on values."""
    f = np.float32
    q = rng.standard_normal((2, 4, 3, 8)).astype(f)
    k = rng.standard_normal((2, 2, 5, 8)).astype(f)
    v = rng.standard_normal((2, 2, 5, 8)).astype(f)
    good = dict(causal=False, mask=np.ones((2, 4, 3, 5), bool), bias=None, key_lens=np.array([5, 5]),
                scale=0.5, window=(-1, -1), softcap=5.0, alibi_slopes=np.ones(4, f),
                sinks=np.zeros(4, f), out=np.empty((2, 4, 3, 8), f))

    def bad(what, q=q, k=k, v=v, **kw):
        return what, q, k, v, {**good, **kw}

    return [
        bad("batch of k", k=rng.standard_normal((3, 2, 5, 8)).astype(f)),
        bad("heads of v", v=rng.standard_normal((2, 1, 5, 8)).astype(f)),
        bad("head dim of k", k=rng.standard_normal((2, 2, 5, 4)).astype(f)),
        bad("heads not a multiple", k=rng.standard_normal((2, 3, 5, 8)).astype(f),
            v=rng.standard_normal((2, 3, 5, 8)).astype(f)),
        bad("mask shape", mask=np.ones((2, 4, 3, 4), bool)),
        bad("key_lens range", key_lens=np.array([5, 7])),
        bad("key_lens shape", key_lens=np.array([5, 5, 5])),
        bad("alibi shape", alibi_slopes=np.ones(3, f)),
        bad("alibi finite", alibi_slopes=np.array([1, np.inf, 1, 1], f)),
        bad("sinks shape", sinks=np.zeros(5, f)),
        bad("sinks nan", sinks=np.array([0, np.nan, 0, 0], f)),
        bad("scale nan", scale=np.nan),
        bad("scale inf", scale=np.inf),
        bad("softcap zero", softcap=0.0),
        bad("softcap negative", softcap=-2.0),
        bad("window", window=(-3, 0)),
        bad("out shape", out=np.empty((2, 4, 3, 7), f)),
        bad("out overlaps q", out=q),
    ]


def test_value_errors_match_the_python_call(rng):
    for what, q, k, v, opts in _bad_values(rng):
        (pt, pm), (jt, jm) = _python_and_jitted_errors(
            _call_bhld, q, k, v, *(opts[name] for name in _OPTIONS), return_lse=True, **opts)
        assert (jt, jm) == (pt, pm), what


def test_type_errors_match_the_python_call(rng):
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)

    @numba.njit
    def call_causal(q, k, v, causal):
        return fastqkv.attention(q, k, v, causal=causal)

    @numba.njit
    def call_mask(q, k, v, mask):
        return fastqkv.attention(q, k, v, mask=mask)

    for fn, args, kw in (
            (_call_plain, (q.astype(np.int32), q, q), {}),
            (_call_plain, (q, q.astype(np.float64), q), {}),
            (call_causal, (q, q, q, 1), {"causal": 1}),
            (call_mask, (q, q, q, np.ones((3, 3), np.float32)), {"mask": np.ones((3, 3), np.float32)})):
        (pt, pm), (jt, jm) = _python_and_jitted_errors(fn, *args, **kw)
        assert pt is TypeError and (jt, jm) == (pt, pm)


def test_a_backend_other_than_c_is_refused_with_a_message():
    @numba.njit
    def call(q):
        return fastqkv.attention(q, q, q, backend="numba")

    with pytest.raises(ValueError, match="backend must be 'auto' or 'c'"):
        call(np.zeros((1, 1, 1, 4), np.float32))


# ---------------------------------------------------------------------------
# prange, allocations

@numba.njit(parallel=True)
def _batch_parallel(q, k, v, out):
    for i in numba.prange(q.shape[0]):
        fastqkv.attention(q[i], k[i], v[i], causal=True, out=out[i])


@numba.njit
def _batch_sequential(q, k, v, out):
    for i in range(q.shape[0]):
        fastqkv.attention(q[i], k[i], v[i], causal=True, out=out[i])


def test_calls_in_prange_equal_the_sequential_result(rng):
    # 16 problems of (H, L, D): 3-D inputs, one per prange iteration
    q = rng.standard_normal((16, 4, 9, 32)).astype(np.float32)
    k = rng.standard_normal((16, 2, 40, 32)).astype(np.float32)
    v = rng.standard_normal((16, 2, 40, 32)).astype(np.float32)
    par = np.full(q.shape, np.nan, np.float32)
    seq = np.full(q.shape, np.nan, np.float32)
    _batch_parallel(q, k, v, par)
    _batch_sequential(q, k, v, seq)
    np.testing.assert_array_equal(par, seq)


@numba.njit
def _steady(q, k, v, out, n):
    for _ in range(n):
        fastqkv.attention(q, k, v, causal=True, out=out)


def test_a_steady_loop_with_out_allocates_nothing(rng):
    from numba.core.runtime import _nrt_python, rtsys
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16, 64)).astype(np.float32)
    v = rng.standard_normal((1, 1, 16, 64)).astype(np.float32)
    out = np.empty_like(q)
    _steady(q, k, v, out, 1)                                    # compiled, and warm

    def allocations(n):
        before = rtsys.get_allocation_stats()
        _steady(q, k, v, out, n)
        after = rtsys.get_allocation_stats()
        return after.alloc - before.alloc, after.mi_alloc - before.mi_alloc

    was_on = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    try:
        # the call from Python wraps each argument array (the same count
        # for 1 and 1000 iterations); the loop itself allocates nothing
        assert allocations(1000) == allocations(1)
    finally:
        if not was_on:
            _nrt_python.memsys_disable_stats()


# ---------------------------------------------------------------------------
# registration

_ENTRY_POINT = r"""
import sys
from numba.core import entrypoints
assert "fastqkv._njit" not in sys.modules
entrypoints.init_all()
print(int("fastqkv._njit" in sys.modules))
"""


def test_numbas_entry_point_registers_the_overload(tmp_path):
    """The entry point that pyproject.toml declares, in a distribution's
    metadata on the path, makes Numba import fastqkv._njit."""
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["numba_extensions"]
    assert eps == {"init": "fastqkv._njit:_init"}
    dist = tmp_path / "fastqkv_njit_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastqkv-njit-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[numba_extensions]\ninit = {eps['init']}\n")
    env = hs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _ENTRY_POINT], capture_output=True, text=True,
                       env=env, cwd=hs.TESTS_DIR, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["1"], r.stdout + r.stderr


_CACHED_USER = '''
import numba
import fastqkv
import fastqkv._njit

@numba.njit(cache=True)
def step(q, k, v, out):
    return fastqkv.attention(q, k, v, causal=True, out=out)
'''

_CACHED_RUN = '''
import numpy as np
import cached_user
q = np.arange(48, dtype=np.float32).reshape(1, 2, 3, 8) / 48
out = np.empty_like(q)
cached_user.step(q, q, q, out)
print(sum(cached_user.step.stats.cache_hits.values()), repr(out.tobytes()))
'''


def test_a_function_cached_on_disk_calls_the_entry_point_in_a_new_process(tmp_path):
    """cache=True: the machine code links the entry point by name, which a
    new process registers again (an address baked in would be stale)."""
    (tmp_path / "cached_user.py").write_text(_CACHED_USER)
    env = hs.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")
    runs = [subprocess.run([sys.executable, "-c", _CACHED_RUN], capture_output=True, text=True,
                           env=env, cwd=str(tmp_path), timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr
    (hits0, out0), (hits1, out1) = (r.stdout.split(" ", 1) for r in runs)
    assert (hits0, hits1) == ("0", "1") and out0 == out1
