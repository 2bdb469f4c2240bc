/* AVX2 + FMA variant (x86-64-v3), compiled with -mavx2 -mfma.
 * Register tiles for 16 ymm registers: QK 4 rows x 3 vectors (12 accumulators),
 * PV 6 rows x 2 vectors (12 accumulators).
 * FQ_ROWS / FQ_KT tuned on AMD EPYC Zen 4 (2 cores,
 * 2 MiB L2 per core, 32 KiB L1d; the per-thread scratch (Q, K^T panels, V, S,
 * O) stays well inside L2 and one K panel (D x 24 floats) inside L1. */
#define FQ_ISA_NAME "avx2"
#define FQ_ISA_SYM fq_isa_avx2
#define FQ_VBYTES 32
#define MR_QK 6
#define NV_QK 2
#define MR_PV 6
#define NV_PV 2
#define FQ_ROWS 128
#define FQ_KT 192
#include "attn_isa.inc"
