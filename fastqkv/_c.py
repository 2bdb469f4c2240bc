"""The ``c`` backend: thin wrapper over the compiled module ``fastqkv._ckernels``.

The extension holds one kernel body compiled per ISA (generic, AVX2+FMA,
AVX-512); the variant is chosen once at import from cpuid/xgetbv, or forced
with ``$FASTQKV_ISA=generic|avx2|avx512`` (an unknown or unusable value makes
the backend unavailable, with the reason in ``fastqkv.backends()``).
:func:`forced_isa` switches the variant at run time for tests and benchmarks.
"""

from __future__ import annotations

import contextlib

from . import _validate

_IMPORT_ERROR = None
try:
    from . import _ckernels
except ImportError as exc:  # the extension was not built (no compiler, failed build)
    _ckernels = None
    _IMPORT_ERROR = exc

# every storage dtype: float32/float64 on both routes, float16/bfloat16 at half
# width on the streaming route (the planner widens them for the tiled one)
_DTYPES = _validate.FLOAT_DTYPES

# paged problems (Problem.block_table) are read through the block table by
# the streaming kernel, and so are quantized K/V (Problem.k_scale): int8 and
# float8 widened in registers, the scales applied per key
FEATURES = frozenset({"paged", "quant"})

# Problem.route -> the route argument of _ckernels.attention (FQ_ROUTE_*)
_ROUTE = {"tile": 0, "stream": 1}


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
    if _validate.storage_name(problem.dtype) in _DTYPES:
        return None
    return f"dtype {problem.dtype} is not supported by the c backend"


def run(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) of a prepared Problem on its route."""
    _ckernels.attention(p.q, p.k, p.v, p.out, p.lse, p.mask, p.bias, p.key_lens, p.alibi,
                        p.sinks, p.scale, p.softcap, p.window_left, p.window_right, num_threads,
                        _ROUTE[p.route], p.block_table, p.block_size, p.k_scale, p.v_scale)


def interruptible():
    """Make the calling thread's calls the ones :func:`abort` stops."""
    _ckernels.interruptible()


def abort(on):
    """While ``on``: the interruptible thread's running call takes no
    further work item and raises KeyboardInterrupt (``out`` partial)."""
    _ckernels.abort(on)


def isa():
    """The ISA variant in use, or None."""
    return None if _ckernels is None else _ckernels.isa()


def isa_variants():
    """ISA variants both compiled into this build and runnable on this CPU."""
    if _ckernels is None:
        return []
    sup = set(_ckernels.isa_supported())
    return [name for name in _ckernels.isa_compiled() if name in sup]


def set_splits(n):
    """Split the key axis of streaming calls into ``n`` parts (0: the
    driver's own choice); process-wide, for tests."""
    _ckernels.set_splits(n)


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
