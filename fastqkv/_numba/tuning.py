"""Tuning table of the Numba backend: one row per vector width (ISA class).

Contract: every tile size, register block and streaming block size of the
Numba kernels is a field of :class:`Tuning`; the row of the CPU Numba
compiles for (chosen by its vector width, as the C backend picks a kernel
per ISA) is :data:`ROW`, and the module-level names below are its values.
Jitted code reads ``MR``, ``NR``, ``MRS``, ... as compile-time constants;
the launcher reads the tile sizes (``ROWS``, ``KEYS``, ...) at each call,
so tests may shrink them without recompiling.  Names follow the glossary of
``csrc/README.md``; the measurements behind the values are in
``docs/tuning.md`` ("Numba backend").
"""

from __future__ import annotations

from typing import NamedTuple


class Tuning(NamedTuple):
    """Tuned constants of one ISA class."""

    isa: str                    #: ISA class: "generic", "avx2" or "avx512"
    tuned_on: str               #: the CPU the row's values were measured on
    vbytes: int                 #: bytes per vector register
    acc: int                    #: vector accumulators a register block may hold
    # tiled kernel
    rows: int                   #: ROWS: about this many packed query rows (G*qt) per work item
    keys: int                   #: KEYS: kt, keys per K/V tile (best a multiple of NR)
    decode_keys: int            #: DECODE_KEYS: kt of items of at most 8 rows (per-tile overheads dominate)
    mr: int                     #: MR: rows of a register block
    nr: int                     #: NR: keys per K^T panel = columns per PV block
    unroll: int                 #: UNROLL: reduction steps per loop iteration of a register block
    min_heads_whole: int        #: (batch, KV head) pairs from which an unwindowed item takes up to 2*ROWS rows
    min_work_per_thread: int    #: multiply-adds below which one more thread costs more than it brings
    # streaming kernel
    stream_keys: int            #: STREAM_KEYS: SKT, keys per chunk (a multiple of 4)
    decode_stream_keys: int     #: DECODE_STREAM_KEYS: SKT of a one-position decode
    token_major_keys: int       #: TOKEN_MAJOR_KEYS: SKT when an item holds every KV head of a token-major cache
    mrs: int                    #: MRS: rows per block of the score and PV micro-kernels
    sqc: int                    #: SQC: keys per block of the score micro-kernel
    nv_pv: int                  #: NV_PV: vectors per row of the PV block
    skb: int                    #: SKB: keys per block of the transposed score micro-kernel
    pf_bytes: int               #: PF_BYTES: bytes of K (V) rows prefetched ahead of the row being read
    split_min_keys: int         #: SPLIT_MIN_KEYS: keys per KV split at least
    items_per_thread: int       #: ITEMS_PER_THREAD: work items per thread a split aims at


_AVX512 = Tuning(
    isa="avx512", tuned_on="Intel Ice Lake Xeon (MR/NR, streaming); AMD EPYC Zen 4 (ROWS/KEYS)",
    vbytes=64, acc=24,
    rows=64, keys=512, decode_keys=1024, mr=6, nr=64, unroll=4,
    min_heads_whole=8, min_work_per_thread=1 << 21,
    stream_keys=128, decode_stream_keys=512, token_major_keys=32,
    mrs=4, sqc=4, nv_pv=4, skb=8, pf_bytes=8192, split_min_keys=512, items_per_thread=8)

# 16 vector registers: 12 accumulators; not tuned on its own (the AVX-512
# row's sizes, the width-bound ones scaled to the vector), except the
# streaming micro-kernels' blocks: MRS x SQC and MRS x NV_PV accumulators
# of 8 vectors, which leave room for the K (V) vectors, decoded or not,
# without spilling
_AVX2 = _AVX512._replace(isa="avx2", tuned_on="AMD EPYC Zen 1 (SQC, NV_PV); the rest not tuned (AVX-512 values, "
                                              "width-bound ones scaled)",
                         vbytes=32, acc=12, nr=32, skb=4, sqc=2, nv_pv=2)

_GENERIC = _AVX512._replace(isa="generic", tuned_on="not tuned (AVX-512 values, width-bound ones scaled)",
                            vbytes=16, acc=12, nr=16, skb=4)

TABLE = {row.isa: row for row in (_GENERIC, _AVX2, _AVX512)}


def isa_class():
    """The ISA class of the CPU Numba compiles for (``NUMBA_CPU_FEATURES``
    or ``NUMBA_CPU_NAME`` when set, else the host)."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        feats = config.CPU_FEATURES
    elif config.CPU_NAME:
        feats = ""
    else:
        import llvmlite.binding as llb
        feats = llb.get_host_cpu_features().flatten()
    feats = feats.split(",")
    if "+avx512f" in feats:
        return "avx512"
    if "+avx" in feats:
        return "avx2"
    return "generic"


ROW = TABLE[isa_class()]

VBYTES = ROW.vbytes
ACC = ROW.acc
ROWS = ROW.rows
KEYS = ROW.keys
DECODE_KEYS = ROW.decode_keys
MR = ROW.mr
NR = ROW.nr
UNROLL = ROW.unroll
MIN_HEADS_WHOLE = ROW.min_heads_whole
MIN_WORK_PER_THREAD = ROW.min_work_per_thread
STREAM_KEYS = ROW.stream_keys
DECODE_STREAM_KEYS = ROW.decode_stream_keys
TOKEN_MAJOR_KEYS = ROW.token_major_keys
MRS = ROW.mrs
SQC = ROW.sqc
NV_PV = ROW.nv_pv
SKB = ROW.skb
PF_BYTES = ROW.pf_bytes
SPLIT_MIN_KEYS = ROW.split_min_keys
ITEMS_PER_THREAD = ROW.items_per_thread
