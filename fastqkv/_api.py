"""Public functions: plan (which checks) -> dispatch -> the result.

Every function here checks its arguments through :mod:`fastqkv._problem`'s
planners before any work, runs the kernels of the backend
:mod:`fastqkv._dispatch` resolves through :func:`fastqkv._interrupt.run`
(Ctrl-C) and uses the oracle (:mod:`fastqkv.reference`) only through its public
functions."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _dispatch, _interrupt, _problem, _validate

Window = Optional[Tuple[int, int]]
Result = Union[NDArray, Tuple[NDArray, NDArray]]

__all__ = ["attention", "attention_varlen", "paged_attention", "merge_attention",
           "attention_weights", "self_attention", "shared_prefix_attention",
           "shared_prefix_paged_attention"]


def _run(p, backend):
    """Dispatch a validated Problem and return the public result."""
    mod, name = _dispatch.resolve(backend, p)
    if not p.empty:
        if p.Lk == 0:
            p.out[...] = 0
            if p.lse is not None:
                p.lse[...] = -np.inf if p.sinks is None else p.sinks[:, None]
        else:
            _interrupt.run(mod, name, _problem.prepare(p, getattr(mod, "FEATURES", ())),
                           _dispatch.get_num_threads())
    return p.result()


def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = False,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None,
              key_lens: Optional[ArrayLike] = None, scale: Optional[float] = None,
              window: Window = None, softcap: Optional[float] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              k_scale: Optional[ArrayLike] = None, v_scale: Optional[ArrayLike] = None,
              layout: str = "bhld", return_lse: bool = False, out: Optional[NDArray] = None,
              backend: str = "auto") -> Result:
    """Fused attention ``softmax(scale * q k^T + bias) v``.

    Semantics are those of :func:`fastqkv.reference.attention` (its module
    docstring is normative).  ``backend`` is ``"auto"`` or a name from
    :func:`fastqkv.backends`.  Returns ``out`` or ``(out, lse)``.
    Quantized ``k``/``v`` (int8, float8_e4m3fn, float8_e5m2) come with their
    float32 ``k_scale``/``v_scale`` (see :func:`fastqkv.quantize_kv`).

    Ctrl-C stops a long call of the ``c`` or ``numba`` backend within a work
    item and raises KeyboardInterrupt; the inputs are untouched, but ``out=``
    may then hold partial results.
    """
    if (mask is None and bias is None and key_lens is None and window is None and softcap is None
            and alibi_slopes is None and sinks is None and layout == "bhld"
            and k_scale is None and v_scale is None and type(backend) is str):
        p = _problem.plan_simple(q, k, v, causal, scale, return_lse, out)
        if p is not None:
            mod, name = _dispatch.resolve(backend, p)
            _interrupt.run(mod, name, p, _dispatch.get_num_threads())
            return (p.out, p.lse) if return_lse else p.out
    _dispatch._check_name(backend, "backend")
    p = _problem.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
        v_scale=v_scale, layout=layout, return_lse=return_lse, out=out)
    return _run(p, backend)


def attention_weights(q: ArrayLike, k: ArrayLike, *, causal: bool = False,
                      mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None,
                      key_lens: Optional[ArrayLike] = None, scale: Optional[float] = None,
                      window: Window = None, softcap: Optional[float] = None,
                      alibi_slopes: Optional[ArrayLike] = None,
                      sinks: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
                      layout: str = "bhld", backend: str = "auto") -> NDArray:
    """Softmax probabilities ``(B, Hq, Lq, Lk)`` for inspection; see
    :func:`fastqkv.reference.attention_weights`.  The normaliser comes from
    the dispatched fused pass's lse; scores are recomputed with NumPy."""
    v = _validate.stand_in_v(k)
    _, lse = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens,
                       scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       sinks=sinks, k_scale=k_scale, v_scale=k_scale, layout=layout,
                       return_lse=True, backend=backend)
    p = _problem.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, k_scale=k_scale,
        v_scale=k_scale, layout=layout)
    acc = p.acc_dtype.type
    w = np.zeros((p.B, p.Hq, p.Lq, p.Lk), dtype=p.acc_dtype)
    lse4 = np.asarray(lse).reshape(p.B, p.Hq, p.Lq)
    for b in range(0 if p.empty else p.B):
        s = _scores(p, b, acc)
        with np.errstate(all="ignore"):
            e = np.exp(s - lse4[b][..., None])
        w[b, :, :, : s.shape[-1]] = np.where(np.isneginf(lse4[b])[..., None], 0, e)
    return w[(0,) * (4 - p.ndim)]


def _scores(p, b, dtype):
    """Scores ``(Hq, Lq, Lk_b)`` of batch ``b`` of Problem ``p`` in ``dtype``
    (the accumulation type), score options applied, invisible keys -inf."""
    lkb = p.Lk if p.key_lens is None else int(p.key_lens[b])
    kb = p.k[b, :, :lkb].astype(dtype)
    if p.k_scale is not None:
        kb = kb * p.k_scale[b, :, :lkb, None].astype(dtype)
    kb = kb[np.arange(p.Hq) // p.group]
    with np.errstate(all="ignore"):
        s = np.matmul(p.q[b].astype(dtype), kb.transpose(0, 2, 1)) * dtype(p.scale)
        if p.softcap:
            c = dtype(p.softcap)
            s = c * np.tanh(s / c)
        if p.bias is not None:
            s = s + p.bias[b, :, :, :lkb].astype(dtype)
        if p.alibi is not None:
            dist = np.abs(np.arange(p.Lq)[:, None] + (lkb - p.Lq) - np.arange(lkb)[None, :])
            s = s - p.alibi[b].astype(dtype)[:, None, None] * dist.astype(dtype)
    return np.where(p.visible_keys(b), s, -np.inf)


def merge_attention(outs: Sequence[ArrayLike], lses: Sequence[ArrayLike], *,
                    layout: str = "bhld") -> Tuple[NDArray, NDArray]:
    """Combine partial results over disjoint key sets; see
    :func:`fastqkv.reference.merge_attention`.  Computed in the lse's
    precision (float64 for float64, else float32)."""
    outs, lses = _validate.check_merge(outs, lses, layout)
    B, H, L, _ = _validate.bhld(outs[0], layout).shape
    outs4 = [_validate.bhld(o, layout) for o in outs]
    lses3 = [x.reshape(B, H, L) for x in lses]
    o, lse = _merge(outs4, lses3)
    res = np.empty(outs[0].shape, outs[0].dtype)
    _validate.bhld(res, layout)[...] = o
    return res, lse.astype(lses[0].dtype).reshape(lses[0].shape)


def _merge(outs4, lses3):
    """The merge of :func:`merge_attention` on ``(B, H, L, Dv)`` outputs and
    ``(B, H, L)`` lses: ``(out, lse)`` in the accumulation dtype of the
    lses' dtype; a partial of lse -inf is not read, NaN makes the row NaN."""
    acc = _validate.acc_dtype(lses3[0].dtype)
    L = [x.astype(acc, copy=False) for x in lses3]
    m = L[0]
    for x in L[1:]:
        m = np.maximum(m, x)                                   # NaN propagates
    m0 = np.where(np.isneginf(m), acc.type(0), m)
    tot = np.zeros(m.shape, acc)
    out = np.zeros(outs4[0].shape, acc)
    with np.errstate(all="ignore"):
        for x, o in zip(L, outs4):
            w = np.exp(x - m0)                                 # 0 for a -inf partial
            tot += w
            out += np.where(w[..., None] == 0, acc.type(0), w[..., None] * o)
        none = (tot == 0)[..., None]
        out = np.where(none, acc.type(0), out / np.where(none, acc.type(1), tot[..., None]))
        lse = m0 + np.log(tot)
    return out, lse


def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, causal: bool = False,
                     scale: Optional[float] = None, window: Window = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[ArrayLike] = None,
                     sinks: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
                     v_scale: Optional[ArrayLike] = None, return_lse: bool = False,
                     out: Optional[NDArray] = None, backend: str = "auto", mask: None = None,
                     bias: None = None, key_lens: None = None) -> Result:
    """Attention over a packed ragged batch; see
    :func:`fastqkv.reference.attention_varlen`."""
    _dispatch._check_name(backend, "backend")
    q, k, v, cq, ck, alibi, sinks, out, lse, return_lse, k_scale, v_scale = _problem.plan_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, mask=mask, bias=bias, key_lens=key_lens,
        alibi_slopes=alibi_slopes, return_lse=return_lse, out=out, causal=causal, scale=scale,
        window=window, softcap=softcap, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.stop == qs.start:
            continue
        _, l = attention(q[qs], k[ks], v[ks], causal=causal, scale=scale, window=window,
                         softcap=softcap, alibi_slopes=None if alibi is None else alibi[b],
                         sinks=sinks, k_scale=_validate.scale_rows(k_scale, ks),
                         v_scale=_validate.scale_rows(v_scale, ks),
                         layout="blhd", return_lse=True, out=out[qs], backend=backend)
        if lse is not None:
            lse[:, qs] = l
    return (out, lse) if return_lse else out


def paged_attention(q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                    block_table: ArrayLike, seq_lens: ArrayLike, *,
                    cu_seqlens_q: Optional[ArrayLike] = None, causal: bool = False,
                    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None,
                    scale: Optional[float] = None, window: Window = None,
                    softcap: Optional[float] = None, alibi_slopes: Optional[ArrayLike] = None,
                    sinks: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
                    v_scale: Optional[ArrayLike] = None, layout: str = "bhld",
                    return_lse: bool = False, out: Optional[NDArray] = None,
                    backend: str = "auto", key_lens: None = None) -> Result:
    """Attention against a paged KV cache; see
    :func:`fastqkv.reference.paged_attention`.  With ``cu_seqlens_q`` (packed
    queries of several lengths) each sequence is one call on its blocks."""
    _dispatch._check_name(backend, "backend")
    if cu_seqlens_q is not None:
        return _paged_packed(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, causal,
                             mask, bias, scale, window, softcap, alibi_slopes, sinks, k_scale,
                             v_scale, layout, return_lse, out, backend, key_lens)
    p = _problem.plan_paged(
        q, k_cache, v_cache, block_table, seq_lens, causal=causal, mask=mask, bias=bias,
        scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        k_scale=k_scale, v_scale=v_scale, layout=layout, return_lse=return_lse, out=out,
        key_lens=key_lens)
    return _run(p, backend)


def _paged_packed(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, causal, mask, bias,
                  scale, window, softcap, alibi_slopes, sinks, k_scale, v_scale, layout,
                  return_lse, out, backend, key_lens):
    """paged_attention with packed queries: checked whole, then one paged
    call per sequence with queries, on its row of the block table."""
    pages = _validate.check_paged(q, k_cache, v_cache, block_table, seq_lens, layout="blhd",
                                  key_lens=key_lens, k_scale=k_scale, v_scale=v_scale, packed=True)
    q, cq = _validate.check_packed_queries(q, cu_seqlens_q, pages.seq_lens, layout, mask, bias)
    B, Hq, Dv = len(cq) - 1, q.shape[1], pages.v_cache.shape[3]
    acc = _validate.acc_dtype(q.dtype)
    alibi = None
    if alibi_slopes is not None:
        alibi = np.broadcast_to(_validate.check_alibi(alibi_slopes, B, Hq, acc), (B, Hq))
    sinks = None if sinks is None else _validate.check_sinks(sinks, Hq, acc)
    _validate.check_options(causal, scale, window, softcap)
    if out is None:
        out = np.empty((q.shape[0], Hq, Dv), q.dtype)
    else:
        _validate.check_out(out, (q.shape[0], Hq, Dv), q.dtype,
                            (("q", q), ("k_cache", pages.k_cache), ("v_cache", pages.v_cache)))
    lse = np.full((Hq, q.shape[0]), -np.inf, acc) if return_lse else None
    for b in range(B):
        qs = slice(cq[b], cq[b + 1])
        if qs.stop == qs.start:
            continue
        _, l = paged_attention(q[qs][None], pages.k_cache, pages.v_cache, pages.block_table[b:b + 1],
                               pages.seq_lens[b:b + 1], causal=causal, scale=scale, window=window,
                               softcap=softcap, alibi_slopes=None if alibi is None else alibi[b],
                               sinks=sinks, k_scale=pages.k_scale, v_scale=pages.v_scale,
                               layout="blhd", return_lse=True, out=out[qs][None], backend=backend)
        if lse is not None:
            lse[:, qs] = l[0]
    return (out, lse) if return_lse else out


def shared_prefix_attention(q: ArrayLike, prefix_k: ArrayLike, prefix_v: ArrayLike, k: ArrayLike,
                            v: ArrayLike, *, key_lens: Optional[ArrayLike] = None,
                            causal: bool = False, scale: Optional[float] = None,
                            softcap: Optional[float] = None, sinks: Optional[ArrayLike] = None,
                            layout: str = "bhld", return_lse: bool = False,
                            out: Optional[NDArray] = None, backend: str = "auto") -> Result:
    """``N`` requests over one shared prefix and their own suffixes (cascade
    attention); see :func:`fastqkv.reference.shared_prefix_attention`.

    The prefix's K/V are read once for all requests: their queries are
    stacked into one call over the prefix, each request's suffix is a batch
    entry of a second call, and the two partials merge exactly through their
    log-sum-exp (:func:`merge_attention`)."""
    _dispatch._check_name(backend, "backend")
    ps = _problem.plan_attention(q, k, v, causal=causal, key_lens=key_lens, scale=scale,
                                 softcap=softcap, sinks=sinks, layout=layout, return_lse=True)
    lens = np.full(ps.B, ps.Lk) if ps.key_lens is None else ps.key_lens
    q = _validate.check_shared_prefix(q, layout, causal, lens)
    pk, pv = _validate.check_prefix_kv(prefix_k, prefix_v, q, layout, ps.Hkv, ps.Dv)
    return _cascade(ps, q, layout, return_lse, out, backend,
                    lambda qs: attention(qs, pk, pv, scale=scale, softcap=softcap, layout=layout,
                                         return_lse=True, backend=backend),
                    (("prefix_k", pk), ("prefix_v", pv)))


def shared_prefix_paged_attention(q: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                                  prefix_blocks: ArrayLike, prefix_len: int,
                                  block_table: ArrayLike, seq_lens: ArrayLike, *,
                                  causal: bool = False, scale: Optional[float] = None,
                                  softcap: Optional[float] = None,
                                  sinks: Optional[ArrayLike] = None, layout: str = "bhld",
                                  return_lse: bool = False, out: Optional[NDArray] = None,
                                  backend: str = "auto") -> Result:
    """:func:`shared_prefix_attention` on a paged cache; see
    :func:`fastqkv.reference.shared_prefix_paged_attention`."""
    _dispatch._check_name(backend, "backend")
    table, plen = _validate.check_prefix_blocks(prefix_blocks, prefix_len, k_cache)
    ps = _problem.plan_paged(q, k_cache, v_cache, block_table, seq_lens, causal=causal,
                             scale=scale, softcap=softcap, sinks=sinks, layout=layout,
                             return_lse=True)
    q = _validate.check_shared_prefix(q, layout, causal, ps.key_lens)
    return _cascade(ps, q, layout, return_lse, out, backend,
                    lambda qs: paged_attention(qs[None], k_cache, v_cache, table, plen,
                                               scale=scale, softcap=softcap, layout=layout,
                                               return_lse=True, backend=backend),
                    (("k_cache", k_cache), ("v_cache", v_cache)))


def _cascade(ps, q, layout, return_lse, out, backend, prefix_call, others):
    """Run the suffix Problem ``ps`` and ``prefix_call`` on the requests'
    stacked queries ``(Hq, N*Lq, D)`` (``"blhd"``: ``(N*Lq, Hq, D)``), merge
    the two, write ``out``."""
    N, Hq, Lq, Dv = ps.B, ps.Hq, ps.Lq, ps.Dv
    shape = _validate.user_shape(N, Hq, Lq, Dv, 4, layout)
    if out is not None:
        _validate.check_out(out, shape, ps.dtype, (("q", q),) + others + (("k", ps.k), ("v", ps.v)))
    o_s, l_s = _run(ps, backend)
    if layout == "blhd":
        o_p, l_p = prefix_call(q.reshape(N * Lq, Hq, q.shape[3]))
        o_p = o_p.reshape(N, Lq, Hq, Dv).transpose(0, 2, 1, 3)
    else:
        o_p, l_p = prefix_call(q.transpose(1, 0, 2, 3).reshape(Hq, N * Lq, q.shape[3]))
        o_p = o_p.reshape(Hq, N, Lq, Dv).transpose(1, 0, 2, 3)
    l_p = l_p.reshape(Hq, N, Lq).transpose(1, 0, 2)
    o, lse = _merge([o_p, _validate.bhld(o_s, layout)], [l_p, l_s])
    res = np.empty(shape, ps.dtype) if out is None else out
    _validate.bhld(res, layout)[...] = o
    return (res, lse) if return_lse else res


def self_attention(x: ArrayLike, w_q: ArrayLike, w_k: ArrayLike, w_v: ArrayLike,
                   w_o: ArrayLike, *, num_heads: int, num_kv_heads: Optional[int] = None,
                   causal: bool = False, mask: Optional[ArrayLike] = None,
                   bias: Optional[ArrayLike] = None, key_lens: Optional[ArrayLike] = None,
                   scale: Optional[float] = None, window: Window = None,
                   softcap: Optional[float] = None, alibi_slopes: Optional[ArrayLike] = None,
                   sinks: Optional[ArrayLike] = None, backend: str = "auto") -> NDArray:
    """Multi-head self-attention layer; see :func:`fastqkv.reference.self_attention`.
    Projections use NumPy matmul (float32 for half-width inputs); attention
    is the dispatched fused kernel."""
    _dispatch._check_name(backend, "backend")
    x3, dtype, Hq, Hkv, D, Dv, squeeze = _validate.check_self_attention(
        x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads)
    mm = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
    xm = x3.astype(mm, copy=False)
    B, L, _ = xm.shape

    def proj(w, H, d):
        return (xm @ np.asarray(w).astype(mm, copy=False)).reshape(B, L, H, d).astype(dtype, copy=False)

    q, k, v = proj(w_q, Hq, D), proj(w_k, Hkv, D), proj(w_v, Hkv, Dv)
    o = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
                  window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                  layout="blhd", backend=backend)
    y = (o.reshape(B, L, Hq * Dv).astype(mm, copy=False) @ np.asarray(w_o).astype(mm, copy=False))
    y = y.astype(dtype, copy=False)
    return y[0] if squeeze else y
