"""pytest-benchmark suite over the design's shape classes:

    pytest bench --benchmark-only [--bench-size quick] [--bench-threads 2]

Each case is a ``benchmark.group``, so fastqkv's backends, ``auto`` and the
peers (PyTorch SDPA, ONNX Runtime; skipped when not installed) are compared
side by side.
"""

import os

import pytest

from cases import MEDIANS, PEERS, RUNNERS, SIZES, Skip, make_inputs, shape_classes


def pytest_addoption(parser):
    group = parser.getgroup("fastqkv bench")
    group.addoption("--bench-size", choices=SIZES, default=os.environ.get("FASTQKV_BENCH_SIZE", "full"),
                    help="shape sizes: full (the design's), quick or tiny (default $FASTQKV_BENCH_SIZE or full)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="threads for fastqkv and the peers (default fastqkv.get_num_threads())")


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        size = metafunc.config.getoption("--bench-size")
        pairs = [(c, r) for c in shape_classes(size) for r in RUNNERS]    # case-major order
        metafunc.parametrize(("bench_case", "runner"), pairs, ids=[f"{c.name}-{r}" for c, r in pairs])


@pytest.fixture(scope="session")
def bench_threads(request):
    import fastqkv
    return request.config.getoption("--bench-threads") or fastqkv.get_num_threads()


_current = {}


@pytest.fixture(scope="session")
def bench_size(request):
    return request.config.getoption("--bench-size")


@pytest.fixture
def bench_inputs(bench_case):
    """The case's arrays, kept while consecutive tests use the same case; a
    case that cannot be created here (a missing optional package) skips."""
    if _current.get("case") != bench_case:
        _current.clear()
        try:
            _current.update(case=bench_case, inputs=make_inputs(bench_case))
        except Skip as exc:
            _current.update(case=bench_case, skip=str(exc))
    if "skip" in _current:
        pytest.skip(_current["skip"])
    return _current["inputs"]


def pytest_terminal_summary(terminalreporter):
    """One line per case: auto's choice against the fastest fastqkv backend."""
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("auto dispatch against the fastest backend")
    for case, runs in MEDIANS.items():
        backends = {r: t for r, (t, _) in runs.items() if r != "auto" and r not in PEERS}
        if "auto" not in runs or not backends:
            continue
        choice = runs["auto"][1].removeprefix("-> ")
        fastest = min(backends, key=backends.get)
        line = f"{case}: auto picks {choice}, fastest {fastest} {backends[fastest] * 1e3:.3f} ms"
        if choice in backends:
            ratio = backends[choice] / backends[fastest]
            line += f"; {choice} {100 * (ratio - 1):+.1f} % ({'within' if ratio <= 1.05 else 'NOT within'} 5 %)"
        tr.write_line(line)
