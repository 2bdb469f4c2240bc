/* AVX-512 (F/DQ/BW/VL, x86-64-v4) variant, compiled with -mavx512f -mavx512dq
 * -mavx512bw -mavx512vl -mavx2 -mfma.  Register tiles for 32 zmm registers:
 * QK 6 rows x 4 vectors (64 keys) and PV 6 rows x 4 vectors (64 columns),
 * 24 accumulators each: 10 loads per 24 FMAs, fewer loads per FMA being the
 * gain over AVX2.  FQ_ROWS / FQ_KT tuned on an AMD EPYC Zen 4, the register
 * tiles on an Intel Ice Lake Xeon (docs/tuning.md). */
#define FQ_ISA_NAME "avx512"
#define FQ_ISA_SYM fq_isa_avx512
#define FQ_VBYTES 64
#define MR_QK 6
#define NV_QK 4
#define MR_PV 6
#define NV_PV 4
#define FQ_ROWS 256
#define FQ_KT 512
/* P.V key chunks of 32 KiB of V: two thirds of Ice Lake's 48 KiB L1d */
#define FQ_PV_L1_BYTES 32768
#include "attn_isa.inc"
