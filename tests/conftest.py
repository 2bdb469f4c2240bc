import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Hypothesis profiles for the property-based suites (tests/test_reliability_fuzz.py):
# "ci" (default) is bounded and derandomized so a run is reproducible and short;
# "release" is the long search: HYPOTHESIS_PROFILE=release pytest tests/test_reliability_fuzz.py
try:
    import os as _os

    from hypothesis import HealthCheck as _HealthCheck
    from hypothesis import settings as _settings
except ImportError:  # hypothesis is a test extra; the fuzz suite skips without it
    pass
else:
    _settings.register_profile(
        "ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
        suppress_health_check=[_HealthCheck.too_slow, _HealthCheck.data_too_large])
    _settings.register_profile(
        "release", max_examples=20000, deadline=None, print_blob=True,
        suppress_health_check=[_HealthCheck.too_slow, _HealthCheck.data_too_large])
    _settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))
