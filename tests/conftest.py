import os

import numpy as np
import pytest

import fastqkv as _fastqkv

# Child processes started by the tests (python -c / -m) must import the same
# fastqkv as this process -- the installed one, which holds the compiled
# extension -- and not a source tree that happens to be the working directory.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(_fastqkv.__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_PKG_PARENT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


@pytest.fixture(autouse=True, scope="session")
def _outside_the_source_tree(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


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
