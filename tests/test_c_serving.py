"""Serving paths of the C backend against the oracle: the streaming kernel
(decode), split-KV with the LSE merge (forced through the test hook), paged
KV caches and float16/bfloat16 storage; at 1 and 2 threads, every ISA."""

import numpy as np
import pytest

import fastqkv
from fastqkv import _c, reference, testing

pytestmark = pytest.mark.skipif(not fastqkv.backends()["c"].available,
                                reason=f"c backend unavailable: {fastqkv.backends()['c'].reason}")

ISAS = _c.isa_variants()


@pytest.fixture(params=ISAS)
def isa(request):
    with _c.forced_isa(request.param):
        yield request.param


@pytest.fixture
def decode_hook():
    """set(stream, splits): stream 0 auto / 1 never / 2 always; splits 0 auto / n forced."""
    from fastqkv import _ckernels

    try:
        yield _ckernels.set_decode
    finally:
        _ckernels.set_decode(0, 0)


# (name, (B, Hq, Hkv, Lq, Lk, D, Dv), kwargs)
DECODE = [
    ("mha-decode", (2, 3, 3, 1, 150, 16, 16), {}),
    ("gqa4-decode-ragged", (3, 8, 2, 1, 200, 32, 32), dict(key_lens=np.array([200, 0, 77]))),
    ("gqa8-decode-causal", (2, 16, 2, 1, 130, 64, 48), dict(causal=True, key_lens=np.array([1, 130]))),
    ("gqa4-spec-causal", (2, 8, 2, 5, 90, 24, 24), dict(causal=True, key_lens=np.array([90, 7]))),
    ("gqa4-q16-window", (1, 4, 1, 16, 120, 8, 8), dict(causal=True, window=(20, 0))),
    ("odd-dims", (1, 2, 1, 3, 67, 3, 5), dict(window=(10, 4))),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("splits", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("name,shape,kw", DECODE, ids=[d[0] for d in DECODE])
def test_split_kv_matches_oracle(name, shape, kw, splits, threads, isa, decode_hook):
    """Every split count (incl. empty and fully masked splits) equals the oracle."""
    decode_hook(0, splits)
    rng = np.random.default_rng(len(name) + splits)
    case = testing.make_case(name, rng, *shape, **kw)
    testing.check_case(case, backend="c", num_threads=threads)


def test_split_and_unsplit_agree(decode_hook):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 1, 64), np.float32)
    k = rng.standard_normal((1, 2, 3000, 64), np.float32)
    v = rng.standard_normal((1, 2, 3000, 64), np.float32)
    outs = []
    for s in (1, 4, 13):
        decode_hook(0, s)
        outs.append(fastqkv.attention(q, k, v, return_lse=True, backend="c"))
    for o, l in outs[1:]:
        np.testing.assert_allclose(o, outs[0][0], atol=2e-6)
        np.testing.assert_allclose(l, outs[0][1], atol=2e-6)


def test_nan_value_beyond_split_visible_range(decode_hook):
    """NaN/inf in keys a row cannot see (causal tail, key_lens) never reach it."""
    decode_hook(0, 5)
    rng = np.random.default_rng(6)
    case = testing.make_case("nan-tail", rng, 2, 4, 2, 3, 100, 16, causal=True,
                             key_lens=np.array([60, 100]))
    case.k[0, :, 60:] = np.nan
    case.v[0, :, 60:] = np.inf
    case.v[1, :, 99] = np.nan        # only the last query row sees key 99
    testing.check_case(case, backend="c", num_threads=2)


STREAMABLE = [c for c in testing.generate_cases()
              if not any(key in c.kwargs for key in ("mask", "bias", "softcap", "alibi_slopes"))]


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("case", STREAMABLE, ids=[c.name for c in STREAMABLE])
def test_streaming_kernel_on_generated_cases(case, splits, isa, decode_hook):
    """The streaming kernel forced on every generated case it can run (any Lq)."""
    decode_hook(2, splits)
    testing.check_case(case, backend="c", num_threads=2)
