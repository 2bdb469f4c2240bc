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

# Memory-bound decode (Lq <= DECODE_MAX_LQ, no mask/bias/softcap/ALiBi, at
# least DECODE_MIN_KV_BYTES of K/V to read) on the CPU vendors listed in
# DECODE_ORDER_VENDORS goes through DECODE_ORDER; everywhere else (and for
# every other call) auto uses AUTO_ORDER.  Measured by `fastqkv bench --case
# decode`, 2 threads:
#  - AMD EPYC (Zen 4): the Numba streaming kernel reads K/V faster.  B8 Hq32
#    Hkv8 Lk4096 D128 float32 numba 9.3 ms vs c 14.6 ms; Lk 32k 20.2 vs
#    31.0 ms; float16 B4 Lk4096 (~50 MB) 3.2 vs 3.7 ms.  Below the threshold c
#    wins: float16 B2 Lk2048 (~12 MB) c 0.60 ms, numba 0.83 ms; Lk 512 float32
#    c 0.032 ms, numba 0.077 ms.  (Both decode kernels have changed since:
#    their prefetch now runs 8 KiB ahead; not measured again on Zen 4.)
#  - Intel Xeon (Ice Lake, AVX-512): c is faster on every decode case: B8
#    Lk4096 c 11.8 ms vs numba 12.4 ms, B2 Lk32k 27.2 vs 27.5 ms, float16 B4
#    Lk4096 3.9 vs 4.1 ms, bfloat16 4.0 vs 4.3 ms (before the prefetch
#    rework: 14.6 vs 20.1, 27.8 vs 32.8, 4.3 vs 5.3, 4.2 vs 5.4 ms).
DECODE_ORDER = ("numba", "c", "numpy")
DECODE_ORDER_VENDORS = ("AuthenticAMD",)
DECODE_MAX_LQ = 16
DECODE_MIN_KV_BYTES = 32 << 20

# Layout names accepted by every public function.
LAYOUTS = ("bhld", "blhd")

# Overlap checks between `out=` and the inputs: work budget for
# numpy.shares_memory before the answer counts as "may overlap".
SHARES_MEMORY_MAX_WORK = 100_000

# Largest thread count accepted by set_num_threads / $FASTQKV_NUM_THREADS.
MAX_THREADS = 1024
