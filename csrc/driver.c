/* The portable framework: tile sizes, work items, tile skipping order and the
 * persistent thread pool.  No SIMD here; the per-ISA kernels do the math.
 *
 * Work item = (batch, KV-head group, query tile).  Items are handed out
 * dynamically (one atomic counter) in order of decreasing query tile, so with
 * causal attention the most expensive tiles start first and the cheap ones
 * fill the gaps (longest-processing-time order).  Each thread owns its output
 * rows and its scratch, allocated once and grown only when a call needs more,
 * so a steady loop does not allocate.  Small problems run on the calling
 * thread with no hand-off.  Every thread of a call reads the call's abort
 * flag before taking an item (Ctrl-C: fq_interruptible, fq_abort). */
#include "fastqkv.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define FQ_MAX_THREADS 256
/* below this many multiply-adds the calling thread does everything: waking
 * a worker costs more (docs/tuning.md) */
#define FQ_SERIAL_FLOPS (1 << 21)
/* a thread that waits (a worker for the next job, the caller for the
 * workers) first spins this many pause instructions before sleeping on a
 * condition variable: back-to-back calls skip the futex wake-up */
#define FQ_SPIN 2000
#define FQ_PACK_PANELS 16        /* panels per item of the packing pass */
/* the packing pass keeps a K^T copy of up to this many bytes (kept between
 * calls); larger problems pack per item instead */
#define FQ_PACK_MAX_BYTES ((size_t)256 << 20)

typedef struct {
    const fq_problem *p;
    const fq_kfuncs *kf;
    int pack;           /* 1: the packing pass, 0: attention items */
    int stream;         /* items of the streaming kernel */
    int64_t nsplit, chunk;
    char *part;         /* nsplit > 1: row partials */
    size_t pstride;     /* bytes between the partials of consecutive splits */
    void *own_scratch;  /* non-NULL: a call outside the pool, on one thread */
    int64_t nitems, nqt, BH, pchunks;
    const int *abort;   /* read (atomic) before each item; nonzero: stop */
    int64_t next;       /* atomic */
    int status;         /* atomic, first error wins */
} fq_job;

static struct {
    pthread_mutex_t call_lock;   /* one call uses the pool at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    int nstarted;                /* worker threads alive (thread 0 is the caller) */
    unsigned long gen;
    int nactive;                 /* threads taking part in the current job */
    int pending;                 /* workers still busy with the current job */
    fq_job *job;
    fq_scratch scratch[FQ_MAX_THREADS];
    fq_scratch kpack, vbad;      /* the packing pass's output, grown on demand */
    fq_scratch part;             /* split-KV partials of pool calls */
    unsigned long start_gen[FQ_MAX_THREADS];
    int tile_rows, tile_kt;      /* overrides for tuning, 0 = ISA default */
    int stream_splits;           /* test hook, 0 = automatic */
} pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
    PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
    0, 0, 0, 0, NULL, {{0, 0}}, {0, 0}, {0, 0}, {0, 0}, {0}, 0, 0, 0,
};

/* the abort flag of calls made by the interruptible thread; other threads'
 * calls read one that stays zero */
static int abort_flag, abort_never;
static pthread_t abort_thread;
static int abort_thread_set;

void fq_interruptible(void)
{
    abort_thread = pthread_self();
    __atomic_store_n(&abort_thread_set, 1, __ATOMIC_RELEASE);
}

void fq_abort(int on) { __atomic_store_n(&abort_flag, on != 0, __ATOMIC_RELAXED); }

static const int *job_abort(void)
{
    return __atomic_load_n(&abort_thread_set, __ATOMIC_ACQUIRE) &&
           pthread_equal(pthread_self(), abort_thread) ? &abort_flag : &abort_never;
}

static void set_status(fq_job *job, int st)
{
    int zero = 0;
    __atomic_compare_exchange_n(&job->status, &zero, st, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static void run_items(fq_job *job, int tid)
{
    void *scratch = job->own_scratch ? job->own_scratch : pool.scratch[tid].buf;
    for (;;) {
        if (__atomic_load_n(job->abort, __ATOMIC_RELAXED)) {
            set_status(job, FQ_EINTR);
            break;
        }
        int64_t it = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (it >= job->nitems)
            break;
        if (job->pack) {
            int64_t bg = it / job->pchunks, c = it % job->pchunks;
            int64_t pn0 = c * FQ_PACK_PANELS, pn1 = pn0 + FQ_PACK_PANELS;
            job->kf->pack(job->p, bg, pn0, pn1 < job->p->npan ? pn1 : job->p->npan);
            continue;
        }
        int st;
        if (job->stream) {
            int64_t sp = it % job->nsplit, rest = it / job->nsplit;
            int64_t qtile = job->nqt - 1 - rest / job->BH;
            int64_t bg = rest % job->BH, hg = job->p->Hkv / job->p->hpi;
            int64_t b = bg / hg, g = bg % hg * job->p->hpi;
            int64_t j0 = sp * job->chunk, j1 = j0 + job->chunk < job->p->Lk ? j0 + job->chunk : job->p->Lk;
            st = job->kf->sitem(job->p, b, g, qtile * job->p->qt, j0, j1, scratch,
                                job->part ? job->part + (size_t)sp * job->pstride : NULL);
        } else {
            int64_t qtile = job->nqt - 1 - it / job->BH;
            int64_t bg = it % job->BH;
            int64_t b = bg / job->p->Hkv, g = bg % job->p->Hkv;
            st = job->kf->item(job->p, b, g, qtile * job->p->qt, scratch);
        }
        if (st)
            set_status(job, st);
    }
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void *worker(void *arg)
{
    int tid = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    unsigned long seen = pool.start_gen[tid];
    for (;;) {
        pthread_mutex_unlock(&pool.mu);
        for (int s = 0; s < FQ_SPIN && __atomic_load_n(&pool.gen, __ATOMIC_ACQUIRE) == seen; s++)
            cpu_relax();
        pthread_mutex_lock(&pool.mu);
        while (pool.gen == seen)
            pthread_cond_wait(&pool.cv_work, &pool.mu);
        seen = pool.gen;
        if (tid >= pool.nactive)
            continue;
        fq_job *job = pool.job;
        pthread_mutex_unlock(&pool.mu);
        run_items(job, tid);
        pthread_mutex_lock(&pool.mu);
        if (__atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE) == 0)
            pthread_cond_signal(&pool.cv_done);
    }
    return NULL;
}

/* after fork() only the calling thread exists in the child */
static void atfork_child(void)
{
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv_work, NULL);
    pthread_cond_init(&pool.cv_done, NULL);
    pool.nstarted = 0;
    pool.pending = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

/* start workers 1..n-1; returns how many threads are usable */
static int ensure_workers(int n)
{
    pthread_once(&atfork_once, register_atfork);
    while (pool.nstarted + 1 < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int tid = pool.nstarted + 1;
        /* the generation before the worker's first job */
        pool.start_gen[tid] = pool.gen;
        int rc = pthread_create(&th, &attr, worker, (void *)(intptr_t)tid);
        pthread_attr_destroy(&attr);
        if (rc)
            break;
        pool.nstarted++;
    }
    return pool.nstarted + 1 < n ? pool.nstarted + 1 : n;
}

/* scratch of calls that run on their own thread without the pool (single
 * threaded, or the pool is busy with another Python thread's call): one per
 * calling thread, freed when that thread exits */
static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;
static int tls_ok;

static void tls_free(void *ptr)
{
    fq_scratch *s = (fq_scratch *)ptr;
    free(s->buf);
    free(s);
}

static void tls_init(void) { tls_ok = pthread_key_create(&tls_key, tls_free) == 0; }

static fq_scratch *tls_scratch(void)
{
    pthread_once(&tls_once, tls_init);
    if (!tls_ok)
        return NULL;
    fq_scratch *s = (fq_scratch *)pthread_getspecific(tls_key);
    if (!s) {
        s = (fq_scratch *)calloc(1, sizeof *s);
        if (s && pthread_setspecific(tls_key, s)) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

static int ensure_buf(fq_scratch *s, size_t bytes)
{
    if (s->cap >= bytes)
        return 0;
    void *nb = NULL;
    size_t cap = bytes + bytes / 4;
    if (posix_memalign(&nb, 64, cap))
        return -1;
    free(s->buf);
    s->buf = nb;
    s->cap = cap;
    return 0;
}

/* run every item of `job` on threads 0..n-1 (the caller is thread 0) */
static void run_job(fq_job *job, int n)
{
    if (n <= 1) {
        run_items(job, 0);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.job = job;
    pool.nactive = n;
    pool.pending = n - 1;
    __atomic_store_n(&pool.gen, pool.gen + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.cv_work);
    pthread_mutex_unlock(&pool.mu);
    run_items(job, 0);
    for (int s = 0; s < FQ_SPIN && __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; s++)
        cpu_relax();
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0)
        pthread_cond_wait(&pool.cv_done, &pool.mu);
    pool.job = NULL;
    pthread_mutex_unlock(&pool.mu);
}

int fq_set_tiles(int rows, int kt)
{
    pool.tile_rows = rows > 0 ? rows : 0;
    pool.tile_kt = kt > 0 ? kt : 0;
    return 0;
}

int fq_set_splits(int splits)
{
    pool.stream_splits = splits > 0 ? splits : 0;
    return 0;
}

/* rows per streaming item beyond a decode step (whose query positions all go
 * in one item, so each K/V byte is read once per group) */
#define FQ_STREAM_ROWS 64
/* a split covers at least this many keys (the merge and the item's set-up
 * stay negligible) */
#define FQ_MIN_CHUNK 512

/* with call_lock held: start workers and size their scratch; returns how
 * many threads can take part (0: no memory even for the caller) */
static int pool_threads(int nthreads, size_t bytes)
{
    nthreads = ensure_workers(nthreads);
    for (int t = 0; t < nthreads; t++)
        if (ensure_buf(&pool.scratch[t], bytes))
            return t;
    return nthreads;
}

static size_t rup64(size_t x) { return (x + 63) & ~(size_t)63; }

static int run_stream(fq_problem *p, const fq_kfuncs *kf, int nthreads)
{
    int64_t qt = p->Lq <= p->stream_maxq ? p->Lq : FQ_STREAM_ROWS / p->G;
    if (qt < 1)
        qt = 1;
    if (qt > p->Lq)
        qt = p->Lq;
    p->qt = qt;
    /* a paged cache keeps every KV head of a token in one row: one item
     * reads all heads, so the block is read front to back */
    p->hpi = p->block_table ? p->Hkv : 1;
    double work = (double)p->B * p->Hq * p->Lq * (double)p->Lk * (double)(p->D + p->Dv);
    if (work < FQ_SERIAL_FLOPS)
        nthreads = 1;
    fq_job job;
    memset(&job, 0, sizeof job);
    job.p = p;
    job.kf = kf;
    job.abort = job_abort();
    job.stream = 1;
    job.nqt = (p->Lq + qt - 1) / qt;
    job.BH = p->B * (p->Hkv / p->hpi);
    int64_t items0 = job.nqt * job.BH;

    /* split-KV: enough items of similar size for the threads (ragged
     * key_lens included: the key axis is cut in chunks of one length) */
    int64_t nsplit = 1;
    if (pool.stream_splits) {
        nsplit = pool.stream_splits;
    } else if (nthreads > 1) {
        double total = 0;
        for (int64_t b = 0; b < p->B; b++)
            total += (double)(p->key_lens ? p->key_lens[b] : p->Lk);
        total *= (double)(p->Hkv / p->hpi * job.nqt);
        double chunk = total / (8.0 * nthreads);
        if (chunk < FQ_MIN_CHUNK)
            chunk = FQ_MIN_CHUNK;
        int64_t c = ((int64_t)chunk + 63) / 64 * 64;
        nsplit = (p->Lk + c - 1) / c;
    }
    if (nsplit > FQ_MAX_SPLITS)
        nsplit = FQ_MAX_SPLITS;
    if (nsplit > p->Lk)
        nsplit = p->Lk;
    if (nsplit < 1)
        nsplit = 1;
    job.nsplit = nsplit;
    job.chunk = (p->Lk + nsplit - 1) / nsplit;
    job.nitems = items0 * nsplit;
    p->psplit = nsplit;
    if (job.nitems < nthreads)
        nthreads = (int)job.nitems;

    size_t elt = p->dtype == FQ_F64 ? 8 : 4;
    job.pstride = (size_t)(p->Dv + 2) * elt;
    size_t pbytes = nsplit > 1 ? (size_t)(p->B * p->Hq * p->Lq) * (size_t)nsplit * job.pstride : 0;
    size_t bytes = rup64(kf->sscratch(p));

    if (nthreads == 1 || pthread_mutex_trylock(&pool.call_lock) != 0) {
        fq_scratch *s = tls_scratch();
        if (!s || ensure_buf(s, bytes + pbytes))
            return FQ_ENOMEM;
        job.own_scratch = s->buf;
        job.part = pbytes ? (char *)s->buf + bytes : NULL;
        run_items(&job, 0);
        if (!job.status && job.part)
            kf->smerge(p, job.part, nsplit, 0, p->B * p->Hq * p->Lq);
        return job.status;
    }
    nthreads = pool_threads(nthreads, bytes);
    if (!nthreads) {
        pthread_mutex_unlock(&pool.call_lock);
        return FQ_ENOMEM;
    }
    if (pbytes) {
        if (ensure_buf(&pool.part, pbytes)) {
            pthread_mutex_unlock(&pool.call_lock);
            return FQ_ENOMEM;
        }
        job.part = (char *)pool.part.buf;
    }
    run_job(&job, nthreads);
    if (!job.status && job.part)
        kf->smerge(p, job.part, nsplit, 0, p->B * p->Hq * p->Lq);
    pthread_mutex_unlock(&pool.call_lock);
    return job.status;
}

int fq_run(const fq_problem *p0, const fq_isa *isa, int nthreads)
{
    fq_problem p = *p0;
    if (p.dtype < FQ_F32 || p.dtype > FQ_E5M2)
        return FQ_EINVAL;
    const fq_kfuncs *kf = p.dtype >= FQ_I8 ? &isa->quant[p.dtype - FQ_I8] : p.dtype == FQ_F64 ? &isa->f64 :
                          p.dtype == FQ_F16 ? &isa->f16 : p.dtype == FQ_BF16 ? &isa->bf16 : &isa->f32;
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > FQ_MAX_THREADS)
        nthreads = FQ_MAX_THREADS;
    /* the route was chosen by the planner and checked against the problem
     * by module.c */
    if (p.route == FQ_ROUTE_STREAM)
        return kf->sitem ? run_stream(&p, kf, nthreads) : FQ_EINVAL;
    if (!kf->item)
        return FQ_EINVAL;

    /* tiles: rows = G*qt near the tuned target, kt a multiple of NR */
    int64_t rows = pool.tile_rows ? pool.tile_rows : isa->rows;
    int64_t kt = pool.tile_kt ? pool.tile_kt : isa->kt;
    kt = (kt + kf->nr - 1) / kf->nr * kf->nr;
    int64_t maxk = (p.Lk + kf->nr - 1) / kf->nr * kf->nr;
    if (kt > maxk)
        kt = maxk;
    int64_t qt = rows / p.G;
    if (qt < 1)
        qt = 1;
    if (qt > p.Lq)
        qt = p.Lq;
    double work = (double)p.B * p.Hq * p.Lq * (double)p.Lk * (double)(p.D + p.Dv);
    if (work < FQ_SERIAL_FLOPS)
        nthreads = 1;
    /* enough items to balance (also when another process takes a core for a
     * while): at least 8 per thread where tiles allow */
    while (nthreads > 1 && qt > 8 && p.B * p.Hkv * ((p.Lq + qt - 1) / qt) < 8 * nthreads)
        qt = (qt + 1) / 2;
    p.qt = qt;
    p.kt = kt;

    fq_job job;
    memset(&job, 0, sizeof job);
    job.p = &p;
    job.kf = kf;
    job.abort = job_abort();
    job.nqt = (p.Lq + qt - 1) / qt;
    job.BH = p.B * p.Hkv;
    job.nitems = job.nqt * job.BH;
    if (job.nitems < nthreads)
        nthreads = (int)job.nitems;

    size_t bytes = kf->scratch_bytes(&p);
    /* the pool serves one call at a time; a single-threaded call, or any call
     * made while another Python thread holds the pool, runs on its own
     * thread with thread-local scratch (never waiting for the other call) */
    if (nthreads == 1 || pthread_mutex_trylock(&pool.call_lock) != 0) {
        fq_scratch *s = tls_scratch();
        if (!s || ensure_buf(s, bytes))
            return FQ_ENOMEM;
        job.own_scratch = s->buf;
        run_items(&job, 0);
        return job.status;
    }
    nthreads = pool_threads(nthreads, bytes);
    if (!nthreads) {
        pthread_mutex_unlock(&pool.call_lock);
        return FQ_ENOMEM;
    }
    /* several query tiles per group: pack K^T once for all of them */
    if (job.nqt > 1) {
        int64_t npan = (p.Lk + kf->nr - 1) / kf->nr;
        size_t elt = p.dtype == FQ_F64 ? 8 : 4;
        size_t kb = (size_t)(job.BH * npan * kf->nr * p.D) * elt;
        if (kb <= FQ_PACK_MAX_BYTES && !ensure_buf(&pool.kpack, kb) &&
            !ensure_buf(&pool.vbad, (size_t)(job.BH * npan))) {
            p.kpack = pool.kpack.buf;
            p.vbad = pool.vbad.buf;
            p.npan = npan;
            fq_job pj = job;
            pj.pack = 1;
            pj.pchunks = (npan + FQ_PACK_PANELS - 1) / FQ_PACK_PANELS;
            pj.nitems = job.BH * pj.pchunks;
            run_job(&pj, nthreads);
        }
    }
    /* an aborted packing pass leaves the flag set: this job stops at once */
    run_job(&job, nthreads);
    pthread_mutex_unlock(&pool.call_lock);
    return job.status;
}

/* ---- machine limit for the benchmarks ------------------------------------
 * The read bandwidth: nthreads threads each sum a contiguous part of n
 * floats with 4 independent vector accumulators (memory bound on any x86-64
 * with SSE2), the way a decode step streams its K/V cache, and prefetch
 * FQ_PROBE_PF floats ahead as the decode kernels do: without it the probe
 * reads less than a decode kernel and is not the limit (docs/tuning.md). */
#define FQ_PROBE_PF 2048
typedef float fq_v4 __attribute__((vector_size(16)));
typedef float fq_v4u __attribute__((vector_size(16), aligned(4), may_alias));
typedef struct { const float *p; size_t n; double sum; } fq_sumpart;

static void *sum_part(void *arg)
{
    fq_sumpart *sp = (fq_sumpart *)arg;
    const float *p = sp->p;
    size_t i = 0, n = sp->n;
    fq_v4 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (; i + 16 <= n; i += 16) {
        __builtin_prefetch(p + i + FQ_PROBE_PF, 0, 3);
        a0 += *(const fq_v4u *)(p + i);
        a1 += *(const fq_v4u *)(p + i + 4);
        a2 += *(const fq_v4u *)(p + i + 8);
        a3 += *(const fq_v4u *)(p + i + 12);
    }
    fq_v4 a = (a0 + a1) + (a2 + a3);
    double s = (double)a[0] + a[1] + a[2] + a[3];
    for (; i < n; i++)
        s += p[i];
    sp->sum = s;
    return NULL;
}

double fq_read_sum(const float *p, size_t n, int nthreads)
{
    fq_sumpart parts[FQ_MAX_THREADS];
    pthread_t th[FQ_MAX_THREADS];
    int started[FQ_MAX_THREADS];
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > FQ_MAX_THREADS)
        nthreads = FQ_MAX_THREADS;
    size_t per = (n / (size_t)nthreads + 15) / 16 * 16;
    for (int t = 0; t < nthreads; t++) {
        size_t a = per * (size_t)t < n ? per * (size_t)t : n;
        size_t b = a + per < n ? a + per : n;
        parts[t].p = p + a;
        parts[t].n = b - a;
        parts[t].sum = 0;
    }
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&th[t], NULL, sum_part, &parts[t]) == 0;
    sum_part(&parts[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            sum_part(&parts[t]);   /* no thread: the caller sums it */
    }
    double s = 0;
    for (int t = 0; t < nthreads; t++)
        s += parts[t].sum;
    return s;
}
