"""The Problem: one validated attention call, normalised for the kernels, and
the planners that build it.

Contract: ``plan_*`` take the caller's arguments, run the checks of
:mod:`fastqkv._validate` (which raise) and return a :class:`Problem` whose
arrays are 4-D ``(B, H, L, D)`` views a kernel can walk, with ``out`` (and
``lse``) allocated.  The planner alone decides which kernel runs a call
(:attr:`Problem.route`: ``"tile"``, the tiled prefill kernel, or
``"stream"``, the streaming decode kernel) and, in :func:`prepare`, turns a
problem into one that route can run (a paged cache with score options
gathered dense, float16/bfloat16 storage with score options widened to
float32, quantized K/V dequantized for a kernel that does not read them).
Backends trust a Problem and follow its route.  Nothing here
copies an input unless a kernel could not walk it (non-unit last stride,
unaligned data, a stride that is not a whole number of elements).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from . import _config, _validate
from ._validate import bhld, lse_shape, user_shape

__all__ = ["Problem", "plan_attention", "plan_simple", "plan_varlen", "plan_paged",
           "attach_pages", "prepare", "densify_pages", "force_route"]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)

ROUTES = ("tile", "stream")
_forced_route = [None]


@contextlib.contextmanager
def force_route(route):
    """Inside the block, calls take ``route`` ("tile" or "stream"; None:
    the planner's own choice) wherever the call allows it: "stream" needs a
    call without score options, "tile" one with float32/float64 storage and
    a dense cache.  Process-wide; for tests and benchmarks, in every backend
    that follows :attr:`Problem.route`."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
    prev = _forced_route[0]
    _forced_route[0] = route
    try:
        yield
    finally:
        _forced_route[0] = prev


def _route(p):
    """The kernel that runs ``p``.  The streaming kernel reads paged caches,
    half storage and quantized K/V but applies no score options; the tiled
    kernel applies them but reads only dense float32/float64 (prepare() makes
    such copies; the float dtypes of two bytes are float16 and bfloat16)."""
    if p.has_score_options:
        return "tile"
    if p.block_table is not None or p.dtype.itemsize == 2 or p.k_scale is not None:
        return "stream"
    return _dense_route(p.Lq)


def _dense_route(Lq):
    """The route of a dense float32/float64 call without score options:
    decode steps stream, longer query blocks tile (unless forced)."""
    forced = _forced_route[0]
    if forced is not None:
        return forced
    return "stream" if _decode_len(Lq) else "tile"


def _decode_len(Lq):
    return Lq <= _config.STREAM_MAX_LQ


class Problem:
    """A validated attention call, normalised for the kernels.

    Arrays are 4-D ``(B, H, L, D)`` views (no copies unless needed to walk
    them); the last axis of q/k/v/out has unit stride.  ``mask`` and ``bias``
    are broadcast views of shape ``(B, Hq, Lq, Lk)`` (zero strides where the
    caller broadcast); ``bias`` and ``alibi`` are in the accumulation dtype.
    ``window_right`` already includes ``causal`` (causal means right = 0).
    ``key_lens`` is an int64 ``(B,)`` array or None (all ``Lk``).
    ``alibi`` is a contiguous ``(B, Hq)`` array or None.  ``sinks`` is a
    contiguous ``(Hq,)`` array in the accumulation dtype or None: one logit
    per query head that the softmax normaliser (and the lse) counts once
    with no value (see :mod:`fastqkv.reference`); it is not a score option,
    so both routes take it, in their epilogue or split-KV merge.

    Paged KV (``block_table`` not None): ``k`` and ``v`` are the caches
    ``(num_blocks, block_size, Hkv, D)``; key ``j`` of batch ``b`` and KV
    head ``g`` is ``k[block_table[b, j // block_size], j % block_size, g]``;
    ``Lk = max_blocks * block_size`` and ``key_lens`` holds the sequence
    lengths (table entries past a sequence's last block are not read).
    A backend that lists ``"paged"`` in its ``FEATURES`` receives such
    problems on the streaming route; others get a dense gathered copy.

    Quantized K/V (``k_scale`` not None): ``k`` and ``v`` hold int8 or
    float8 (one dtype, see :data:`fastqkv._validate.QUANT_DTYPES`) and
    ``dtype`` is q's; ``k_scale``/``v_scale`` are float32 views ``(B, Hkv,
    Lk)`` (paged: ``(num_blocks, block_size, Hkv)``), zero strides for one
    scale per KV head; key ``j`` is ``k[..., j, :] * k_scale[..., j]``.  A
    backend listing ``"quant"`` receives them on the streaming route with
    float32 q/out (``"quant_options"``: on the tiled route too); others get
    dequantized float32 copies.

    ``route`` is the kernel that runs the call (see :func:`_route`);
    ``round_to`` is None, or the half-width output a widened problem's
    float32 ``out`` is rounded into by :meth:`result`.
    """

    __slots__ = (
        "q", "k", "v", "out", "lse", "mask", "bias", "key_lens", "alibi",
        "scale", "softcap", "causal", "window_left", "window_right",
        "B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "dtype", "acc_dtype",
        "out_user", "lse_user", "copy_to", "return_lse", "layout", "ndim",
        "block_table", "block_size", "route", "round_to", "sinks", "k_scale", "v_scale",
    )

    @classmethod
    def _fast(cls, q, k, v, out, lse, mask, bias, key_lens, alibi, scale, softcap, causal,
              window_left, window_right, B, Hq, Hkv, Lq, Lk, D, Dv, dtype, acc_dtype, out_user,
              lse_user, copy_to, return_lse, layout, ndim, route=None):
        p = cls.__new__(cls)
        p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse; p.mask = mask  # noqa: E702
        p.bias = bias; p.key_lens = key_lens; p.alibi = alibi; p.scale = scale  # noqa: E702
        p.softcap = softcap; p.causal = causal; p.window_left = window_left  # noqa: E702
        p.window_right = window_right; p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq  # noqa: E702
        p.Lk = Lk; p.D = D; p.Dv = Dv; p.dtype = dtype; p.acc_dtype = acc_dtype  # noqa: E702
        p.out_user = out_user; p.lse_user = lse_user; p.copy_to = copy_to  # noqa: E702
        p.return_lse = return_lse; p.layout = layout; p.ndim = ndim  # noqa: E702
        p.block_table = None; p.block_size = None; p.round_to = None  # noqa: E702
        p.sinks = p.k_scale = p.v_scale = None
        p.route = _route(p) if route is None else route
        return p

    @property
    def group(self):
        """Query heads per KV head."""
        return self.Hq // self.Hkv

    @property
    def empty(self):
        return self.B == 0 or self.Hq == 0 or self.Lq == 0

    @property
    def has_score_options(self):
        """Whether scores take a mask, bias, ALiBi or softcap."""
        return self.mask is not None or self.bias is not None or self.alibi is not None \
            or bool(self.softcap)

    @property
    def decode_step(self):
        """A decode step: at most ``_config.STREAM_MAX_LQ`` query positions and
        no score options (memory-bound: each K/V byte is read once per step)."""
        return _decode_len(self.Lq) and not self.has_score_options

    def visible_keys(self, b):
        """Boolean ``(Hq, Lq, Lk_b)`` visibility of batch ``b`` (mask, causal,
        window; keys past ``Lk_b`` are already cut off)."""
        lkb = self.Lk if self.key_lens is None else int(self.key_lens[b])
        i = np.arange(self.Lq)[:, None] + (lkb - self.Lq)
        j = np.arange(lkb)[None, :]
        vis = np.ones((self.Lq, lkb), dtype=bool)
        if self.window_left >= 0:
            vis &= j >= i - self.window_left
        if self.window_right >= 0:
            vis &= j <= i + self.window_right
        vis = np.broadcast_to(vis, (self.Hq, self.Lq, lkb))
        if self.mask is not None:
            vis = vis & self.mask[b, :, :, :lkb]
        return vis

    def result(self):
        """What the public function returns, after the kernel filled out/lse."""
        if self.round_to is not None:
            self.round_to[...] = self.out
        if self.copy_to is not None:
            self.copy_to[...] = self.out_user
            self.out_user = self.copy_to
        if self.return_lse:
            return self.out_user, self.lse_user
        return self.out_user

    def __repr__(self):
        opts = []
        for name in ("causal", "window_left", "window_right", "softcap"):
            opts.append(f"{name}={getattr(self, name)}")
        for name in ("mask", "bias", "key_lens", "alibi", "sinks", "k_scale"):
            if getattr(self, name) is not None:
                opts.append(name)
        return (
            f"Problem(B={self.B}, Hq={self.Hq}, Hkv={self.Hkv}, Lq={self.Lq}, Lk={self.Lk}, "
            f"D={self.D}, Dv={self.Dv}, dtype={self.dtype}, scale={self.scale:.6g}, {', '.join(opts)}, "
            f"route={self.route})"
        )


def plan_attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                   window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None,
                   v_scale=None, layout="bhld", return_lse=False, out=None):
    """Check the arguments of :func:`fastqkv.attention`; return a Problem
    whose ``out`` (and ``lse``) are allocated and ready for a kernel."""
    c = _validate.check_attention(q, k, v, causal, mask, bias, key_lens, scale, window, softcap,
                                  alibi_slopes, layout, return_lse, out, sinks, k_scale, v_scale)
    B, Hq, Hkv, Lq, Lk, D, Dv = c.dims
    ndim = c.ndim
    dtype = c.q.dtype
    acc = _validate.acc_dtype(dtype)
    scale = 1.0 / math.sqrt(D) if c.scale is None else c.scale
    softcap = 0.0 if c.softcap is None else c.softcap
    wl, wr = c.window
    if c.causal:
        wr = 0
    full = (B, Hq, Lq, Lk)
    mask = None if c.mask is None else np.broadcast_to(c.mask, full)
    bias = c.bias
    if bias is not None:
        if bias.dtype != acc:
            bias = bias.astype(acc)
        bias = np.broadcast_to(_walkable_any(bias), full)
    alibi = None
    if c.alibi is not None:
        alibi = np.ascontiguousarray(np.broadcast_to(c.alibi.astype(acc), (B, Hq)))

    out_shape = user_shape(B, Hq, Lq, Dv, ndim, layout)
    copy_to = None
    if out is not None:
        out_user = out
        if Dv > 1 and (out.strides[-1] != out.itemsize or not out.flags.aligned):
            copy_to = out
            out_user = np.empty(out_shape, dtype)
    else:
        out_user = np.empty(out_shape, dtype)
    lse_user = None
    lse4 = None
    if c.return_lse:
        lse_user = np.empty(lse_shape(B, Hq, Lq, ndim), acc)
        lse4 = lse_user.reshape(B, Hq, Lq)

    p = Problem._fast(
        _walkable(bhld(c.q, layout)), _walkable(bhld(c.k, layout)), _walkable(bhld(c.v, layout)),
        bhld(out_user, layout), lse4, mask, bias, c.key_lens, alibi, scale, softcap, c.causal, wl,
        wr, B, Hq, Hkv, Lq, Lk, D, Dv, dtype, acc, out_user, lse_user, copy_to, c.return_lse,
        layout, ndim)
    p.sinks = c.sinks
    if c.k_scale is not None:
        p.k_scale, p.v_scale = (_walkable_any(_validate.scale_bhl(x, (B, Hkv, Lk), ndim, layout))
                                for x in (c.k_scale, c.v_scale))
        p.route = _route(p)
    return p


def plan_simple(q, k, v, causal, scale, return_lse, out=None):
    """The per-call fast path of plan_attention for its commonest call:
    C-contiguous aligned 4-D ``bhld`` ndarrays of one dtype (float32 or
    float64), no mask/bias/key_lens/window/softcap/ALiBi, non-empty work, and
    either no ``out`` or a C-contiguous aligned writeable ``out`` of the right
    shape and dtype whose memory bounds are disjoint from q, k and v.

    Returns a ready Problem, or None whenever anything differs; the caller
    then runs :func:`plan_attention`, which does every check and raises."""
    nd = np.ndarray
    if type(q) is not nd or type(k) is not nd or type(v) is not nd:
        return None
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt or (dt is not _F32 and dt is not _F64):
        return None
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if (Bk != B or Bv != B or Hv != Hkv or Lv != Lk or Dk != D or not (B and Hq and Lq and Lk and D and Dv)
            or not Hkv or Hq % Hkv):
        return None
    if (causal is not True and causal is not False) or (return_lse is not True and return_lse is not False):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    fq, fk, fv = q.flags, k.flags, v.flags
    if not (fq.c_contiguous and fk.c_contiguous and fv.c_contiguous and fq.aligned and fk.aligned
            and fv.aligned):
        return None
    acc = _F64 if dt is _F64 else _F32
    if out is None:
        out = np.empty((B, Hq, Lq, Dv), dt)
    else:
        if type(out) is not nd or out.dtype != dt or out.shape != (B, Hq, Lq, Dv):
            return None
        fo = out.flags
        if not (fo.c_contiguous and fo.aligned and fo.writeable):
            return None
        # bounds only: disjoint extents cannot overlap (anything else takes
        # the full check of plan_attention)
        may_share = np.may_share_memory
        if may_share(out, q) or may_share(out, k) or may_share(out, v):
            return None
    lse = np.empty((B, Hq, Lq), acc) if return_lse else None
    return Problem._fast(q, k, v, out, lse, None, None, None, None, scale, 0.0, causal, -1,
                         0 if causal else -1, B, Hq, Hkv, Lq, Lk, D, Dv, dt, acc, out, lse, None,
                         return_lse, "bhld", 4, _dense_route(Lq))


def _walkable(a):
    """Return ``a`` or a copy that a kernel can walk: aligned, unit last stride,
    every stride a whole number of elements."""
    flags = a.flags
    if flags.c_contiguous and flags.aligned:
        return a
    item = a.itemsize
    ok = flags.aligned
    if ok:
        for n, s in zip(a.shape, a.strides):
            if n > 1 and s % item:
                ok = False
                break
        if ok and a.ndim and a.shape[-1] > 1 and a.strides[-1] != item:
            ok = False
    return a if ok else _aligned_copy(a)


def _aligned_copy(a):
    """A C-contiguous copy in fresh (aligned) memory; ascontiguousarray would
    return an unaligned contiguous array unchanged."""
    return np.array(a, order="C", copy=True)


def _walkable_any(a):
    return a if a.flags.aligned else _aligned_copy(a)


# ---------------------------------------------------------------------------
# attention_varlen

def plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, mask, bias, key_lens, alibi_slopes,
                return_lse, out, causal=False, scale=None, window=None, softcap=None,
                sinks=None, k_scale=None, v_scale=None):
    """Check a packed ragged batch.  Returns
    ``(q, k, v, cu_q, cu_k, alibi (B, Hq) or None, sinks (Hq,) or None, out,
    lse or None, return_lse, k_scale, v_scale)`` with ``out`` zeroed (the rows
    of sequences without keys) and ``lse`` -inf (the sink of each head, with
    sinks); the scales as the caller gave them (None for float K/V)."""
    q, k, v, cq, ck, alibi, sinks, return_lse, k_scale, v_scale = _validate.check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, mask=mask, bias=bias, key_lens=key_lens,
        alibi_slopes=alibi_slopes, return_lse=return_lse, out=out, causal=causal, scale=scale,
        window=window, softcap=softcap, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    acc = _validate.acc_dtype(q.dtype)
    Hq = q.shape[1]
    if alibi is not None:
        alibi = np.ascontiguousarray(np.broadcast_to(alibi.astype(acc), (len(cq) - 1, Hq)))
    if out is None:
        out = np.empty((q.shape[0], Hq, v.shape[2]), q.dtype)
    out[...] = 0  # rows of empty-key sequences; rows of empty query spans do not exist
    lse = None
    if return_lse:
        lse = np.full((Hq, q.shape[0]), -np.inf, acc)
        if sinks is not None:
            lse[...] = sinks[:, None]
    return q, k, v, cq, ck, alibi, sinks, out, lse, return_lse, k_scale, v_scale


# ---------------------------------------------------------------------------
# paged_attention

def plan_paged(q, k_cache, v_cache, block_table, seq_lens, *, causal=False, mask=None, bias=None,
               scale=None, window=None, softcap=None, alibi_slopes=None, sinks=None,
               k_scale=None, v_scale=None, layout="bhld", return_lse=False, out=None,
               key_lens=None):
    """Check the arguments of :func:`fastqkv.paged_attention`; return a paged
    Problem (see :class:`Problem`)."""
    pages = _validate.check_paged(q, k_cache, v_cache, block_table, seq_lens, layout=layout,
                                  key_lens=key_lens, k_scale=k_scale, v_scale=v_scale)
    kd, vd = _placeholders(pages, layout)
    ones = None if pages.k_scale is None else np.ones(pages.k_cache.shape[2], _F32)
    p = plan_attention(
        q, kd, vd, causal=causal, mask=mask, bias=bias, key_lens=pages.seq_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=ones,
        v_scale=ones, layout=layout, return_lse=return_lse, out=out)
    return attach_pages(p, pages)


def attach_pages(p, pages):
    """Turn a Problem planned against dense placeholders of the gathered
    cache into a paged Problem on the caches ``pages`` (CheckedPages)."""
    _validate.check_out_overlap(p.out_user, (("k_cache", pages.k_cache), ("v_cache", pages.v_cache)))
    p.k = _walkable(pages.k_cache)
    p.v = _walkable(pages.v_cache)
    p.block_table = pages.block_table
    p.block_size = pages.block_size
    if pages.k_scale is not None:
        shape = pages.k_cache.shape[:3]
        p.k_scale, p.v_scale = (
            _walkable_any(np.broadcast_to(x if x.ndim == 3 else x[None, None], shape))
            for x in (pages.k_scale, pages.v_scale))
    p.route = _route(p)
    return p


def _placeholders(plan, q_ndim_layout):
    """Zero-stride stand-ins with the shape of the gathered dense K/V."""
    B, nb = plan.block_table.shape
    Lk = nb * plan.block_size
    Hkv = plan.k_cache.shape[2]
    shapes = [(B, Lk, Hkv, c.shape[3]) for c in (plan.k_cache, plan.v_cache)]
    if q_ndim_layout == "bhld":
        shapes = [(b, h, L, d) for b, L, h, d in shapes]
    # one real row of zeros per array, so the placeholders are walkable as they are
    return [np.broadcast_to(np.zeros(s[3], plan.k_cache.dtype), s) for s in shapes]


# ---------------------------------------------------------------------------
# what a route runs

def prepare(p, features=()):
    """Make a non-empty Problem with ``Lk > 0`` runnable on its route by a
    backend listing ``features``: a paged cache on the tiled route, or for a
    backend without ``"paged"``, becomes a dense gathered copy; half storage
    on the tiled route becomes float32 copies (rounded back by
    :meth:`Problem.result`) unless the backend lists ``"half_options"``.
    Quantized K/V become dequantized float32 copies unless the backend lists
    ``"quant"`` (on the tiled route: ``"quant_options"``); if it does, half
    q and out become float32 (q is small beside the cache)."""
    if p.k_scale is not None:
        if "quant" not in features or (p.route == "tile" and "quant_options" not in features):
            if p.block_table is not None:
                densify_pages(p)
            _dequantize(p)
        elif p.dtype.itemsize == 2 and "half_options" not in features:
            _widen(p, kv=False)
    if p.block_table is not None and (p.route == "tile" or "paged" not in features):
        densify_pages(p)
    if p.route == "tile" and p.dtype.itemsize == 2 and "half_options" not in features:
        _widen(p)
    return p


def densify_pages(p):
    """Replace a paged Problem's caches (and scales) by dense gathered
    (B, Hkv, Lk, D) copies (scales (B, Hkv, Lk), 1 past each sequence)."""
    bs = p.block_size
    kc, vc = p.k, p.v
    k = np.zeros((p.B, p.Hkv, p.Lk, kc.shape[3]), kc.dtype)
    v = np.zeros((p.B, p.Hkv, p.Lk, vc.shape[3]), vc.dtype)
    scales = [] if p.k_scale is None else [(s, np.ones((p.B, p.Hkv, p.Lk), _F32))
                                           for s in (p.k_scale, p.v_scale)]
    for b in range(p.B):
        n = int(p.key_lens[b])
        blocks = p.block_table[b, : -(-n // bs)]
        if n:
            k[b, :, :n] = kc[blocks].reshape(-1, p.Hkv, kc.shape[3])[:n].transpose(1, 0, 2)
            v[b, :, :n] = vc[blocks].reshape(-1, p.Hkv, vc.shape[3])[:n].transpose(1, 0, 2)
            for src, dst in scales:
                dst[b, :, :n] = src[blocks].reshape(-1, p.Hkv)[:n].T
    p.k, p.v = k, v
    if scales:
        p.k_scale, p.v_scale = (dst for _, dst in scales)
    p.block_table = p.block_size = None
    return p


def _dequantize(p):
    """Replace a dense quantized Problem's K/V by float32 copies
    ``k * k_scale`` (and widen half q/out, see :func:`_widen`)."""
    with np.errstate(all="ignore"):  # scales past key_lens are never read
        p.k, p.v = (np.multiply(x, s[..., None], dtype=_F32)
                    for x, s in ((p.k, p.k_scale), (p.v, p.v_scale)))
    p.k_scale = p.v_scale = None
    if p.dtype.itemsize == 2:
        _widen(p)
    return p


def _widen(p, kv=True):
    """Replace a half-storage Problem's q/k/v/out (``kv=False``: q/out) by
    float32 copies; C order (astype's order "K" can leave a broadcast,
    zero-stride axis innermost)."""
    p.q = np.ascontiguousarray(p.q, dtype=_F32)
    if kv:
        p.k, p.v = (np.ascontiguousarray(x, dtype=_F32) for x in (p.k, p.v))
    p.round_to = p.out
    p.out = np.empty(p.out.shape, _F32)
    p.dtype = _F32
    return p
