"""Public functions: validate -> plan -> dispatch."""

from __future__ import annotations

import numpy as np

from . import _dispatch, _validate, reference

__all__ = ["attention", "attention_varlen", "paged_attention", "merge_attention",
           "attention_weights", "self_attention"]


def _run(p, backend):
    """Dispatch a validated Problem and return the public result."""
    mod, _ = _dispatch.resolve(backend, p)
    if not p.empty:
        if p.Lk == 0:
            p.out[...] = 0
            if p.lse is not None:
                p.lse[...] = -np.inf
        else:
            mod.run(p, _dispatch.get_num_threads())
    return p.result()


def attention(q, k, v, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
              window=None, softcap=None, alibi_slopes=None, layout="bhld",
              return_lse=False, out=None, backend="auto"):
    """Fused attention ``softmax(scale * q k^T + bias) v``.

    Semantics are those of :func:`fastqkv.reference.attention` (its module
    docstring is normative).  ``backend`` is ``"auto"`` or a name from
    :func:`fastqkv.backends`.  Returns ``out`` or ``(out, lse)``.
    """
    _dispatch._check_name(backend, "backend")
    p = _validate.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout=layout,
        return_lse=return_lse, out=out)
    return _run(p, backend)


def attention_weights(q, k, *, causal=False, mask=None, bias=None, key_lens=None, scale=None,
                      window=None, softcap=None, alibi_slopes=None, layout="bhld",
                      backend="auto"):
    """Softmax probabilities ``(B, Hq, Lq, Lk)`` for inspection; see
    :func:`fastqkv.reference.attention_weights`.  The normaliser comes from
    the dispatched fused pass's lse; scores are recomputed with NumPy."""
    v = reference._dummy_v(q, k, layout)
    _, lse = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens,
                       scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       layout=layout, return_lse=True, backend=backend)
    p = _validate.plan_attention(
        q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
        window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout=layout)
    acc = p.acc_dtype.type
    w = np.zeros((p.B, p.Hq, p.Lq, p.Lk), dtype=p.acc_dtype)
    lse4 = np.asarray(lse).reshape(p.B, p.Hq, p.Lq)
    for b in range(0 if p.empty else p.B):
        s, _ = reference.scores(p, b, dtype=acc)
        with np.errstate(all="ignore"):
            e = np.exp(s - lse4[b][..., None])
        w[b, :, :, : s.shape[-1]] = np.where(np.isneginf(lse4[b])[..., None], 0, e)
    return reference.weights_user_shape(w, p.ndim)


def merge_attention(outs, lses, *, layout="bhld"):
    """Combine partial results over disjoint key sets; see
    :func:`fastqkv.reference.merge_attention`."""
    return reference.merge_attention(outs, lses, layout=layout)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                     window=None, softcap=None, alibi_slopes=None, return_lse=False,
                     out=None, backend="auto", mask=None, bias=None, key_lens=None):
    """Attention over a packed ragged batch; see
    :func:`fastqkv.reference.attention_varlen`."""
    _dispatch._check_name(backend, "backend")
    plan = _validate.plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mask=mask, bias=bias,
                                 key_lens=key_lens, alibi_slopes=alibi_slopes,
                                 return_lse=return_lse, out=out)
    return reference._varlen_loop(plan, attention, dict(causal=causal, scale=scale,
                                                        window=window, softcap=softcap,
                                                        backend=backend))


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, causal=False, mask=None,
                    bias=None, scale=None, window=None, softcap=None, alibi_slopes=None,
                    layout="bhld", return_lse=False, out=None, backend="auto", key_lens=None):
    """Attention against a paged KV cache; see
    :func:`fastqkv.reference.paged_attention`."""
    _dispatch._check_name(backend, "backend")
    plan = _validate.plan_paged(q, k_cache, v_cache, block_table, seq_lens, layout=layout,
                                key_lens=key_lens)
    k, v = reference.gather_pages(plan)
    return attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=plan.seq_lens,
                     scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                     layout=layout, return_lse=return_lse, out=out, backend=backend)


def self_attention(x, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None, causal=False,
                   mask=None, bias=None, key_lens=None, scale=None, window=None, softcap=None,
                   alibi_slopes=None, backend="auto"):
    """Multi-head self-attention layer; see :func:`fastqkv.reference.self_attention`.
    Projections use NumPy matmul (float32 for half-width inputs); attention
    is the dispatched fused kernel."""
    _dispatch._check_name(backend, "backend")
    x3, dtype, Hq, Hkv, D, Dv, squeeze = _validate.plan_self_attention(
        x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads)
    mm = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
    xm = x3.astype(mm, copy=False)
    B, L, _ = xm.shape

    def proj(w, H, d):
        return (xm @ np.asarray(w).astype(mm, copy=False)).reshape(B, L, H, d).astype(dtype, copy=False)

    q, k, v = proj(w_q, Hq, D), proj(w_k, Hkv, D), proj(w_v, Hkv, Dv)
    o = attention(q, k, v, causal=causal, mask=mask, bias=bias, key_lens=key_lens, scale=scale,
                  window=window, softcap=softcap, alibi_slopes=alibi_slopes, layout="blhd",
                  backend=backend)
    y = (o.reshape(B, L, Hq * Dv).astype(mm, copy=False) @ np.asarray(w_o).astype(mm, copy=False))
    y = y.astype(dtype, copy=False)
    return y[0] if squeeze else y
