/* fastqkv C backend: the problem description shared by module.c, capi.c,
 * driver.c and the per-ISA kernels.  The Python wrapper validates every
 * argument and chooses the kernel (the route); module.c re-checks only what
 * protects memory.  capi.c, the C API's entry point, has no wrapper before
 * it: it checks every argument and chooses the route itself.  The driver and
 * the kernels trust both. */
#ifndef FASTQKV_H
#define FASTQKV_H

#include <stddef.h>
#include <stdint.h>

enum { FQ_F32 = 0, FQ_F64 = 1, FQ_F16 = 2, FQ_BF16 = 3,
       /* quantized K/V (one byte per value, float32 scales per key) with
        * float32 q and out: the streaming kernel only */
       FQ_I8 = 4, FQ_E4M3 = 5, FQ_E5M2 = 6 };

/* the kernel that runs a call, chosen by the Python planner (Problem.route):
 * the tiled kernel (float32/float64, dense, every score option) or the
 * streaming kernel (any storage dtype, dense or paged, no score options) */
enum { FQ_ROUTE_TILE = 0, FQ_ROUTE_STREAM = 1 };

/* status codes returned by fq_run (never printed, never exit()) */
enum { FQ_OK = 0, FQ_ENOMEM = 1, FQ_EISA = 2, FQ_EINVAL = 3,
       FQ_EINTR = 4 /* aborted through fq_abort: out holds partial results */ };

/* most splits of the key axis per decode row (the merge weighs the partials
 * of a row in an array of this size) */
#define FQ_MAX_SPLITS 256

typedef struct fq_problem {
    int dtype;                       /* FQ_F32, FQ_F64 (storage = accumulation), FQ_F16
                                      * or FQ_BF16 (accumulated in float32); FQ_I8,
                                      * FQ_E4M3 or FQ_E5M2: the storage of k/v, with
                                      * q/out float32 */
    int route;                       /* FQ_ROUTE_TILE or FQ_ROUTE_STREAM */
    int64_t stream_maxq;             /* a streaming call of at most this many query
                                      * positions takes them all in one item
                                      * (fastqkv._config.STREAM_MAX_LQ) */
    int64_t B, Hq, Hkv, G, Lq, Lk, D, Dv;
    const char *q, *k, *v;           /* (B,H,L,D) views, byte strides, unit last stride */
    char *out;
    char *lse;                       /* NULL or contiguous (B,Hq,Lq) */
    int64_t sq[3], sk[3], sv[3], so[3];
    const unsigned char *mask;       /* NULL or bool (B,Hq,Lq,Lk), any strides */
    int64_t sm[4];
    const char *bias;                /* NULL or (B,Hq,Lq,Lk) in the dtype, any strides */
    int64_t sb[4];
    const int64_t *key_lens;         /* NULL or (B,) within [0, Lk] */
    const char *alibi;               /* NULL or contiguous (B,Hq) */
    const char *sinks;               /* NULL or contiguous (Hq,) in the accumulation dtype */
    double scale, softcap;           /* softcap 0 = off */
    int64_t wl, wr;                  /* window, -1 = unbounded; causal is wr = 0 */
    /* tiling, chosen by the driver */
    int64_t qt;                      /* query positions per work item (rows = G*qt) */
    int64_t kt;                      /* keys per tile, a multiple of the kernel's NR */
    /* K^T panels of every (batch, KV head) over the whole key axis, packed
     * once per call by the driver's first pass (NULL: each item packs) */
    void *kpack;
    unsigned char *vbad;             /* per panel: its V rows hold inf/NaN */
    int64_t npan;                    /* panels per (batch, KV head) */
    /* paged KV: k/v are caches (num_blocks, block_size, Hkv, D) with
     * sk/sv = (block, head, position) byte strides; key j of batch b is row
     * j % block_size of block block_table[b * bt_cols + j / block_size] */
    const int64_t *block_table;      /* NULL: dense */
    int64_t bt_cols, block_size;
    /* quantized K/V: float32 scales, key j of KV head g is k[j] * ks[j] and
     * v[j] * vs[j]; byte strides (batch, head, position), paged (block,
     * head, position-in-block) as sk/sv; any strides, 0 included.  Only the
     * scales of keys below key_lens are read */
    const char *ks, *vs;
    int64_t sks[3], svs[3];
    int64_t psplit;                  /* splits of the key axis (partials per row) */
    int64_t hpi;                     /* KV heads per streaming item (paged: all) */
} fq_problem;

/* Per-thread scratch, allocated once and grown on demand. */
typedef struct fq_scratch {
    void *buf;
    size_t cap;
} fq_scratch;

/* One dtype of one ISA variant. */
typedef struct fq_kfuncs {
    /* computes output rows of query positions [q0, q0+qt) of every query
     * head of KV group g of batch b */
    int (*item)(const fq_problem *p, int64_t b, int64_t g, int64_t q0, void *scratch);
    size_t (*scratch_bytes)(const fq_problem *p);
    /* first pass: K^T panels [pn0, pn1) of (batch, KV head) bg into p->kpack */
    void (*pack)(const fq_problem *p, int64_t bg, int64_t pn0, int64_t pn1);
    void (*vexp)(const void *x, void *y, int64_t n);   /* test hook for the vector exp */
    int nr;                          /* key-tile granularity (QK micro-kernel columns) */
    /* the streaming kernel (decode, paged, half storage): rows of query
     * positions [q0, q0+qt) of group g of batch b over keys [j0, j1); writes
     * out/lse, or (part != NULL) the row partials (O, m, l) of one split */
    int (*sitem)(const fq_problem *p, int64_t b, int64_t g, int64_t q0, int64_t j0, int64_t j1,
                 void *scratch, void *part);
    size_t (*sscratch)(const fq_problem *p);
    /* merges the psplit partials of flat rows [r0, r1) into out/lse */
    void (*smerge)(const fq_problem *p, const void *part, int64_t nsplit, int64_t r0, int64_t r1);
} fq_kfuncs;

typedef struct fq_isa {
    const char *name;
    fq_kfuncs f32, f64, f16, bf16;   /* f16/bf16: streaming kernel only */
    const fq_kfuncs *quant;          /* [i]: dtype FQ_I8 + i (FQ_I8, FQ_E4M3, FQ_E5M2),
                                      * streaming kernel only */
    int rows;                        /* target rows per work item (tuned) */
    int kt;                          /* keys per tile (tuned) */
} fq_isa;

extern const fq_isa fq_isa_generic;
#if FQ_HAVE_AVX2
extern const fq_isa fq_isa_avx2;
#endif
#if FQ_HAVE_AVX512
extern const fq_isa fq_isa_avx512;
#endif

/* module.c: the ISA variant in use (NULL when none is usable, fq_isa_error
 * says why) and fastqkv._config.STREAM_MAX_LQ, both set at import */
const fq_isa *fq_current_isa(void);
const char *fq_isa_error(void);
int64_t fq_stream_maxq(void);

/* capi.c: the C API's entry point (fastqkv/include/fastqkv/fastqkv_api.h)
 * and fastqkv's version string */
struct fastqkv_args;
int fastqkv_attention(const struct fastqkv_args *args, char *message, size_t message_size);
const char *fq_version(void);

/* cpu_features.c */
int fq_cpu_has_avx2_fma(void);
int fq_cpu_has_avx512(void);

/* driver.c */
int fq_run(const fq_problem *p, const fq_isa *isa, int nthreads);
int fq_set_tiles(int rows, int kt);   /* 0 = the ISA's tuned default */
/* test hook: key splits of streaming calls, 0 = automatic, n > 0 = n */
int fq_set_splits(int splits);

/* Ctrl-C: fq_interruptible() marks the calling thread as the one whose
 * calls fq_abort(1) stops; its running call takes no further work item,
 * skips the split-KV merge and returns FQ_EINTR.  fq_abort(0) re-arms. */
void fq_interruptible(void);
void fq_abort(int on);

/* the benchmarks' read bandwidth probe: the sum of n floats on nthreads threads */
double fq_read_sum(const float *p, size_t n, int nthreads);

#endif
