"""The benchmark shape classes of DESIGN section 3.

The canonical list lives in the package (``fastqkv._bench.shape_classes``),
so that ``fastqkv bench`` and this pytest-benchmark suite time the same
shapes and the package does not depend on this folder.  The size is
``--bench-size`` (see conftest.py) or ``$FASTQKV_BENCH_SIZE``: ``full``
(default), ``quick`` or ``tiny``.
"""

from fastqkv._bench import (PEERS, SIZES, BenchCase, Skip, check, make_inputs, numpy_seconds,
                            prepare, shape_classes)

__all__ = ["PEERS", "SIZES", "BenchCase", "Skip", "check", "make_inputs", "numpy_seconds",
           "prepare", "shape_classes", "RUNNERS", "MEDIANS"]

# fastqkv's backends, auto, then the peers (skipped when not installed)
RUNNERS = ("auto", "c", "numba", "numpy") + PEERS

# {case name: {runner: (median seconds, note)}}, filled by the timed tests and
# summarised (auto's choice against the fastest backend) at the end of the session
MEDIANS = {}
