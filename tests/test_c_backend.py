"""The C backend against the oracle: every generated case, at 1 and 2
threads, with every ISA variant this machine can run forced in turn."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import _c, reference, testing

pytestmark = pytest.mark.skipif(not fastqkv.backends()["c"].available,
                                reason=f"c backend unavailable: {fastqkv.backends()['c'].reason}")

ISAS = _c.isa_variants()
CASES = testing.generate_cases()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_case(case, threads, isa):
    testing.check_case(case, backend="c", num_threads=threads)


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# Larger shapes than the generator: several key tiles, row remainders of the
# micro-kernels, causal/window tile skipping with the diagonal tile clamped.
EXTRA = [
    # name, (B, Hq, Hkv, Lq, Lk, D, Dv), kwargs
    ("gqa8-prefill-causal", (1, 8, 1, 301, 301, 128, 128), dict(causal=True)),
    ("mha-chunked-causal", (1, 2, 2, 128, 700, 64, 64), dict(causal=True)),
    ("gqa4-keylens-causal", (2, 8, 2, 70, 500, 80, 80),
     dict(causal=True, key_lens=np.array([500, 233]))),
    ("window-tiles", (1, 3, 1, 400, 400, 32, 48), dict(window=(100, 20))),
    ("window-right-only", (1, 1, 1, 50, 450, 16, 16), dict(window=(-1, 5))),
    ("mask-padding-blhd", (2, 4, 4, 129, 129, 64, 64), dict(layout="blhd")),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,shape,kw", EXTRA, ids=[e[0] for e in EXTRA])
def test_larger_shapes(name, shape, kw, dtype, isa):
    rng = np.random.default_rng(1)
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    kw = dict(kw)
    if kw.get("layout") == "blhd":
        q, k, v = (_rand(rng, (B, Lq, Hq, D), dtype), _rand(rng, (B, Lk, Hkv, D), dtype),
                   _rand(rng, (B, Lk, Hkv, Dv), dtype))
        pad = np.ones((B, 1, 1, Lk), bool)
        pad[0, ..., 100:] = False
        kw["mask"] = pad
    else:
        q, k, v = (_rand(rng, (B, Hq, Lq, D), dtype), _rand(rng, (B, Hkv, Lk, D), dtype),
                   _rand(rng, (B, Hkv, Lk, Dv), dtype))
    testing.check_case(testing.Case(name, q, k, v, kw), backend="c", num_threads=2)


def test_nan_in_masked_value_inside_visible_range(isa):
    """A masked key inside a tile: its NaN value must not reach any row."""
    rng = np.random.default_rng(2)
    q, k, v = _rand(rng, (1, 2, 40, 16), np.float32), _rand(rng, (1, 1, 300, 16), np.float32), \
        _rand(rng, (1, 1, 300, 16), np.float32)
    mask = np.ones((1, 1, 1, 300), bool)
    mask[..., 77] = False
    v[0, 0, 77] = np.nan
    k[0, 0, 77] = np.inf
    testing.check_case(testing.Case("nan-v-masked", q, k, v, {"mask": mask}), backend="c", num_threads=2)


def test_fully_masked_and_huge_logits(isa):
    rng = np.random.default_rng(3)
    q = _rand(rng, (1, 4, 50, 64), np.float32) * 300
    k, v = _rand(rng, (1, 1, 260, 64), np.float32), _rand(rng, (1, 1, 260, 64), np.float32)
    mask = rng.random((1, 4, 50, 260)) < 0.3
    mask[0, 2, 10] = False
    out, lse = fastqkv.attention(q, k, v, mask=mask, return_lse=True, backend="c")
    assert np.all(out[0, 2, 10] == 0) and lse[0, 2, 10] == -np.inf
    testing.check_case(testing.Case("huge-masked", q, k, v, {"mask": mask}), backend="c", num_threads=2)


@pytest.mark.parametrize("dtype,lo,bound", [(np.float32, -87.0, 4e-7), (np.float64, -708.0, 1e-15)])
def test_vector_exp_error_bound(dtype, lo, bound, isa):
    """The stated bound of the kernels' exp (csrc/kernels/simd.h)."""
    from fastqkv import _ckernels

    x = np.concatenate([np.linspace(lo, 0.0, 200_001), np.linspace(-1, 1, 10_001),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 10.0, 50.0])]).astype(dtype)
    y = np.empty_like(x)
    _ckernels.vexp(x, y)
    want = np.exp(x.astype(np.longdouble))
    rel = np.abs((y.astype(np.longdouble) - want) / want).max()
    assert rel < bound, rel
    special = np.array([-np.inf, np.nan, -1e6, -1000.0], dtype)
    y = np.empty_like(special)
    _ckernels.vexp(special, y)
    assert y[0] == 0 and np.isnan(y[1]) and y[2] == 0 and y[3] == 0


def test_probe_details():
    ok, reason, details = _c.probe()
    assert ok, reason
    assert details["isa"] in details["isa_compiled"]
    assert "generic" in details["isa_compiled"]
    assert set(ISAS) <= set(details["isa_supported"])


def test_forced_isa_rejects_unknown():
    from fastqkv import _ckernels

    with pytest.raises(ValueError, match="unknown ISA"):
        _ckernels.set_isa("sse9")
    assert _ckernels.isa() in ISAS


def _probe_in_subprocess(env_isa):
    env = dict(os.environ, FASTQKV_ISA=env_isa)
    code = ("import fastqkv; i = fastqkv.backends()['c']; "
            "print(i.available, i.details.get('isa'), i.reason)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_env_isa_generic_forces_portable_path():
    assert _probe_in_subprocess("generic").startswith("True generic")


def test_env_isa_unknown_makes_backend_unavailable_with_reason():
    out = _probe_in_subprocess("avx9000")
    assert out.startswith("False None") and "FASTQKV_ISA" in out


def test_supports_half_storage():
    """float16/bfloat16 are computed (tests in tests/test_c_serving.py)."""
    from fastqkv import _problem

    for dt in testing.half_dtypes():
        q = np.zeros((1, 1, 2, 8), dt)
        assert _c.supports(_problem.plan_attention(q, q, q)) is None


def test_threads_agree_and_inputs_read_in_place():
    """A 2-thread run equals a 1-thread run, and a broadcast mask is read in place."""
    rng = np.random.default_rng(4)
    q, k, v = _rand(rng, (2, 8, 200, 64), np.float32), _rand(rng, (2, 2, 200, 64), np.float32), \
        _rand(rng, (2, 2, 200, 64), np.float32)
    mask = np.broadcast_to(rng.random((1, 1, 1, 200)) < 0.9, (2, 8, 200, 200))
    outs = []
    for n in (1, 2):
        with testing.threads(n):
            outs.append(fastqkv.attention(q, k, v, mask=mask, causal=True, backend="c"))
    want = reference.attention(q, k, v, mask=mask, causal=True)
    testing.assert_close(outs[0], want, np.float32)
    testing.assert_close(outs[1], want, np.float32)


@pytest.fixture
def small_tiles(force):
    """Tiles far smaller than the tuned ones: many key tiles, diagonal tiles,
    row remainders and the packing pass on small shapes."""
    force(rows=8, keys=32)


SMALL_TILE_CASES = [c for c in CASES if c.q.shape[-2] >= 7 or c.k.shape[-2] >= 40]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=[c.name for c in SMALL_TILE_CASES])
def test_generated_case_small_tiles(case, threads, small_tiles):
    testing.check_case(case, backend="c", num_threads=threads)


@pytest.mark.parametrize("name,shape,kw", EXTRA, ids=[e[0] for e in EXTRA])
def test_larger_shapes_small_tiles(name, shape, kw, small_tiles):
    test_larger_shapes(name, shape, kw, np.float32, _c.isa())


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000, 4099])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_sum_probe(n, threads):
    """The benchmarks' bandwidth probe reads every element exactly once."""
    from fastqkv import _ckernels

    x = np.arange(n, dtype=np.float32) % 7
    assert _ckernels.read_sum(x, threads) == float(x.astype(np.float64).sum())
    with pytest.raises(ValueError):
        _ckernels.read_sum(x.astype(np.float64), threads)
    with pytest.raises(ValueError):
        _ckernels.read_sum(np.ones(8, np.float32)[::2], threads)
