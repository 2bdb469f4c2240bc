"""The machine's limits next to the attention cases: sgemm (numpy float32
matmul 2048^2) and read bandwidth (float32 sum over 512 MiB on every thread,
the probe of `fastqkv bench`)."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def big():
    return np.ones((512 << 20) // 4, np.float32)


def test_sgemm_2048(benchmark):
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    b = a.T.copy()
    benchmark.group = "machine: sgemm 2048^2 float32"
    benchmark(np.matmul, a, b)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["gflops"] = 2 * 2048 ** 3 / benchmark.stats.stats.median / 1e9


def test_read_bandwidth_512mib(benchmark, big):
    import fastqkv

    _ckernels = pytest.importorskip("fastqkv._ckernels", reason="the C probe needs the C extension")
    threads = fastqkv.get_num_threads()
    benchmark.group = f"machine: read 512 MiB float32 (C probe, {threads} threads)"
    benchmark(_ckernels.read_sum, big, threads)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["gbs"] = big.nbytes / benchmark.stats.stats.median / 1e9
