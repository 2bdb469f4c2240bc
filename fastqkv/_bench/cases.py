"""The benchmark shapes: THE one list of cases, for ``fastqkv bench``, the
pytest-benchmark suite and the scripts in ``bench/``.

Contract: :data:`CASES` holds every shape once, each tagged with the
selections it belongs to; :func:`shape_classes` returns one selection in list
order (``full``, ``quick`` and ``tiny`` are the sizes of ``fastqkv bench``;
``c-peers`` and ``numba-peers`` the tables of the two scripts).  Names are
unique within a selection.  :class:`BenchCase` derives the work of a case
(visible pairs, flops, K/V bytes) from its fields alone, without creating
arrays, so it never needs an optional package.  :class:`Skip` is the one
exception that says "this runner or case cannot run here".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZES = ("full", "quick", "tiny")
SELECTIONS = SIZES + ("c-peers", "numba-peers")

# bytes per element of the benchmark dtypes (bfloat16 and float8 without
# importing ml_dtypes)
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int8": 1,
            "float8_e4m3fn": 1, "float8_e5m2": 1}


class Skip(Exception):
    """A runner or case that cannot run here; the message says why."""


@dataclass(frozen=True)
class BenchCase:
    """One benchmark shape.  ``ragged`` is None, ``"key_lens"`` (per-sequence
    KV length) or ``"padding"`` (boolean key-padding mask); sequence ``b``
    then has ``Lk - b * Lk // (2 * B)`` keys.  ``kv`` names a quantized K/V
    dtype (int8, float8_e4m3fn, float8_e5m2; float32 scales per token and
    head) read with q and out of ``dtype``; None: K/V of ``dtype``."""
    name: str
    kind: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    causal: bool = True
    dtype: str = "float32"
    ragged: str | None = None
    kv: str | None = None

    @property
    def bound(self):
        """``"memory"`` (decode: K/V streamed once) or ``"compute"``."""
        return "memory" if self.kind == "decode" else "compute"

    def lengths(self):
        """Keys per sequence."""
        if self.ragged is None:
            return [self.Lk] * self.B
        return [self.Lk - (b * self.Lk) // (2 * self.B) for b in range(self.B)]

    def visible_pairs(self):
        """Visible (query, key) pairs summed over the batch (per head)."""
        tot = 0
        for lk in self.lengths():
            if self.causal:
                i = np.arange(self.Lq) + (lk - self.Lq)
                tot += int(np.clip(i + 1, 0, lk).sum())
            else:
                tot += self.Lq * lk
        return tot

    def flops(self):
        """4 * Hq * visible pairs * D (QK^T and PV, 2 flops per multiply-add)."""
        return 4.0 * self.Hq * self.visible_pairs() * self.D

    def kv_bytes(self):
        """Bytes of K and V (and their scales) that must be read (visible keys only)."""
        if self.kv is None:
            return float(sum(self.lengths()) * self.Hkv * 2 * self.D * ITEMSIZE[self.dtype])
        return float(sum(self.lengths()) * self.Hkv * 2 * (self.D * ITEMSIZE[self.kv] + 4))

    def describe(self):
        s = f"B{self.B} Hq{self.Hq}"
        if self.Hkv != self.Hq:
            s += f" Hkv{self.Hkv}"
        s += f" Lq{self.Lq} Lk{self.Lk} D{self.D} {self.dtype}"
        if self.kv is not None:
            s += f" {self.kv} KV"
        if self.causal:
            s += " causal"
        if self.ragged == "key_lens":
            s += " ragged key_lens"
        elif self.ragged == "padding":
            s += " key-padding mask"
        return s


def _cases():
    C = BenchCase
    full, quick, tiny = {"full"}, {"quick"}, {"tiny"}
    fq = full | quick
    both = {"c-peers", "numba-peers"}
    return [
        (tiny, C("prefill-mha", "prefill", 1, 2, 2, 24, 24, 16)),
        (tiny, C("prefill-gqa", "prefill", 1, 4, 2, 24, 24, 16)),
        (tiny, C("encoder-pad", "encoder", 2, 2, 2, 16, 16, 8, causal=False, ragged="padding")),
        (tiny, C("decode-gqa", "decode", 2, 4, 2, 1, 40, 16, ragged="key_lens")),
        (tiny, C("chunked-prefill", "chunked", 1, 4, 2, 8, 40, 16)),
        (tiny, C("float64-prefill", "prefill", 1, 2, 2, 16, 16, 8, dtype="float64")),
        (tiny, C("float16-decode", "decode", 2, 4, 2, 1, 40, 16, dtype="float16", ragged="key_lens")),

        (fq, C("small-prefill-L64", "small", 1, 8, 8, 64, 64, 64)),
        (fq, C("small-decode-L512", "decode", 1, 8, 2, 1, 512, 64)),
        (quick, C("prefill-mha-L512", "prefill", 1, 8, 8, 512, 512, 128)),
        (quick, C("prefill-gqa-L512", "prefill", 1, 32, 8, 512, 512, 128)),
        (quick, C("encoder-bert-L128", "encoder", 2, 12, 12, 128, 128, 64, causal=False)),
        (quick, C("encoder-bert-L256-pad", "encoder", 2, 12, 12, 256, 256, 64, causal=False, ragged="padding")),
        (quick, C("decode-gqa-4k", "decode", 2, 32, 8, 1, 4096, 128, ragged="key_lens")),
        (quick, C("chunked-prefill-64x1k", "chunked", 1, 32, 8, 64, 1024, 128)),
        (quick, C("float64-prefill-L256", "prefill", 1, 8, 8, 256, 256, 128, dtype="float64")),
        (quick, C("float16-decode-2k", "decode", 2, 32, 8, 1, 2048, 128, dtype="float16", ragged="key_lens")),
        (quick, C("int8-decode-2k", "decode", 2, 32, 8, 1, 2048, 128, ragged="key_lens", kv="int8")),
        (quick, C("bfloat16-decode-2k", "decode", 2, 32, 8, 1, 2048, 128, dtype="bfloat16", ragged="key_lens")),

        ({"c-peers"}, C("prefill-mha-32h-L1024", "prefill", 1, 32, 32, 1024, 1024, 128)),
        (full | {"numba-peers"}, C("prefill-mha-L1024", "prefill", 1, 16, 16, 1024, 1024, 128)),
        (full, C("prefill-mha-L2048", "prefill", 1, 16, 16, 2048, 2048, 128)),
        (full | both, C("prefill-gqa-L1024", "prefill", 1, 32, 8, 1024, 1024, 128)),
        (both, C("prefill-gqa-L2048", "prefill", 1, 32, 8, 2048, 2048, 128)),
        (full | both, C("encoder-bert-L128", "encoder", 8, 12, 12, 128, 128, 64, causal=False)),
        (full | both, C("encoder-bert-L512-pad", "encoder", 8, 12, 12, 512, 512, 64, causal=False,
                        ragged="padding")),
        (full, C("decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, ragged="key_lens")),
        (full, C("decode-gqa-32k", "decode", 2, 32, 8, 1, 32768, 128, ragged="key_lens")),
        (full | {"c-peers"}, C("chunked-prefill-128x4k", "chunked", 1, 32, 8, 128, 4096, 128)),
        (full, C("float64-prefill-L512", "prefill", 1, 8, 8, 512, 512, 128, dtype="float64")),
        (both, C("float64-prefill-L512-D64", "prefill", 1, 8, 8, 512, 512, 64, dtype="float64")),
        (full, C("float16-decode-4k", "decode", 4, 32, 8, 1, 4096, 128, dtype="float16", ragged="key_lens")),
        (full, C("bfloat16-decode-4k", "decode", 4, 32, 8, 1, 4096, 128, dtype="bfloat16", ragged="key_lens")),
        # quantized K/V beside the float32 (decode-gqa-4k, chunked-prefill-128x4k) and bfloat16 shapes
        (full, C("bfloat16-decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, dtype="bfloat16",
                 ragged="key_lens")),
        (full, C("int8-decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, ragged="key_lens", kv="int8")),
        (full, C("float8_e4m3fn-decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, ragged="key_lens",
                 kv="float8_e4m3fn")),
        (full, C("float8_e5m2-decode-gqa-4k", "decode", 8, 32, 8, 1, 4096, 128, ragged="key_lens",
                 kv="float8_e5m2")),
        (full, C("bfloat16-chunked-prefill-128x4k", "chunked", 1, 32, 8, 128, 4096, 128,
                 dtype="bfloat16")),
        (full, C("int8-chunked-prefill-128x4k", "chunked", 1, 32, 8, 128, 4096, 128, kv="int8")),
        (full, C("float8_e4m3fn-chunked-prefill-128x4k", "chunked", 1, 32, 8, 128, 4096, 128,
                 kv="float8_e4m3fn")),
        # the scripts' decode tables: full caches, each dtype and paged from this shape
        (both, C("decode-B8-4k", "decode", 8, 32, 8, 1, 4096, 128, causal=False)),
        (both, C("decode-B1-32k", "decode", 1, 32, 8, 1, 32768, 128, causal=False)),
    ]


CASES = _cases()


def shape_classes(size="full"):
    """The cases of one selection, in list order: ``size`` is ``"full"`` (the
    design's shapes), ``"quick"`` (smaller, for a run under a minute),
    ``"tiny"`` (smoke tests), or a script's selection (``"c-peers"``,
    ``"numba-peers"``)."""
    if size not in SELECTIONS:
        raise ValueError(f"size must be one of {SELECTIONS}, got {size!r}")
    return [c for tags, c in CASES if size in tags]


def np_dtype(name):
    """The NumPy dtype of a case's dtype name; :class:`Skip` when it needs a
    package that is not installed (bfloat16: ml_dtypes)."""
    from ..testing import as_dtype
    dt = as_dtype(name)
    if dt is None:
        raise Skip(f"{name} needs ml_dtypes (pip install ml_dtypes)")
    return dt
