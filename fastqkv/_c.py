"""The ``c`` backend: thin wrapper over the compiled module ``fastqkv._ckernels``.

The extension holds one kernel body compiled per ISA (generic, AVX2+FMA,
AVX-512); the variant is chosen once at import from cpuid/xgetbv, or forced
with ``$FASTQKV_ISA=generic|avx2|avx512`` (an unknown or unusable value makes
the backend unavailable, with the reason in ``fastqkv.backends()``).
:func:`forced_isa` switches the variant at run time for tests and benchmarks.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _validate

_IMPORT_ERROR = None
try:
    from . import _ckernels
except ImportError as exc:  # the extension was not built (no compiler, failed build)
    _ckernels = None
    _IMPORT_ERROR = exc

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# stored half width, accumulated in float32 (the streaming kernel)
_HALF = tuple(_validate.half_dtypes()) if hasattr(_validate, "half_dtypes") else tuple(
    d for d in (np.dtype(np.float16), _validate.BFLOAT16) if d is not None)

# paged problems (Problem.block_table) are read through the block table by
# the streaming kernel; with mask/bias/softcap/ALiBi they are densified here
FEATURES = frozenset({"paged"})


def _has_score_options(p):
    return p.mask is not None or p.bias is not None or p.alibi is not None or bool(p.softcap)


def probe():
    if _ckernels is None:
        return False, (f"the compiled module fastqkv._ckernels is not importable "
                       f"({_IMPORT_ERROR}); reinstall with a C compiler to build it"), {}
    details = {
        "isa": _ckernels.isa(),
        "isa_compiled": list(_ckernels.isa_compiled()),
        "isa_supported": list(_ckernels.isa_supported()),
    }
    err = _ckernels.isa_error()
    if err is not None:
        return False, err, details
    return True, f"compiled, ISA {details['isa']}", details


def supports(problem):
    if problem.dtype in _DTYPES:
        return None
    if problem.dtype in _HALF:
        return None
    return f"dtype {problem.dtype} is not supported by the c backend"


def run(problem, num_threads):
    p = problem
    if p.block_table is not None and _has_score_options(p):
        _validate.densify_pages(p)
    if p.dtype in _HALF and _has_score_options(p):
        # the streaming kernel reads half storage but applies no score
        # options: widen to float32, run the tiled kernel, round the output
        f32 = np.float32
        out32 = np.empty(p.out.shape, f32)
        # C order: astype's default order "K" can leave a broadcast (zero
        # stride) axis innermost
        q, k, v = (np.ascontiguousarray(x, dtype=f32) for x in (p.q, p.k, p.v))
        _ckernels.attention(q, k, v, out32, p.lse,
                            p.mask, p.bias, p.key_lens, p.alibi, p.scale, p.softcap,
                            p.window_left, p.window_right, num_threads)
        p.out[...] = out32.astype(p.dtype)
    elif p.block_table is None:
        _ckernels.attention(p.q, p.k, p.v, p.out, p.lse, p.mask, p.bias, p.key_lens, p.alibi,
                            p.scale, p.softcap, p.window_left, p.window_right, num_threads)
    else:
        _ckernels.attention(p.q, p.k, p.v, p.out, p.lse, None, None, p.key_lens, None,
                            p.scale, 0.0, p.window_left, p.window_right, num_threads,
                            p.block_table, p.block_size)


def isa():
    """The ISA variant in use, or None."""
    return None if _ckernels is None else _ckernels.isa()


def isa_variants():
    """ISA variants both compiled into this build and runnable on this CPU."""
    if _ckernels is None:
        return []
    sup = set(_ckernels.isa_supported())
    return [name for name in _ckernels.isa_compiled() if name in sup]


@contextlib.contextmanager
def forced_isa(name):
    """Run the c backend with ISA variant ``name`` inside the block
    (process-wide; not for use while other threads run attention)."""
    if _ckernels is None:
        raise RuntimeError(f"fastqkv._ckernels is not importable ({_IMPORT_ERROR})")
    prev = _ckernels.set_isa(name)
    try:
        yield
    finally:
        _ckernels.set_isa(prev)
