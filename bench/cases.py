"""The pytest-benchmark suite's view of the package's one shape list.

The cases are ``fastqkv._bench.shape_classes(size)``, the shapes
``fastqkv bench`` times; the size is ``--bench-size`` (see conftest.py) or
``$FASTQKV_BENCH_SIZE``: ``full`` (default), ``quick`` or ``tiny``.
"""

from fastqkv._bench import PEERS, SIZES, Skip, check, make_inputs, prepare, shape_classes
from fastqkv._bench.runners import check_numpy_cost, fastqkv_names

__all__ = ["PEERS", "SIZES", "Skip", "check", "check_numpy_cost", "make_inputs", "prepare",
           "shape_classes", "RUNNERS", "MEDIANS"]

# auto, fastqkv's backends, then the peers (skipped when not installed)
RUNNERS = ("auto", *fastqkv_names(), *PEERS)

# {case name: {runner: (median seconds, note)}}, filled by the timed tests and
# summarised (auto's choice against the fastest backend) at the end of the session
MEDIANS = {}
