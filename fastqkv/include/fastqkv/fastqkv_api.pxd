# Cython declarations of fastqkv's C API: the names of fastqkv_api.h (beside
# this file).  Build with include_dirs=[fastqkv.get_include()], then
#
#     from fastqkv.fastqkv_api cimport *       (or cimport the names you use)
#     import_fastqkv()                          (once, at module import)
#     with nogil:
#         st = fastqkv_API.attention(&args, msg, sizeof(msg))

from libc.stdint cimport int64_t, uint8_t

cdef extern from "fastqkv/fastqkv_api.h" nogil:
    enum: FASTQKV_API_VERSION
    enum: FASTQKV_ARGS_WORDS

    enum:
        FASTQKV_F32
        FASTQKV_F64
        FASTQKV_F16
        FASTQKV_BF16

    enum:
        FASTQKV_OK
        FASTQKV_ENOMEM
        FASTQKV_EISA
        FASTQKV_EVALUE
        FASTQKV_EINTR
        FASTQKV_ETYPE

    ctypedef struct fastqkv_args:
        int64_t struct_size
        int64_t dtype
        int64_t B, Hq, Hkv, Lq, Lk, D, Dv
        const void *q
        int64_t q_strides[4]
        const void *k
        int64_t k_strides[4]
        const void *v
        int64_t v_strides[4]
        void *out
        int64_t out_strides[4]
        void *lse
        const uint8_t *mask
        int64_t mask_strides[4]
        const void *bias
        int64_t bias_strides[4]
        const int64_t *key_lens
        const void *alibi_slopes
        const void *sinks
        double scale
        double softcap
        int64_t causal
        int64_t window_left, window_right
        int64_t num_threads

    ctypedef struct fastqkv_api:
        int64_t abi_version
        int64_t size
        const char *(*version)() noexcept nogil
        int (*attention)(const fastqkv_args *args, char *message, size_t message_size) noexcept nogil

    const fastqkv_api *fastqkv_API

    int import_fastqkv() except -1 with gil
