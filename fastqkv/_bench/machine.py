"""Machine probes: the limits a kernel is measured against, and the load
of a shared machine.

Contract: :func:`gemm_gflops` (NumPy matmul) and :func:`read_bandwidth` (a
parallel float32 sum, the decode roofline) return (best, median) figures;
:func:`measure_machine` bundles them with how each was measured;
:func:`sgemm_clean_env` runs the sgemm probe in a subprocess without
OpenBLAS core-type overrides.  :class:`ForeignLoad` and :func:`wait_quiet`
read ``/proc/stat`` to tell how busy the rest of the machine is.  Every probe
takes its thread count as an argument.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._tune import cpu_model as cpu_name  # noqa: F401 - this module's name for it

# MiB of the read bandwidth probe per bench size
PROBE_MIB = {"full": 512, "quick": 256, "tiny": 16}


def _blas_limit(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def gemm_gflops(n, dtype, runs):
    """(best, median) GFLOP/s of an ``n x n`` NumPy matmul."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    b = a.T.copy()
    a @ b
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    f = 2.0 * n ** 3
    return f / min(ts) / 1e9, f / statistics.median(ts) / 1e9


def read_probe(nbytes, threads):
    """``(read, array, how, pool)``: ``read()`` sums the float32 ``array`` of
    ``nbytes`` on ``threads`` threads with the C extension's probe (NumPy's
    own sum does not scale across Python threads: it reads at about one
    core's rate), or without the extension NumPy sums in the Python thread
    ``pool``, which the caller shuts down (None with the C probe)."""
    a = np.ones(nbytes // 4, np.float32)
    try:
        from .. import _ckernels
    except ImportError:
        _ckernels = None
    if _ckernels is not None and hasattr(_ckernels, "read_sum"):
        def read():
            _ckernels.read_sum(a, threads)
        how = (f"float32 sum over {nbytes >> 20} MiB, {threads} threads of the C probe "
               "(4 vector accumulators each, software prefetch 8 KiB ahead)")
        return read, a, how, None
    parts = np.array_split(a, threads)
    ex = ThreadPoolExecutor(threads)

    def read():
        list(ex.map(np.sum, parts))
    how = (f"numpy float32 sum over {nbytes >> 20} MiB split across {threads} Python threads "
           "(C probe unavailable: understates multi-core bandwidth)")
    return read, a, how, ex


def read_bandwidth(nbytes, threads, runs, probe=None):
    """Read bandwidth (best, median GB/s) of :func:`read_probe`, and how it
    was measured.  ``probe``: a :func:`read_probe` made before (its array is
    not allocated again; its owner shuts its pool down)."""
    read, a, how, ex = probe or read_probe(nbytes, threads)
    with contextlib.ExitStack() as stack:
        if ex is not None and probe is None:
            stack.enter_context(ex)
        read()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            read()
            ts.append(time.perf_counter() - t0)
    return a.nbytes / min(ts) / 1e9, a.nbytes / statistics.median(ts) / 1e9, how


def measure_machine(threads, size="full", probe=None):
    """sgemm/dgemm GFLOP/s (numpy matmul) and read bandwidth (a float32 sum on
    ``threads`` threads; ``probe`` as for :func:`read_bandwidth`):
    ``{name: value}`` plus how each was measured."""
    n = {"full": 2048, "quick": 1024, "tiny": 256}[size]
    mib = PROBE_MIB[size]
    runs = 5 if size != "tiny" else 2
    lim = _blas_limit(threads)
    try:
        s_best, s_med = gemm_gflops(n, np.float32, runs)
        d_best, d_med = gemm_gflops(n // 2 if size == "full" else n, np.float64, runs)
    finally:
        if lim is not None:
            lim.restore_original_limits()
    bw_best, bw_med, bw_how = read_bandwidth(mib << 20, threads, runs, probe)
    blas = f"{threads} BLAS threads (threadpoolctl)" if lim is not None else \
        "BLAS default threads (threadpoolctl not installed)"
    return {
        "sgemm_gflops": s_med, "sgemm_gflops_best": s_best,
        "dgemm_gflops": d_med, "dgemm_gflops_best": d_best,
        "bandwidth_gbs": bw_med, "bandwidth_gbs_best": bw_best,
        "sgemm_method": f"numpy float32 matmul {n}x{n}, median of {runs}, {blas}",
        "bandwidth_method": f"{bw_how}, median of {runs}",
    }


def sgemm_clean_env(threads, n=2048, runs=15):
    """Median GFLOP/s of an ``n x n`` float32 matmul measured in a subprocess
    with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset and the BLAS thread count
    set to ``threads`` (NaN if the subprocess fails)."""
    code = ("import sys; from fastqkv._bench.machine import gemm_gflops; import numpy as np; "
            f"print(gemm_gflops({n}, np.float32, {runs})[1])")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


def versions():
    """Versions of fastqkv, Python, NumPy and the optional peers (None: not installed)."""
    from .. import __version__
    v = {"fastqkv": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "numba"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - missing or broken: reported as not installed
            v[mod] = None
    return v


# ---------------------------------------------------------------------------
# load of a shared machine

def _cpu_ticks():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class ForeignLoad:
    """CPU cores used by other processes while the block ran (this machine
    may be shared: a benchmark is only meaningful when this is near 0)."""

    def __enter__(self):
        self.t0, self.c0, self.s0 = time.perf_counter(), time.process_time(), _cpu_ticks()
        return self

    def __exit__(self, *exc):
        s1 = _cpu_ticks()
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.c0
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        if self.s0 is None or s1 is None or wall <= 0:
            self.cores = float("nan")
        else:
            self.cores = max(0.0, ((s1[0] - self.s0[0]) / hz - own) / wall)
        return False


def wait_quiet(max_seconds, idle_share=0.8, window=1.0):
    """Wait (at most max_seconds) until the machine was idle for at least
    `idle_share` of its CPU time over `window` seconds; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_seconds:
        a = _cpu_ticks()
        time.sleep(window)
        b = _cpu_ticks()
        if a is None or b is None:
            break
        busy, total = b[0] - a[0], b[1] - a[1]
        if total and 1 - busy / total >= idle_share:
            break
    return time.perf_counter() - t0
