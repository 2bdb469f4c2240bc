"""The NumPy oracle: plain NumPy, float64 inside, the full score matrix.

Every backend of fastqkv is checked against this module, and its docstrings
are the normative semantics.  It is deliberately boring: no tiling, no online
softmax, no threads.

Semantics of ``attention(q, k, v, ...)``
----------------------------------------
Shapes, layout ``"bhld"``: ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``,
``v (B, Hkv, Lk, Dv)``, output ``(B, Hq, Lq, Dv)``.  3-D inputs are
``(H, L, D)`` and 2-D inputs ``(L, D)``; the output has the same rank.
Layout ``"blhd"`` is ``(B, L, H, D)`` (3-D: ``(L, H, D)``).  ``mask`` and
``bias`` are always indexed ``(B, Hq, Lq, Lk)`` (broadcastable), whatever the
layout; ``lse`` is ``(B, Hq, Lq)`` (3-D: ``(Hq, Lq)``, 2-D: ``(Lq,)``).

For batch ``b``, query head ``h``, query row ``i`` and key ``j``:

* GQA/MQA: ``Hq % Hkv == 0`` and head ``h`` reads KV head ``h // (Hq // Hkv)``.
* ``Lk_b`` is ``key_lens[b]`` when given, else ``Lk``.  Keys ``j >= Lk_b``
  are not visible and are never read.
* The aligned query position is ``i' = i + (Lk_b - Lq)`` (bottom-right
  alignment, as in a KV cache whose last ``Lq`` positions are the queries).
* Score: ``s = scale * (q[i] . k[j])``, ``scale`` defaulting to ``1/sqrt(D)``;
  then softcap ``s = c * tanh(s / c)``; then ``s += bias[b, h, i, j]``; then
  ALiBi ``s -= slope[b, h] * |i' - j|`` (``alibi_slopes`` of shape ``(Hq,)``
  or ``(B, Hq)``).
* Visibility: ``j < Lk_b``, ``mask[b, h, i, j]`` (True = attend), causal
  ``j <= i'``, window ``(left, right)``: ``i' - left <= j <= i' + right`` with
  ``-1`` meaning unbounded on that side.  Invisible scores are ``-inf``; an
  invisible key's K, V, bias and mask values never influence the result (not
  even NaN or inf in them).
* ``p = exp(s - m) / l`` with ``m`` the row max and ``l`` the row sum of
  ``exp(s - m)``; ``out[i] = sum_j p[i, j] * v[j]`` over visible ``j``;
  ``lse[i] = m + log(l)`` (natural log).
* A row with no visible key (fully masked, ``Lk_b == 0`` or ``Lk == 0``)
  gives ``out = 0`` and ``lse = -inf``.
* NaN in a visible score (from q, k, bias or scale arithmetic) makes that
  whole output row and its lse NaN; NaN or inf in a visible value row
  reaches the output through ``p * v`` (so ``0 * inf`` is NaN).  A score of
  ``+inf`` gives ``inf - inf``: the row is NaN.  Scores of magnitude ``1e4``
  and ``-inf`` biases are handled exactly (max subtraction).  The fast
  backends compute weights in their own precision: a weight that underflows
  to 0 there (but not in float64) meets an inf value as ``0 * inf = NaN``
  where this oracle gives inf; either way the row is not finite.
* dtypes: float32 and float64 compute in their own precision in the fast
  backends; float16 and bfloat16 are stored at half width and accumulated in
  float32.  This oracle computes everything in float64 and rounds the output
  to the input dtype; ``lse`` is float64 for float64 inputs, else float32.
* Empty work: ``B``, ``Hq`` or ``Lq`` of 0 gives an empty output.  Head dim 0
  is an error.
* ``out=`` receives the result (it may be strided; it must not overlap an
  input).  Inputs are never modified.

Other functions
---------------
``attention_varlen``, ``paged_attention``, ``merge_attention``,
``attention_weights`` and ``self_attention`` are documented where they are
defined below; each reduces to the dense semantics above.
"""

from __future__ import annotations

import numpy as np

from . import _validate

__all__ = [
    "attention", "attention_varlen", "paged_attention", "merge_attention",
    "attention_weights", "self_attention",
]


# ---------------------------------------------------------------------------
# core: one validated Problem, computed densely in float64

def visible_keys(p, b):
    """Boolean ``(Hq, Lq, Lk_b)`` visibility of batch ``b`` (mask, causal,
    window; keys past ``Lk_b`` are already cut off)."""
    lkb = p.Lk if p.key_lens is None else int(p.key_lens[b])
    i = np.arange(p.Lq)[:, None] + (lkb - p.Lq)
    j = np.arange(lkb)[None, :]
    vis = np.ones((p.Lq, lkb), dtype=bool)
    if p.window_left >= 0:
        vis &= j >= i - p.window_left
    if p.window_right >= 0:
        vis &= j <= i + p.window_right
    vis = np.broadcast_to(vis, (p.Hq, p.Lq, lkb))
    if p.mask is not None:
        vis = vis & p.mask[b, :, :, :lkb]
    return vis


def scores(p, b, dtype=np.float64):
    """Scores ``(Hq, Lq, Lk_b)`` of batch ``b`` in ``dtype`` with softcap,
    bias and ALiBi applied and invisible keys set to ``-inf``."""
    lkb = p.Lk if p.key_lens is None else int(p.key_lens[b])
    g = p.group
    qb = p.q[b].astype(dtype)
    kv_of = np.arange(p.Hq) // g
    kb = p.k[b, :, :lkb].astype(dtype)[kv_of]
    vis = visible_keys(p, b)
    with np.errstate(all="ignore"):
        s = np.matmul(qb, kb.transpose(0, 2, 1)) * dtype(p.scale)
        if p.softcap:
            c = dtype(p.softcap)
            s = c * np.tanh(s / c)
        if p.bias is not None:
            s = s + p.bias[b, :, :, :lkb].astype(dtype)
        if p.alibi is not None:
            i = np.arange(p.Lq)[:, None] + (lkb - p.Lq)
            dist = np.abs(i - np.arange(lkb)[None, :]).astype(dtype)
            s = s - p.alibi[b].astype(dtype)[:, None, None] * dist
    return np.where(vis, s, -np.inf), vis


def _attention_problem(p):
    """Fill ``p.out`` and ``p.lse`` of a validated Problem, densely in float64."""
    if p.empty:
        return
    g = p.group
    kv_of = np.arange(p.Hq) // g
    for b in range(p.B):
        lkb = p.Lk if p.key_lens is None else int(p.key_lens[b])
        if lkb == 0:
            p.out[b] = 0
            if p.lse is not None:
                p.lse[b] = -np.inf
            continue
        s, vis = scores(p, b)
        vb = p.v[b, :, :lkb].astype(np.float64)[kv_of]            # (Hq, Lk_b, Dv)
        with np.errstate(all="ignore"):
            m = np.max(s, axis=-1, keepdims=True)                  # NaN propagates
            m_safe = np.where(np.isneginf(m), 0.0, m)
            e = np.exp(s - m_safe)                                 # 0 where invisible
            l = np.sum(e, axis=-1, keepdims=True)
            if np.isfinite(vb).all():
                o = np.matmul(e, vb)
            else:  # keep invisible keys out of the sum even when v holds NaN/inf
                o = np.zeros((p.Hq, p.Lq, p.Dv))
                for h in range(p.Hq):
                    for i in range(p.Lq):
                        cols = vis[h, i]
                        o[h, i] = e[h, i, cols] @ vb[h, cols]
            empty_row = l == 0
            o = np.where(empty_row, 0.0, o / np.where(empty_row, 1.0, l))
            lse = (m_safe + np.log(l))[..., 0]
        p.out[b] = o.astype(p.dtype)
        if p.lse is not None:
            p.lse[b] = lse


# ---------------------------------------------------------------------------
# public functions (same signatures as fastqkv's)

def attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
              window=None, softcap=None, alibi_slopes=None, layout="bhld",
              return_lse=False, out=None, backend=None):
    """Scaled dot-product attention; see the module docstring for semantics.

    ``backend`` is accepted for signature parity and ignored: this *is* the
    oracle.  Returns ``out`` or ``(out, lse)`` when ``return_lse``.
    """
    p = _validate.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout=layout,
        return_lse=return_lse, out=out)
    if not p.empty and p.Lk == 0:
        p.out[...] = 0
        if p.lse is not None:
            p.lse[...] = -np.inf
    else:
        _attention_problem(p)
    return p.result()


def attention_weights(q, k, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                      window=None, softcap=None, alibi_slopes=None, layout="bhld", backend=None):
    """Softmax probabilities ``(B, Hq, Lq, Lk)`` (3-D input: ``(Hq, Lq, Lk)``,
    2-D: ``(Lq, Lk)``), for inspection.

    Same masking options as :func:`attention`; invisible keys (including keys
    past ``key_lens``) have probability 0 and a fully masked row is all 0.
    The dtype is float64 for float64 inputs, else float32.
    """
    v = _dummy_v(q, k, layout)
    p = _validate.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout=layout)
    w = np.zeros((p.B, p.Hq, p.Lq, p.Lk), dtype=p.acc_dtype)
    for b in range(0 if p.empty else p.B):
        s, _ = scores(p, b)
        if s.shape[-1] == 0:
            continue
        with np.errstate(all="ignore"):
            m = np.max(s, axis=-1, keepdims=True)
            m_safe = np.where(np.isneginf(m), 0.0, m)
            e = np.exp(s - m_safe)
            l = np.sum(e, axis=-1, keepdims=True)
            w[b, :, :, : s.shape[-1]] = np.where(l == 0, 0.0, e / np.where(l == 0, 1.0, l))
    return weights_user_shape(w, p.ndim)


def _dummy_v(q, k, layout):
    """A zero-stride V of head dim 1 matching k, for validating (q, k) only."""
    k = _validate.as_array(k, "k")
    if not _validate.is_float_dtype(k.dtype):
        return k
    shape = list(k.shape)
    if shape:
        shape[-1] = 1
    return np.broadcast_to(np.zeros((), k.dtype), tuple(shape))


def weights_user_shape(w, ndim):
    if ndim == 4:
        return w
    if ndim == 3:
        return w[0]
    return w[0, 0]


def merge_attention(outs, lses, *, layout="bhld"):
    """Combine partial attention results over disjoint key sets.

    ``outs`` is a sequence of outputs of one shape (``(B, Hq, Lq, Dv)`` in
    layout ``"bhld"``, ``(B, Lq, Hq, Dv)`` in ``"blhd"``, or 3-D/2-D), and
    ``lses`` the matching log-sum-exps (``(B, Hq, Lq)``, …).  Returns
    ``(out, lse)`` with ``lse = log(sum_i exp(lse_i))`` and
    ``out = sum_i exp(lse_i - lse) * out_i``.  A partial with ``lse = -inf``
    contributes nothing (its output is not read); if every partial is
    ``-inf`` the merged row is 0 with ``lse = -inf``.  NaN in any partial's
    lse makes the merged row NaN.  Output dtypes are those of the inputs.
    """
    outs4, lses3, meta = _validate.plan_merge(outs, lses, layout)
    out_dtype, lse_dtype, out_shape, lse_shape = meta
    L = np.stack([x.astype(np.float64) for x in lses3])           # (n, B, H, Lq)
    with np.errstate(all="ignore"):
        m = np.max(L, axis=0)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        w = np.exp(L - m_safe)                                      # 0 for -inf partials
        tot = np.sum(w, axis=0)
        lse = m_safe + np.log(tot)
        acc = np.zeros(outs4[0].shape, np.float64)
        for wi, oi in zip(w, outs4):
            contrib = wi[..., None] * oi.astype(np.float64)
            acc += np.where(wi[..., None] == 0, 0.0, contrib)
        out = np.where(tot[..., None] == 0, 0.0, acc / np.where(tot == 0, 1.0, tot)[..., None])
    return _validate.merge_result(out, lse, out_dtype, lse_dtype, out_shape, lse_shape, layout)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                     window=None, softcap=None, alibi_slopes=None, return_lse=False,
                     out=None, backend=None, mask=None, bias=None, key_lens=None):
    """Attention over a packed ragged batch.

    ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)``;
    sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and
    key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int arrays of length
    ``B + 1``, starting at 0, non-decreasing, ending at ``total``).  Each
    sequence is attended on its own with the dense semantics (bottom-right
    causal per sequence).  Output ``(total_q, Hq, Dv)``; lse ``(Hq, total_q)``.
    ``mask``, ``bias`` and ``key_lens`` are not supported here (ragged shapes
    have no dense mask) and raise ``ValueError``.
    """
    plan = _validate.plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mask=mask, bias=bias,
                                 key_lens=key_lens, alibi_slopes=alibi_slopes,
                                 return_lse=return_lse, out=out, causal=causal, scale=scale,
                                 window=window, softcap=softcap)
    return _varlen_loop(plan, attention, dict(causal=causal, scale=scale, window=window,
                                              softcap=softcap))


def _varlen_loop(plan, attn, opts):
    """Run ``attn`` per sequence of a validated varlen plan."""
    q, k, v, cq, ck, alibi, out, lse, return_lse = plan
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.stop == qs.start:
            continue
        slopes = None if alibi is None else alibi[b]
        o, l = attn(q[qs], k[ks], v[ks], layout="blhd", alibi_slopes=slopes,
                    return_lse=True, out=out[qs], **opts)
        if lse is not None:
            lse[:, qs] = l
    return (out, lse) if return_lse else out


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, causal=False, mask=None,
                    bias=None, scale=None, window=None, softcap=None, alibi_slopes=None,
                    layout="bhld", return_lse=False, out=None, backend=None, key_lens=None):
    """Attention against a paged KV cache.

    ``k_cache (num_blocks, block_size, Hkv, D)``, ``v_cache (num_blocks,
    block_size, Hkv, Dv)``, ``block_table (B, max_blocks)`` int,
    ``seq_lens (B,)`` int.  Key ``j`` of sequence ``b`` (``j < seq_lens[b]``)
    is row ``j % block_size`` of block ``block_table[b, j // block_size]``;
    table entries past a sequence's last block are not read.  It equals
    :func:`attention` on the gathered dense cache of length
    ``Lk = max_blocks * block_size`` with ``key_lens = seq_lens``, so the
    queries are the last ``Lq`` positions of each sequence for causal and
    window, and ``mask``/``bias`` are indexed ``(B, Hq, Lq, Lk)``.
    ``key_lens`` is not accepted (``seq_lens`` is it).
    """
    plan = _validate.plan_paged(q, k_cache, v_cache, block_table, seq_lens, layout=layout,
                                key_lens=key_lens)
    k, v = gather_pages(plan)
    return attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=plan.seq_lens,
                     scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                     layout=layout, return_lse=return_lse, out=out)


def gather_pages(plan):
    """Dense ``(B, Lk, Hkv, D)`` copies of a paged cache; unused slots are 0."""
    B, nb = plan.block_table.shape
    bs = plan.block_size
    k = np.zeros((B, nb * bs) + plan.k_cache.shape[2:], plan.k_cache.dtype)
    v = np.zeros((B, nb * bs) + plan.v_cache.shape[2:], plan.v_cache.dtype)
    for b in range(B):
        used = -(-int(plan.seq_lens[b]) // bs)
        for t in range(used):
            blk = int(plan.block_table[b, t])
            k[b, t * bs:(t + 1) * bs] = plan.k_cache[blk]
            v[b, t * bs:(t + 1) * bs] = plan.v_cache[blk]
    if plan.layout == "bhld":
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return k, v


def self_attention(x, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None, causal=False,
                   mask=None, bias=None, key_lens=None, scale=None, window=None, softcap=None,
                   alibi_slopes=None, backend=None):
    """A multi-head self-attention layer without biases or norms.

    ``x (B, L, d_model)`` or ``(L, d_model)``; ``w_q (d_model, Hq*D)``,
    ``w_k (d_model, Hkv*D)``, ``w_v (d_model, Hkv*Dv)``,
    ``w_o (Hq*Dv, d_model)``, with ``Hq = num_heads`` and
    ``Hkv = num_kv_heads`` (default ``num_heads``).  Computes
    ``attention(x@w_q, x@w_k, x@w_v) @ w_o`` with heads split in the
    ``"blhd"`` layout; masking options as in :func:`attention`.
    Returns ``(B, L, d_model)`` (or ``(L, d_model)``) in x's dtype.
    """
    plan = _validate.plan_self_attention(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads)
    x3, dtype, Hq, Hkv, D, Dv, squeeze = plan
    f = np.float64
    xf = x3.astype(f)
    B, L, _ = xf.shape
    q = (xf @ w_q.astype(f)).reshape(B, L, Hq, D)
    k = (xf @ w_k.astype(f)).reshape(B, L, Hkv, D)
    v = (xf @ w_v.astype(f)).reshape(B, L, Hkv, Dv)
    o = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
                  window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout="blhd")
    y = (o.reshape(B, L, Hq * Dv) @ w_o.astype(f)).astype(dtype)
    return y[0] if squeeze else y
