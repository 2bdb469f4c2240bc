"""Build of the C extension ``fastqkv._ckernels`` (metadata lives in pyproject.toml).

The kernel bodies (csrc/kernels/attn_tile.inc, the tiled kernel, and
attn_stream.inc, the streaming kernel, included by attn_tile.inc, for
float16/bfloat16 storage by attn_half.inc and for int8/float8 K/V by
attn_quant.inc; all instantiated by attn_isa.inc)
are compiled once per ISA:
``attn_generic.c`` with the baseline flags, ``attn_avx2.c`` with AVX2+FMA+F16C and
``attn_avx512.c`` with AVX-512 F/DQ/BW/VL (x86-64 only, each kept only if the
compiler accepts its flags), each with its ``attn_<isa>_quant.c`` (the int8/float8
K/V kernels of that ISA, a unit of their own).  The variant is chosen at import
from cpuid/xgetbv.
No -march=native (one build runs on every x86-64) and no -ffast-math (the
kernels rely on -inf and NaN).

The build is graceful: if there is no C compiler or the compilation fails,
a warning is printed, the package installs without the extension, and
``fastqkv.backends()["c"].reason`` says why.
"""

import concurrent.futures
import os
import platform
import re
import shlex
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BASE_FLAGS = ["-std=gnu11", "-O3", "-ffp-contract=fast", "-fno-math-errno",
              "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64", "x64")


def _numpy_include():
    import numpy

    return numpy.get_include()


class GracefulBuildExt(build_ext):
    """Per-file ISA flags, probed ISA variants, and no failure on a broken compiler."""

    failed = None

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves a pure-Python package
            self._warn(exc)

    def build_extensions(self):
        try:
            self._configure()
            super().build_extensions()
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _warn(self, exc):
        GracefulBuildExt.failed = f"{type(exc).__name__}: {exc}"
        msg = ("WARNING: fastqkv: building the C extension fastqkv._ckernels failed "
               f"({GracefulBuildExt.failed}); installing without it. The 'c' backend "
               "will be unavailable; the other backends work.")
        print(msg, file=sys.stderr)
        self.extensions = []

    def _accepts(self, flags):
        """Whether the compiler builds a tiny file with `flags`."""
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write("typedef float v __attribute__((vector_size(64)));\n"
                        "void f(v *a, const v *b) { *a = *a * *b + *b; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=BASE_FLAGS + flags)
            except Exception:  # noqa: BLE001
                return False
        return True

    def _configure(self):
        ext = self.extensions[0]
        enabled = []
        for isa, flags in ISA_FLAGS.items():
            srcs = [f"csrc/kernels/attn_{isa}.c", f"csrc/kernels/attn_{isa}_quant.c"]
            ok = IS_X86_64 and os.environ.get("FASTQKV_BUILD_NO_" + isa.upper()) is None \
                and self._accepts(flags)
            if ok:
                enabled.append(isa)
            else:
                ext.sources[:] = [s for s in ext.sources if s not in srcs]
            ext.define_macros.append((f"FQ_HAVE_{isa.upper()}", "1" if ok else "0"))
        print(f"fastqkv: compiling ISA variants: generic {' '.join(enabled)}", file=sys.stderr)
        # per-source flags: wrap the compiler's single-file compile step
        compiler = self.compiler
        orig = compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs or [])
            for isa, flags in ISA_FLAGS.items():
                if src.replace("\\", "/").endswith((f"kernels/attn_{isa}.c", f"kernels/attn_{isa}_quant.c")):
                    extra = extra + flags
            # $FASTQKV_CFLAGS comes last, so it can override the optimisation
            # level (scripts/asan_check.sh builds with -O1)
            extra = extra + shlex.split(os.environ.get("FASTQKV_CFLAGS", ""))
            return orig(obj, src, ext_, cc_args, extra, pp_opts)

        compiler._compile = _compile
        compiler.compile = self._parallel_compile(compiler)

    @staticmethod
    def _parallel_compile(compiler):
        """The compiler's compile() with its sources compiled by as many
        processes as the machine has CPUs (the kernel units take minutes
        each; distutils compiles one at a time)."""
        def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                    extra_preargs=None, extra_postargs=None, depends=None):
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
            todo = [(obj, build[obj]) for obj in objects if obj in build]
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for job in [pool.submit(compiler._compile, obj, src, ext, cc_args, extra_postargs, pp_opts)
                            for obj, (src, ext) in todo]:
                    job.result()
            return objects

        return compile

    def get_outputs(self):
        return [] if GracefulBuildExt.failed else super().get_outputs()

    def copy_extensions_to_source(self):
        if not GracefulBuildExt.failed:
            super().copy_extensions_to_source()

    def get_output_mapping(self):
        if GracefulBuildExt.failed:
            return {}
        return super().get_output_mapping()


def _version():
    """The package version (pyproject.toml), compiled in for the C API's version()."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "pyproject.toml"), encoding="utf-8") as f:
        match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return match.group(1) if match else "unknown"


def _extension():
    sources = ["csrc/module.c", "csrc/capi.c", "csrc/driver.c", "csrc/cpu_features.c",
               "csrc/kernels/attn_generic.c", "csrc/kernels/attn_avx2.c",
               "csrc/kernels/attn_avx512.c", "csrc/kernels/attn_generic_quant.c",
               "csrc/kernels/attn_avx2_quant.c", "csrc/kernels/attn_avx512_quant.c"]
    try:
        include = [_numpy_include(), "csrc", "fastqkv/include"]
    except ImportError:
        include = ["csrc", "fastqkv/include"]
    return Extension(
        "fastqkv._ckernels",
        sources=sources,
        include_dirs=include,
        define_macros=[("FQ_VERSION", '"%s"' % _version())],
        extra_compile_args=BASE_FLAGS,
        libraries=["m"] if os.name == "posix" else [],
        extra_link_args=["-pthread"] if os.name == "posix" else [],
        depends=["csrc/fastqkv.h", "fastqkv/include/fastqkv/fastqkv_api.h", "csrc/kernels/simd.h",
                 "csrc/kernels/attn_tile.inc", "csrc/kernels/attn_isa.inc", "csrc/kernels/attn_stream.inc",
                 "csrc/kernels/attn_half.inc", "csrc/kernels/attn_quant.inc", "csrc/kernels/halfbits.h"],
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": GracefulBuildExt})
