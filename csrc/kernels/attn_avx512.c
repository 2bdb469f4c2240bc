/* AVX-512 (F/DQ/BW/VL, x86-64-v4) variant, compiled with -mavx512f -mavx512dq
 * -mavx512bw -mavx512vl -mfma.  Register tiles for 32 zmm registers:
 * QK 8 rows x 3 vectors (24 accumulators), PV 8 rows x 2 vectors.
 * Tiles tuned on AMD EPYC Zen 4 (2 cores, 2 MiB L2 per core, 32 KiB L1d). */
#define FQ_ISA_NAME "avx512"
#define FQ_ISA_SYM fq_isa_avx512
#define FQ_VBYTES 64
#define MR_QK 12
#define NV_QK 2
#define MR_PV 8
#define NV_PV 2
#define FQ_ROWS 128
#define FQ_KT 256
#include "attn_isa.inc"
