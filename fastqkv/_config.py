"""One home for constants: environment-variable names, defaults and thresholds.

Tile sizes that belong to a compiled kernel live beside that kernel (with the
CPU they were tuned on); this file holds what the Python layer decides.
"""

# Environment variables read by fastqkv.
ENV_BACKEND = "FASTQKV_BACKEND"          # force a backend for backend="auto"
ENV_NUM_THREADS = "FASTQKV_NUM_THREADS"  # default thread count
ENV_ISA = "FASTQKV_ISA"                  # force a compiled ISA variant of the C backend
ENV_TUNE_FILE = "FASTQKV_TUNE_FILE"      # where `fastqkv tune` writes and auto reads its table

# Order in which backend="auto" tries the backends for a call class that
# `fastqkv tune` has not measured on this machine (fastqkv._tune).
AUTO_ORDER = ("c", "numba", "numpy")

# A call of at most STREAM_MAX_LQ query positions without mask, bias,
# softcap or ALiBi is a decode step: the planner sends it to the streaming
# kernel (each K/V byte read once per step), longer query blocks to the tiled
# kernel (Problem.route); the C driver keeps a decode step's query positions
# in one work item.
STREAM_MAX_LQ = 16

# A call of at least this many multiply-adds (B*Hq*Lq*Lk*(D+Dv)) made from
# the main thread runs its kernel on a helper thread while the main thread
# waits where Python's SIGINT handler can run (Ctrl-C then stops the
# kernels); below it the call is too short to need it and skips the hand-off.
INTERRUPTIBLE_MIN_WORK = 1 << 29

# Layout names accepted by every public function.
LAYOUTS = ("bhld", "blhd")

# Overlap checks between `out=` and the inputs: work budget for
# numpy.shares_memory before the answer counts as "may overlap".
SHARES_MEMORY_MAX_WORK = 100_000

# Largest thread count accepted by set_num_threads / $FASTQKV_NUM_THREADS.
MAX_THREADS = 1024
