/* The vector vocabulary of the kernels, written once with GNU C vector
 * extensions, and the scalar helpers of their row epilogues.  Each ISA
 * translation unit defines FQ_VBYTES (16 = SSE2/NEON baseline, 32 = AVX2,
 * 64 = AVX-512) and is compiled with that ISA's flags, so the same source
 * becomes xmm, ymm or zmm code.  FMA comes from -ffp-contract=fast on
 * a*b+c (the AVX2/AVX-512 units are built with -mfma).
 *
 * Included once per accumulation type with FQ_T set: by attn_tile.inc
 * (float32/float64 storage) and attn_half.inc (float16/bfloat16 storage,
 * accumulated in float32).  Names are suffixed with FQ_SFX so every
 * instantiation lives in one unit. */

#include <math.h>

#define FQ_CAT_(a, b) a##_##b
#define FQ_CAT(a, b) FQ_CAT_(a, b)
#define N(name) FQ_CAT(name, FQ_SFX)

#define AI static inline __attribute__((always_inline))

typedef FQ_T N(vec) __attribute__((vector_size(FQ_VBYTES)));
typedef FQ_T N(vecu) __attribute__((vector_size(FQ_VBYTES), aligned(sizeof(FQ_T)), may_alias));
#if FQ_IS_F64
typedef int64_t N(ivec) __attribute__((vector_size(FQ_VBYTES)));
typedef int64_t N(ivec16) __attribute__((vector_size(16)));
typedef int64_t N(ivec32) __attribute__((vector_size(32)));
#else
typedef int32_t N(ivec) __attribute__((vector_size(FQ_VBYTES)));
typedef int32_t N(ivec16) __attribute__((vector_size(16)));
typedef int32_t N(ivec32) __attribute__((vector_size(32)));
#endif

#define V N(vec)
#define VU N(vecu)
#define VI N(ivec)
#define VL ((int64_t)(FQ_VBYTES / sizeof(FQ_T)))

AI V N(vload)(const FQ_T *p) { return *(const VU *)p; }
AI void N(vstore)(FQ_T *p, V x) { *(VU *)p = x; }
/* an initializer list, not 0 + s (which is not an identity for -0.0 and
 * would cost an add before every broadcast) */
#define FQ_NLANES (FQ_VBYTES / FQ_ELEM_BYTES)
#if FQ_NLANES == 2
AI V N(vsplat)(FQ_T s) { return (V){s, s}; }
#elif FQ_NLANES == 4
AI V N(vsplat)(FQ_T s) { return (V){s, s, s, s}; }
#elif FQ_NLANES == 8
AI V N(vsplat)(FQ_T s) { return (V){s, s, s, s, s, s, s, s}; }
#elif FQ_NLANES == 16
AI V N(vsplat)(FQ_T s) { return (V){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
#else
#error "unsupported vector length"
#endif
#undef FQ_NLANES
/* m ? a : b, lane-wise (m lanes are all-ones or zero) */
AI V N(vsel)(VI m, V a, V b) { return (V)((m & (VI)a) | (~m & (VI)b)); }
/* max that keeps b when a compares false (drops NaN: callers check for it) */
AI V N(vmax)(V a, V b) { return N(vsel)(a > b, a, b); }
/* horizontal max / sum as a tree: halve the vector down to 16 bytes, then
 * the 2 or 4 lanes left (log depth instead of a serial chain) */
typedef FQ_T N(vec16) __attribute__((vector_size(16)));
#if FQ_VBYTES >= 32
typedef FQ_T N(vec32) __attribute__((vector_size(32)));
#endif

AI N(vec16) N(fold16)(V x, int is_max)
{
#if FQ_VBYTES == 16
    (void)is_max;
    return x;
#else
#if FQ_VBYTES == 64
    union { V v; N(vec32) h[2]; } u = {x};
    N(vec32) a = u.h[0], b = u.h[1], y;
    if (is_max) {
        N(ivec32) m = b > a;
        y = (N(vec32))((m & (N(ivec32))b) | (~m & (N(ivec32))a));
    } else {
        y = a + b;
    }
#else
    N(vec32) y = x;
#endif
    union { N(vec32) v; N(vec16) h[2]; } w = {y};
    N(vec16) c = w.h[0], d = w.h[1];
    if (is_max) {
        N(ivec16) m = d > c;
        return (N(vec16))((m & (N(ivec16))d) | (~m & (N(ivec16))c));
    }
    return c + d;
#endif
}

/* NaN lanes are dropped by the max: callers look for NaN separately */
AI FQ_T N(hmax)(V x)
{
    N(vec16) h = N(fold16)(x, 1);
#if FQ_IS_F64
    return h[1] > h[0] ? h[1] : h[0];
#else
    FQ_T a = h[1] > h[0] ? h[1] : h[0], b = h[3] > h[2] ? h[3] : h[2];
    return b > a ? b : a;
#endif
}

AI FQ_T N(hsum)(V x)
{
    N(vec16) h = N(fold16)(x, 0);
#if FQ_IS_F64
    return h[0] + h[1];
#else
    return (h[0] + h[2]) + (h[1] + h[3]);
#endif
}

/* scalar max that keeps a NaN from either side (a row max stays NaN) */
AI FQ_T N(nanmax)(FQ_T a, FQ_T b) { return (a != a || a > b) ? a : b; }

/* the sink logit s folded into a row with visible keys (running max m,
 * sum l > 0): one more logit without a value, M = max(m, s),
 * a = exp(m - M), L = l*a + exp(s - M); returns a/L (out = O*a/L) and sets
 * *lse = M + log(L); NaN in m stays NaN.  Out of line, so that the code
 * the compiler makes of the kernels' loops does not depend on it */
static __attribute__((noinline)) FQ_T N(sinkfold)(FQ_T m, FQ_T l, FQ_T s, FQ_T *lse)
{
    const FQ_T M = N(nanmax)(m, s);
    const FQ_T a = (FQ_T)exp((double)(m - M));
    const FQ_T L = l * a + (FQ_T)exp((double)(s - M));
    *lse = M + (FQ_T)log((double)L);
    return a / L;
}

/* A row's normalisation from its running max m and sum l (l == 0: no
 * visible key; m is then not used) with the sink logit s of its head (-inf:
 * no sink, the plain O / l): returns the factor of the row's unnormalised
 * O and sets *lse.  A row without a visible key gets factor 0 and lse = s. */
AI FQ_T N(rownorm)(FQ_T m, FQ_T l, FQ_T s, FQ_T *lse)
{
    if (l == 0) {
        *lse = s;
        return 0;
    }
    if (s == -(FQ_T)INFINITY) {
        *lse = m + (FQ_T)log((double)l);
        return 1 / l;
    }
    return N(sinkfold)(m, l, s, lse);
}

/* Transposed reduction: x[0..FQ_VLC) -> one vector whose lane j is the sum
 * of the lanes of x[fq_bitrev(j)] (callers place their j-th accumulator at
 * x[bitrev(j)] to get the sums in order): log2(VL) levels of two shuffles and
 * an add per pair, instead of one horizontal sum per vector. */
#define FQ_VLC (FQ_VBYTES / FQ_ELEM_BYTES)
#define FQ_LO(j, H) ((((j) % (2 * (H))) < (H)) ? ((j) / (2 * (H))) * 2 * (H) + (j) % (2 * (H)) \
                     : FQ_VLC + ((j) / (2 * (H))) * 2 * (H) + (j) % (2 * (H)) - (H))
#define FQ_HI(j, H) (FQ_LO(j, H) + (H))
#define FQ_L2(F, H) F(0, H), F(1, H)
#define FQ_L4(F, H) FQ_L2(F, H), F(2, H), F(3, H)
#define FQ_L8(F, H) FQ_L4(F, H), F(4, H), F(5, H), F(6, H), F(7, H)
#define FQ_L16(F, H) FQ_L8(F, H), F(8, H), F(9, H), F(10, H), F(11, H), F(12, H), F(13, H), \
                     F(14, H), F(15, H)
#undef FQ_LN
#if FQ_VLC == 16
#define FQ_LN FQ_L16
#elif FQ_VLC == 8
#define FQ_LN FQ_L8
#elif FQ_VLC == 4
#define FQ_LN FQ_L4
#else
#define FQ_LN FQ_L2
#endif
#if defined(__clang__)
#define FQ_PAIR(a, b, H) (__builtin_shufflevector(a, b, FQ_LN(FQ_LO, H)) + \
                          __builtin_shufflevector(a, b, FQ_LN(FQ_HI, H)))
#else
#define FQ_PAIR(a, b, H) (__builtin_shuffle(a, b, (VI){FQ_LN(FQ_LO, H)}) + \
                          __builtin_shuffle(a, b, (VI){FQ_LN(FQ_HI, H)}))
#endif

static inline int N(bitrev)(int j)
{
    int r = 0;
    for (int b = 1; b < FQ_VLC; b <<= 1)
        r = (r << 1) | ((j & b) != 0);
    return r;
}

AI V N(vred)(V *x)
{
#if FQ_VLC >= 16
    for (int i = 0; i < 8; i++)
        x[i] = FQ_PAIR(x[2 * i], x[2 * i + 1], 8);
#endif
#if FQ_VLC >= 8
    for (int i = 0; i < 4; i++)
        x[i] = FQ_PAIR(x[2 * i], x[2 * i + 1], 4);
#endif
#if FQ_VLC >= 4
    for (int i = 0; i < 2; i++)
        x[i] = FQ_PAIR(x[2 * i], x[2 * i + 1], 2);
#endif
    return FQ_PAIR(x[0], x[1], 1);
}

/* Vectorised exp, Cephes style: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite
 * two-constant ln2), exp(r) by a polynomial, 2^n built in the exponent bits
 * (n taken from the rounding magic number, no float->int conversion).
 * exp(-inf) = 0 exactly, inputs below ln(min normal) flush to 0 (their lanes
 * are cleared at the end, whatever the arithmetic made of them; callers pass
 * x = s - max <= 0, where such values are negligible next to the row sum of
 * >= 1), NaN -> NaN.  Domain: x <= 88 (f32) / 709 (f64); no clamp above.
 * Error bound (tested in tests/test_c_backend.py over [-87, 0] resp. [-708, 0]
 * and a few positive values): float32 relative error < 4e-7 (~3 ulp, Cephes
 * expf polynomial, degree 7); float64 relative error < 1e-15 (~5 ulp, Taylor
 * degree 13 on |r| <= 0.347, truncation < 2e-17). */
#if FQ_IS_F64
AI V N(vexp)(V x)
{
    const V magic = N(vsplat)(6755399441055744.0);   /* 1.5 * 2^52 */
    const VI under = x < -708.3964185322641;
    V t = x * 1.4426950408889634 + magic;
    V n = t - magic;
    V r = x - n * 6.93145751953125E-1;
    r = r - n * 1.42860682030941723212E-6;
    V p = N(vsplat)(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    VI e = ((VI)t - (VI)magic + 1023) << 52;
    V res = p * (V)e;
    return (V)((VI)res & ~under);
}
#else
AI V N(vexp)(V x)
{
    const V magic = N(vsplat)(12582912.0f);          /* 1.5 * 2^23 */
    const VI under = x < -87.33654f;
    V t = x * 1.44269504088896341f + magic;
    V n = t - magic;
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = N(vsplat)(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    VI e = ((VI)t - (VI)magic + 127) << 23;
    V res = p * (V)e;
    return (V)((VI)res & ~under);
}
#endif
