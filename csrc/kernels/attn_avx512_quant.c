/* The avx512 unit's int8/float8 K/V kernels, compiled apart from its other
 * kernels with the same flags and parameters (attn_isa.inc says why). */
#define FQ_UNIT_QUANT 1
#include "attn_avx512.c"
