/* A third-party C extension as tests/test_capi.py builds it: it includes
 * fastqkv's public header (fastqkv.get_include()), imports the C API table in
 * its init and fills a fastqkv_args from NumPy arrays.  The test builds it in
 * a temporary directory; nothing here belongs to fastqkv itself.
 *
 *   attention(dtype, q, k, v, out, lse, mask, bias, key_lens, alibi, sinks,
 *             scale, softcap, causal, window_left, window_right, num_threads
 *             [, struct_size, null_q]) -> None
 *
 * Arrays are 4-D (B, H, L, D) views (mask and bias broadcast to
 * (B, Hq, Lq, Lk)), or None; strides are passed in elements.  A failed call
 * raises ValueError (FASTQKV_EVALUE), TypeError (FASTQKV_ETYPE) or
 * RuntimeError with the entry's message; status() returns the last status. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <fastqkv/fastqkv_api.h>

static int last_status;

/* data pointer and element strides of an ndarray or None (right-aligned to 4 axes) */
static int view(PyObject *o, const char *name, const void **data, int64_t *strides, int64_t *shape)
{
    *data = NULL;
    if (o == Py_None)
        return 0;
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an ndarray or None", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    int nd = PyArray_NDIM(a);
    npy_intp item = PyArray_ITEMSIZE(a);
    *data = PyArray_DATA(a);
    for (int d = 0; d < nd && d < 4 && strides; d++) {
        strides[4 - nd + d] = PyArray_STRIDE(a, d) / item;
        if (shape)
            shape[4 - nd + d] = PyArray_DIM(a, d);
    }
    return 0;
}

static PyObject *attention(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *q, *k, *v, *out, *lse, *mask, *bias, *kl, *alibi, *sinks;
    long long dtype, causal, wl, wr, nthreads, struct_size = sizeof(fastqkv_args);
    int null_q = 0;
    double scale, softcap;
    if (!PyArg_ParseTuple(args, "LOOOOOOOOOOddLLLL|Lp", &dtype, &q, &k, &v, &out, &lse, &mask,
                          &bias, &kl, &alibi, &sinks, &scale, &softcap, &causal, &wl, &wr,
                          &nthreads, &struct_size, &null_q))
        return NULL;
    fastqkv_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = struct_size;
    a.dtype = dtype;
    int64_t qs[4] = {0}, ks[4] = {0}, vs[4] = {0};
    const void *p;
    if (view(q, "q", &a.q, a.q_strides, qs) || view(k, "k", &a.k, a.k_strides, ks) ||
        view(v, "v", &a.v, a.v_strides, vs) || view(out, "out", &p, a.out_strides, NULL))
        return NULL;
    a.out = (void *)p;
    if (view(lse, "lse", &p, NULL, NULL))
        return NULL;
    a.lse = (void *)p;
    if (view(mask, "mask", &p, a.mask_strides, NULL))
        return NULL;
    a.mask = (const uint8_t *)p;
    if (view(bias, "bias", &a.bias, a.bias_strides, NULL) || view(kl, "key_lens", &p, NULL, NULL) ||
        view(alibi, "alibi", &a.alibi_slopes, NULL, NULL) || view(sinks, "sinks", &a.sinks, NULL, NULL))
        return NULL;
    a.key_lens = (const int64_t *)p;
    a.B = qs[0]; a.Hq = qs[1]; a.Lq = qs[2]; a.D = qs[3];
    a.Hkv = ks[1]; a.Lk = ks[2]; a.Dv = vs[3];
    a.scale = scale;
    a.softcap = softcap;
    a.causal = causal;
    a.window_left = wl;
    a.window_right = wr;
    a.num_threads = nthreads;
    if (null_q)
        a.q = NULL;
    char msg[512];
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = fastqkv_API->attention(&a, msg, sizeof msg);
    Py_END_ALLOW_THREADS
    last_status = st;
    if (st == FASTQKV_OK)
        Py_RETURN_NONE;
    PyErr_SetString(st == FASTQKV_EVALUE ? PyExc_ValueError :
                    st == FASTQKV_ETYPE ? PyExc_TypeError : PyExc_RuntimeError, msg);
    return NULL;
}

static PyObject *status(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    return PyLong_FromLong(last_status);
}

static PyObject *version(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    return PyUnicode_FromString(fastqkv_API->version());
}

static PyMethodDef methods[] = {
    {"attention", attention, METH_VARARGS, "fastqkv_API->attention on NumPy arrays"},
    {"status", status, METH_NOARGS, "the status of the last call"},
    {"version", version, METH_NOARGS, "fastqkv_API->version()"},
    {NULL, NULL, 0, NULL},
};

/* the module's name is MODSYM, set by the build (one source, several modules) */
#define STR_(x) #x
#define STR(x) STR_(x)

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, STR(MODSYM), NULL, -1, methods, NULL, NULL, NULL, NULL,
};

#define INIT_NAME(n) PyInit_##n
#define INIT(n) INIT_NAME(n)

PyMODINIT_FUNC INIT(MODSYM)(void)
{
    import_array();
    if (import_fastqkv() < 0)
        return NULL;
    return PyModule_Create(&moddef);
}
