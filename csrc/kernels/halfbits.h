/* float16 bit patterns to float32, exactly, with integer/float arithmetic:
 * the conversion of the units without F16C (the generic one), for float16
 * storage (attn_half.inc) and for float8, whose values are float16 bit
 * patterns (attn_quant.inc).  (h & 0x7fff) << 13 read as a float is h's
 * magnitude times 2^-112 (subnormals included); inf/NaN get the all-ones
 * exponent.  Also the 32-bit lane vector and the float <-> bits helpers of
 * both includers.  Included once per instantiation, after simd.h. */

typedef uint32_t N(uvec) __attribute__((vector_size(FQ_VBYTES)));

AI uint32_t N(fbits)(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
AI float N(bitsf)(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* the float16 whose bits are h */
AI float N(h2f)(uint32_t h)
{
    uint32_t em = (h & 0x7fff) << 13;
    uint32_t u = N(fbits)(N(bitsf)(em) * 0x1p112f);
    if ((h & 0x7c00) == 0x7c00)
        u |= 0x7f800000u;
    return N(bitsf)(u | (h & 0x8000) << 16);
}

/* the float16s whose bits are the 32-bit lanes of h */
AI V N(h2fv)(N(uvec) h)
{
    N(uvec) em = (h & 0x7fff) << 13;
    V f = (V)em * N(vsplat)(0x1p112f);
    N(uvec) u = (N(uvec))f | ((N(uvec))((h & 0x7c00) == 0x7c00) & 0x7f800000u);
    return (V)(u | (h & 0x8000) << 16);
}
