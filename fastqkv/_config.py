"""One home for constants: environment-variable names, defaults and thresholds.

Tile sizes that belong to a compiled kernel live beside that kernel (with the
CPU they were tuned on); this file holds what the Python layer decides.
"""

# Environment variables read by fastqkv.
ENV_BACKEND = "FASTQKV_BACKEND"          # force a backend for backend="auto"
ENV_NUM_THREADS = "FASTQKV_NUM_THREADS"  # default thread count
ENV_ISA = "FASTQKV_ISA"                  # force a compiled ISA variant of the C backend

# Order in which backend="auto" tries the backends: fastest first.
AUTO_ORDER = ("c", "numba", "numpy")

# Layout names accepted by every public function.
LAYOUTS = ("bhld", "blhd")

# Overlap checks between `out=` and the inputs: work budget for
# numpy.shares_memory before the answer counts as "may overlap".
SHARES_MEMORY_MAX_WORK = 100_000

# Largest thread count accepted by set_num_threads / $FASTQKV_NUM_THREADS.
MAX_THREADS = 1024
