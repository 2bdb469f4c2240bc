/* AVX-512 (F/DQ/BW/VL, x86-64-v4) variant, compiled with -mavx512f -mavx512dq
 * -mavx512bw -mavx512vl -mavx2 -mfma.  Register tiles for 32 zmm registers:
 * QK 6 rows x 4 vectors (64 keys) and PV 6 rows x 4 vectors (64 columns),
 * 24 accumulators each: 10 loads per 24 FMAs.  Measured on an Intel Ice Lake
 * Xeon (2 cores, 48 KiB L1d, 1.25 MiB L2 per core) against the earlier QK
 * 12 x 2 / PV 8 x 2: prefill 8-11 % faster from PV, 2-5 % more from QK with
 * Q packed per row block.  A K^T panel is 32 KiB for D = 128 (L1 on Ice
 * Lake; on a 32 KiB-L1 core such as Zen 4 it is not retuned).
 * FQ_ROWS / FQ_KT tuned on an AMD EPYC Zen 4 (2 cores, 32 KiB L1d and 2 MiB
 * L2 per core): scratch ~1.1 MiB for D = 128, inside L2; a sweep on the Ice
 * Lake Xeon found no better pair (within noise).  On Zen 4 a zmm FMA issues as
 * two 256-bit halves, so the gain over AVX2 comes from the larger register
 * file (fewer loads per FMA), not from wider arithmetic. */
#define FQ_ISA_NAME "avx512"
#define FQ_ISA_SYM fq_isa_avx512
#define FQ_VBYTES 64
#define MR_QK 6
#define NV_QK 4
#define MR_PV 6
#define NV_PV 4
#define FQ_ROWS 256
#define FQ_KT 512
/* P.V key chunks of 32 KiB of V (two thirds of Ice Lake's 48 KiB L1d):
 * 1-3.6 % faster prefill there than 16 KiB; 64 KiB was 2-5 % slower */
#define FQ_PV_L1_BYTES 32768
#include "attn_isa.inc"
