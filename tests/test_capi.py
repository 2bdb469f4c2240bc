"""The C API (fastqkv/include/fastqkv/fastqkv_api.h, the capsule
``fastqkv._ckernels._C_API``) as a third party uses it: a C extension
(tests/capi_caller.c) and a Cython module, each built once per session in a
temporary directory against ``fastqkv.get_include()``, run against the oracle;
bad arguments give the status and the message of fastqkv's own checks; a
caller built for another ABI version is refused at import."""

import concurrent.futures
import importlib.util
import os
import shutil
import sysconfig

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

pytestmark = [
    pytest.mark.skipif(not fastqkv.backends()["c"].available,
                       reason=f"c backend unavailable: {fastqkv.backends()['c'].reason}"),
    pytest.mark.skipif(shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None,
                       reason="no C compiler to build a caller of the C API"),
]

HERE = os.path.dirname(os.path.abspath(__file__))
# the header's codes
F32, F64, F16, BF16 = 0, 1, 2, 3
OK, EVALUE, ETYPE = 0, 3, 5
CODES = {"float32": F32, "float64": F64, "float16": F16, "bfloat16": BF16}
ARGS_BYTES = 49 * 8


def _build(tmp, name, source, macros=()):
    """Build extension ``name`` from ``source`` (.c or .pyx) in ``tmp``; return the module."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    ext = Extension(name, sources=[str(source)],
                    include_dirs=[np.get_include(), fastqkv.get_include()],
                    define_macros=[("MODSYM", name)] + list(macros),
                    extra_compile_args=["-O0", "-g0"])   # callers only: quick to compile
    if str(source).endswith(".pyx"):
        from Cython.Build import cythonize

        ext = cythonize([ext], include_path=[fastqkv.get_include()], quiet=True, force=True,
                        build_dir=str(tmp / "cython"), compiler_directives={"language_level": 3})[0]
    dist = Distribution({"ext_modules": [ext], "script_name": "setup.py"})
    cmd = build_ext(dist)
    cmd.build_lib = str(tmp / "lib")
    cmd.build_temp = str(tmp / "obj")
    cmd.ensure_finalized()
    cmd.run()
    path = cmd.get_ext_fullpath(name)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """The C caller, built against ABI version 1."""
    tmp = tmp_path_factory.mktemp("capi_c")
    src = tmp / "capi_caller.c"
    shutil.copy(os.path.join(HERE, "capi_caller.c"), src)
    return _build(tmp, "capi_caller", src)


# ---------------------------------------------------------------------------
# the caller against the oracle

def _acc(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _call(mod, case, out=None, num_threads=1, **raw):
    """Run ``case`` through the C caller; returns ``(out, lse)``.  ``raw``
    overrides the caller's arguments (dtype, struct_size, null_q, ...)."""
    q, k, v, kw = case.q, case.k, case.v, case.kwargs
    B, Hq, Lq, _ = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    acc = _acc(q.dtype)
    full = (B, Hq, Lq, Lk)
    if out is None:
        out = np.full((B, Hq, Lq, Dv), np.nan, q.dtype)
    lse = np.full((B, Hq, Lq), np.nan, acc)
    mask = None if kw.get("mask") is None else np.broadcast_to(kw["mask"], full)
    bias = None if kw.get("bias") is None else np.broadcast_to(kw["bias"].astype(acc), full)
    kl = None if kw.get("key_lens") is None else np.asarray(kw["key_lens"], np.int64)
    alibi = kw.get("alibi_slopes")
    if alibi is not None:
        alibi = np.ascontiguousarray(np.broadcast_to(alibi.astype(acc), (B, Hq)))
    sinks = None if kw.get("sinks") is None else np.ascontiguousarray(kw["sinks"], acc)
    window = kw.get("window") or (-1, -1)
    args = dict(dtype=CODES[q.dtype.name], scale=kw.get("scale", np.nan), softcap=kw.get("softcap") or 0.0,
                causal=int(kw.get("causal", False)), struct_size=ARGS_BYTES, null_q=False)
    args.update(raw)
    mod.attention(args["dtype"], q, k, v, out, lse, mask, bias, kl, alibi, sinks, args["scale"],
                  args["softcap"], args["causal"], window[0], window[1], num_threads,
                  args["struct_size"], args["null_q"])
    return out, lse


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _cases():
    """(name, dtype, (B, Hq, Hkv, Lq, Lk, D, Dv), strides, options) with
    options as functions of an rng (arrays drawn per case)."""
    return [
        ("f32-decode-gqa4", "float32", (2, 8, 2, 1, 37, 64, 64), "contiguous", {}),
        ("f32-decode-keylens-sinks", "float32", (3, 4, 1, 4, 50, 32, 32), "contiguous",
         dict(key_lens=lambda r: np.array([50, 0, 17]), sinks=lambda r: _rand(r, 4) * 2)),
        ("f32-prefill-causal-gqa4", "float32", (1, 8, 2, 40, 40, 32, 32), "contiguous",
         dict(causal=True)),
        ("f64-prefill-window", "float64", (2, 2, 2, 33, 50, 16, 24), "contiguous",
         dict(window=(5, 3))),
        ("f64-decode-causal-window-keylens", "float64", (2, 4, 4, 3, 20, 16, 16), "contiguous",
         dict(causal=True, window=(6, -1), key_lens=lambda r: np.array([20, 9]))),
        ("bf16-decode-causal-sinks", "bfloat16", (2, 8, 2, 1, 64, 64, 64), "contiguous",
         dict(causal=True, sinks=lambda r: _rand(r, 8))),
        ("bf16-prefill-window-keylens", "bfloat16", (2, 4, 1, 24, 40, 32, 32), "contiguous",
         dict(causal=True, window=(8, -1), key_lens=lambda r: np.array([40, 31]))),
        ("f16-decode", "float16", (1, 4, 2, 2, 30, 16, 16), "contiguous", dict(causal=True)),
        ("f32-mask-bcast-bias", "float32", (2, 4, 2, 20, 30, 32, 32), "contiguous",
         dict(mask=lambda r: r.random((2, 1, 1, 30)) > 0.3, bias=lambda r: _rand(r, (1, 4, 20, 30)))),
        ("f32-decode-mask", "float32", (2, 4, 4, 1, 30, 16, 16), "contiguous",
         dict(mask=lambda r: r.random((2, 1, 1, 30)) > 0.5)),
        ("f32-softcap-alibi", "float32", (2, 4, 2, 18, 25, 16, 16), "contiguous",
         dict(causal=True, softcap=5.0, alibi_slopes=lambda r: r.random((2, 4)) * 0.3)),
        ("f64-alibi-softcap-sinks-keylens", "float64", (2, 4, 1, 6, 21, 16, 8), "contiguous",
         dict(alibi_slopes=lambda r: r.random(4) * 0.3, softcap=3.0, sinks=lambda r: _rand(r, 4),
              key_lens=lambda r: np.array([21, 4]), scale=0.4)),
        ("f32-transposed-views", "float32", (2, 4, 2, 10, 30, 32, 32), "transposed",
         dict(causal=True)),
        ("f64-sliced-views-mask-bias", "float64", (2, 2, 1, 19, 23, 8, 8), "sliced",
         dict(mask=lambda r: r.random((19, 23)) > 0.2, bias=lambda r: _rand(r, (2, 1, 19, 1)))),
        ("f32-one-key-bias", "float32", (1, 2, 1, 5, 1, 8, 1), "contiguous",
         dict(bias=lambda r: _rand(r, (1, 2, 5, 1)))),
        ("f32-no-keys-sinks", "float32", (2, 2, 1, 3, 0, 8, 8), "contiguous",
         dict(sinks=lambda r: np.array([0.5, -np.inf]))),
        ("f64-empty-batch", "float64", (0, 2, 1, 3, 5, 8, 8), "contiguous", {}),
    ]


CASES = _cases()


def _make(spec, rng):
    name, dtype, dims, strides, opts = spec
    dt = testing.as_dtype(dtype)
    if dt is None:
        pytest.skip(f"{dtype} needs ml_dtypes")
    kw = {key: (val(rng) if callable(val) else val) for key, val in opts.items()}
    return testing.make_case(name, rng, *dims, dtype=dt, strides=strides, **kw)


def _check(case, out, lse):
    ref_out, ref_lse = case.call(reference, return_lse=True)
    cond, vmax = testing.case_bounds(case)
    ctx = case.describe()
    testing.assert_close(out, ref_out, case.q.dtype, cond=cond, vmax=vmax, what="out", context=ctx)
    testing.assert_close(lse, ref_lse, case.q.dtype, cond=cond + testing._magnitude(ref_lse),
                         what="lse", context=ctx)


@pytest.mark.parametrize("spec", CASES, ids=[c[0] for c in CASES])
def test_c_caller_matches_oracle(caller, spec, rng):
    case = _make(spec, rng)
    _check(case, *_call(caller, case))


def test_c_caller_strided_out_and_threads(caller, rng):
    """out a strided view of a larger buffer (its padding untouched); the same
    call with num_threads 2."""
    case = _make(CASES[2], rng)
    B, Hq, Lq, _ = case.q.shape
    Dv = case.v.shape[3]
    big = np.full((B, Hq, Lq, Dv + 3), np.nan, np.float32)
    out, lse = _call(caller, case, out=big[..., 1:Dv + 1], num_threads=2)
    _check(case, out, lse)
    assert np.isnan(big[..., 0]).all() and np.isnan(big[..., Dv + 1:]).all()


def test_c_caller_concurrent_single_threaded_calls(caller, rng):
    """Calls with num_threads 1 from several threads at once (the caller
    releases the GIL) give the sequential result, bit for bit."""
    cases = [_make(CASES[i], rng) for i in (0, 2, 10)]
    want = [_call(caller, c) for c in cases]

    def work(i):
        c = cases[i % len(cases)]
        for _ in range(20):
            out, lse = _call(caller, c)
            if not (np.array_equal(out, want[i % len(cases)][0])
                    and np.array_equal(lse, want[i % len(cases)][1])):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_version_and_include(caller):
    assert caller.version() == fastqkv.__version__
    inc = fastqkv.get_include()
    assert os.path.isabs(inc)
    for name in ("fastqkv_api.h", "fastqkv_api.pxd"):
        assert os.path.isfile(os.path.join(inc, "fastqkv", name))


# ---------------------------------------------------------------------------
# bad arguments: the status, and the message of fastqkv's own check

def _small(rng, Hq=2, Hkv=1, Lk=5, dtype=np.float32, **kw):
    return testing.make_case("bad", rng, 1, Hq, Hkv, 3, Lk, 8, dtype=dtype, **kw)


# name, case builder, the caller's overrides, status; a case with
# python=True must give the message fastqkv.attention gives
BAD = [
    ("heads", lambda r: _small(r, Hq=6, Hkv=4), {}, EVALUE, True),
    ("key_lens", lambda r: _small(r, key_lens=np.array([7])), {}, EVALUE, True),
    ("scale", lambda r: _small(r, scale=np.inf), {}, EVALUE, True),
    ("softcap", lambda r: _small(r, softcap=-1.0), {}, EVALUE, True),
    ("window", lambda r: _small(r, window=(-2, 0)), {}, EVALUE, True),
    ("sinks", lambda r: _small(r, sinks=np.array([0.0, np.nan])), {}, EVALUE, True),
    ("alibi", lambda r: _small(r, alibi_slopes=np.array([0.1, np.inf])), {}, EVALUE, True),
    ("null-q", lambda r: _small(r), dict(null_q=True), EVALUE, "q must not be NULL"),
    ("struct-size", lambda r: _small(r), dict(struct_size=ARGS_BYTES - 8), EVALUE,
     f"struct_size must be {ARGS_BYTES}"),
    ("dtype", lambda r: _small(r), dict(dtype=7), ETYPE, "dtype must be FASTQKV_F32"),
    ("half-mask", lambda r: _small(r, dtype=np.float16, mask=np.ones(5, bool)), {}, EVALUE,
     "score options (mask, bias, alibi_slopes, softcap) need float32 or float64 storage in the C API"),
]


@pytest.mark.parametrize("name,build,raw,status,want", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(caller, rng, name, build, raw, status, want):
    case = build(rng)
    exc = TypeError if status == ETYPE else ValueError
    with pytest.raises(exc) as err:
        _call(caller, case, **raw)
    assert caller.status() == status
    msg = str(err.value)
    if want is True:
        with pytest.raises(exc) as py_err:
            case.call(fastqkv, backend="c")
        assert msg == str(py_err.value)
    else:
        assert want in msg


def test_other_abi_version_is_refused(tmp_path):
    src = tmp_path / "capi_caller.c"
    shutil.copy(os.path.join(HERE, "capi_caller.c"), src)
    with pytest.raises(ImportError, match="fastqkv C API version 1, this module was built against "
                                          "version 2: rebuild it against this fastqkv"):
        _build(tmp_path, "capi_caller_v2", src, macros=[("FASTQKV_API_VERSION", "2")])


# ---------------------------------------------------------------------------
# Cython

PYX = """
# a Cython caller of fastqkv's C API (written and built by tests/test_capi.py)
from libc.string cimport memset
from fastqkv.fastqkv_api cimport *

import_fastqkv()


def attention(float[:, :, :, ::1] q, float[:, :, :, ::1] k, float[:, :, :, ::1] v,
              float[:, :, :, ::1] out, bint causal):
    cdef fastqkv_args a
    cdef char msg[256]
    cdef int st, d
    memset(&a, 0, sizeof(a))
    a.struct_size = sizeof(fastqkv_args)
    a.dtype = FASTQKV_F32
    a.B, a.Hq, a.Lq, a.D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    a.Hkv, a.Lk, a.Dv = k.shape[1], k.shape[2], v.shape[3]
    a.q, a.k, a.v, a.out = &q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0], &out[0, 0, 0, 0]
    for d in range(4):
        a.q_strides[d] = q.strides[d] // 4
        a.k_strides[d] = k.strides[d] // 4
        a.v_strides[d] = v.strides[d] // 4
        a.out_strides[d] = out.strides[d] // 4
    a.scale = float("nan")
    a.causal = causal
    a.window_left = a.window_right = -1
    a.num_threads = 1
    with nogil:
        st = fastqkv_API.attention(&a, msg, sizeof(msg))
    if st != FASTQKV_OK:
        raise ValueError((<char *>msg).decode())
"""


def test_cython_caller(tmp_path, rng):
    pytest.importorskip("Cython", reason="Cython is not installed")
    src = tmp_path / "capi_cython.pyx"
    src.write_text(PYX)
    mod = _build(tmp_path, "capi_cython", src)
    case = testing.make_case("cython", rng, 2, 4, 2, 9, 30, 32, causal=True)
    out = np.empty((2, 4, 9, 32), np.float32)
    mod.attention(case.q, case.k, case.v, out, True)
    ref_out = case.call(reference)
    cond, vmax = testing.case_bounds(case)
    testing.assert_close(out, ref_out, np.float32, cond=cond, vmax=vmax, context=case.describe())
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        mod.attention(case.q[:, :3].copy(), case.k, case.v, out[:, :3].copy(), False)
