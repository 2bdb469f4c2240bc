"""The disk cache of the Numba backend: one source stamp for the whole package.

Contract: importing this module (every kernel module does, through
:mod:`.vec` or directly, before it defines a jitted function) makes Numba's
cache judge each function of ``fastqkv/_numba`` against the sources of all
the package's modules, not only the file that defines it.  A driver compiled
in ``prefill.py`` inlines code from ``softmax.py``, ``vec.py`` and others, so
a change to any of them must invalidate it; Numba's own locators stamp a
cached function with its defining file alone.  Functions of other packages
keep Numba's own locators.
"""

from __future__ import annotations

import hashlib
import os

from numba.core import caching

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_stamp: list = []


def _package_stamp():
    """A digest of every module of the package (name, mtime, size), taken
    once per process."""
    if _stamp:
        return _stamp[0]
    h = hashlib.sha256()
    for name in sorted(os.listdir(_PACKAGE_DIR)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(_PACKAGE_DIR, name))
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_size};".encode())
    _stamp.append(h.hexdigest())
    return _stamp[0]


def _package_locator(base):
    """``base`` (one of Numba's source-file locators), restricted to this
    package's files and stamped with :func:`_package_stamp`."""

    class PackageLocator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _PACKAGE_DIR:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return _package_stamp()

    PackageLocator.__name__ = PackageLocator.__qualname__ = f"FastqkvPackage{base.__name__.lstrip('_')}"
    return PackageLocator


def _install():
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    classes = impl._locator_classes
    if any(getattr(c, "_fastqkv_package", False) for c in classes):
        return
    ours = []
    for base in classes:
        if issubclass(base, caching._SourceFileBackedLocatorMixin):
            loc = _package_locator(base)
            loc._fastqkv_package = True
            ours.append(loc)
    classes[:0] = ours


_install()
