"""Shared-prefix (cascade) attention: every backend against the oracle on the
generator's ``shared_prefix`` cases, the oracle against plain attention on
the concatenated keys, and the checks of bad input."""

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

BACKENDS = [n for n, i in fastqkv.backends().items() if i.available] + ["auto"]
DTYPES = ["float32", "float64"] + [d.name for d in testing.half_dtypes()]
CASES = testing.generate_cases(dtypes=DTYPES, kinds=("shared_prefix",))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shared_prefix_matches_oracle(backend, case):
    testing.check_case(case, backend)


def _arrays(rng, N=3, Hq=8, Hkv=2, Lq=2, P=20, S=9, D=8):
    q = rng.standard_normal((N, Hq, Lq, D))
    pk, pv = rng.standard_normal((2, Hkv, P, D))
    k, v = rng.standard_normal((2, N, Hkv, S, D))
    return q, pk, pv, k, v


def test_oracle_is_attention_over_prefix_plus_suffix(rng):
    q, pk, pv, k, v = _arrays(rng)
    lens = np.array([9, 2, 5])
    got, lse = reference.shared_prefix_attention(q, pk, pv, k, v, key_lens=lens, causal=True,
                                                 return_lse=True)
    for n, m in enumerate(lens):
        kk = np.concatenate([pk, k[n, :, :m]], axis=1)
        vv = np.concatenate([pv, v[n, :, :m]], axis=1)
        o, l = reference.attention(q[n], kk, vv, causal=True, return_lse=True)
        np.testing.assert_array_equal(got[n], o)
        np.testing.assert_array_equal(lse[n], l)


def test_out_and_lse(rng):
    q, pk, pv, k, v = (x.astype(np.float32) for x in _arrays(rng))
    out = np.full(q.shape, np.nan, np.float32)
    got, lse = fastqkv.shared_prefix_attention(q, pk, pv, k, v, out=out, return_lse=True)
    assert got is out and lse.shape == q.shape[:3] and lse.dtype == np.float32
    want = reference.shared_prefix_attention(q, pk, pv, k, v)
    testing.assert_close(got, want, np.float32, cond=10, vmax=4)


def test_bad_input(rng):
    q, pk, pv, k, v = _arrays(rng)
    with pytest.raises(ValueError, match=r"every suffix length must be >= 2, got 1"):
        fastqkv.shared_prefix_attention(q, pk, pv, k, v, key_lens=[9, 1, 5], causal=True)
    with pytest.raises(ValueError, match="prefix_k and prefix_v must be 3-D"):
        fastqkv.shared_prefix_attention(q, pk[None], pv, k, v)
    with pytest.raises(ValueError, match="Hkv=2 .the suffix's."):
        fastqkv.shared_prefix_attention(q, pk[:1], pv[:1], k, v)
    with pytest.raises(ValueError, match="one P"):
        fastqkv.shared_prefix_attention(q, pk, pv[:, :5], k, v)
    with pytest.raises(TypeError, match="prefix_k and prefix_v must have q's dtype"):
        fastqkv.shared_prefix_attention(q, pk.astype(np.float32), pv, k, v)
    with pytest.raises(ValueError, match="q must be 4-D"):
        fastqkv.shared_prefix_attention(q[0], pk, pv, k[0], v[0])
    with pytest.raises(ValueError, match="out must have shape"):
        fastqkv.shared_prefix_attention(q, pk, pv, k, v, out=np.empty((3, 8, 1, 8)))
    kc, vc = rng.standard_normal((2, 10, 4, 2, 8))
    table = np.arange(6).reshape(3, 2)
    with pytest.raises(ValueError, match=r"prefix_len must be <= len\(prefix_blocks\) \* block_size = 8"):
        fastqkv.shared_prefix_paged_attention(q, kc, vc, [7, 8], 9, table, [8, 8, 8])
    with pytest.raises(ValueError, match=r"prefix_blocks must name blocks in \[0, 10\)"):
        fastqkv.shared_prefix_paged_attention(q, kc, vc, [7, 10], 5, table, [8, 8, 8])
    with pytest.raises(TypeError, match="prefix_blocks must be a 1-D integer array"):
        fastqkv.shared_prefix_paged_attention(q, kc, vc, [[7, 8]], 5, table, [8, 8, 8])
    with pytest.raises(ValueError, match="every suffix length must be >= 2"):
        fastqkv.shared_prefix_paged_attention(q, kc, vc, [7, 8], 5, table, [8, 0, 8], causal=True)
