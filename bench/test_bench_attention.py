"""Every shape class x every runner (fastqkv backends, auto, PyTorch SDPA,
ONNX Runtime), grouped by case; each result is checked against the oracle
before it is timed."""

import pytest

from cases import MEDIANS, Skip, check, check_numpy_cost, prepare


def test_attention(benchmark, bench_case, runner, bench_inputs, bench_threads, bench_size):
    case = bench_case
    try:
        if runner == "numpy":
            check_numpy_cost(case, bench_size)
        call, fetch, note = prepare(runner, bench_inputs, bench_threads)
    except Skip as exc:
        pytest.skip(str(exc))
    bad = check(bench_inputs, fetch(call()))          # also the warm-up (numba JIT)
    assert bad is None, f"{case.name} {runner}: {bad}"
    benchmark.group = f"{case.name}: {case.describe()}"
    benchmark.extra_info.update(case=case.name, runner=runner, note=note, threads=bench_threads,
                                flops=case.flops(), kv_bytes=case.kv_bytes())
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        med = stats.stats.median
        benchmark.extra_info["gflops"] = case.flops() / med / 1e9
        MEDIANS.setdefault(case.name, {})[runner] = (med, note)
        if case.bound == "memory":
            benchmark.extra_info["kv_gbs"] = case.kv_bytes() / med / 1e9
