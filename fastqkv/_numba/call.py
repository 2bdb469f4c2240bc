"""What the drivers hand their work items: the call, flag bits, scratch.

Contract: the ``flags`` bits a driver call carries (which optional inputs
are real, and whether K/V are a paged cache); the jitted helpers that cut a
thread's scratch out of the caller's flat workspace; and the named tuples a
driver builds once per thread for its work items - the call
(:class:`TileCall`, :class:`StreamCall`), the thread scratch
(:class:`TileScratch`, :class:`StreamScratch`), the K/V packed once
(:class:`PackedKV`), the split partials (:class:`Partials`) and a streaming
chunk (:class:`Chunk`).  The micro-kernels and the per-row helpers keep
plain arguments.
"""

from __future__ import annotations

from typing import NamedTuple

from numba import njit

from . import cache  # noqa: F401  (before any jitted function: the package-wide cache stamp)

# bits of the `flags` argument
HAS_LSE = 1
HAS_MASK = 2
HAS_BIAS = 4
HAS_KEY_LENS = 8
HAS_ALIBI = 16
PAGED = 32            # streaming driver only: K/V are a paged cache
HAS_SINKS = 64


@njit(nogil=True, cache=True, inline="always")
def _a16(n):
    """``n`` rounded up to 16 elements (64 bytes or more)."""
    return (n + 15) & ~15


@njit(nogil=True, cache=True, inline="always")
def _carve(ws, at, n):
    """``ws[at:at+n]`` and ``at + n``."""
    return ws[at:at + n], at + n


@njit(nogil=True, cache=True, inline="always")
def _carve16(ws, at, n):
    """``ws[at:at+n]`` and the next start, rounded up to 16 elements: with
    ``ws`` 64-byte aligned, every scratch array starts on a cache line."""
    return ws[at:at + n], at + _a16(n)


# Named tuples a driver builds once per thread and hands to its work items.
# Their arrays are borrowed (vec._borrow): they live for the whole call, and
# views taken of them cost no atomic reference counting.

class TileCall(NamedTuple):
    """A tiled-kernel call, as its work items read it."""

    q: object           #: (B, Hq, Lq, D) queries
    k: object           #: (B, Hkv, Lk, D) keys
    v: object           #: (B, Hkv, Lk, Dv) values
    out: object         #: (B, Hq, Lq, Dv) output
    lse: object         #: (B, Hq, Lq) log-sum-exp when HAS_LSE, else a dummy
    mask: object        #: (B, Hq, Lq, Lk) bool, True = visible, when HAS_MASK, else a dummy
    bias: object        #: (B, Hq, Lq, Lk) added to the scores when HAS_BIAS, else a dummy
    key_lens: object    #: (B,) int64 keys of each batch when HAS_KEY_LENS, else a dummy
    alibi: object       #: (B, Hq) ALiBi slopes when HAS_ALIBI, else a dummy
    sinks: object       #: (Hq,) sink logits when HAS_SINKS, else a dummy
    sc: float           #: scale of the scores
    softcap: float      #: > 0: scores capped by ``softcap * tanh(s / softcap)``
    wl: int             #: window: keys up to wl before the aligned position (-1: unbounded)
    wr: int             #: window: keys up to wr after it (-1: unbounded; causal is 0)
    flags: int          #: HAS_* bits


class TileScratch(NamedTuple):
    """One thread's scratch of the tiled kernel (``R`` rows: an item's
    ``G*qt`` rows padded; ``ktp``: a tile's keys padded to whole panels)."""

    qs: object          #: Q rows, packed per MR-row block (wide items) or (R, D)
    ks: object          #: (ktp, D) K tile: K^T panels (wide items) or K rows
    vs: object          #: (ktp, Dvp) V rows of a tile, columns Dv: zero
    s: object           #: (R, lds) scores S, then the probabilities P over them
    o: object           #: (R, Dvp) unnormalised output O
    m: object           #: (R,) running row max
    l: object           #: (R,) running row sum
    alpha: object       #: (R,) exp(m_old - m_new) of the last tile


class PackedKV(NamedTuple):
    """K and V of a call packed once for all query tiles (``on`` False: each
    item packs its own tiles and the arrays are placeholders)."""

    on: bool            #: the call is prepacked
    kp: object          #: (B, Hkv, tiles, ktp, D) K^T panels of NR keys per tile
    vp: object          #: (B, Hkv, tiles, ktp, Dvp) V rows per tile
    bad: object         #: (B, Hkv, tiles) the V tile holds inf or NaN


class StreamCall(NamedTuple):
    """A streaming-kernel call, as its work items read it."""

    q: object           #: (B, Hq, Lq, D) queries (16-bit storage: uint16 bits; quantized K/V: float32)
    k: object           #: (B, Hkv, Lk, D) keys, or the paged cache (blocks, block size, Hkv, D)
    v: object           #: values, as k
    key_lens: object    #: (B,) int64 keys of each batch (paged, or HAS_KEY_LENS), else a dummy
    bt: object          #: (B, blocks per sequence) block table when paged, else a dummy
    kscale: object      #: quantized K: (B, Hkv, Lk) scales, paged (blocks, block size, Hkv); else a dummy
    vscale: object      #: quantized V: the scales of v, as kscale
    sc: float           #: scale of the scores
    wl: int             #: window: keys up to wl before the aligned position (-1: unbounded)
    wr: int             #: window: keys up to wr after it (-1: unbounded; causal is 0)
    flags: int          #: HAS_* and PAGED bits
    kind: int           #: storage decode (vec.KIND_*)
    paged: bool         #: flags & PAGED


class StreamScratch(NamedTuple):
    """One thread's scratch of the streaming kernel, per KV head ``hh`` of
    an item (``R`` rows: the group's rows padded; ``sktp``: a chunk's keys
    padded, see stream._chunk_room)."""

    qs: object          #: (hpi, R, D) Q rows, widened
    QT: object          #: (hpi, R*D) the same rows transposed: Q^T[t*ldt + r]
    ks: object          #: (hpi, sktp, D) K rows of a gathered chunk, widened
    vs: object          #: (hpi, sktp, Dv) V rows of a gathered chunk, widened
    s: object           #: (hpi, R, sktp) scores S (or S^T), then P over them
    o: object           #: (hpi, R, Dvp) unnormalised output O
    m: object           #: (hpi, R) running row max
    l: object           #: (hpi, R) running row sum
    alpha: object       #: (hpi, R) exp(m_old - m_new) of the last chunk
    mx: object          #: (R,) the transposed softmax's row maxima
    tab: object         #: (4*sktp,) int64 row byte offsets: K rows at 0, V rows at 2*sktp
    ksc: object         #: (hpi, sktp) quantized K: the scales of a chunk's keys (times vec._dec_factor)
    vsc: object         #: (hpi, sktp) quantized V: the same for its values


class Partials(NamedTuple):
    """Split partials of a streaming call: row ``R = ((b*Hq + h)*Lq + i)*nsmax + split``."""

    po: object          #: (rows, Dv) unnormalised O of each split
    pm: object          #: (rows,) its row max
    pl: object          #: (rows,) its row sum
    nsmax: int          #: slots per output row (the most splits of any batch)


class Chunk(NamedTuple):
    """A chunk of keys that every row of a streaming item sees whole."""

    b: int              #: batch
    kv0: int            #: first KV head of the item
    hpi: int            #: KV heads of the item
    c0: int             #: first key
    n: int              #: keys
    nn: int             #: keys of the next chunk, whose rows follow in the row tables
    ktab: int           #: offset of the K rows in the row table
    vtab: int           #: offset of the V rows
