/* Which ISA variants this CPU (and its OS) can run: cpuid + xgetbv.
 * No SIMD instructions in this file: it is compiled for the baseline. */
#include "fastqkv.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* AVX state usable: cpuid says OSXSAVE+AVX and the OS saves XMM|YMM. */
static int os_avx(uint64_t *xcr0)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & (1u << 27)) || !(c & (1u << 28)))   /* OSXSAVE, AVX */
        return 0;
    *xcr0 = xgetbv0();
    return (*xcr0 & 6) == 6;
}

int fq_cpu_has_avx2_fma(void)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    uint64_t xcr0;
    if (!os_avx(&xcr0))
        return 0;
    __get_cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 12)) || !(c & (1u << 29)))     /* FMA, F16C */
        return 0;
    if (__get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) != 0;                    /* AVX2 */
}

int fq_cpu_has_avx512(void)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    uint64_t xcr0;
    if (!fq_cpu_has_avx2_fma() || !os_avx(&xcr0))
        return 0;
    if ((xcr0 & 0xe6) != 0xe6)                      /* opmask, ZMM_Hi256, Hi16_ZMM */
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    /* F, DQ, BW, VL */
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
    return (b & need) == need;
}

#else
int fq_cpu_has_avx2_fma(void) { return 0; }
int fq_cpu_has_avx512(void) { return 0; }
#endif
