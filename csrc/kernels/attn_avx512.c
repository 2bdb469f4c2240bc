/* AVX-512 (F/DQ/BW/VL, x86-64-v4) variant, compiled with -mavx512f -mavx512dq
 * -mavx512bw -mavx512vl -mavx2 -mfma.  Register tiles for 32 zmm registers:
 * QK 12 rows x 2 vectors (32 keys, 24 accumulators), PV 6 rows x 4 vectors
 * (64 columns, 24 accumulators: 10 loads per 24 FMAs; 8 x 2 was 10 per 16,
 * and 6 x 4 measured 8-11 % faster on prefill on an Intel Ice Lake Xeon).
 * FQ_ROWS / FQ_KT tuned on an AMD EPYC Zen 4 (2 cores, 32 KiB L1d and 2 MiB
 * L2 per core): scratch ~1.1 MiB for D = 128, inside L2.  On Zen 4 a zmm FMA
 * issues as two 256-bit halves, so the gain over AVX2 comes from the larger
 * register file (fewer loads per FMA), not from wider arithmetic. */
#define FQ_ISA_NAME "avx512"
#define FQ_ISA_SYM fq_isa_avx512
#define FQ_VBYTES 64
#define MR_QK 12
#define NV_QK 2
#define MR_PV 6
#define NV_PV 4
#define FQ_ROWS 256
#define FQ_KT 512
#include "attn_isa.inc"
