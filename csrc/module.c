/* CPython glue of fastqkv._ckernels: argument checks that protect memory
 * (types, dims, dtypes, shapes, strides, key_lens range, the scales of
 * quantized K/V, a route the problem can take), then the whole computation with the GIL released;
 * status codes become exceptions.  The route (which kernel runs the call) is
 * the Python planner's; this file does not choose it.  The ISA variant is
 * chosen once at import (cpuid + xgetbv, or $FASTQKV_ISA). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <string.h>

#include "fastqkv.h"
#define FASTQKV_NO_IMPORT
#include "fastqkv/fastqkv_api.h"

static const fq_isa *const compiled_isas[] = {
#if FQ_HAVE_AVX512
    &fq_isa_avx512,
#endif
#if FQ_HAVE_AVX2
    &fq_isa_avx2,
#endif
    &fq_isa_generic,
};
#define N_COMPILED ((int)(sizeof(compiled_isas) / sizeof(compiled_isas[0])))
static const char *const known_isas[] = {"generic", "avx2", "avx512"};

static const fq_isa *current_isa = NULL;
static char isa_error[512];
/* fastqkv._config.STREAM_MAX_LQ, read at import */
static int64_t stream_maxq;

const fq_isa *fq_current_isa(void) { return current_isa; }

const char *fq_isa_error(void) { return isa_error[0] ? isa_error : "no usable ISA variant"; }

int64_t fq_stream_maxq(void) { return stream_maxq; }

static int cpu_supports(const char *name)
{
    if (!strcmp(name, "generic"))
        return 1;
    if (!strcmp(name, "avx2"))
        return fq_cpu_has_avx2_fma();
    if (!strcmp(name, "avx512"))
        return fq_cpu_has_avx512();
    return 0;
}

/* NULL and a message in `err` when `name` cannot be used here */
static const fq_isa *find_isa(const char *name, char *err, size_t errlen)
{
    int known = 0;
    for (size_t i = 0; i < sizeof(known_isas) / sizeof(known_isas[0]); i++)
        known |= !strcmp(name, known_isas[i]);
    if (!known) {
        snprintf(err, errlen, "unknown ISA %.64s (known: generic, avx2, avx512)", name);
        return NULL;
    }
    const fq_isa *found = NULL;
    for (int i = 0; i < N_COMPILED; i++)
        if (!strcmp(compiled_isas[i]->name, name))
            found = compiled_isas[i];
    if (!found) {
        snprintf(err, errlen, "ISA %.64s was not compiled into this build", name);
        return NULL;
    }
    if (!cpu_supports(name)) {
        snprintf(err, errlen, "ISA %.64s is not supported by this CPU/OS", name);
        return NULL;
    }
    return found;
}

static void select_isa(void)
{
    const char *env = getenv("FASTQKV_ISA");
    isa_error[0] = 0;
    if (env && env[0]) {
        char err[256];
        current_isa = find_isa(env, err, sizeof err);
        if (!current_isa)
            snprintf(isa_error, sizeof isa_error, "$FASTQKV_ISA=%.64s: %s", env, err);
        return;
    }
    for (int i = 0; i < N_COMPILED; i++)
        if (cpu_supports(compiled_isas[i]->name)) {
            current_isa = compiled_isas[i];
            return;
        }
}

/* ---- argument checks ---------------------------------------------------- */

/* whether an array's dtype is a user dtype (ml_dtypes') of that itemsize
 * and type name */
static int user_dtype(PyArrayObject *a, npy_intp itemsize, const char *want)
{
    PyArray_Descr *d = PyArray_DESCR(a);
    if (PyArray_TYPE(a) < NPY_USERDEF || PyArray_ITEMSIZE(a) != itemsize || !d->typeobj)
        return 0;
    const char *name = ((PyTypeObject *)d->typeobj)->tp_name;
    const char *dot = strrchr(name, '.');
    return !strcmp(dot ? dot + 1 : name, want);
}

/* FQ_* storage dtype of an array, -1 if unsupported; bfloat16 is the
 * ml_dtypes type (a user dtype: itemsize 2, named "bfloat16") */
static int storage_dtype(PyArrayObject *a)
{
    int tn = PyArray_TYPE(a);
    if (tn == NPY_FLOAT32)
        return FQ_F32;
    if (tn == NPY_FLOAT64)
        return FQ_F64;
    if (tn == NPY_FLOAT16)
        return FQ_F16;
    return user_dtype(a, 2, "bfloat16") ? FQ_BF16 : -1;
}

/* FQ_I8, FQ_E4M3 or FQ_E5M2 for quantized K/V storage (float8: the
 * ml_dtypes types, itemsize 1), else -1 */
static int quant_dtype(PyArrayObject *a)
{
    if (PyArray_TYPE(a) == NPY_INT8)
        return FQ_I8;
    if (user_dtype(a, 1, "float8_e4m3fn"))
        return FQ_E4M3;
    return user_dtype(a, 1, "float8_e5m2") ? FQ_E5M2 : -1;
}

static PyArrayObject *as_arr(PyObject *o, const char *name)
{
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray", name);
        return NULL;
    }
    return (PyArrayObject *)o;
}

/* a float 4-D view the kernel walks: dtype, unit last stride, element strides */
static int check_view(PyArrayObject *a, const char *name, int typenum, int ndim)
{
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s has the wrong dtype", name);
        return -1;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D", name, ndim);
        return -1;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned", name);
        return -1;
    }
    npy_intp item = PyArray_ITEMSIZE(a);
    for (int d = 0; d < ndim; d++) {
        if (PyArray_DIM(a, d) > 1 && PyArray_STRIDE(a, d) % item) {
            PyErr_Format(PyExc_ValueError, "%s strides must be whole elements", name);
            return -1;
        }
    }
    return 0;
}

static int same_shape(PyArrayObject *a, const char *name, const npy_intp *shape, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (PyArray_DIM(a, d) != shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s has the wrong shape", name);
            return -1;
        }
    return 0;
}

static int unit_last(PyArrayObject *a, const char *name)
{
    int nd = PyArray_NDIM(a);
    if (PyArray_DIM(a, nd - 1) > 1 && PyArray_STRIDE(a, nd - 1) != PyArray_ITEMSIZE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must have a unit last stride", name);
        return -1;
    }
    return 0;
}

static int64_t last_stride(PyArrayObject *a)
{
    /* a last dim of size 1 may carry any stride; the kernel steps by elements */
    return PyArray_ITEMSIZE(a);
}

/* attention(q, k, v, out, lse, mask, bias, key_lens, alibi, sinks,
 *           scale, softcap, window_left, window_right, num_threads, route
 *           [, block_table, block_size [, k_scale, v_scale]]) */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 16 && nargs != 18 && nargs != 20) {
        PyErr_SetString(PyExc_TypeError, "attention() takes 16, 18 or 20 positional arguments");
        return NULL;
    }
    if (!current_isa) {
        PyErr_SetString(PyExc_RuntimeError, fq_isa_error());
        return NULL;
    }
    PyArrayObject *q = as_arr(args[0], "q"), *k, *v, *out, *lse = NULL, *mask = NULL, *bias = NULL,
                  *kl = NULL, *alibi = NULL, *sinks = NULL, *bt = NULL, *ksc = NULL, *vsc = NULL;
    if (!q || !(k = as_arr(args[1], "k")) || !(v = as_arr(args[2], "v")) || !(out = as_arr(args[3], "out")))
        return NULL;
    if (args[4] != Py_None && !(lse = as_arr(args[4], "lse")))
        return NULL;
    if (args[5] != Py_None && !(mask = as_arr(args[5], "mask")))
        return NULL;
    if (args[6] != Py_None && !(bias = as_arr(args[6], "bias")))
        return NULL;
    if (args[7] != Py_None && !(kl = as_arr(args[7], "key_lens")))
        return NULL;
    if (args[8] != Py_None && !(alibi = as_arr(args[8], "alibi")))
        return NULL;
    if (args[9] != Py_None && !(sinks = as_arr(args[9], "sinks")))
        return NULL;
    double scale = PyFloat_AsDouble(args[10]);
    double softcap = PyFloat_AsDouble(args[11]);
    long long wl = PyLong_AsLongLong(args[12]);
    long long wr = PyLong_AsLongLong(args[13]);
    long nthreads = PyLong_AsLong(args[14]);
    long route = PyLong_AsLong(args[15]);
    long long bsize = 0;
    if (nargs >= 18 && args[16] != Py_None) {
        if (!(bt = as_arr(args[16], "block_table")))
            return NULL;
        bsize = PyLong_AsLongLong(args[17]);
    }
    if (nargs == 20 && args[18] != Py_None && !(ksc = as_arr(args[18], "k_scale")))
        return NULL;
    if (nargs == 20 && args[19] != Py_None && !(vsc = as_arr(args[19], "v_scale")))
        return NULL;
    if (PyErr_Occurred())
        return NULL;
    if (route != FQ_ROUTE_TILE && route != FQ_ROUTE_STREAM) {
        PyErr_SetString(PyExc_ValueError, "route must be 0 (tiled) or 1 (streaming)");
        return NULL;
    }

    int tn = PyArray_TYPE(q);
    int dt = storage_dtype(q);
    if (dt < 0) {
        PyErr_SetString(PyExc_TypeError, "the c backend computes float16, bfloat16, float32 and float64 only");
        return NULL;
    }
    /* lse, bias, alibi and sinks are in the accumulation dtype */
    int acc_tn = dt == FQ_F64 ? NPY_FLOAT64 : NPY_FLOAT32;
    /* quantized K/V: one dtype for k and v, float32 q and out, and scales */
    const int qkv = quant_dtype(k);
    const int ktn = qkv >= 0 ? PyArray_TYPE(k) : tn;
    if (qkv >= 0 && dt != FQ_F32) {
        PyErr_SetString(PyExc_TypeError, "quantized k and v need float32 q and out");
        return NULL;
    }
    if (check_view(q, "q", tn, 4) || check_view(k, "k", ktn, 4) || check_view(v, "v", ktn, 4) ||
        check_view(out, "out", tn, 4) || unit_last(q, "q") || unit_last(k, "k") ||
        unit_last(v, "v") || unit_last(out, "out"))
        return NULL;
    PyArray_Descr *kd = qkv >= 0 ? PyArray_DESCR(k) : PyArray_DESCR(q);
    if (PyArray_DESCR(k) != kd && !PyArray_EquivTypes(PyArray_DESCR(k), kd)) {
        PyErr_SetString(PyExc_TypeError, "k has the wrong dtype");
        return NULL;
    }
    if (!PyArray_EquivTypes(PyArray_DESCR(v), kd)) {
        PyErr_SetString(PyExc_TypeError, "v must have the dtype of k");
        return NULL;
    }
    if (!PyArray_EquivTypes(PyArray_DESCR(out), PyArray_DESCR(q))) {
        PyErr_SetString(PyExc_TypeError, "out must have the dtype of q");
        return NULL;
    }
    if ((qkv >= 0) != (ksc != NULL) || (qkv >= 0) != (vsc != NULL)) {
        PyErr_SetString(PyExc_TypeError, qkv >= 0 ? "quantized k and v need k_scale and v_scale"
                                                  : "k_scale and v_scale are for quantized k and v only");
        return NULL;
    }
    if (!PyArray_ISWRITEABLE(out)) {
        PyErr_SetString(PyExc_ValueError, "out must be writeable");
        return NULL;
    }
    npy_intp B = PyArray_DIM(q, 0), Hq = PyArray_DIM(q, 1), Lq = PyArray_DIM(q, 2), D = PyArray_DIM(q, 3);
    npy_intp Hkv, Lk, Dv = PyArray_DIM(v, 3);
    npy_intp nblocks = 0, btcols = 0;
    if (bt) {
        /* paged: k/v are caches (num_blocks, block_size, Hkv, D) */
        nblocks = PyArray_DIM(k, 0);
        Hkv = PyArray_DIM(k, 2);
        npy_intp kshape[4] = {nblocks, bsize, Hkv, D}, vshape[4] = {nblocks, bsize, Hkv, Dv};
        if (bsize < 1 || same_shape(k, "k cache", kshape, 4) || same_shape(v, "v cache", vshape, 4)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "block_size must be >= 1");
            return NULL;
        }
        if (PyArray_TYPE(bt) != NPY_INT64 || PyArray_NDIM(bt) != 2 || PyArray_DIM(bt, 0) != B ||
            !PyArray_IS_C_CONTIGUOUS(bt) || !PyArray_ISALIGNED(bt)) {
            PyErr_SetString(PyExc_ValueError, "block_table must be a C-contiguous int64 array of shape (B, max_blocks)");
            return NULL;
        }
        btcols = PyArray_DIM(bt, 1);
        Lk = btcols * bsize;
        npy_intp sshape[3] = {nblocks, bsize, Hkv};
        if (ksc && (check_view(ksc, "k_scale", NPY_FLOAT32, 3) || same_shape(ksc, "k_scale", sshape, 3) ||
                    check_view(vsc, "v_scale", NPY_FLOAT32, 3) || same_shape(vsc, "v_scale", sshape, 3)))
            return NULL;
        if (!kl) {
            PyErr_SetString(PyExc_ValueError, "a paged call needs key_lens (the sequence lengths)");
            return NULL;
        }
    } else {
        Hkv = PyArray_DIM(k, 1);
        Lk = PyArray_DIM(k, 2);
        npy_intp kshape[4] = {B, Hkv, Lk, D}, vshape[4] = {B, Hkv, Lk, Dv};
        if (same_shape(k, "k", kshape, 4) || same_shape(v, "v", vshape, 4))
            return NULL;
        npy_intp sshape[3] = {B, Hkv, Lk};
        if (ksc && (check_view(ksc, "k_scale", NPY_FLOAT32, 3) || same_shape(ksc, "k_scale", sshape, 3) ||
                    check_view(vsc, "v_scale", NPY_FLOAT32, 3) || same_shape(vsc, "v_scale", sshape, 3)))
            return NULL;
    }
    npy_intp oshape[4] = {B, Hq, Lq, Dv};
    if (same_shape(out, "out", oshape, 4))
        return NULL;
    if (D < 1 || Dv < 1 || Hkv < 1 || Hq % Hkv) {
        PyErr_SetString(PyExc_ValueError, "bad head dims or head counts");
        return NULL;
    }
    npy_intp full[4] = {B, Hq, Lq, Lk};
    if (lse) {
        npy_intp lshape[3] = {B, Hq, Lq};
        if (check_view(lse, "lse", acc_tn, 3) || same_shape(lse, "lse", lshape, 3))
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(lse) || !PyArray_ISWRITEABLE(lse)) {
            PyErr_SetString(PyExc_ValueError, "lse must be C-contiguous and writeable");
            return NULL;
        }
    }
    if (mask) {
        if (PyArray_TYPE(mask) != NPY_BOOL || PyArray_NDIM(mask) != 4) {
            PyErr_SetString(PyExc_TypeError, "mask must be a 4-D bool array");
            return NULL;
        }
        if (same_shape(mask, "mask", full, 4))
            return NULL;
    }
    if (bias && (check_view(bias, "bias", acc_tn, 4) || same_shape(bias, "bias", full, 4)))
        return NULL;
    if (alibi) {
        npy_intp ashape[2] = {B, Hq};
        if (check_view(alibi, "alibi", acc_tn, 2) || same_shape(alibi, "alibi", ashape, 2))
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(alibi)) {
            PyErr_SetString(PyExc_ValueError, "alibi must be C-contiguous");
            return NULL;
        }
    }
    if (sinks) {
        npy_intp sshape[1] = {Hq};
        if (check_view(sinks, "sinks", acc_tn, 1) || same_shape(sinks, "sinks", sshape, 1))
            return NULL;
        if (!PyArray_IS_C_CONTIGUOUS(sinks)) {
            PyErr_SetString(PyExc_ValueError, "sinks must be C-contiguous");
            return NULL;
        }
    }
    if (kl) {
        if (PyArray_TYPE(kl) != NPY_INT64 || PyArray_NDIM(kl) != 1 || PyArray_DIM(kl, 0) != B ||
            !PyArray_IS_C_CONTIGUOUS(kl)) {
            PyErr_SetString(PyExc_ValueError, "key_lens must be a contiguous int64 array of shape (B,)");
            return NULL;
        }
        const int64_t *lens = (const int64_t *)PyArray_DATA(kl);
        for (npy_intp b = 0; b < B; b++)
            if (lens[b] < 0 || lens[b] > Lk || (bt && lens[b] > 0 && nblocks == 0)) {
                PyErr_SetString(PyExc_ValueError, "key_lens values must lie in [0, Lk]");
                return NULL;
            }
    }
    if (wl < -1 || wr < -1) {
        PyErr_SetString(PyExc_ValueError, "window bounds must be >= -1");
        return NULL;
    }
    if (B == 0 || Hq == 0 || Lq == 0)
        Py_RETURN_NONE;

    fq_problem p;
    memset(&p, 0, sizeof p);
    p.dtype = qkv >= 0 ? qkv : dt;
    p.route = (int)route;
    p.stream_maxq = stream_maxq;
    p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.G = Hq / Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D; p.Dv = Dv;
    p.q = PyArray_BYTES(q); p.k = PyArray_BYTES(k); p.v = PyArray_BYTES(v); p.out = PyArray_BYTES(out);
    for (int d = 0; d < 3; d++) {
        p.sq[d] = PyArray_STRIDE(q, d);
        p.sk[d] = PyArray_STRIDE(k, d);
        p.sv[d] = PyArray_STRIDE(v, d);
        p.so[d] = PyArray_STRIDE(out, d);
    }
    if (bt) {
        /* (block, head, position) strides */
        p.sk[1] = PyArray_STRIDE(k, 2); p.sk[2] = PyArray_STRIDE(k, 1);
        p.sv[1] = PyArray_STRIDE(v, 2); p.sv[2] = PyArray_STRIDE(v, 1);
        p.block_table = (const int64_t *)PyArray_DATA(bt);
        p.bt_cols = btcols;
        p.block_size = bsize;
    }
    if (ksc) {
        /* (batch, head, position) strides; paged scales are (block, position, head) */
        const int hd = bt ? 2 : 1, ps = bt ? 1 : 2;
        p.ks = PyArray_BYTES(ksc);
        p.vs = PyArray_BYTES(vsc);
        p.sks[0] = PyArray_STRIDE(ksc, 0); p.sks[1] = PyArray_STRIDE(ksc, hd); p.sks[2] = PyArray_STRIDE(ksc, ps);
        p.svs[0] = PyArray_STRIDE(vsc, 0); p.svs[1] = PyArray_STRIDE(vsc, hd); p.svs[2] = PyArray_STRIDE(vsc, ps);
    }
    p.lse = lse ? PyArray_BYTES(lse) : NULL;
    if (mask) {
        p.mask = (const unsigned char *)PyArray_BYTES(mask);
        for (int d = 0; d < 4; d++)
            p.sm[d] = PyArray_STRIDE(mask, d);
    }
    if (bias) {
        p.bias = PyArray_BYTES(bias);
        for (int d = 0; d < 4; d++)
            p.sb[d] = PyArray_STRIDE(bias, d);
        if (Lk == 1)
            p.sb[3] = last_stride(bias);
    }
    p.key_lens = kl ? (const int64_t *)PyArray_DATA(kl) : NULL;
    p.alibi = alibi ? PyArray_BYTES(alibi) : NULL;
    p.sinks = sinks ? PyArray_BYTES(sinks) : NULL;
    p.scale = scale; p.softcap = softcap; p.wl = wl; p.wr = wr;

    if (Lk == 0) {
        PyErr_SetString(PyExc_ValueError, "Lk must be > 0 (the wrapper handles Lk == 0)");
        return NULL;
    }
    /* the tiled kernel reads dense float32/float64 only; the streaming
     * kernel reads no mask or bias and applies no softcap or ALiBi */
    if (route == FQ_ROUTE_TILE && (dt >= FQ_F16 || qkv >= 0 || bt)) {
        PyErr_SetString(PyExc_ValueError,
                        "the tiled route takes no float16/bfloat16 storage, quantized K/V or paged cache");
        return NULL;
    }
    if (route == FQ_ROUTE_STREAM && (mask || bias || alibi || softcap != 0)) {
        PyErr_SetString(PyExc_ValueError, "the streaming route takes no mask, bias, softcap or ALiBi");
        return NULL;
    }
    const fq_isa *isa = current_isa;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = fq_run(&p, isa, (int)nthreads);
    Py_END_ALLOW_THREADS
    if (st == FQ_ENOMEM)
        return PyErr_NoMemory();
    if (st == FQ_EINTR) {
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    }
    if (st) {
        PyErr_Format(PyExc_RuntimeError, "fastqkv kernel failed with status %d", st);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    if (!current_isa)
        Py_RETURN_NONE;
    return PyUnicode_FromString(current_isa->name);
}

static PyObject *py_isa_error(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    if (current_isa || !isa_error[0])
        Py_RETURN_NONE;
    return PyUnicode_FromString(isa_error);
}

static PyObject *py_isa_compiled(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    PyObject *t = PyTuple_New(N_COMPILED);
    if (!t)
        return NULL;
    for (int i = 0; i < N_COMPILED; i++)
        PyTuple_SET_ITEM(t, i, PyUnicode_FromString(compiled_isas[N_COMPILED - 1 - i]->name));
    return t;
}

static PyObject *py_isa_supported(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    PyObject *l = PyList_New(0);
    for (size_t i = 0; l && i < sizeof(known_isas) / sizeof(known_isas[0]); i++)
        if (cpu_supports(known_isas[i])) {
            PyObject *s = PyUnicode_FromString(known_isas[i]);
            if (!s || PyList_Append(l, s)) {
                Py_XDECREF(s);
                Py_DECREF(l);
                return NULL;
            }
            Py_DECREF(s);
        }
    return l;
}

/* set_isa(name): use variant `name` from now on (None = automatic choice);
 * returns the previous name (or None).  Not thread-safe against running calls
 * on other threads; meant for tests and benchmarks. */
static PyObject *py_set_isa(PyObject *self, PyObject *arg)
{
    (void)self;
    PyObject *prev = current_isa ? PyUnicode_FromString(current_isa->name) : (Py_INCREF(Py_None), Py_None);
    if (!prev)
        return NULL;
    if (arg == Py_None) {
        current_isa = NULL;
        for (int i = 0; i < N_COMPILED; i++)
            if (cpu_supports(compiled_isas[i]->name)) {
                current_isa = compiled_isas[i];
                break;
            }
        isa_error[0] = 0;
        return prev;
    }
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) {
        Py_DECREF(prev);
        return NULL;
    }
    char err[256];
    const fq_isa *isa = find_isa(name, err, sizeof err);
    if (!isa) {
        Py_DECREF(prev);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    current_isa = isa;
    isa_error[0] = 0;
    return prev;
}

/* vexp(x, y): y = the kernels' vector exp of x (1-D contiguous float32/64) */
static PyObject *py_vexp(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "vexp(x, y)");
        return NULL;
    }
    PyArrayObject *x = as_arr(args[0], "x"), *y;
    if (!x || !(y = as_arr(args[1], "y")))
        return NULL;
    int tn = PyArray_TYPE(x);
    if ((tn != NPY_FLOAT32 && tn != NPY_FLOAT64) || PyArray_TYPE(y) != tn || PyArray_NDIM(x) != 1 ||
        PyArray_NDIM(y) != 1 || PyArray_DIM(x, 0) != PyArray_DIM(y, 0) ||
        !PyArray_IS_C_CONTIGUOUS(x) || !PyArray_IS_C_CONTIGUOUS(y) || !PyArray_ISWRITEABLE(y)) {
        PyErr_SetString(PyExc_ValueError, "x, y must be 1-D contiguous float32/float64 of one shape");
        return NULL;
    }
    if (!current_isa) {
        PyErr_SetString(PyExc_RuntimeError, isa_error);
        return NULL;
    }
    const fq_kfuncs *kf = tn == NPY_FLOAT64 ? &current_isa->f64 : &current_isa->f32;
    kf->vexp(PyArray_DATA(x), PyArray_DATA(y), PyArray_DIM(x, 0));
    Py_RETURN_NONE;
}

static PyObject *py_set_tiles(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_tiles(rows, kt); 0 = tuned default");
        return NULL;
    }
    long rows = PyLong_AsLong(args[0]), kt = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    fq_set_tiles((int)rows, (int)kt);
    Py_RETURN_NONE;
}

static PyObject *py_interruptible(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    fq_interruptible();
    Py_RETURN_NONE;
}

static PyObject *py_abort(PyObject *self, PyObject *arg)
{
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    fq_abort(on);
    Py_RETURN_NONE;
}

static PyObject *py_set_splits(PyObject *self, PyObject *arg)
{
    (void)self;
    long splits = PyLong_AsLong(arg);
    if (splits == -1 && PyErr_Occurred())
        return NULL;
    fq_set_splits((int)(splits > INT_MAX ? INT_MAX : splits));
    Py_RETURN_NONE;
}

/* read_sum(x, nthreads): the sum of a 1-D contiguous float32 array read by
 * nthreads threads, GIL released (the benchmarks' read bandwidth probe) */
static PyObject *py_read_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read_sum(x, nthreads)");
        return NULL;
    }
    PyArrayObject *x = as_arr(args[0], "x");
    if (!x)
        return NULL;
    if (PyArray_TYPE(x) != NPY_FLOAT32 || PyArray_NDIM(x) != 1 || !PyArray_IS_C_CONTIGUOUS(x)) {
        PyErr_SetString(PyExc_ValueError, "x must be a 1-D contiguous float32 array");
        return NULL;
    }
    long nt = PyLong_AsLong(args[1]);
    if (nt == -1 && PyErr_Occurred())
        return NULL;
    double s;
    Py_BEGIN_ALLOW_THREADS
    /* fq_read_sum clamps the thread count; only the narrowing to int is done here */
    s = fq_read_sum((const float *)PyArray_DATA(x), (size_t)PyArray_DIM(x, 0), (int)(nt < 1 ? 1 : nt > INT_MAX ? INT_MAX : nt));
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(s);
}

static PyMethodDef methods[] = {
    {"interruptible", py_interruptible, METH_NOARGS,
     "interruptible(): abort(True) stops the calls this thread makes from now on"},
    {"abort", py_abort, METH_O,
     "abort(on): the interruptible thread's running call stops between work items "
     "(KeyboardInterrupt) while on"},
    {"set_splits", py_set_splits, METH_O,
     "set_splits(n): test hook; key splits of streaming calls, 0 = automatic"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL,
     "attention(q, k, v, out, lse, mask, bias, key_lens, alibi, sinks, scale, softcap, "
     "window_left, window_right, num_threads, route[, block_table, block_size[, k_scale, "
     "v_scale]]): fill out (and lse) of a validated problem on route 0 (tiled) or 1 "
     "(streaming); sinks: None or a C-contiguous (Hq,) array in the accumulation dtype; "
     "k_scale/v_scale: float32 (B, Hkv, Lk) or, paged, (num_blocks, block_size, Hkv) "
     "scales of int8/float8 k and v (streaming route)"},
    {"isa", py_isa, METH_NOARGS, "the ISA variant in use (None if $FASTQKV_ISA is unusable)"},
    {"isa_error", py_isa_error, METH_NOARGS, "why no ISA variant is usable, or None"},
    {"isa_compiled", py_isa_compiled, METH_NOARGS, "ISA variants compiled into this build"},
    {"isa_supported", py_isa_supported, METH_NOARGS, "ISA variants this CPU/OS can run"},
    {"set_isa", py_set_isa, METH_O, "set_isa(name | None) -> previous name"},
    {"vexp", (PyCFunction)(void (*)(void))py_vexp, METH_FASTCALL, "vexp(x, y): test hook"},
    {"read_sum", (PyCFunction)(void (*)(void))py_read_sum, METH_FASTCALL,
     "read_sum(x, nthreads): sum of a 1-D float32 array on nthreads threads (bandwidth probe)"},
    {"set_tiles", (PyCFunction)(void (*)(void))py_set_tiles, METH_FASTCALL,
     "set_tiles(rows, kt): override tile sizes for tuning (0 = default)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "fastqkv._ckernels",
    "Fused tiled attention kernels (C, per-ISA variants chosen at import).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* the decode-step threshold has its one home in fastqkv._config */
static int read_stream_maxq(void)
{
    PyObject *cfg = PyImport_ImportModule("fastqkv._config");
    if (!cfg)
        return -1;
    PyObject *n = PyObject_GetAttrString(cfg, "STREAM_MAX_LQ");
    Py_DECREF(cfg);
    if (!n)
        return -1;
    long long v = PyLong_AsLongLong(n);
    Py_DECREF(n);
    if (v == -1 && PyErr_Occurred())
        return -1;
    stream_maxq = v;
    return 0;
}

/* the C API table (fastqkv/include/fastqkv/fastqkv_api.h), exported as the
 * capsule _C_API */
static const fastqkv_api c_api = {
    FASTQKV_API_VERSION, (int64_t)sizeof(fastqkv_api), fq_version, fastqkv_attention,
};

PyMODINIT_FUNC PyInit__ckernels(void)
{
    import_array();
    if (read_stream_maxq())
        return NULL;
    select_isa();
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    PyObject *cap = PyCapsule_New((void *)&c_api, "fastqkv._ckernels._C_API", NULL);
    if (!cap || PyModule_AddObject(m, "_C_API", cap)) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
