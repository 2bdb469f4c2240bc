/* AVX2 + FMA variant (x86-64-v3), compiled with -mavx2 -mfma.
 * Register tiles for 16 ymm registers: QK 6 rows x 2 vectors (16 keys, 12
 * accumulators), PV 6 rows x 2 vectors (12 accumulators).
 * FQ_ROWS (rows per work item) and FQ_KT (keys per tile) were tuned on an
 * AMD EPYC Zen 4 (2 cores, 32 KiB L1d and 2 MiB L2 per core, 32 MiB L3):
 * the per-thread scratch (Q, S, O, and K^T/V tiles when packed per item)
 * is ~0.6 MiB for D = 128 and stays inside L2; one K^T panel (D x 16 floats)
 * stays in L1 while every row block streams over it. */
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
