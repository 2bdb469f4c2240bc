"""Fixtures shared by the test files: the session's working directory, a
seeded ``rng``, ``force`` (the backends' tuning knobs for one test), ``isa``
(every C ISA variant this machine runs) and the hypothesis profiles."""

import os

import numpy as np
import pytest

import fastqkv as _fastqkv
from fastqkv import _c

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


@pytest.fixture(autouse=True, scope="session")
def _no_tune_file(tmp_path_factory):
    """auto takes its neutral order: a tune file the machine's user wrote
    (``fastqkv tune``) would make the backend it picks depend on that file."""
    old = os.environ.get("FASTQKV_TUNE_FILE")
    os.environ["FASTQKV_TUNE_FILE"] = str(tmp_path_factory.mktemp("tune") / "none.json")
    from fastqkv import _tune
    _tune.forget()
    yield
    if old is None:
        del os.environ["FASTQKV_TUNE_FILE"]
    else:
        os.environ["FASTQKV_TUNE_FILE"] = old
    _tune.forget()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------
# KNOBS: the one place that names the backends' private tuning hooks.  Each
# knob maps to setters ``set(value) -> undo``, one per backend that has it;
# a backend that is not available is left out.  When a hook moves or is
# renamed, re-point it here and nowhere else.
#
#   splits              C: key splits per (batch, KV head) of a decode (0: its own choice)
#   split_keys          Numba: keys per split (0: its own choice)
#   route               "stream" or "tile": the kernel few-query calls take (None: its own choice)
#   rows, keys          C and Numba: query rows and keys per tile (C 0: tuned default)
#   decode_keys         Numba: keys per tile of an item of at most 8 rows
#   stream_keys         Numba: keys per chunk of the streaming kernel
#   decode_stream_keys  Numba: keys per chunk of a one-position decode
#   isa                 C: the ISA variant (a name of fastqkv._c.isa_variants())

def _c_knobs():
    from fastqkv import _ckernels

    state = {"splits": 0, "rows": 0, "kt": 0}     # 0: the backend's own choice

    def field(name, apply):
        def set_(value):
            old, state[name] = state[name], value
            apply()

            def undo():
                state[name] = old
                apply()
            return undo
        return set_

    def splits():
        _ckernels.set_splits(state["splits"])

    def tiles():
        _ckernels.set_tiles(state["rows"], state["kt"])

    def isa(name):
        prev = _ckernels.set_isa(name)
        return lambda: _ckernels.set_isa(prev)

    return {"splits": field("splits", splits),
            "rows": field("rows", tiles),
            "keys": field("kt", tiles),
            "isa": isa}


def _route(value):
    """The planner's route, the same for every backend."""
    from fastqkv import _problem

    ctx = _problem.force_route(value)
    ctx.__enter__()
    return lambda: ctx.__exit__(None, None, None)


def _numba_knobs():
    def attr(name):
        def set_(value):
            from fastqkv._numba import launch, tuning

            mod = launch if name == "FORCE_SPLIT" else tuning
            old = getattr(mod, name)
            setattr(mod, name, value)
            return lambda: setattr(mod, name, old)
        return set_

    return {"split_keys": attr("FORCE_SPLIT"), "rows": attr("ROWS"), "keys": attr("KEYS"),
            "decode_keys": attr("DECODE_KEYS"), "stream_keys": attr("STREAM_KEYS"),
            "decode_stream_keys": attr("DECODE_STREAM_KEYS")}


KNOB_NAMES = ("splits", "split_keys", "route", "rows", "keys", "decode_keys", "stream_keys",
              "decode_stream_keys", "isa")
_KNOBS = {name: [] for name in KNOB_NAMES}
_KNOBS["route"].append(_route)
for _backend, _table in (("c", _c_knobs), ("numba", _numba_knobs)):
    if _fastqkv.backends()[_backend].available:
        for _name, _setter in _table().items():
            _KNOBS[_name].append(_setter)
C_ISAS = _c.isa_variants()
# ---------------------------------------------------------------------------


@pytest.fixture
def force():
    """``force(**knobs)`` sets the named knobs (see KNOBS above) on every
    backend that has them, for this test only; they are restored afterwards.
    It may be called again within a test."""
    undo = []

    def set_(**knobs):
        for name, value in knobs.items():
            if name not in _KNOBS:
                raise TypeError(f"unknown knob {name!r}; known: {', '.join(KNOB_NAMES)}")
            for setter in _KNOBS[name]:
                undo.append(setter(value))

    try:
        yield set_
    finally:
        for fn in reversed(undo):
            fn()


@pytest.fixture(params=C_ISAS)
def isa(request, force):
    """Each ISA variant of the C backend this machine runs, forced in turn."""
    force(isa=request.param)
    return request.param


# Hypothesis profiles for the property-based suites (tests/test_reliability_fuzz.py):
# "ci" (default) is bounded and derandomized so a run is reproducible and short;
# "release" is the long search: HYPOTHESIS_PROFILE=release pytest tests/test_reliability_fuzz.py
try:
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
    _settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
