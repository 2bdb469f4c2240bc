"""The ``numpy`` backend: the oracle's dense float64 computation.

Always available; slow (it materialises the ``Lq x Lk`` scores per batch).
It runs :func:`fastqkv.reference.attention` on a Problem's arrays, so it
checks the planner's normalisation against the oracle's semantics.
"""

from . import reference

# it reads no paged cache; it applies score options at every storage dtype
# and reads quantized K/V with their scales
FEATURES = frozenset({"half_options", "quant", "quant_options"})


def probe():
    return True, "always available (dense NumPy, float64 inside)", {}


def supports(problem):
    return None


def compute(p):
    """Fill ``p.out`` (and ``p.lse``) of a dense Problem with
    :func:`fastqkv.reference.attention` on its (B, H, L, D) arrays (causal
    is in ``p.window_right``)."""
    out, lse = reference.attention(
        p.q, p.k, p.v, mask=p.mask, bias=p.bias, key_lens=p.key_lens, scale=p.scale,
        window=(p.window_left, p.window_right), softcap=p.softcap or None,
        alibi_slopes=p.alibi, sinks=p.sinks, k_scale=p.k_scale, v_scale=p.v_scale,
        return_lse=True, out=p.out)
    if p.lse is not None:
        p.lse[...] = lse


def run(problem, num_threads):
    compute(problem)
