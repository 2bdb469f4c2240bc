/* Portable variant: 16-byte GNU C vectors (SSE2 on x86-64, NEON on aarch64);
 * register tiles for 16 vector registers, QK 4 x 3 and PV 4 x 2. */
#define FQ_ISA_NAME "generic"
#define FQ_ISA_SYM fq_isa_generic
#define FQ_VBYTES 16
#define MR_QK 4
#define NV_QK 3
#define MR_PV 4
#define NV_PV 2
#define FQ_ROWS 128
#define FQ_KT 256
#include "attn_isa.inc"
