/* The C API's entry point (fastqkv/include/fastqkv/fastqkv_api.h): checks
 * every field of a fastqkv_args a C caller can get wrong, with the wording of
 * fastqkv/_validate.py where the check is the same, then describes the call
 * as an fq_problem on the route the Python planner would choose
 * (fastqkv._problem) and runs it with fq_run.  No Python object is touched,
 * so it runs without the GIL; a call with num_threads == 1 runs on the
 * calling thread alone. */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastqkv.h"
#include "fastqkv/fastqkv_api.h"

#ifndef FQ_VERSION
#error "FQ_VERSION (fastqkv's version string) is defined by setup.py"
#endif

_Static_assert(sizeof(void *) != 8 || sizeof(fastqkv_args) == 8 * FASTQKV_ARGS_WORDS,
               "fastqkv_args must be FASTQKV_ARGS_WORDS words of 8 bytes");
_Static_assert((int)FASTQKV_F32 == FQ_F32 && (int)FASTQKV_F64 == FQ_F64 &&
               (int)FASTQKV_F16 == FQ_F16 && (int)FASTQKV_BF16 == FQ_BF16,
               "the public dtype codes are the kernels'");

/* window sides at least this large see every key: stored as unbounded, as
 * fastqkv._validate.check_window does (no bound overflows) */
#define WINDOW_UNBOUNDED ((int64_t)1 << 62)
/* element strides beyond this would overflow as byte strides */
#define STRIDE_MAX ((int64_t)1 << 59)

const char *fq_version(void) { return FQ_VERSION; }

/* status `code` with a formatted message */
__attribute__((format(printf, 4, 5)))
static int fail(char *msg, size_t n, int code, const char *fmt, ...)
{
    if (msg && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, n, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* a double as Python's str() writes it (nan, inf, -1.0, 0.5) */
static const char *pyfloat(double x, char buf[32])
{
    if (isnan(x))
        return "nan";
    if (isinf(x))
        return x > 0 ? "inf" : "-inf";
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, 32, "%.*g", prec, x);
        if (strtod(buf, NULL) == x)
            break;
    }
    if (!strpbrk(buf, ".e"))
        strcat(buf, ".0");
    return buf;
}

static const char *const ARR4[] = {"q", "k", "v", "out"};

int fastqkv_attention(const fastqkv_args *a, char *msg, size_t n)
{
    char f1[32];
    if (msg && n)
        msg[0] = 0;
    if (!a)
        return fail(msg, n, FASTQKV_EVALUE, "args must not be NULL");
    if (a->struct_size != (int64_t)sizeof(fastqkv_args))
        return fail(msg, n, FASTQKV_EVALUE,
                    "struct_size must be %d (sizeof(fastqkv_args) of C API version %d), got %lld: "
                    "rebuild the caller against this fastqkv",
                    (int)sizeof(fastqkv_args), FASTQKV_API_VERSION, (long long)a->struct_size);
    const int64_t dt = a->dtype;
    if (dt < FQ_F32 || dt > FQ_BF16)
        return fail(msg, n, FASTQKV_ETYPE,
                    "dtype must be FASTQKV_F32, FASTQKV_F64, FASTQKV_F16 or FASTQKV_BF16 "
                    "(float32, float64, float16 or bfloat16), got %lld", (long long)dt);
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, Lq = a->Lq, Lk = a->Lk, D = a->D, Dv = a->Dv;
    const int64_t sizes[5] = {B, Hq, Hkv, Lq, Lk};
    static const char *const size_names[5] = {"B", "Hq", "Hkv", "Lq", "Lk"};
    for (int i = 0; i < 5; i++)
        if (sizes[i] < 0)
            return fail(msg, n, FASTQKV_EVALUE, "%s must be >= 0, got %lld", size_names[i],
                        (long long)sizes[i]);
    if (D < 1)
        return fail(msg, n, FASTQKV_EVALUE, "q and k must have a head dim > 0, got %lld", (long long)D);
    if (Dv < 1)
        return fail(msg, n, FASTQKV_EVALUE, "v must have a head dim > 0, got %lld", (long long)Dv);
    if ((Hkv == 0 && Hq != 0) || (Hkv && Hq % Hkv))
        return fail(msg, n, FASTQKV_EVALUE,
                    "the number of query heads (%lld) must be a multiple of the number of "
                    "key/value heads (%lld)", (long long)Hq, (long long)Hkv);

    /* the four (B, H, L, D) views; element sizes are powers of two, so
     * alignment is tested with masks (a division costs more than all the
     * checks of a call together) */
    const size_t item = dt == FQ_F64 ? 8 : dt == FQ_F32 ? 4 : 2;
    const size_t acc = dt == FQ_F64 ? 8 : 4;
    const int64_t *strides[4] = {a->q_strides, a->k_strides, a->v_strides, a->out_strides};
    const void *ptrs[4] = {a->q, a->k, a->v, a->out};
    const int64_t last[4] = {D, D, Dv, Dv};
    /* q and out are read and written when there are rows, k and v when
     * there are also keys; only views holding elements need a unit stride */
    const int have_rows = B && Hq && Lq, have_keys = have_rows && Lk;
    for (int i = 0; i < 4; i++) {
        const int used = i == 1 || i == 2 ? have_keys : have_rows;
        if (!ptrs[i] && used)
            return fail(msg, n, FASTQKV_EVALUE, "%s must not be NULL", ARR4[i]);
        if ((uintptr_t)ptrs[i] & (item - 1))
            return fail(msg, n, FASTQKV_EVALUE, "%s must be aligned to its element size (%d bytes)",
                        ARR4[i], (int)item);
        for (int d = 0; d < 4; d++)
            if (strides[i][d] > STRIDE_MAX || strides[i][d] < -STRIDE_MAX)
                return fail(msg, n, FASTQKV_EVALUE, "%s_strides[%d] is out of range, got %lld",
                            ARR4[i], d, (long long)strides[i][d]);
        if (used && last[i] > 1 && strides[i][3] != 1)
            return fail(msg, n, FASTQKV_EVALUE,
                        "%s must have a unit last stride (%s_strides[3] = 1), got %lld",
                        ARR4[i], ARR4[i], (long long)strides[i][3]);
    }
    if ((uintptr_t)a->lse & (acc - 1))
        return fail(msg, n, FASTQKV_EVALUE, "lse must be aligned to its element size (%d bytes)", (int)acc);

    /* scalar options, as fastqkv._validate.check_attention */
    if (a->causal != 0 && a->causal != 1)
        return fail(msg, n, FASTQKV_EVALUE, "causal must be 0 or 1 (False or True), got %lld",
                    (long long)a->causal);
    if (isinf(a->scale))
        return fail(msg, n, FASTQKV_EVALUE, "scale must be finite, got %s", pyfloat(a->scale, f1));
    const double softcap = a->softcap;
    if (!isfinite(softcap))
        return fail(msg, n, FASTQKV_EVALUE, "softcap must be finite, got %s", pyfloat(softcap, f1));
    if (softcap < 0)
        return fail(msg, n, FASTQKV_EVALUE, "softcap must be > 0, got %s", pyfloat(softcap, f1));
    if (a->window_left < -1)
        return fail(msg, n, FASTQKV_EVALUE, "window[0] (left) must be >= -1, got %lld",
                    (long long)a->window_left);
    if (a->window_right < -1)
        return fail(msg, n, FASTQKV_EVALUE, "window[1] (right) must be >= -1, got %lld",
                    (long long)a->window_right);
    if (a->num_threads < 1)
        return fail(msg, n, FASTQKV_EVALUE, "num_threads must be >= 1, got %lld",
                    (long long)a->num_threads);

    /* score options: mask and bias walked through their strides */
    const int score_opts = a->mask || a->bias || a->alibi_slopes || softcap != 0;
    if (score_opts && dt >= FQ_F16)
        return fail(msg, n, FASTQKV_EVALUE,
                    "score options (mask, bias, alibi_slopes, softcap) need float32 or float64 "
                    "storage in the C API");
    for (int d = 0; d < 4; d++) {
        if (a->mask && (a->mask_strides[d] > STRIDE_MAX || a->mask_strides[d] < -STRIDE_MAX))
            return fail(msg, n, FASTQKV_EVALUE, "mask_strides[%d] is out of range, got %lld", d,
                        (long long)a->mask_strides[d]);
        if (a->bias && (a->bias_strides[d] > STRIDE_MAX || a->bias_strides[d] < -STRIDE_MAX))
            return fail(msg, n, FASTQKV_EVALUE, "bias_strides[%d] is out of range, got %lld", d,
                        (long long)a->bias_strides[d]);
    }
    if ((uintptr_t)a->bias & (acc - 1))
        return fail(msg, n, FASTQKV_EVALUE, "bias must be aligned to its element size (%d bytes)", (int)acc);
    if (a->key_lens) {
        if ((uintptr_t)a->key_lens & (sizeof(int64_t) - 1))
            return fail(msg, n, FASTQKV_EVALUE, "key_lens must be aligned to its element size (8 bytes)");
        int64_t lo = 0, hi = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t x = a->key_lens[b];
            lo = b == 0 || x < lo ? x : lo;
            hi = b == 0 || x > hi ? x : hi;
        }
        if (B && (lo < 0 || hi > Lk))
            return fail(msg, n, FASTQKV_EVALUE, "key_lens must lie in [0, Lk=%lld], got values in [%lld, %lld]",
                        (long long)Lk, (long long)lo, (long long)hi);
    }
    /* alibi_slopes (B, Hq) finite; sinks (Hq,) finite or -inf */
    const void *vecs[2] = {a->alibi_slopes, a->sinks};
    static const char *const vec_names[2] = {"alibi_slopes", "sinks"};
    for (int i = 0; i < 2; i++) {
        if (!vecs[i])
            continue;
        if ((uintptr_t)vecs[i] & (acc - 1))
            return fail(msg, n, FASTQKV_EVALUE, "%s must be aligned to its element size (%d bytes)",
                        vec_names[i], (int)acc);
        const int64_t len = i == 0 ? B * Hq : Hq;
        for (int64_t j = 0; j < len; j++) {
            double x = acc == 8 ? ((const double *)vecs[i])[j] : ((const float *)vecs[i])[j];
            if (i == 0 && !isfinite(x))
                return fail(msg, n, FASTQKV_EVALUE, "alibi_slopes must be finite");
            if (i == 1 && (isnan(x) || x == INFINITY))
                return fail(msg, n, FASTQKV_EVALUE,
                            "sinks must be finite (or -inf for a head without a sink), got NaN or +inf");
        }
    }

    const fq_isa *isa = fq_current_isa();
    if (!isa)
        return fail(msg, n, FASTQKV_EISA, "%s", fq_isa_error());
    if (!have_rows)
        return FASTQKV_OK;

    if (Lk == 0) {
        /* no keys: out = 0, lse = -inf or the head's sink */
        char *out = (char *)a->out;
        const int64_t *so = a->out_strides;
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hq; h++)
                for (int64_t i = 0; i < Lq; i++)
                    memset(out + (b * so[0] + h * so[1] + i * so[2]) * (int64_t)item, 0, (size_t)Dv * item);
        if (a->lse)
            for (int64_t r = 0; r < B * Hq * Lq; r++) {
                int64_t h = r / Lq % Hq;
                if (acc == 8)
                    ((double *)a->lse)[r] = a->sinks ? ((const double *)a->sinks)[h] : -INFINITY;
                else
                    ((float *)a->lse)[r] = a->sinks ? ((const float *)a->sinks)[h] : -INFINITY;
            }
        return FASTQKV_OK;
    }

    fq_problem p;
    memset(&p, 0, sizeof p);
    p.dtype = (int)dt;
    /* fastqkv._problem._route: score options tile, half storage streams,
     * else decode steps stream */
    p.stream_maxq = fq_stream_maxq();
    p.route = score_opts ? FQ_ROUTE_TILE : dt >= FQ_F16 ? FQ_ROUTE_STREAM :
              Lq <= p.stream_maxq ? FQ_ROUTE_STREAM : FQ_ROUTE_TILE;
    p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.G = Hq / Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D; p.Dv = Dv;
    p.q = (const char *)a->q; p.k = (const char *)a->k; p.v = (const char *)a->v;
    p.out = (char *)a->out;
    for (int d = 0; d < 3; d++) {
        p.sq[d] = a->q_strides[d] * (int64_t)item;
        p.sk[d] = a->k_strides[d] * (int64_t)item;
        p.sv[d] = a->v_strides[d] * (int64_t)item;
        p.so[d] = a->out_strides[d] * (int64_t)item;
    }
    p.lse = (char *)a->lse;
    if (a->mask) {
        p.mask = a->mask;
        for (int d = 0; d < 4; d++)
            p.sm[d] = a->mask_strides[d];
    }
    if (a->bias) {
        p.bias = (const char *)a->bias;
        for (int d = 0; d < 4; d++)
            p.sb[d] = a->bias_strides[d] * (int64_t)acc;
        if (Lk == 1)
            p.sb[3] = (int64_t)acc;
    }
    p.key_lens = a->key_lens;
    p.alibi = (const char *)a->alibi_slopes;
    p.sinks = (const char *)a->sinks;
    p.scale = isnan(a->scale) ? 1.0 / sqrt((double)D) : a->scale;
    p.softcap = softcap;
    p.wl = a->window_left >= WINDOW_UNBOUNDED ? -1 : a->window_left;
    p.wr = a->causal ? 0 : a->window_right >= WINDOW_UNBOUNDED ? -1 : a->window_right;

    /* the driver caps the thread count; only the narrowing to int is done here */
    int st = fq_run(&p, isa, a->num_threads > INT_MAX ? INT_MAX : (int)a->num_threads);
    switch (st) {
    case FQ_OK:
        return FASTQKV_OK;
    case FQ_ENOMEM:
        return fail(msg, n, FASTQKV_ENOMEM, "out of memory for the kernel's scratch");
    case FQ_EINTR:
        return fail(msg, n, FASTQKV_EINTR, "interrupted (fastqkv's abort flag is set); out holds partial results");
    default:
        return fail(msg, n, FASTQKV_EISA, "the %s kernels cannot run this problem (status %d)", isa->name, st);
    }
}
