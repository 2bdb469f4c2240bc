/* fastqkv C API: the public header for C, C++ and Cython code that calls
 * fastqkv's attention kernel without Python in the loop.
 *
 *     #include <Python.h>                 (first, in an extension module)
 *     #include <fastqkv/fastqkv_api.h>    (directory: fastqkv.get_include())
 *
 *     in the module's init:   if (import_fastqkv() < 0) return NULL;
 *     anywhere after, without the GIL:
 *         fastqkv_args a = {0};  a.struct_size = sizeof a;  ... fill ...
 *         char msg[256];
 *         int st = fastqkv_API->attention(&a, msg, sizeof msg);
 *
 * The table lives in the capsule fastqkv._ckernels._C_API.  Plain C code that
 * only needs the types includes this header without Python.h (the import part
 * is compiled only after Python.h, and never with FASTQKV_NO_IMPORT defined).
 * Semantics are those of fastqkv.attention (fastqkv.reference's docstring);
 * README.md, "Embedding fastqkv", has an example. */
#ifndef FASTQKV_API_H
#define FASTQKV_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* the ABI version a caller is built against; import_fastqkv refuses a
 * fastqkv whose table has another one */
#ifndef FASTQKV_API_VERSION
#define FASTQKV_API_VERSION 1
#endif

/* storage dtype of q, k, v and out */
enum { FASTQKV_F32 = 0, FASTQKV_F64 = 1, FASTQKV_F16 = 2, FASTQKV_BF16 = 3 };

/* status codes of fastqkv_api.attention */
enum {
    FASTQKV_OK = 0,
    FASTQKV_ENOMEM = 1,   /* no memory for the kernel's scratch */
    FASTQKV_EISA = 2,     /* no usable ISA variant ($FASTQKV_ISA names an unusable one) */
    FASTQKV_EVALUE = 3,   /* a bad size, range or option (Python: ValueError) */
    FASTQKV_EINTR = 4,    /* stopped by fastqkv's Ctrl-C flag; out holds partial results */
    FASTQKV_ETYPE = 5     /* a bad dtype or kind of argument (Python: TypeError) */
};

/* One attention call.  Every field is 8 bytes wide (int64_t, double or a
 * pointer), in this order, so that callers without C structs (Numba) can
 * fill it as an int64 array of FASTQKV_ARGS_WORDS words (doubles stored by
 * their bits).  Strides count ELEMENTS (of the array's own dtype), not bytes;
 * 0 is a broadcast axis.  Fields left 0 by `fastqkv_args a = {0}` are the
 * defaults (NULL = no such option), except scale (NaN for the default),
 * window_left and window_right (-1 = unbounded) and num_threads (>= 1). */
typedef struct fastqkv_args {
    int64_t struct_size;          /* sizeof(fastqkv_args) of the caller: 8 * FASTQKV_ARGS_WORDS */
    int64_t dtype;                /* FASTQKV_F32/F64/F16/BF16: storage of q, k, v and out */
    int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
    const void *q;   int64_t q_strides[4];    /* (B, Hq, Lq, D); D stride 1 (or D == 1) */
    const void *k;   int64_t k_strides[4];    /* (B, Hkv, Lk, D) */
    const void *v;   int64_t v_strides[4];    /* (B, Hkv, Lk, Dv) */
    void *out;       int64_t out_strides[4];  /* (B, Hq, Lq, Dv), storage dtype */
    void *lse;                                /* NULL or C-contiguous (B, Hq, Lq) in the accumulation
                                               * dtype (double for F64, else float) */
    const uint8_t *mask; int64_t mask_strides[4];  /* NULL or bool bytes (B, Hq, Lq, Lk);
                                                    * nonzero = attend */
    const void *bias;    int64_t bias_strides[4];  /* NULL or (B, Hq, Lq, Lk), accumulation dtype */
    const int64_t *key_lens;      /* NULL or (B,) within [0, Lk] */
    const void *alibi_slopes;     /* NULL or C-contiguous (B, Hq), accumulation dtype, finite */
    const void *sinks;            /* NULL or C-contiguous (Hq,), accumulation dtype, finite or -inf */
    double scale;                 /* NaN = default 1/sqrt(D) */
    double softcap;               /* 0 = off, else > 0 and finite */
    int64_t causal;               /* 0 or 1 (bottom-right) */
    int64_t window_left, window_right;   /* -1 = unbounded */
    int64_t num_threads;          /* >= 1; 1 runs on the calling thread (no pool) */
} fastqkv_args;

#define FASTQKV_ARGS_WORDS 49     /* = sizeof(fastqkv_args) / 8 */

typedef struct fastqkv_api {
    int64_t abi_version;          /* FASTQKV_API_VERSION of the fastqkv that made the table */
    int64_t size;                 /* sizeof(fastqkv_api) */
    const char *(*version)(void); /* fastqkv's version string */
    /* checks every argument (on failure a message naming the argument is
     * written into message[0..message_size), NUL-terminated; on success
     * message[0] = 0) and runs the kernel; touches no Python object and does
     * not need the GIL; safe from several threads at once */
    int (*attention)(const fastqkv_args *args, char *message, size_t message_size);
} fastqkv_api;

#if defined(Py_PYTHON_H) && !defined(FASTQKV_NO_IMPORT)
/* the table, set by import_fastqkv (one copy per translation unit, as
 * NumPy's PyArray_API without PY_ARRAY_UNIQUE_SYMBOL) */
static const fastqkv_api *fastqkv_API = NULL;

/* imports the table from fastqkv._ckernels; 0, or -1 with a Python
 * exception set (ImportError when the ABI versions differ) */
static int import_fastqkv(void)
{
    const fastqkv_api *api =
        (const fastqkv_api *)PyCapsule_Import("fastqkv._ckernels._C_API", 0);
    if (api == NULL)
        return -1;
    if (api->abi_version != FASTQKV_API_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "fastqkv C API version %lld, this module was built against version %lld: "
                     "rebuild it against this fastqkv",
                     (long long)api->abi_version, (long long)FASTQKV_API_VERSION);
        return -1;
    }
    if (api->size < (int64_t)sizeof(fastqkv_api)) {
        PyErr_Format(PyExc_ImportError,
                     "fastqkv C API table of %lld bytes, this module needs %lld: "
                     "rebuild it against this fastqkv",
                     (long long)api->size, (long long)sizeof(fastqkv_api));
        return -1;
    }
    fastqkv_API = api;
    return 0;
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* FASTQKV_API_H */
