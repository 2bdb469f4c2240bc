"""Launcher of the Numba backend: signatures, driver cache, workspace, call.

Contract: :func:`run` fills ``p.out`` (and ``p.lse``) for a Problem
prepared by :func:`fastqkv._problem.prepare`, on the kernel its ``route``
names (``"stream"``: decode, paged caches, 16-bit storage and quantized
K/V without score options; ``"tile"``: the tiled kernel, dense
float32/float64).  Importing
this module imports numba; :mod:`fastqkv._numba` imports it on first use
only.

* Drivers: one signature per dtype (:data:`SIGNATURES`,
  :data:`STREAM_SIGNATURES`: float32, float64, 16-bit storage as uint16
  bits, and int8 / float8 K/V as uint8 bits under float32 queries),
  compiled or loaded from Numba's disk cache on first use by
  :func:`driver` / :func:`stream_driver`.  Each signature is a kernel of
  :data:`KERNELS`, named ``(route, dtype name)``: :func:`kernel` is the one
  a Problem runs on, :func:`cached_kernels` those on disk.
* Workspace: per Python thread, grown on demand and kept between calls
  (:func:`_workspace`), so a steady loop allocates nothing.
* Threads: no more than work items, none woken for tiny calls
  (:func:`_threads_for`).
* Ctrl-C: :func:`abort` stops the calls of the thread marked by
  :func:`interruptible` between work items.
* Tile sizes are read from :mod:`.tuning` at each call; ``FORCE_SPLIT``
  forces the keys per split (tests).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, types

from .. import _config
from .._validate import storage_name
from . import tuning
from .call import HAS_ALIBI, HAS_BIAS, HAS_KEY_LENS, HAS_LSE, HAS_MASK, HAS_SINKS, PAGED
from .prefill import _attention_py, _layout
from .stream import _chunk_room, _stream_layout, _stream_py
from .vec import KIND_BF16, KIND_E4M3, KIND_E5M2, KIND_F16, KIND_FLOAT, KIND_I8

__all__ = ["driver", "stream_driver", "run", "warmup", "cache_status", "kernel", "compile_kernel",
           "cached_kernels", "release_workspace", "SIGNATURES", "STREAM_SIGNATURES", "KERNELS"]

# > 0: keys per split of every streaming call (tests)
FORCE_SPLIT = 0


def _signature(dt):
    def arr(dtype, ndim, readonly):
        return types.Array(dtype, ndim, "A", readonly=readonly)
    i64 = types.int64
    return types.void(
        arr(dt, 4, True), arr(dt, 4, True), arr(dt, 4, True),      # q, k, v
        arr(dt, 4, False), arr(dt, 3, False),                      # out, lse
        arr(types.boolean, 4, True), arr(dt, 4, True),             # mask, bias
        arr(i64, 1, True), arr(dt, 2, True), arr(dt, 1, True),     # key_lens, alibi, sinks
        dt, dt, i64, i64, i64, i64, i64, i64,       # scale, softcap, wl, wr, flags, qt, kt, nthreads
        types.Array(dt, 1, "C"), types.Array(types.boolean, 1, "C"),   # workspace
        types.Array(i64, 1, "C"))                                       # work queue


SIGNATURES = {np.dtype(np.float32): _signature(types.float32),
              np.dtype(np.float64): _signature(types.float64)}


def _stream_signature(st):
    """K/V storage ``st``; q and out have it too, except under 8-bit K/V
    (uint8 bits: int8 or float8), whose q and out are float32."""
    def arr(dtype, ndim, readonly):
        return types.Array(dtype, ndim, "A", readonly=readonly)
    acc = types.float64 if st == types.float64 else types.float32
    qt = acc if st == types.uint8 else st
    i64 = types.int64
    return types.void(
        arr(qt, 4, True), arr(st, 4, True), arr(st, 4, True),      # q, k, v (or the caches)
        arr(qt, 4, False), arr(acc, 3, False),                     # out, lse
        arr(i64, 1, True), arr(i64, 2, True), arr(acc, 1, True),   # key_lens, block_table, sinks
        arr(acc, 3, True), arr(acc, 3, True),                      # k_scale, v_scale (8-bit K/V)
        acc, i64, i64, i64, i64,                                   # scale, wl, wr, flags, kind
        i64, i64, i64, i64, i64,                                   # qt, skt, hpi, split, nthreads
        types.Array(acc, 1, "C"), types.Array(i64, 1, "C"))        # workspace, queue


STREAM_SIGNATURES = {np.dtype(np.float32): _stream_signature(types.float32),
                     np.dtype(np.float64): _stream_signature(types.float64),
                     np.dtype(np.uint16): _stream_signature(types.uint16),
                     np.dtype(np.uint8): _stream_signature(types.uint8)}


# (driver, dtype) -> compiled dispatcher
_compiled = {}
_compiled_lock = threading.Lock()


def _compile(py_func, signatures, dtype):
    """``py_func`` compiled for ``signatures[dtype]`` only (or loaded from the
    disk cache), once per process."""
    key = (py_func, dtype)
    fn = _compiled.get(key)
    if fn is None:
        with _compiled_lock:
            fn = _compiled.get(key)
            if fn is None:
                fn = njit([signatures[dtype]], parallel=True, nogil=True, cache=True)(py_func)
                _compiled[key] = fn
    return fn


def driver(dtype):
    """The compiled tiled-kernel driver for float32 or float64 inputs: one
    signature per dtype, compiled (or loaded from the disk cache) on first
    use, so a float32 user never pays for the float64 code."""
    return _compile(_attention_py, SIGNATURES, np.dtype(dtype))


def stream_driver(dtype):
    """The compiled streaming driver for float32, float64, 16-bit (uint16
    bits) or 8-bit (uint8 bits) storage; compiled or loaded from the disk
    cache on first use."""
    return _compile(_stream_py, STREAM_SIGNATURES, np.dtype(dtype))


# ---------------------------------------------------------------------------
# dummies for absent options, tile sizes, workspace

_DUMMIES = {}
_BT_DUMMY = np.zeros((1, 1), np.int64)
_OPTIONAL = (("lse", HAS_LSE), ("mask", HAS_MASK), ("bias", HAS_BIAS),
             ("key_lens", HAS_KEY_LENS), ("alibi", HAS_ALIBI), ("sinks", HAS_SINKS))


def _dummies(dt):
    d = _DUMMIES.get(dt)
    if d is None:
        d = dict(
            lse=np.zeros((1, 1, 1), dt),
            mask=np.ones((1, 1, 1, 1), np.bool_),
            bias=np.zeros((1, 1, 1, 1), dt),
            key_lens=np.zeros(1, np.int64),
            alibi=np.zeros((1, 1), dt),
            sinks=np.zeros(1, dt),
            scale=np.zeros((1, 1, 1), dt),
        )
        _DUMMIES[dt] = d
    return d


def tiles(p):
    """``(qt, kt)``: query positions per work item and keys per K/V tile."""
    g = p.Hq // p.Hkv
    qt = max(1, tuning.ROWS // g)
    if p.window_left < 0 and p.window_right < 0 and p.Lq <= 2 * qt and p.B * p.Hkv >= tuning.MIN_HEADS_WHOLE:
        qt = p.Lq       # no window to skip tiles by: one item per head (encoder L128)
    qt = min(qt, p.Lq)
    kt = tuning.DECODE_KEYS if g * qt <= 8 else tuning.KEYS
    kt = min(kt, (p.Lk + 3) & ~3)
    return qt, kt


_local = threading.local()
# the workspace dict of the thread whose calls abort() stops, or None
_abortable = None
# a work counter past every item: the drivers' loops take nothing more
_PAST_ALL = 1 << 62


def _bufs():
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    return bufs


def interruptible():
    """Make the calling thread's calls the ones :func:`abort` stops."""
    global _abortable
    _abortable = _bufs()


def abort(on):
    """Stop the interruptible thread's running call between work items: its
    work counters (the drivers' ``queue``) jump past every item.  A driver
    resets them when it starts, so the caller repeats this until the call
    has returned; the next call starts afresh (``on`` false: nothing to
    undo).  The streaming driver then merges whatever the splits hold into
    ``out``: the caller raises instead of returning it."""
    queue = None if not on or _abortable is None else _abortable.get("queue")
    if queue is not None:
        queue[0] = queue[1] = _PAST_ALL


def _workspace(dt, nfloat, nbool, nqueue=2):
    """This thread's workspace (grown on demand, kept between calls, so a
    steady loop allocates nothing): ``(floats of dtype dt, bools, queue)``.
    It holds about the size of K and V of the largest multi-tile call;
    :func:`release_workspace` frees it."""
    bufs = _bufs()
    ws = bufs.get(dt)
    if ws is None or ws.shape[0] < nfloat:
        ws = bufs[dt] = _aligned(max(nfloat, 1), dt)
    wsb = bufs.get("bool")
    if wsb is None or wsb.shape[0] < nbool:
        wsb = bufs["bool"] = np.empty(max(nbool, 1), np.bool_)
    queue = bufs.get("queue")
    if queue is None or queue.shape[0] < nqueue:
        queue = bufs["queue"] = np.zeros(max(nqueue, 2), np.int64)
    return ws, wsb, queue


def _aligned(n, dt, align=64):
    """An empty 1-d array of ``n`` elements of ``dt`` starting on an
    ``align``-byte boundary (vector loads of the micro-kernels then do not
    straddle cache lines)."""
    dt = np.dtype(dt)
    raw = np.empty(n * dt.itemsize + align, np.uint8)
    at = -raw.ctypes.data % align
    return raw[at:at + n * dt.itemsize].view(dt)


def release_workspace():
    """Free the calling thread's kernel workspace, and that of the thread
    that runs its long calls (:func:`interruptible`)."""
    _bufs().clear()
    if _abortable is not None:
        _abortable.clear()


def _key_padding(p):
    """A key-padding mask (broadcast over heads and queries) seen as lengths.

    Returns None, or ``(lens, exact)``: keys ``>= lens[b]`` are masked for
    every query of batch ``b`` (their tiles are then skipped, not masked),
    and ``exact`` says the mask is nothing more than that.  Only when
    lengths cannot change the meaning of anything else: no ``key_lens``
    (they would move the bottom-right alignment), no window, causal or
    ALiBi.  The mask is read, never copied.
    """
    m = p.mask
    if (m is None or p.key_lens is not None or p.alibi is not None
            or p.window_left >= 0 or p.window_right >= 0
            or m.strides[1] != 0 or m.strides[2] != 0 or p.Lk == 0):
        return None
    rows = m[:, 0, 0, :]                                  # (B, Lk) view
    any_true = rows.any(axis=1)
    last = p.Lk - np.argmax(rows[:, ::-1], axis=1)        # 1 + index of the last True
    lens = np.where(any_true, last, 0).astype(np.int64)
    if (lens == p.Lk).all():
        return None
    exact = bool(np.array_equal(rows, np.arange(p.Lk)[None, :] < lens[:, None]))
    return lens, exact


# ---------------------------------------------------------------------------
# threads

def _call_threads(n, fn, *args):
    """``fn(*args)`` (a parallel driver whose ``prange`` loops run at most
    ``n`` iterations) with Numba's pool at least ``n`` threads wide.  A wider
    pool is left as it is: each ``numba.set_num_threads`` costs microseconds,
    a sizeable part of a small call."""
    old = numba.get_num_threads()
    if old >= n:
        fn(*args)
        return
    numba.set_num_threads(n)
    try:
        fn(*args)
    finally:
        numba.set_num_threads(old)


def _threads_for(num_threads, items, work):
    """No more threads than work items, and none woken for tiny calls."""
    n = min(int(num_threads), numba.config.NUMBA_NUM_THREADS, items, 1 + work // tuning.MIN_WORK_PER_THREAD)
    return max(1, n)


# ---------------------------------------------------------------------------
# the call

# storage dtype name -> the kernels' element codec (vec.KIND_*); the
# 8-bit ones read as uint8 bits
_KINDS = {"float16": KIND_F16, "bfloat16": KIND_BF16,
          "int8": KIND_I8, "float8_e4m3fn": KIND_E4M3, "float8_e5m2": KIND_E5M2}
_BITS = {2: np.dtype(np.uint16), 1: np.dtype(np.uint8)}


def _kind(dt):
    return _KINDS.get(storage_name(dt), KIND_FLOAT)


def _stream_storage(dt, kind):
    """The dtype of the streaming signature that reads K/V storage ``dt`` of
    element codec ``kind``: 16-bit floats by their uint16 bits, int8 and
    float8 by their uint8 bits."""
    return _BITS[dt.itemsize] if kind != KIND_FLOAT else dt


def run(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) of a prepared Problem on its route
    (:attr:`fastqkv._problem.Problem.route`): the streaming kernel or the
    tiled one."""
    if p.route == "stream":
        _run_stream(p, num_threads)
    else:
        _run_general(p, num_threads)


def heads_per_item(p):
    """KV heads per streaming work item: 1 when each head's K rows lie
    together (bhld), all of them when the cache is token-major (paged
    caches, blhd), so that a token's K/V for every head is read in one
    contiguous run."""
    if p.block_table is not None:
        return p.Hkv
    k = p.k
    if p.Hkv > 1 and p.Lk > 1 and abs(k.strides[1]) < abs(k.strides[2]):
        return p.Hkv
    return 1


def split_keys(p, num_threads, qt, skt, hpi=1):
    """Keys per KV split of a streaming call: splits only for decode-like
    calls (Lq <= _config.STREAM_MAX_LQ), sized so that there are about
    ITEMS_PER_THREAD work items per thread and at least SPLIT_MIN_KEYS keys
    per split; ``FORCE_SPLIT`` (tests) overrides."""
    lk = p.Lk
    if FORCE_SPLIT:
        return int(FORCE_SPLIT)
    if p.Lq > _config.STREAM_MAX_LQ:
        return max(1, lk)
    nqt = -(-p.Lq // qt)
    total = int(p.key_lens.sum()) if p.key_lens is not None else p.B * lk
    target = tuning.ITEMS_PER_THREAD * max(1, int(num_threads))
    split = max(tuning.SPLIT_MIN_KEYS, -(-total * (p.Hkv // hpi) * nqt // target))
    # as many splits as that needs, of equal length (the longest sequence's
    # last split is then not a sliver beside a few long items)
    split = -(-lk // -(-lk // split))
    split = -(-split // skt) * skt
    return max(1, min(split, lk))


def _run_stream(p, num_threads):
    dt = np.dtype(p.dtype)
    kv = np.dtype(p.k.dtype)
    kind = _kind(kv)
    st = _stream_storage(kv, kind)
    acc = np.dtype(p.acc_dtype)
    fn = stream_driver(st)
    dm = _dummies(acc)
    q, k, v, out = p.q, p.k, p.v, p.out
    tmp = None
    if not out.flags.aligned:   # possible only when Dv == 1
        tmp = np.empty(out.shape, dt)
        out = tmp
    if kind != KIND_FLOAT:
        k, v = k.view(st), v.view(st)
        if p.k_scale is None:   # 16-bit storage: q and out too
            q, out = q.view(st), out.view(st)
    k_scale = dm["scale"] if p.k_scale is None else p.k_scale
    v_scale = dm["scale"] if p.v_scale is None else p.v_scale
    flags = 0
    lse = dm["lse"]
    if p.lse is not None:
        flags |= HAS_LSE
        lse = p.lse
    key_lens = dm["key_lens"]
    if p.key_lens is not None:
        flags |= HAS_KEY_LENS
        key_lens = p.key_lens
    bt = _BT_DUMMY
    if p.block_table is not None:
        flags |= PAGED
        bt = p.block_table
    sinks = dm["sinks"]
    if p.sinks is not None:
        flags |= HAS_SINKS
        sinks = p.sinks
    g = p.Hq // p.Hkv
    qt = min(p.Lq, max(1, tuning.ROWS // g))
    hpi = heads_per_item(p)
    skt = tuning.TOKEN_MAJOR_KEYS if hpi > 1 else (tuning.DECODE_STREAM_KEYS if p.Lq == 1 else tuning.STREAM_KEYS)
    split = split_keys(p, num_threads, qt, skt, hpi)
    nqt = -(-p.Lq // qt)
    # plain Python over the lengths: a small decode call is over in tens of
    # microseconds, and each NumPy call on a tiny array costs several
    lens = p.key_lens.tolist() if p.key_lens is not None else [p.Lk] * p.B
    ns = [max(1, -(-x // split)) for x in lens]
    items = sum(ns) * (p.Hkv // hpi) * nqt
    work = p.Hq * p.Lq * sum(lens) * (p.D + p.Dv)
    n = _threads_for(num_threads, items, work)
    part, per = _stream_layout.py_func(p.B, p.Hq, p.Lq, g, p.D, p.Dv, qt, skt, hpi, max(ns))
    ws, _, queue = _workspace(acc, part + n * per, 0, 4 + p.B + n * 4 * _chunk_room(skt))
    _call_threads(n, fn, q, k, v, out, lse, key_lens, bt, sinks, k_scale, v_scale, acc.type(p.scale),
                  int(p.window_left), int(p.window_right), flags, kind, qt, skt, hpi, split, n, ws, queue)
    if tmp is not None:
        p.out[...] = tmp


def _run_general(p, num_threads):
    """Fill ``p.out`` (and ``p.lse``) for a validated float32/float64 Problem
    on the tiled kernel."""
    dt = np.dtype(p.dtype)
    fn = driver(dt)
    dm = _dummies(dt)
    flags = 0
    args = {}
    for name, bit in _OPTIONAL:
        a = getattr(p, name)
        if a is None:
            a = dm[name]
        else:
            flags |= bit
        args[name] = a
    key_lens = _key_padding(p)
    if key_lens is not None:
        flags |= HAS_KEY_LENS
        args["key_lens"] = key_lens[0]
        if key_lens[1]:
            flags &= ~HAS_MASK
    out = p.out
    tmp = None
    if not out.flags.aligned:   # possible only when Dv == 1
        tmp = np.empty(out.shape, dt)
        out = tmp
    qt, kt = tiles(p)
    T = dt.type
    items = p.B * p.Hkv * -(-p.Lq // qt)
    work = p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv)
    n = _threads_for(num_threads, items, work)
    g = p.Hq // p.Hkv
    per, nkp, nvp, nbad = _layout(p.B, p.Hkv, p.Lq, p.Lk, g, p.D, p.Dv, qt, kt, n)
    ws, wsb, queue = _workspace(dt, nkp + nvp + n * per, nbad)
    _call_threads(n, fn, p.q, p.k, p.v, out, args["lse"], args["mask"], args["bias"], args["key_lens"],
                  args["alibi"], args["sinks"], T(p.scale), T(p.softcap),
                  int(p.window_left), int(p.window_right), flags, qt, kt, n, ws, wsb, queue)
    if tmp is not None:
        p.out[...] = tmp


def warmup():
    """Compile (or load from the disk cache) every signature; returns :func:`cache_status`."""
    for key in KERNELS:
        compile_kernel(key)
    return cache_status()


# ---------------------------------------------------------------------------
# kernels: one compiled signature of a driver, named (route, dtype name)

_DRIVERS = {"tile": (_attention_py, SIGNATURES), "stream": (_stream_py, STREAM_SIGNATURES)}
KERNELS = tuple((route, dt.name) for route, (_fn, sigs) in _DRIVERS.items() for dt in sigs)


def kernel(p):
    """The kernel that runs a planned Problem ``p`` on its route:
    ``("tile", "float32" | "float64")`` (other storage is read as float32
    copies) or ``("stream", storage)`` (``"uint16"`` for 16-bit floats,
    ``"uint8"`` for int8/float8 K/V)."""
    dt = np.dtype(p.dtype)
    if p.route == "stream":
        kv = np.dtype(p.k.dtype)
        return "stream", _stream_storage(kv, _kind(kv)).name
    return "tile", "float64" if dt == np.float64 else "float32"


def compile_kernel(key):
    """Compile ``key`` of :data:`KERNELS` (or load it from the disk cache)."""
    route, name = key
    (driver if route == "tile" else stream_driver)(np.dtype(name))


def cached_kernels():
    """The kernels of :data:`KERNELS` that Numba's disk cache holds for this
    CPU and these sources, and the cache's directory (reads Numba's cache
    index, a private API: raises what it raises)."""
    from numba.core.caching import FunctionCache
    from numba.core.registry import cpu_target

    codegen = cpu_target.target_context.codegen()
    found, where = set(), None
    for route, (fn, sigs) in _DRIVERS.items():
        cache = FunctionCache(fn)
        index = cache._cache_file._load_index()
        where = cache._cache_path
        found.update((route, dt.name) for dt, sig in sigs.items() if cache._index_key(sig, codegen) in index)
    return found, where


def cache_status():
    """``{"warm": bool | None, "signatures": n cached of N, "dir": path}`` from
    Numba's cache index of the drivers (None when it cannot be read)."""
    try:
        found, where = cached_kernels()
    except Exception as exc:  # noqa: BLE001 - private Numba API; report, never raise
        return {"warm": None, "signatures": f"unknown ({type(exc).__name__}: {exc})", "dir": None}
    return {"warm": len(found) == len(KERNELS), "signatures": f"{len(found)} of {len(KERNELS)}", "dir": where}
