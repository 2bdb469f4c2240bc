"""fastqkv: fused, tiled CPU attention for Python.

``attention(q, k, v, ...)`` computes ``softmax(scale * q k^T + bias) v`` with a
max-subtracted online softmax; ``fastqkv.reference`` is the NumPy oracle that
defines the semantics.
"""

import os as _os

from . import reference
from ._api import (attention, attention_varlen, attention_weights, merge_attention,
                   paged_attention, self_attention, shared_prefix_attention,
                   shared_prefix_paged_attention)
from ._quant import quantize_kv
from ._dispatch import (BackendInfo, backends, get_backend, get_num_threads, set_backend,
                        set_num_threads, use_backend, warmup)

__version__ = "0.1.0"


def get_include():
    """The directory of fastqkv's C API headers: ``#include <fastqkv/fastqkv_api.h>``
    (and the Cython declarations ``fastqkv/fastqkv_api.pxd``) with this directory
    on the include path, as ``numpy.get_include()``."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "include")


__all__ = [
    "attention", "attention_varlen", "paged_attention", "merge_attention", "attention_weights",
    "self_attention", "shared_prefix_attention", "shared_prefix_paged_attention", "quantize_kv", "reference", "backends", "BackendInfo", "set_backend", "use_backend",
    "get_backend", "set_num_threads", "get_num_threads", "warmup", "get_include", "__version__",
]
