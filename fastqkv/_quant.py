"""Quantizing K/V for the quantized-cache calls: :func:`quantize_kv`.

The kernels read int8 and float8 K/V with float32 scales as they are (see
:mod:`fastqkv.reference` for the semantics); this module makes such arrays
from float K/V, for users filling a cache and for the tests.
"""

from __future__ import annotations

import numpy as np

from . import _validate

__all__ = ["quantize_kv", "QUANT_MAX"]

# The largest finite magnitude of each quantized dtype: a token's absmax is
# mapped onto it (int8 is symmetric: -127..127, -128 unused).
QUANT_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def quantize_kv(x, dtype, *, layout="bhld"):
    """Quantize K or V (or a paged cache of them) per token and head.

    ``x`` is a float array whose last axis is the head dim: ``(B, Hkv, L,
    D)`` in ``"bhld"``, ``(B, L, Hkv, D)`` in ``"blhd"``, a packed ``(total,
    Hkv, D)`` or a paged cache ``(num_blocks, block_size, Hkv, D)``.
    ``dtype`` is ``"int8"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"`` (or
    their NumPy dtypes; float8 needs ml_dtypes).  Returns ``(xq, scale)``:
    ``scale`` float32 of shape ``x.shape[:-1]`` (``(B, Hkv, L)`` in bhld,
    ``(B, L, Hkv)`` in blhd: one per token and head, whatever the layout,
    which only names the axes) holds each row's absmax over the largest
    magnitude of ``dtype`` (1 for an all-zero row), and
    ``xq = round(x / scale)``: int8 to nearest, clipped to [-127, 127];
    float8 to nearest even.  ``xq * scale[..., None]`` is the K (or V) the
    attention functions see.  Non-finite values raise ``ValueError``.
    """
    _validate.check_layout(layout)
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in QUANT_MAX:
        raise ValueError(f"dtype must be one of {tuple(QUANT_MAX)}, got {dtype!r}")
    _validate.quant_dtype(name)            # ImportError without ml_dtypes, before any work
    a = _validate.as_array(x, "x")
    if not _validate.is_float_dtype(a.dtype):
        raise TypeError(f"x must be a floating-point array, got dtype {a.dtype}")
    if a.ndim < 2 or a.shape[-1] == 0:
        raise ValueError(f"x must have a head-dim axis last (at least 2-D, D > 0), got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("x must be finite to be quantized")
    scale = scale_for(np.abs(a).max(axis=-1), name)
    return encode(a, scale[..., None], name), scale


def scale_for(absmax, name):
    """float32 scales mapping ``absmax`` (float64) onto the largest magnitude
    of ``name``; 1 where that would be 0 (an all-zero row)."""
    scale = np.asarray(absmax / QUANT_MAX[name]).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale


def encode(a, scale, name):
    """``a`` (finite float64) over ``scale`` (float32, broadcast against
    ``a``) in dtype ``name``: int8 rounded to nearest and clipped to
    [-127, 127], float8 to nearest even within its largest magnitude."""
    qmax = QUANT_MAX[name]
    y = np.clip(a / np.asarray(scale, np.float64), -qmax, qmax)
    if name == "int8":
        y = np.rint(y)
    return y.astype(_validate.quant_dtype(name))
