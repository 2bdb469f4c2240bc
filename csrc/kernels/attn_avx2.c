/* AVX2 + FMA variant (x86-64-v3), compiled with -mavx2 -mfma.
 * Register tiles for 16 ymm registers: QK 6 rows x 2 vectors (16 keys, 12
 * accumulators), PV 6 rows x 2 vectors (12 accumulators).
 * FQ_ROWS (rows per work item) and FQ_KT (keys per tile), tuned on an AMD
 * EPYC Zen 4 (docs/tuning.md): the scratch stays in L2, a K^T panel in L1. */
#define FQ_ISA_NAME "avx2"
#define FQ_ISA_SYM fq_isa_avx2
#define FQ_VBYTES 32
#define MR_QK 6
#define NV_QK 2
#define MR_PV 6
#define NV_PV 2
#define FQ_ROWS 256
#define FQ_KT 256
#include "attn_isa.inc"
