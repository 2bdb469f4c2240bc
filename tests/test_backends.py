"""Every available backend against the oracle on the shared case generator.

Backend-specific suites (forced ISA variants, thread counts, compile cache)
live in test_c_backend.py and test_numba_backend.py.
"""

import pytest

import fastqkv
from fastqkv import testing

BACKENDS = [n for n, i in fastqkv.backends().items() if i.available]
CASES = testing.generate_cases(quick=True)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_matches_oracle(backend, case):
    testing.check_case(case, backend)


@pytest.mark.parametrize("case", testing.generate_cases(quick=True, dtypes=[d.name for d in testing.half_dtypes()])[:12],
                         ids=lambda c: c.name)
def test_half_width_auto_matches_oracle(case):
    testing.check_case(case, "auto")
