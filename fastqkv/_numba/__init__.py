"""The ``numba`` backend: the fused tiled kernel as Numba JIT code.

Importing this package does not import numba; :mod:`fastqkv._numba.launch`
(which does, with the kernel modules) is imported by the first :func:`run`,
:func:`warmup` or :func:`cache_status`.  The compiled code is cached on
disk by Numba (``cache=True``), so after the first process only loading it
costs time.  Every cached function is stamped with the sources of all the
package's modules (``cache``), so a change to any of them rebuilds the
drivers that inline it.

Modules, by role (each states its contract in its first lines): ``cache``
(the package-wide stamp of the disk cache), ``tuning`` (the tuned sizes,
one row per vector width), ``vec`` (LLVM intrinsics and codegen
vocabulary), ``softmax`` (exp, score options, the online-softmax step),
``micro_tile`` / ``micro_stream`` (the micro-kernels of the two kernels),
``call`` (flag bits, workspace carving, the named tuples handed to work
items), ``prefill`` (the tiled kernel), ``stream`` (the streaming kernel),
``launch`` (signatures, driver cache, workspace, the call on the planner's
route), ``precompile`` (compiling the kernels a run needs ahead of their
first call, in parallel processes).

Backend interface (see :mod:`fastqkv._dispatch`): :func:`probe`,
:func:`supports`, :func:`run`; plus :func:`warmup` and :func:`cache_status`
for ``fastqkv.warmup()`` and ``fastqkv info``.
"""

from __future__ import annotations

import importlib.util
import os

from .._validate import FLOAT_DTYPES, storage_name

__all__ = ["probe", "supports", "run", "warmup", "cache_status", "FEATURES"]

# paged problems (Problem.block_table) are run on the caches in place;
# int8/float8 K/V with their scales (Problem.k_scale) are read as they are
# on the streaming route (the tiled one gets dequantized copies)
FEATURES = frozenset({"paged", "quant"})

# every storage dtype of q (by name); float16/bfloat16 read at half width
_SUPPORTED = FLOAT_DTYPES


def probe():
    """``(available, reason, details)`` without importing or compiling anything."""
    spec = importlib.util.find_spec("numba")
    if spec is None:
        return False, "numba is not installed (pip install numba)", {}
    details = {}
    try:
        from importlib.metadata import version
        details["numba"] = version("numba")
    except Exception:  # noqa: BLE001 - metadata is informational only
        pass
    details["disk_cache"] = _cache_hint()
    return True, "available (Numba JIT; compiled code cached on disk)", details


def _cache_hint():
    """Cheap guess (no numba import) whether compiled kernels are on disk next
    to the package: "present", "not found" (Numba may still keep them in its
    user-wide cache when the package directory is read-only) or "elsewhere"
    ($NUMBA_CACHE_DIR).  Numba itself decides whether they are still valid;
    :func:`cache_status` asks it."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return "elsewhere ($NUMBA_CACHE_DIR)"
    pycache = os.path.join(os.path.dirname(__file__), "__pycache__")
    try:
        names = os.listdir(pycache)
    except OSError:
        return "not found"
    found = any(n.startswith("prefill._attention_py-") and n.endswith(".nbi") for n in names)
    return "present" if found else "not found"


def supports(problem):
    """None, or why this call cannot run on the numba backend (quantized
    K/V: q's dtype is the one that counts)."""
    if storage_name(problem.dtype) not in _SUPPORTED:
        return (f"dtype {problem.dtype} is not supported by the numba backend "
                "(float16, bfloat16, float32 and float64 only)")
    return None


def _launch():
    _select_threading_layer()
    from . import launch
    return launch


_layer_selected = []


def _select_threading_layer():
    """Prefer Numba's TBB threading layer, which is safe both for concurrent
    Python threads and across ``fork`` (the GNU OpenMP layer aborts a forked
    child).  A layer chosen by the user ($NUMBA_THREADING_LAYER or
    ``numba.config.THREADING_LAYER``) is kept; without a loadable TBB,
    Numba's default stays."""
    if _layer_selected:
        return
    _layer_selected.append(True)
    import numba
    if numba.config.THREADING_LAYER != "default" or os.environ.get("NUMBA_THREADING_LAYER"):
        return
    if _load_tbb():
        numba.config.THREADING_LAYER = "tbb"


def _load_tbb():
    """Whether Numba's TBB pool can load.  The ``tbb`` wheel puts libtbb in
    ``<prefix>/lib``, which Numba's extension does not search: load it first
    by path so the extension finds it by its soname."""
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401
        return True
    except ImportError:
        pass
    import ctypes
    import sys
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        lib = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(lib):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                from numba.np.ufunc import tbbpool  # noqa: F401,F811
                return True
            except (OSError, ImportError):
                continue
    return False


def run(problem, num_threads):
    """Fill ``problem.out`` (and ``problem.lse``) for a validated, non-empty
    problem with ``Lk > 0``."""
    _launch().run(problem, num_threads)


def warmup():
    """Compile (or load from the disk cache) the kernels: the tiled kernel
    for float32 and float64, the streaming (decode / paged / 16-bit /
    quantized) kernel for float32, float64, 16-bit and 8-bit storage; one
    signature per dtype serves every option.  Returns :func:`cache_status`."""
    return _launch().warmup()


def cache_status():
    """Whether Numba's disk cache holds the kernels:
    ``{"warm": bool | None, "signatures": "n of N", "dir": path}``."""
    return _launch().cache_status()
