"""The NumPy oracle: plain NumPy, float64 inside, the full score matrix.

Every backend of fastqkv is checked against this module, and its docstrings
are the normative semantics.  It is deliberately boring: no tiling, no online
softmax, no threads.  It shares the argument checks (and their messages) of
:mod:`fastqkv._validate` but none of the planner's normalisation: it puts the
arrays in ``(B, H, L, D)`` order, broadcasts masks and resolves ``key_lens``,
window and causal alignment itself, so a planner bug cannot reach the
oracle and the kernels alike.

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
* Attention sinks (``sinks`` of shape ``(Hq,)``, as GPT-OSS defines them):
  ``sinks[h]`` is one more logit in every row of head ``h``, with no value:
  ``m`` is the max over the row's visible scores and the sink, ``l`` gains
  ``exp(sinks[h] - m)``, ``out = sum_j exp(s_j - m) v[j] / l`` and
  ``lse = m + log(l)`` count the sink.  It is exactly attention over the
  keys plus one always-visible key of score ``sinks[h]`` and value 0, so a
  row with no visible key gives ``out = 0`` and ``lse = sinks[h]``; a sink
  of ``-inf`` is no sink.  ``sinks`` is taken in the accumulation dtype and
  must not be NaN or ``+inf``.  With :func:`merge_attention` the sink is
  counted once: attention with ``sinks`` over the keys ``A + B`` equals the
  merge of attention over ``A`` with ``sinks`` and over ``B`` without.
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
  float32.  ``bias`` and ``alibi_slopes`` are taken in that accumulation
  dtype (float64 for float64 inputs, else float32).  This oracle computes
  everything in float64 and rounds the output to the input dtype; ``lse`` is
  float64 for float64 inputs, else float32.
* Quantized K/V (``k`` and ``v`` of one dtype among int8, float8_e4m3fn and
  float8_e5m2, with q float32, float16 or bfloat16): the keys and values are
  ``K = k.astype(float64) * k_scale[..., None]`` and
  ``V = v.astype(float64) * v_scale[..., None]``, and everything above
  applies to ``K`` and ``V``.  ``k_scale`` and ``v_scale`` are float32 of
  shape ``k.shape[:-1]`` (one per stored token and KV head, in the layout of
  ``k``) or ``(Hkv,)`` (one per KV head); every scale of a key the call
  reads (``j < Lk_b``) must be finite and > 0; those of keys past
  ``Lk_b`` are never read.  Accumulation is float32; output and lse as for
  q's dtype.  :func:`fastqkv.quantize_kv` makes such arrays.
* Empty work: ``B``, ``Hq`` or ``Lq`` of 0 gives an empty output.  Head dim 0
  is an error.
* ``out=`` receives the result (it may be strided; it must not overlap an
  input).  Inputs are never modified.

Other functions
---------------
``attention_varlen``, ``paged_attention``, ``merge_attention``,
``attention_weights``, ``self_attention``, ``shared_prefix_attention`` and
``shared_prefix_paged_attention`` are documented where they are defined
below; each reduces to the dense semantics above.
"""


from __future__ import annotations

import math

import numpy as np

from . import _validate

__all__ = [
    "attention", "attention_varlen", "paged_attention", "merge_attention",
    "attention_weights", "self_attention", "shared_prefix_attention",
    "shared_prefix_paged_attention",
]


# ---------------------------------------------------------------------------
# layout: the caller's 2-D/3-D/4-D arrays <-> (B, H, L, D)

def _to4(a, layout):
    """``a`` (2-D ``(L, D)``, 3-D, or 4-D, in ``layout``) as ``(B, H, L, D)``."""
    if layout == "blhd" and a.ndim >= 3:
        a = np.swapaxes(a, -2, -3)
    return a[(None,) * (4 - a.ndim)]


def _from4(a, layout, ndim):
    """Inverse of :func:`_to4` for an array of rank ``ndim``; an lse
    ``(B, H, L)`` drops its leading axes the same way."""
    a = a[(0,) * (4 - ndim)]
    if layout == "blhd" and ndim >= 3 and a.ndim == ndim:
        a = np.swapaxes(a, -2, -3)
    return a


# ---------------------------------------------------------------------------
# the dense computation, float64, batch by batch

class _Dense:
    """The arrays of one checked attention call in (B, H, L, D) order."""

    def __init__(self, c, layout):
        self.q, self.k, self.v = (_to4(x, layout) for x in (c.q, c.k, c.v))
        self.B, self.Hq, self.Lq, D = self.q.shape
        self.Hkv, self.Lk = self.k.shape[1], self.k.shape[2]
        self.Dv = self.v.shape[3]
        self.acc = np.float64 if c.q.dtype == np.float64 else np.float32
        # quantized K/V: float64 (B, Hkv, Lk, 1) scale columns; None otherwise
        self.k_scale = self.v_scale = None
        if c.k_scale is not None:
            shape = (self.B, self.Hkv, self.Lk)
            self.k_scale, self.v_scale = (
                _validate.scale_bhl(x, shape, c.k.ndim, layout).astype(np.float64)[..., None]
                for x in (c.k_scale, c.v_scale))
        self.scale = 1.0 / math.sqrt(D) if c.scale is None else c.scale
        full = (self.B, self.Hq, self.Lq, self.Lk)
        self.mask = None if c.mask is None else np.broadcast_to(c.mask, full)
        self.bias = None if c.bias is None else np.broadcast_to(c.bias.astype(self.acc), full)
        self.alibi = None
        if c.alibi is not None:
            self.alibi = np.broadcast_to(c.alibi.astype(self.acc), (self.B, self.Hq))
        # the sink logits as a (Hq, 1, 1) float64 column (-inf: no sink)
        self.sinks = np.full((self.Hq, 1, 1), -np.inf)
        if c.sinks is not None:
            self.sinks = c.sinks.astype(np.float64).reshape(self.Hq, 1, 1)
        self.c = c

    def key_len(self, b):
        return self.Lk if self.c.key_lens is None else int(self.c.key_lens[b])

    def visible(self, b):
        """Boolean ``(Hq, Lq, Lk_b)``: mask, causal and window."""
        n = self.key_len(b)
        pos = np.arange(self.Lq)[:, None] + (n - self.Lq)     # aligned query position i'
        j = np.arange(n)[None, :]
        left, right = self.c.window
        vis = np.ones((self.Lq, n), dtype=bool)
        if self.c.causal:
            vis = vis & (j <= pos)
        if left != -1:
            vis = vis & (j >= pos - left)
        if right != -1:
            vis = vis & (j <= pos + right)
        vis = np.repeat(vis[None], self.Hq, axis=0)
        if self.mask is not None:
            vis = vis & self.mask[b, :, :, :n]
        return vis

    def kv(self, x, scale, b, n):
        """Float64 keys or values ``(Hkv, n, D)`` of batch ``b``, dequantized."""
        xb = x[b, :, :n].astype(np.float64)
        if scale is not None:
            with np.errstate(all="ignore"):
                xb = xb * scale[b, :, :n]
        return xb

    def scores(self, b):
        """Float64 scores ``(Hq, Lq, Lk_b)``, -inf where invisible, and the visibility."""
        n = self.key_len(b)
        heads = np.arange(self.Hq) // (self.Hq // self.Hkv)
        qb = self.q[b].astype(np.float64)
        kb = self.kv(self.k, self.k_scale, b, n)[heads]
        vis = self.visible(b)
        with np.errstate(all="ignore"):
            s = np.matmul(qb, kb.transpose(0, 2, 1)) * self.scale
            if self.c.softcap is not None:
                s = self.c.softcap * np.tanh(s / self.c.softcap)
            if self.bias is not None:
                s = s + self.bias[b, :, :, :n].astype(np.float64)
            if self.alibi is not None:
                pos = np.arange(self.Lq)[:, None] + (n - self.Lq)
                dist = np.abs(pos - np.arange(n)[None, :]).astype(np.float64)
                s = s - self.alibi[b].astype(np.float64)[:, None, None] * dist
        return np.where(vis, s, -np.inf), vis

    def run(self):
        """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` in float64."""
        out = np.zeros((self.B, self.Hq, self.Lq, self.Dv))
        lse = np.full((self.B, self.Hq, self.Lq), -np.inf)
        heads = np.arange(self.Hq) // (self.Hq // max(self.Hkv, 1))
        for b in range(self.B if self.Hq and self.Lq else 0):
            n = self.key_len(b)
            if n == 0:
                lse[b] = self.sinks[..., 0]
                continue
            s, vis = self.scores(b)
            vb = self.kv(self.v, self.v_scale, b, n)[heads]            # (Hq, Lk_b, Dv)
            with np.errstate(all="ignore"):
                m = np.maximum(np.max(s, axis=-1, keepdims=True), self.sinks)  # NaN propagates
                m0 = np.where(np.isneginf(m), 0.0, m)
                e = np.exp(s - m0)                                     # 0 where invisible
                total = np.sum(e, axis=-1, keepdims=True) + np.exp(self.sinks - m0)
                if np.isfinite(vb).all():
                    o = np.matmul(e, vb)
                else:  # keep invisible keys out of the sum even when v holds NaN/inf
                    o = np.zeros((self.Hq, self.Lq, self.Dv))
                    for h in range(self.Hq):
                        for i in range(self.Lq):
                            o[h, i] = e[h, i, vis[h, i]] @ vb[h, vis[h, i]]
                none = total == 0
                out[b] = np.where(none, 0.0, o / np.where(none, 1.0, total))
                lse[b] = (m0 + np.log(total))[..., 0]
        return out, lse


# ---------------------------------------------------------------------------
# public functions (same signatures as fastqkv's)

def attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
              window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None,
              v_scale=None, layout="bhld", return_lse=False, out=None, backend=None):
    """Scaled dot-product attention; see the module docstring for semantics.

    ``backend`` is accepted for signature parity and ignored: this *is* the
    oracle.  Returns ``out`` or ``(out, lse)`` when ``return_lse``.
    """
    c = _validate.check_attention(q, k, v, causal, mask, bias, key_lens, scale, window, softcap,
                                  alibi_slopes, layout, return_lse, out, sinks, k_scale, v_scale)
    dense = _Dense(c, layout)
    o, lse = dense.run()
    result = _from4(o, layout, c.ndim).astype(c.q.dtype, order="C")
    if out is not None:
        out[...] = result
        result = out
    if c.return_lse:
        return result, _from4(lse, layout, c.ndim).astype(dense.acc)
    return result


def attention_weights(q, k, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                      window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None,
                      layout="bhld", backend=None):
    """Softmax probabilities ``(B, Hq, Lq, Lk)`` (3-D input: ``(Hq, Lq, Lk)``,
    2-D: ``(Lq, Lk)``), for inspection.

    Same masking options as :func:`attention`; invisible keys (including keys
    past ``key_lens``) have probability 0 and a fully masked row is all 0.
    With ``sinks`` a row sums to ``1 - exp(sinks[h] - lse)`` (the sink's
    share is not a column).  A quantized ``k`` comes with its ``k_scale``.  The dtype is float64 for float64 inputs, else
    float32.
    """
    c = _validate.check_attention(q, k, _validate.stand_in_v(k), causal, mask, bias, key_lens,
                                  scale, window, softcap, alibi_slopes, layout, False, None, sinks,
                                  k_scale, k_scale)
    dense = _Dense(c, layout)
    w = np.zeros((dense.B, dense.Hq, dense.Lq, dense.Lk), dtype=dense.acc)
    for b in range(dense.B if dense.Hq and dense.Lq else 0):
        s, _ = dense.scores(b)
        if s.shape[-1] == 0:
            continue
        with np.errstate(all="ignore"):
            m = np.maximum(np.max(s, axis=-1, keepdims=True), dense.sinks)
            m0 = np.where(np.isneginf(m), 0.0, m)
            e = np.exp(s - m0)
            total = np.sum(e, axis=-1, keepdims=True) + np.exp(dense.sinks - m0)
            w[b, :, :, : s.shape[-1]] = np.where(total == 0, 0.0, e / np.where(total == 0, 1.0, total))
    return w[(0,) * (4 - c.ndim)]


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
    outs, lses = _validate.check_merge(outs, lses, layout)
    ndim = outs[0].ndim
    outs4 = [_to4(o, layout) for o in outs]
    L = np.stack([x.astype(np.float64).reshape(outs4[0].shape[:3]) for x in lses])  # (n, B, H, Lq)
    with np.errstate(all="ignore"):
        m = np.max(L, axis=0)
        m0 = np.where(np.isneginf(m), 0.0, m)
        w = np.exp(L - m0)                                          # 0 for -inf partials
        tot = np.sum(w, axis=0)
        lse = m0 + np.log(tot)
        acc = np.zeros(outs4[0].shape, np.float64)
        for wi, oi in zip(w, outs4):
            acc += np.where(wi[..., None] == 0, 0.0, wi[..., None] * oi.astype(np.float64))
        out = np.where(tot[..., None] == 0, 0.0, acc / np.where(tot == 0, 1.0, tot)[..., None])
    return (_from4(out, layout, ndim).astype(outs[0].dtype, order="C"),
            lse.astype(lses[0].dtype).reshape(lses[0].shape))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                     window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None,
                     v_scale=None, return_lse=False, out=None, backend=None, mask=None,
                     bias=None, key_lens=None):
    """Attention over a packed ragged batch.

    ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)``;
    sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and
    key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int arrays of length
    ``B + 1``, starting at 0, non-decreasing, ending at ``total``).  Each
    sequence is attended on its own with the dense semantics (bottom-right
    causal per sequence).  Output ``(total_q, Hq, Dv)``; lse ``(Hq, total_q)``.
    Scales of a quantized ``k``/``v`` are ``(total_k, Hkv)`` or ``(Hkv,)``.
    ``mask``, ``bias`` and ``key_lens`` are not supported here (ragged shapes
    have no dense mask) and raise ``ValueError``.
    """
    q, k, v, cq, ck, slopes, sinks, return_lse, ks, vs = _validate.check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, mask=mask, bias=bias, key_lens=key_lens,
        alibi_slopes=alibi_slopes, return_lse=return_lse, out=out, causal=causal, scale=scale,
        window=window, softcap=softcap, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    res = np.zeros((q.shape[0], q.shape[1], v.shape[2]), q.dtype)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf,
                  np.float64 if q.dtype == np.float64 else np.float32)
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            seq_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[b])
            rows = slice(ck[b], ck[b + 1])
            o, l = attention(q[cq[b]:cq[b + 1]], k[rows], v[rows],
                             causal=causal, scale=scale, window=window, softcap=softcap,
                             alibi_slopes=seq_slopes, sinks=sinks, layout="blhd",
                             k_scale=_validate.scale_rows(ks, rows),
                             v_scale=_validate.scale_rows(vs, rows), return_lse=True)
            res[cq[b]:cq[b + 1]] = o
            lse[:, cq[b]:cq[b + 1]] = l
    if out is not None:
        out[...] = res
        res = out
    return (res, lse) if return_lse else res


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None,
                    causal=False, mask=None, bias=None, scale=None, window=None, softcap=None,
                    alibi_slopes=None, sinks=None, k_scale=None, v_scale=None, layout="bhld",
                    return_lse=False, out=None, backend=None, key_lens=None):
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
    ``key_lens`` is not accepted (``seq_lens`` is it).  Scales of a
    quantized cache are ``(num_blocks, block_size, Hkv)`` (gathered with it)
    or ``(Hkv,)``.

    With ``cu_seqlens_q`` (int, length ``B + 1``, as in
    :func:`attention_varlen`) the queries of all sequences are packed:
    ``q (total_q, Hq, D)``, sequence ``b`` owning rows ``cu_seqlens_q[b] ..
    cu_seqlens_q[b+1]``, which are the last positions of its ``seq_lens[b]``
    keys (so a sequence has at most that many queries).  It is then
    :func:`attention_varlen` on the gathered keys of each sequence: output
    ``(total_q, Hq, Dv)``, lse ``(Hq, total_q)``; ``mask``/``bias`` are not
    accepted and ``layout`` does not apply.
    """
    if cu_seqlens_q is not None:
        pages = _validate.check_paged(q, k_cache, v_cache, block_table, seq_lens, layout="blhd",
                                      key_lens=key_lens, k_scale=k_scale, v_scale=v_scale,
                                      packed=True)
        q, cq = _validate.check_packed_queries(q, cu_seqlens_q, pages.seq_lens, layout, mask, bias)
        k, v = gather_pages(pages, "blhd")
        ks, vs = gather_page_scales(pages, "blhd")
        lens = pages.seq_lens.tolist()
        ck = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        pack = [None if x is None or x.ndim == 1 else
                np.concatenate([x[b, :n] for b, n in enumerate(lens)] or [x[:0, 0]])
                for x in (k, v, ks, vs)]
        return attention_varlen(q, pack[0], pack[1], cq, ck, causal=causal, scale=scale,
                                window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                sinks=sinks, k_scale=ks if pack[2] is None else pack[2],
                                v_scale=vs if pack[3] is None else pack[3],
                                return_lse=return_lse, out=out)
    pages = _validate.check_paged(q, k_cache, v_cache, block_table, seq_lens, layout=layout,
                                  key_lens=key_lens, k_scale=k_scale, v_scale=v_scale)
    k, v = gather_pages(pages, layout)
    ks, vs = gather_page_scales(pages, layout)
    return attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=pages.seq_lens,
                     scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                     sinks=sinks, k_scale=ks, v_scale=vs, layout=layout, return_lse=return_lse,
                     out=out)


def gather_pages(pages, layout):
    """Dense copies ``(B, Lk, Hkv, D)`` (layout "blhd"; "bhld": ``(B, Hkv,
    Lk, D)``) of a checked paged cache; unused slots are 0."""
    B, nb = pages.block_table.shape
    bs = pages.block_size
    k = np.zeros((B, nb * bs) + pages.k_cache.shape[2:], pages.k_cache.dtype)
    v = np.zeros((B, nb * bs) + pages.v_cache.shape[2:], pages.v_cache.dtype)
    for b in range(B):
        for t in range(-(-int(pages.seq_lens[b]) // bs)):
            blk = int(pages.block_table[b, t])
            k[b, t * bs:(t + 1) * bs] = pages.k_cache[blk]
            v[b, t * bs:(t + 1) * bs] = pages.v_cache[blk]
    if layout == "bhld":
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return k, v


def gather_page_scales(pages, layout):
    """The scales of a checked quantized paged cache laid out as
    :func:`gather_pages` lays out its K/V (slots past a sequence 1; per-head
    scales as they are); ``(None, None)`` for a float cache."""
    if pages.k_scale is None or pages.k_scale.ndim == 1:
        return pages.k_scale, pages.v_scale
    B, nb = pages.block_table.shape
    bs = pages.block_size
    out = []
    for s in (pages.k_scale, pages.v_scale):
        g = np.ones((B, nb * bs, s.shape[2]), np.float32)
        for b in range(B):
            n = int(pages.seq_lens[b])
            for t in range(-(-n // bs)):
                g[b, t * bs:(t + 1) * bs] = s[int(pages.block_table[b, t])]
        out.append(g.transpose(0, 2, 1) if layout == "bhld" else g)
    return tuple(out)


def shared_prefix_attention(q, prefix_k, prefix_v, k, v, *, key_lens=None, causal=False,
                            scale=None, softcap=None, sinks=None, layout="bhld",
                            return_lse=False, out=None, backend=None):
    """Attention of ``N`` requests whose keys are one shared prefix followed
    by each request's own suffix (cascade attention).

    ``q (N, Hq, Lq, D)``, the prefix ``prefix_k (Hkv, P, D)`` and
    ``prefix_v (Hkv, P, Dv)``, the suffixes ``k (N, Hkv, S, D)`` and
    ``v (N, Hkv, S, Dv)`` with ``key_lens (N,)`` (default ``S``) in layout
    ``"bhld"`` (``"blhd"``: ``(N, Lq, Hq, D)``, ``(P, Hkv, D)``, ``(N, S,
    Hkv, D)``).  Request ``n`` is :func:`attention` of ``q[n]`` over the
    ``P + key_lens[n]`` keys ``prefix + k[n, :key_lens[n]]``, with
    ``causal`` bottom-right aligned over that whole sequence; with
    ``causal`` every ``key_lens[n]`` must be at least ``Lq`` (the queries are
    the last positions of the suffix, so they see the whole prefix).
    ``scale``, ``softcap`` and ``sinks`` are as in :func:`attention`.
    """
    suffix = _validate.check_attention(q, k, v, causal, None, None, key_lens, scale, None,
                                       softcap, None, layout, return_lse, out, sinks)
    B, Hq, Hkv, Lq, S, D, Dv = suffix.dims
    lens = np.full(B, S) if suffix.key_lens is None else suffix.key_lens
    q = _validate.check_shared_prefix(q, layout, causal, lens)
    pk, pv = _validate.check_prefix_kv(prefix_k, prefix_v, q, layout, Hkv, Dv)
    pk4, pv4 = (_to4(x, layout)[0] for x in (pk, pv))
    P = pk4.shape[1]
    kk = np.zeros((B, Hkv, P + S, D), q.dtype)
    vv = np.zeros((B, Hkv, P + S, Dv), q.dtype)
    kk[:, :, :P], vv[:, :, :P] = pk4, pv4
    k4, v4 = _to4(suffix.k, layout), _to4(suffix.v, layout)
    for n, m in enumerate(lens.tolist()):
        kk[n, :, P:P + m] = k4[n, :, :m]
        vv[n, :, P:P + m] = v4[n, :, :m]
    return attention(q, _from4(kk, layout, 4), _from4(vv, layout, 4), key_lens=lens + P,
                     causal=causal, scale=scale, softcap=softcap, sinks=sinks, layout=layout,
                     return_lse=return_lse, out=out)


def shared_prefix_paged_attention(q, k_cache, v_cache, prefix_blocks, prefix_len, block_table,
                                  seq_lens, *, causal=False, scale=None, softcap=None, sinks=None,
                                  layout="bhld", return_lse=False, out=None, backend=None):
    """:func:`shared_prefix_attention` on a paged cache: the prefix is keys
    ``0 .. prefix_len - 1`` in the cache blocks ``prefix_blocks`` (1-D),
    request ``n``'s suffix its ``seq_lens[n]`` keys in ``block_table[n]``
    (as :func:`paged_attention`)."""
    table, plen = _validate.check_prefix_blocks(prefix_blocks, prefix_len, k_cache)
    q = _validate._float_array(q, "q")
    pages = _validate.check_paged(q[:1], k_cache, v_cache, table, plen, layout=layout, key_lens=None)
    n = int(plen[0])
    pk, pv = (x[0, :, :n] if layout == "bhld" else x[0, :n] for x in gather_pages(pages, layout))
    pages = _validate.check_paged(q, k_cache, v_cache, block_table, seq_lens, layout=layout,
                                  key_lens=None)
    k, v = gather_pages(pages, layout)
    return shared_prefix_attention(q, pk, pv, k, v, key_lens=pages.seq_lens, causal=causal,
                                   scale=scale, softcap=softcap, sinks=sinks, layout=layout,
                                   return_lse=return_lse, out=out)


def self_attention(x, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None, causal=False,
                   mask=None, bias=None, key_lens=None, scale=None, window=None, softcap=None,
                   alibi_slopes=None, sinks=None, backend=None):
    """A multi-head self-attention layer without biases or norms.

    ``x (B, L, d_model)`` or ``(L, d_model)``; ``w_q (d_model, Hq*D)``,
    ``w_k (d_model, Hkv*D)``, ``w_v (d_model, Hkv*Dv)``,
    ``w_o (Hq*Dv, d_model)``, with ``Hq = num_heads`` and
    ``Hkv = num_kv_heads`` (default ``num_heads``).  Computes
    ``attention(x@w_q, x@w_k, x@w_v) @ w_o`` with heads split in the
    ``"blhd"`` layout; masking options as in :func:`attention`.
    Returns ``(B, L, d_model)`` (or ``(L, d_model)``) in x's dtype.
    """
    plan = _validate.check_self_attention(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads)
    x3, dtype, Hq, Hkv, D, Dv, squeeze = plan
    f = np.float64
    xf = x3.astype(f)
    B, L, _ = xf.shape
    q = (xf @ w_q.astype(f)).reshape(B, L, Hq, D)
    k = (xf @ w_k.astype(f)).reshape(B, L, Hkv, D)
    v = (xf @ w_v.astype(f)).reshape(B, L, Hkv, Dv)
    o = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
                  window=window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                  layout="blhd")
    y = (o.reshape(B, L, Hq * Dv) @ w_o.astype(f)).astype(dtype)
    return y[0] if squeeze else y
