"""Test support for fastqkv and for libraries that embed it.

* :func:`generate_cases` - the one case generator: odd sizes, strided and
  transposed views, GQA ratios 1/4/8, every option, fully masked rows, huge
  logits, NaN; with ``kinds`` also the decode shapes that split the keys,
  paged KV caches and packed (varlen) batches.  A :class:`Case` names the
  public function it calls and its arguments.
* :func:`quant_dtypes` - the quantized K/V dtypes this installation can
  create; given as ``dtypes`` they turn every case of a kind into a call on
  int8/float8 K/V with scales (q float32, some float16/bfloat16).
* :func:`paged_cache` and :func:`varlen_pack` - the builders those cases use:
  dense K/V scattered into a shuffled, NaN-poisoned paged cache; per-sequence
  arrays packed with their ``cu_seqlens``.
* :data:`TOLERANCES` - the one tolerance table (per dtype).
* :func:`check_case` - the one comparison driver: runs a backend on a case
  with a NaN-poisoned output, compares out and lse with the oracle, checks
  that the inputs were not modified; raises ``AssertionError`` that prints
  the whole case.
* :func:`assert_close` - the error metric, usable on its own, with
  :func:`condition_number` for the bound of a comparison made by hand.
* :func:`threads` - a context manager that sets the kernels' thread count.

Embedders can validate their own build with::

    from fastqkv import testing
    for case in testing.generate_cases(kinds=testing.KINDS):
        testing.check_case(case, "auto")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from . import _api, _dispatch, _validate, reference
from . import _quant

__all__ = ["TOLERANCES", "MODEL_TOLERANCES", "KINDS", "Case", "generate_cases", "check_case", "assert_close",
           "as_dtype", "case_bounds", "condition_number", "threads", "half_dtypes", "quant_dtypes",
           "make_case", "paged_cache", "varlen_pack"]

# Relative precision expected of a backend, per storage dtype.  The allowed
# error of an output element is  tol * cond * max|v|,  where cond bounds how
# much the scores can be perturbed by rounding (see condition_number); the lse gets
# tol * cond.  float16/bfloat16 include the rounding of the output itself.
TOLERANCES = {
    "float64": 1e-12,
    "float32": 4e-6,
    "float16": 2e-3,
    "bfloat16": 1.6e-2,
}

# Whole models through an integration (fastqkv against the framework's own
# attention, same weights): the largest logit or hidden-state difference
# allowed, relative to the largest magnitude, per model dtype.
MODEL_TOLERANCES = {
    "float32": 1e-4,
    "bfloat16": 5e-2,
}


def half_dtypes():
    """The half-width dtypes this installation can create (bfloat16 needs ml_dtypes)."""
    return [d for d in map(as_dtype, _validate.HALF_DTYPES) if d is not None]


def quant_dtypes():
    """The quantized K/V dtype names this installation can create (float8
    needs ml_dtypes)."""
    return [d for d in _validate.QUANT_DTYPES if as_dtype(d) is not None]


def as_dtype(name):
    """The NumPy dtype of a name, ``"bfloat16"`` and the float8 types
    included (ml_dtypes; None when it is not installed)."""
    if name == "bfloat16":
        return _validate.bfloat16()
    if name in _validate.QUANT_DTYPES:
        try:
            return _validate.quant_dtype(name)
        except ImportError:
            return None
    return np.dtype(name)


# the public function a Case calls, and the positional arguments it passes
# after q, k, v
FUNCTIONS = {
    "attention": (),
    "attention_varlen": ("cu_seqlens_q", "cu_seqlens_k"),
    "paged_attention": ("block_table", "seq_lens"),
    "shared_prefix_attention": ("k_suffix", "v_suffix"),
    "shared_prefix_paged_attention": ("prefix_blocks", "prefix_len", "block_table", "seq_lens"),
}


@dataclass
class Case:
    """One call of a public function: arrays, keyword options, and how to lay
    out ``out``.  ``fn`` names the function (see ``FUNCTIONS``) and ``args``
    holds its positional arguments after ``q, k, v``: ``(cu_seqlens_q,
    cu_seqlens_k)`` for ``attention_varlen``; ``(block_table, seq_lens)`` for
    ``paged_attention``, whose ``k`` and ``v`` are then the caches; for
    ``shared_prefix_attention`` ``k``/``v`` are the prefix and ``args`` the
    suffixes; for ``shared_prefix_paged_attention`` ``k``/``v`` are the caches
    and ``args`` ``(prefix_blocks, prefix_len, block_table, seq_lens)``."""
    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict = field(default_factory=dict)
    out_strided: bool = False
    fn: str = "attention"
    args: tuple = ()

    def call(self, module, **extra):
        """``module.<fn>(q, k, v, *args, **kwargs, **extra)`` (``module`` is
        ``fastqkv`` or ``fastqkv.reference``)."""
        return getattr(module, self.fn)(self.q, self.k, self.v, *self.args, **self.kwargs, **extra)

    def arrays(self):
        """Every input array of the call, by argument name."""
        names = ("q", "k", "v") + FUNCTIONS[self.fn]
        out = dict(zip(names, (self.q, self.k, self.v) + tuple(self.args)))
        out.update((key, val) for key, val in self.kwargs.items() if isinstance(val, np.ndarray))
        return out

    def describe(self):
        def arr(a):
            return f"shape={a.shape} dtype={a.dtype} strides={a.strides}"
        opts = []
        for key, val in zip(FUNCTIONS[self.fn], self.args):
            opts.append(f"{key}={np.asarray(val).tolist()!r}")
        for key, val in self.kwargs.items():
            if isinstance(val, np.ndarray):
                opts.append(f"{key}=<{arr(val)}>")
            else:
                opts.append(f"{key}={val!r}")
        return (f"case {self.name}: {self.fn}(q <{arr(self.q)}>, k <{arr(self.k)}>, v <{arr(self.v)}>, "
                f"{', '.join(opts) or 'no options'}), out {'strided' if self.out_strided else 'contiguous'}")

    def __repr__(self):
        return f"Case({self.name})"


def _strided(rng, shape, dtype, how):
    """A random array of ``shape`` viewed through non-trivial strides."""
    shape = tuple(shape)
    if how == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if how == "transposed":  # memory (B, L, H, D), viewed as (B, H, L, D)
        base = rng.standard_normal((shape[0], shape[2], shape[1], shape[3])).astype(dtype)
        return base.transpose(0, 2, 1, 3)
    if how == "sliced":  # every other row of a larger buffer, offset head dim
        big = rng.standard_normal(shape[:-2] + (2 * shape[-2], shape[-1] + 3)).astype(dtype)
        return big[..., ::2, 1:shape[-1] + 1]
    raise ValueError(how)


def make_case(name, rng, B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=np.float32, strides="contiguous",
              out_strided=False, **kwargs):
    """Build a 4-D ``bhld`` case with random inputs; ``kwargs`` go to attention."""
    Dv = D if Dv is None else Dv
    q = _strided(rng, (B, Hq, Lq, D), dtype, strides)
    k = _strided(rng, (B, Hkv, Lk, D), dtype, strides)
    v = _strided(rng, (B, Hkv, Lk, Dv), dtype, strides)
    return Case(name, q, k, v, kwargs, out_strided)


KINDS = ("dense", "decode", "paged", "varlen", "shared_prefix")
# the kinds whose functions take quantized K/V
QUANT_KINDS = ("dense", "decode", "paged", "varlen")


def generate_cases(quick=False, seed=0, dtypes=("float32", "float64"), kinds=("dense",)):
    """The case list (deterministic for a seed).  ``quick`` keeps a subset
    that still touches every option.  A quantized name in ``dtypes`` (see
    :func:`quant_dtypes`) builds the float32 cases and quantizes their K/V
    (:func:`_quantized`).  ``kinds`` (any of :data:`KINDS`):
    ``"dense"`` calls of ``attention``; ``"decode"`` the few-query shapes
    the streaming kernels split over the keys (ragged ``key_lens`` with NaN
    and inf past each length); ``"paged"`` calls of ``paged_attention`` on
    :func:`paged_cache` caches of several block sizes; ``"varlen"`` calls of
    ``attention_varlen`` on :func:`varlen_pack` batches; ``"shared_prefix"``
    calls of ``shared_prefix_attention`` and ``shared_prefix_paged_attention``
    (not quantized: see :data:`QUANT_KINDS`)."""
    builders = {"dense": _dense_cases, "decode": _decode_cases, "paged": _paged_cases,
                "varlen": _varlen_cases, "shared_prefix": _shared_prefix_cases}
    unknown = set(kinds) - set(builders)
    if unknown:
        raise ValueError(f"unknown case kinds {sorted(unknown)}; known: {KINDS}")
    rng = np.random.default_rng(seed)
    cases = []
    for kind in kinds:
        for dt in dtypes:
            if dt in _validate.QUANT_DTYPES:
                if kind not in QUANT_KINDS:
                    continue
                qrng = _substream(rng)
                built = builders[kind](np.dtype(np.float32), qrng, quick)
                cases.extend(_quantized(c, dt, i) for i, c in enumerate(built))
            else:
                cases.extend(builders[kind](as_dtype(dt), rng, quick))
    return cases


def _substream(rng):
    """A generator of its own spawned from ``rng``'s seed without advancing
    ``rng`` (``Generator.spawn``, which NumPy has from 1.25 on)."""
    bits = rng.bit_generator
    seq = getattr(bits, "seed_seq", None) or bits._seed_seq
    return np.random.Generator(type(bits)(seq.spawn(1)[0]))


def _head_axis(case, ndim):
    """The KV-head axis of ``case``'s K (of rank ``ndim``); None for 2-D."""
    if case.fn == "paged_attention":
        return 2
    if case.fn == "attention_varlen":
        return 1
    blhd = case.kwargs.get("layout") == "blhd"
    return {4: 2 if blhd else 1, 3: 1 if blhd else 0}.get(ndim)


def _quantized(case, name, i):
    """``case`` (float32) with K/V quantized to ``name`` and their scales:
    one per token and head, or (every fourth case) one per KV head; q
    float16 or bfloat16 in every third case.  Poison stays poison: a K/V row
    that is all non-finite (past ``key_lens``, an unused cache block) gets a
    NaN scale (per-token scales) and NaN float8 values; a single NaN/inf
    element stays in float8 (e4m3fn has no inf: NaN) and is 0 in int8."""
    dt = as_dtype(name)
    per_head = i % 4 == 3
    kw = dict(case.kwargs)
    out = []
    for x in (case.k, case.v):
        x = np.asarray(x, dtype=np.float64)
        bad = ~np.isfinite(x)
        row_bad = bad.all(axis=-1)
        clean = np.where(bad, 0.0, np.abs(x))
        hax = _head_axis(case, x.ndim)
        if per_head:
            axes = tuple(a for a in range(x.ndim) if a != hax)
            s = _quant.scale_for(clean.max(axis=axes) if hax is not None else clean.max().reshape(1), name)
            full = np.expand_dims(s, axes) if hax is not None else s
        else:
            s = _quant.scale_for(clean.max(axis=-1), name)
            full = s[..., None]
        xq = _quant.encode(np.where(bad, 0.0, x), full, name)
        if not per_head:
            s[row_bad] = np.nan
        if name != "int8":
            xq[bad] = x[bad].astype(dt)
            xq[row_bad] = np.nan
        out.append((xq, s))
    (kq, ks), (vq, vs) = out
    kw["k_scale"], kw["v_scale"] = ks, vs
    q = case.q
    if i % 3 == 2:
        half = as_dtype("bfloat16" if i % 2 else "float16") or np.dtype(np.float16)
        q = np.asarray(q).astype(half)
    label = case.name.replace("float32-", "", 1)
    return Case(f"{name}-{label}", q, kq, vq, kw, case.out_strided, case.fn, case.args)


def _dequantized(case):
    """K and V of ``case`` as float64, scales applied (quantized cases)."""
    k, v = (np.asarray(x).astype(np.float64) for x in (case.k, case.v))
    ks, vs = case.kwargs.get("k_scale"), case.kwargs.get("v_scale")
    if ks is None:
        return k, v
    res = []
    for x, s in ((k, ks), (v, vs)):
        s = np.asarray(s, np.float64)
        if s.ndim == x.ndim - 1:
            s = s[..., None]
        else:
            hax = _head_axis(case, x.ndim)
            s = np.expand_dims(s, tuple(a for a in range(x.ndim) if a != hax)) if hax is not None else s
        with np.errstate(all="ignore"):
            res.append(x * s)
    return tuple(res)


def _dense_cases(dtype, rng, quick):
    n = dtype.name
    c = []
    add = c.append

    def mk(name, *shape, **kw):
        add(make_case(f"{n}-{name}", rng, *shape, dtype=dtype, **kw))

    # sizes: (B, Hq, Hkv, Lq, Lk, D[, Dv])
    mk("tiny", 1, 1, 1, 1, 1, 1)
    mk("odd-D3", 2, 2, 2, 7, 7, 3)
    mk("D80-L113", 1, 2, 2, 113, 113, 80)
    mk("gqa4-causal", 1, 8, 2, 33, 33, 64, causal=True)
    mk("gqa8-decode", 2, 8, 1, 1, 300, 128, causal=True)
    mk("mqa-chunk-causal", 1, 4, 1, 16, 129, 32, causal=True)
    mk("mqa32-decode", 2, 32, 1, 1, 70, 24, key_lens=np.array([70, 3]))
    mk("Dv-ne-D", 1, 4, 2, 9, 21, 16, 24)
    mk("transposed-gqa4", 2, 4, 1, 17, 40, 16, strides="transposed", causal=True)
    mk("sliced", 1, 2, 2, 13, 29, 8, strides="sliced")
    mk("out-strided", 1, 2, 1, 11, 19, 8, out_strided=True)
    kl = np.array([0, 5, 64], dtype=np.int64)
    mk("key-lens", 3, 4, 2, 6, 64, 32, key_lens=kl)
    mk("key-lens-causal", 3, 4, 2, 6, 64, 32, key_lens=kl, causal=True)
    mk("window", 1, 2, 1, 40, 40, 16, window=(5, 3))
    mk("window-causal-chunk", 1, 2, 2, 9, 50, 16, window=(7, -1), causal=True)
    mk("softcap", 1, 2, 2, 10, 30, 16, softcap=5.0, scale=2.0)
    mk("alibi", 2, 4, 2, 12, 31, 16, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), causal=True)
    pad = np.ones((2, 1, 1, 45), bool)
    pad[0, ..., 30:] = False
    pad[1, ..., :] = False                      # every row of batch 1 fully masked
    mk("mask-key-padding", 2, 4, 4, 20, 45, 64, mask=pad)
    full = rng.random((1, 2, 15, 23)) < 0.6
    full[0, 1, 4, :] = False                    # one fully masked row
    mk("mask-full", 1, 2, 1, 15, 23, 8, mask=full)
    mk("mask-2d", 1, 2, 2, 15, 23, 8, mask=rng.random((15, 23)) < 0.5)
    mk("bias-broadcast", 1, 4, 2, 7, 26, 16, bias=rng.standard_normal((1, 4, 1, 26)))
    bias = rng.standard_normal((7, 26))
    bias[3, :] = -np.inf                        # a row masked through the bias
    mk("bias-2d-neginf", 1, 4, 2, 7, 26, 16, bias=bias)
    c.append(_huge_logits(n, rng, dtype))
    c.extend(_nan_cases(n, rng, dtype))
    c.extend(_layout_cases(n, rng, dtype))
    if not quick:
        mk("big-prefill-causal", 1, 4, 1, 150, 150, 128, causal=True)
        mk("everything", 2, 8, 2, 21, 70, 32, causal=True, window=(30, -1), softcap=20.0,
           key_lens=np.array([70, 40]), mask=rng.random((2, 1, 21, 70)) < 0.8,
           bias=rng.standard_normal((1, 8, 21, 70)), alibi_slopes=rng.random(8),
           strides="transposed", out_strided=True)
        mk("long-decode-gqa8", 1, 16, 2, 1, 1000, 64)
        mk("L113-D1", 1, 1, 1, 113, 113, 1, causal=True)
    # sinks=: drawn from their own stream (the cases above keep their data)
    srng = _substream(rng)
    full = srng.random((1, 2, 15, 23)) < 0.6
    full[0, 1, 4, :] = False                    # one fully masked row
    for name, shape, kw in (
            ("gqa4-causal", (1, 8, 2, 33, 33, 64), dict(causal=True)),
            ("key-lens-causal", (3, 4, 2, 6, 64, 32), dict(key_lens=np.array([0, 5, 64]), causal=True)),
            ("mask-full", (1, 2, 1, 15, 23, 8), dict(mask=full)),
            ("softcap-alibi-window", (2, 4, 2, 12, 31, 16),
             dict(softcap=5.0, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), window=(6, 2))),
            ("gqa8-decode", (2, 8, 1, 1, 300, 128), dict(causal=True)),
            ("nan-q-row", (1, 2, 2, 5, 12, 8), {})):
        add(_with_sinks(make_case(f"{n}-sinks-{name}", srng, *shape, dtype=dtype, **kw), srng))
    c[-1].q[0, 1, 2, 3] = np.nan                # NaN row 2 of head 1
    return c


def _huge_logits(n, rng, dtype):
    case = make_case(f"{n}-huge-logits", rng, 1, 2, 1, 9, 33, 16, dtype=dtype)
    case.q = (case.q.astype(np.float64) * 300).astype(dtype)   # scores of order 1e4
    return case


def _nan_cases(n, rng, dtype):
    out = []
    c1 = make_case(f"{n}-nan-q-row", rng, 1, 2, 2, 5, 12, 8, dtype=dtype)
    c1.q[0, 1, 2, 3] = np.nan                                   # NaN row 2 of head 1
    out.append(c1)
    c2 = make_case(f"{n}-nan-masked-kv", rng, 1, 2, 1, 5, 12, 8, dtype=dtype, causal=True)
    c2.k[0, 0, 11, 0] = np.nan                                  # only the last query sees key 11
    c2.v[0, 0, 10, 0] = np.inf                                  # keys 10/11 hidden from rows < 4
    out.append(c2)
    c3 = make_case(f"{n}-nan-beyond-key-lens", rng, 2, 2, 1, 4, 16, 8, dtype=dtype,
                   key_lens=np.array([10, 16]))
    c3.k[0, 0, 12:] = np.nan
    c3.v[0, 0, 12:] = np.nan
    out.append(c3)
    c4 = make_case(f"{n}-nan-k-mqa-decode", rng, 1, 16, 1, 1, 40, 8, dtype=dtype)
    c4.k[0, 0, 5, 2] = np.nan                                   # every query head sees it
    out.append(c4)
    return out


def _layout_cases(n, rng, dtype):
    out = []
    q = rng.standard_normal((2, 13, 4, 16)).astype(dtype)
    k = rng.standard_normal((2, 21, 2, 16)).astype(dtype)
    v = rng.standard_normal((2, 21, 2, 12)).astype(dtype)
    out.append(Case(f"{n}-blhd", q, k, v, {"layout": "blhd", "causal": True}))
    out.append(Case(f"{n}-blhd-3d", q[0], k[0], v[0], {"layout": "blhd"}, out_strided=True))
    out.append(Case(f"{n}-bhld-3d", q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                    v[0].transpose(1, 0, 2), {"causal": True}))
    out.append(Case(f"{n}-2d", q[0, :, 0], k[0, :, 0], v[0, :, 0], {"window": (3, 3)}))
    return out


# ---------------------------------------------------------------------------
# builders and the serving kinds

def paged_cache(k, v, block_size, rng, seq_lens=None, *, spare_blocks=3, spare_cols=1):
    """A paged KV cache holding dense ``k``/``v`` (B, Hkv, L, D) in shuffled
    blocks of ``block_size``: ``(k_cache, v_cache, block_table)``, caches of
    shape (num_blocks, block_size, Hkv, D).  Whatever the call must not read
    is poison: rows past ``seq_lens[b]`` (default L) and ``spare_blocks``
    unused blocks are NaN, and ``spare_cols`` table columns past the longest
    sequence hold out-of-range block ids."""
    B, Hkv, L, D = k.shape
    lens = np.full(B, L, np.int64) if seq_lens is None else np.asarray(seq_lens)
    per_seq = -(-L // block_size)
    nblocks = B * per_seq + spare_blocks
    kc = np.full((nblocks, block_size, Hkv, D), np.nan, k.dtype)
    vc = np.full((nblocks, block_size, Hkv, v.shape[3]), np.nan, v.dtype)
    ids = rng.permutation(nblocks)
    table = np.full((B, per_seq + spare_cols), 2**40, np.int64)
    for b in range(B):
        n = int(lens[b])
        for t in range(-(-n // block_size)):
            blk = ids[b * per_seq + t]
            table[b, t] = blk
            rows = min(block_size, n - t * block_size)
            kc[blk, :rows] = k[b, :, t * block_size:t * block_size + rows].transpose(1, 0, 2)
            vc[blk, :rows] = v[b, :, t * block_size:t * block_size + rows].transpose(1, 0, 2)
    return kc, vc, table


def varlen_pack(seqs):
    """Pack per-sequence arrays (L_b, H, D) into ``(packed, cu_seqlens)``:
    ``packed`` of shape (sum L_b, H, D) and ``cu_seqlens`` int64 (B + 1,)."""
    cu = np.concatenate([[0], np.cumsum([len(x) for x in seqs])]).astype(np.int64)
    return np.concatenate(seqs, axis=0), cu


def _with_key_lens(case, key_lens):
    """``case`` with ``key_lens`` set and NaN (K) / inf (V) past each length."""
    case.kwargs["key_lens"] = np.asarray(key_lens)
    for b, n in enumerate(key_lens):
        case.k[b, :, n:] = np.nan
        case.v[b, :, n:] = np.inf
    return case


def _with_sinks(case, rng):
    """``case`` with ``sinks=``: a float32 logit ~N(0, 2^2) per query head,
    the last head's -inf (no sink)."""
    packed = case.fn == "attention_varlen" or "cu_seqlens_q" in case.kwargs
    heads = case.q.shape[-2 if packed or case.kwargs.get("layout") == "blhd" else -3]
    sinks = (2 * rng.standard_normal(heads)).astype(np.float32)
    sinks[-1] = -np.inf
    case.kwargs["sinks"] = sinks
    return case


def _decode_cases(dtype, rng, quick):
    """Few query positions over many keys: the shapes the streaming kernels
    take and split over the keys (forced split counts exercise empty and
    fully masked splits)."""
    n = dtype.name
    c = []
    shapes = [
        # name, (B, Hq, Hkv, Lq, Lk, D, Dv), key_lens or None, options
        ("mha", (2, 3, 3, 1, 150, 16, 16), None, {}),
        ("mha-empty-seq", (3, 8, 8, 1, 300, 32, 32), [300, 0, 17], {}),
        ("gqa4-ragged", (3, 8, 2, 1, 200, 32, 32), [200, 0, 77], {}),
        ("gqa4-long", (2, 8, 2, 1, 517, 64, 64), [517, 260], {}),
        ("gqa8-causal", (2, 16, 2, 1, 130, 64, 48), [1, 130], dict(causal=True)),
        ("gqa8-odd", (2, 16, 2, 1, 77, 67, 40), None, {}),
        ("mqa8", (2, 8, 1, 1, 400, 16, 16), None, {}),
        ("gqa4-spec-causal", (2, 8, 2, 5, 90, 24, 24), [90, 7], dict(causal=True)),
        ("gqa4-spec5-causal", (2, 8, 2, 5, 300, 32, 32), [300, 7], dict(causal=True)),
        ("gqa4-q16-window", (1, 4, 1, 16, 120, 8, 8), None, dict(causal=True, window=(20, 0))),
        ("gqa2-q16-window-left", (1, 4, 2, 16, 200, 24, 24), None, dict(causal=True, window=(50, -1))),
        ("mqa4-window-both", (2, 4, 1, 3, 250, 8, 8), [250, 90], dict(window=(20, 1))),
        ("odd-dims-window", (1, 2, 1, 3, 67, 3, 5), None, dict(window=(10, 4))),
        ("first-row-two-keys", (1, 2, 1, 2, 33, 5, 5), [3], dict(causal=True)),
        # rows in vector lanes (the transposed path): MQA, odd D and Dv, and
        # causal multi-token steps whose last tile takes the row path
        ("mqa32-ragged", (2, 32, 1, 1, 150, 80, 72), [150, 37], {}),
        ("mqa32-odd-D", (2, 32, 1, 1, 300, 67, 67), [300, 45], {}),
        ("gqa16-odd", (1, 32, 2, 1, 100, 67, 33), None, {}),
        ("gqa16-spec3-causal", (1, 32, 2, 3, 200, 80, 80), None, dict(causal=True)),
        ("gqa8-spec4-causal", (2, 16, 2, 4, 90, 16, 16), [90, 50], dict(causal=True)),
    ]
    if quick:
        shapes = shapes[::3]
    for name, shape, key_lens, kw in shapes:
        case = make_case(f"{n}-decode-{name}", rng, *shape, dtype=dtype, **kw)
        c.append(case if key_lens is None else _with_key_lens(case, key_lens))
    # sinks=: drawn from their own stream (the cases above keep their data)
    srng = _substream(rng)
    for name, shape, key_lens, kw in (
            ("gqa4-ragged-causal", (3, 8, 2, 1, 200, 32, 32), [200, 0, 77], dict(causal=True)),
            ("mqa32-ragged", (2, 32, 1, 1, 150, 80, 72), [150, 37], {}),
            ("gqa4-spec5-window", (2, 8, 2, 5, 300, 32, 32), [300, 7], dict(causal=True, window=(20, 0))),
            ("gqa16-spec3-causal", (1, 32, 2, 3, 200, 80, 80), [200], dict(causal=True))):
        case = make_case(f"{n}-decode-sinks-{name}", srng, *shape, dtype=dtype, **kw)
        c.append(_with_sinks(_with_key_lens(case, key_lens), srng))
    return c


def _paged_case(name, rng, dtype, shape, seq_lens, block_size, layout="bhld", Dv=None, **kw):
    """A ``paged_attention`` case over dense random K/V of ``shape``
    (B, Hq, Hkv, Lq, Lk, D) held in a :func:`paged_cache`."""
    B, Hq, Hkv, Lq, Lk, D = shape
    dense = make_case(name, rng, B, Hq, Hkv, Lq, Lk, D, Dv, dtype=dtype)
    seq_lens = np.asarray(seq_lens, np.int64)
    kc, vc, table = paged_cache(dense.k, dense.v, Lk if block_size == "len" else block_size, rng, seq_lens)
    q = dense.q
    if layout == "blhd":
        q = q.transpose(0, 2, 1, 3)
        kw["layout"] = "blhd"
    return Case(name, q, kc, vc, kw, fn="paged_attention", args=(table, seq_lens))


def _paged_cases(dtype, rng, quick):
    n = dtype.name
    c = []
    add = c.append
    block_sizes = (3, 16) if quick else (1, 3, 16, 64, "len")
    for name, shape, seq, kw in (
            # name, (B, Hq, Hkv, Lq, Lk, D), seq_lens, options
            ("mha-decode", (3, 2, 2, 1, 70, 16), [70, 0, 33], dict(causal=True)),
            ("gqa4-decode", (2, 8, 2, 1, 100, 32), [100, 64], {}),
            ("gqa8-decode", (1, 16, 2, 1, 129, 64), [129], dict(causal=True)),
            ("gqa4-chunk-prefill", (2, 8, 2, 20, 90, 16), [90, 41], dict(causal=True)),
            ("gqa4-window", (2, 4, 1, 3, 80, 8), [80, 5], dict(causal=True, window=(9, 0))),
            ("mqa32-decode", (2, 32, 1, 1, 100, 32), [100, 61], {}),
            ("gqa16-chunk-prefill", (1, 32, 2, 3, 70, 16), [70], dict(causal=True))):
        for bs in block_sizes:
            add(_paged_case(f"{n}-paged-{name}-bs{bs}", rng, dtype, shape, seq, bs, **kw))
    # a batch of 3 over 333 keys: decode, a 4-token step and prefill with a cache
    for name, Lq, kw in (("decode", 1, {}), ("lq4-causal", 4, dict(causal=True)),
                         ("prefill40-causal", 40, dict(causal=True)),
                         ("prefill40-window", 40, dict(causal=True, window=(60, -1)))):
        for bs in ((16,) if quick else (1, 3, 16, 64, 333)):
            add(_paged_case(f"{n}-paged-b3-{name}-bs{bs}", rng, dtype, (3, 8, 2, Lq, 333, 16),
                       np.array([333, 47, 200]).clip(Lq), bs, **kw))
    # score options the streaming kernels do not take: the cache is gathered
    add(_paged_case(f"{n}-paged-softcap", rng, dtype, (2, 4, 2, 2, 40, 16), [40, 11], 4, softcap=3.0, causal=True))
    add(_paged_case(f"{n}-paged-softcap5", rng, dtype, (2, 4, 2, 3, 70, 8), [70, 20], 16, softcap=5.0))
    add(_paged_case(f"{n}-paged-alibi", rng, dtype, (2, 4, 2, 3, 70, 8), [70, 20], 16,
               alibi_slopes=np.array([0.5, 0.1, 0.2, 0.3])))
    case = _paged_case(f"{n}-paged-mask", rng, dtype, (2, 4, 2, 3, 70, 8), [70, 20], 16)
    case.kwargs["mask"] = rng.random((2, 4, 3, case.args[0].shape[1] * 16)) < 0.7
    add(case)
    for hq, g in ((8, 1), (8, 4), (8, 8), (32, 16), (32, 32)):
        add(_paged_case(f"{n}-paged-gqa{g}", rng, dtype, (2, hq, hq // g, 1, 100, 16), [100, 0], 7))
    add(_paged_case(f"{n}-paged-blhd", rng, dtype, (2, 4, 2, 3, 50, 8), [50, 9], 8, layout="blhd", causal=True))
    add(_paged_case(f"{n}-paged-blhd-decode", rng, dtype, (2, 8, 2, 1, 50, 16), [50, 23], 8, layout="blhd"))
    add(_paged_case(f"{n}-paged-decode-long", rng, dtype, (2, 8, 2, 1, 300, 32), [300, 17], 16))
    add(_paged_case(f"{n}-paged-decode-Dv", rng, dtype, (2, 8, 2, 1, 120, 32), [120, 33], 16, Dv=24))
    add(_paged_case(f"{n}-paged-prefill-cache", rng, dtype, (2, 8, 2, 20, 120, 32), [120, 40], 16, causal=True))
    # sinks=: drawn from their own stream (the cases above keep their data)
    srng = _substream(rng)
    for name, shape, seq, bs, kw in (
            ("gqa4-decode", (2, 8, 2, 1, 100, 32), [100, 0], 16, {}),
            ("mqa32-decode-causal", (2, 32, 1, 1, 100, 32), [100, 61], 7, dict(causal=True)),
            ("gqa4-chunk-prefill", (2, 8, 2, 20, 90, 16), [90, 41], 3, dict(causal=True)),
            ("blhd-window", (2, 4, 2, 3, 50, 8), [50, 9], 8,
             dict(layout="blhd", causal=True, window=(4, 0)))):
        add(_with_sinks(_paged_case(f"{n}-paged-sinks-{name}", srng, dtype, shape, seq, bs, **kw), srng))
    # packed queries of several lengths (cu_seqlens_q): decode rows and
    # prefill chunks in one call, sequences without queries or keys
    prng = _substream(srng)
    for name, (Hq, Hkv, D), seq, lq, bs, kw in (
            ("mixed-causal", (8, 2, 16), [50, 7, 33, 64, 0], [1, 5, 0, 16, 0], 16, dict(causal=True)),
            ("decode-rows-mqa", (8, 1, 32), [100, 1, 57], [1, 1, 1], 7, {}),
            ("window", (4, 2, 8), [40, 3], [4, 3], 8, dict(causal=True, window=(5, 0))),
            ("softcap", (4, 2, 8), [20, 30], [2, 6], 4, dict(softcap=5.0)),
            ("sinks-alibi", (4, 2, 8), [25, 9], [3, 1], 8,
             dict(causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])))):
        seq = np.array(seq, np.int64)
        L = max(1, int(seq.max()))
        k = prng.standard_normal((len(seq), Hkv, L, D)).astype(dtype)
        v = prng.standard_normal((len(seq), Hkv, L, D)).astype(dtype)
        kc, vc, table = paged_cache(k, v, bs, prng, seq)
        q, cu = varlen_pack([prng.standard_normal((m, Hq, D)).astype(dtype) for m in lq])
        case = Case(f"{n}-paged-packed-{name}", q, kc, vc, dict(kw, cu_seqlens_q=cu),
                    fn="paged_attention", args=(table, seq))
        add(_with_sinks(case, prng) if "sinks" in name else case)
    return c


def _varlen_cases(dtype, rng, quick):
    n = dtype.name

    def mk(name, lq, lk, Hq, Hkv, D, Dv=None, **kw):
        Dv = D if Dv is None else Dv
        q, cq = varlen_pack([rng.standard_normal((m, Hq, D)).astype(dtype) for m in lq])
        k, ck = varlen_pack([rng.standard_normal((m, Hkv, D)).astype(dtype) for m in lk])
        v, _ = varlen_pack([rng.standard_normal((m, Hkv, Dv)).astype(dtype) for m in lk])
        return Case(f"{n}-varlen-{name}", q, k, v, kw, fn="attention_varlen", args=(cq, ck))

    c = [mk("mqa4-causal-empty", [2, 0, 1, 4], [5, 3, 0, 4], 4, 1, 8, causal=True),
         mk("gqa2", [7, 1, 30], [7, 50, 30], 4, 2, 16, 12),
         mk("window", [9, 3], [40, 3], 2, 1, 8, causal=True, window=(5, 2))]
    if not quick:
        c += [mk("softcap-scale", [4, 11], [20, 11], 2, 2, 16, softcap=4.0, scale=0.7),
              mk("alibi", [5, 1, 3], [5, 70, 9], 4, 2, 8, causal=True, alibi_slopes=np.array([0.5, 0.2, 0.1, 0.05])),
              mk("long-prefill", [130], [130], 2, 1, 32, causal=True)]
    # sinks=: mk draws from rng, rebound to a stream of their own (the cases
    # above keep their data)
    rng = _substream(rng)
    c += [_with_sinks(mk("sinks-mqa4-causal-empty", [2, 0, 1, 4], [5, 3, 0, 4], 4, 1, 8, causal=True), rng),
          _with_sinks(mk("sinks-gqa2-window", [7, 1, 30], [7, 50, 30], 4, 2, 16, 12, window=(9, 3)), rng)]
    return c


def _shared_prefix_cases(dtype, rng, quick):
    """Requests over a shared prefix: dense and paged, causal multi-token
    steps, an empty prefix, suffixes of length 0, GQA 1/4/8, both layouts,
    sinks and softcap."""
    n = dtype.name
    c = []
    for name, (N, Hq, Hkv, Lq, P, S, D), lens, kw in (
            # name, (N, Hq, Hkv, Lq, P, S, D), suffix lengths, options
            ("gqa4-decode", (3, 8, 2, 1, 100, 30, 32), [30, 0, 7], {}),
            ("gqa4-causal-lq4", (3, 8, 2, 4, 70, 30, 16), [30, 4, 9], dict(causal=True)),
            ("mha-empty-prefix", (2, 4, 4, 1, 0, 20, 8), [20, 3], {}),
            ("gqa8-causal-sinks", (2, 16, 2, 2, 50, 12, 24), [12, 2], dict(causal=True)),
            ("blhd-softcap", (2, 4, 1, 3, 40, 10, 16), [10, 0], dict(layout="blhd", softcap=5.0))):
        q = rng.standard_normal((N, Hq, Lq, D)).astype(dtype)
        pk, pv = (rng.standard_normal((Hkv, P, D)).astype(dtype) for _ in range(2))
        k, v = (rng.standard_normal((N, Hkv, S, D)).astype(dtype) for _ in range(2))
        lens = np.array(lens, np.int64)
        for b, m in enumerate(lens):
            k[b, :, m:], v[b, :, m:] = np.nan, np.inf             # past each suffix: never read
        if kw.get("layout") == "blhd":
            q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
            pk, pv = (x.transpose(1, 0, 2) for x in (pk, pv))
        case = Case(f"{n}-shared-prefix-{name}", q, pk, pv, dict(kw, key_lens=lens),
                    fn="shared_prefix_attention", args=(k, v))
        c.append(_with_sinks(case, rng) if "sinks" in name else case)
    for name, (N, Hq, Hkv, Lq, P, D), seq, bs, kw in (
            ("paged-gqa4-decode", (3, 8, 2, 1, 50, 16), [20, 5, 0], 16, {}),
            ("paged-causal-lq2", (2, 8, 2, 2, 37, 16), [20, 2], 8, dict(causal=True)),
            ("paged-blhd-mqa", (2, 8, 1, 1, 16, 8), [9, 30], 4, dict(layout="blhd"))):
        q = rng.standard_normal((N, Hq, Lq, D)).astype(dtype)
        seq = np.array(seq, np.int64)
        L = int(max(seq.max(), P))
        k, v = (rng.standard_normal((N + 1, Hkv, L, D)).astype(dtype) for _ in range(2))
        kc, vc, table = paged_cache(k, v, bs, rng, np.concatenate([seq, [P]]))
        if kw.get("layout") == "blhd":
            q = q.transpose(0, 2, 1, 3)
        case = Case(f"{n}-shared-prefix-{name}", q, kc, vc, kw, fn="shared_prefix_paged_attention",
                    args=(table[N], P, table[:N], seq))
        c.append(case)
    return c[::2] if quick else c


# ---------------------------------------------------------------------------
# comparison

def condition_number(q, k, scale=None):
    """Bound on ``|scale * q.k|`` summed in magnitude (``scale`` defaults to
    ``1/sqrt(D)``): rounding perturbs a score by about eps times this, so
    :func:`assert_close` measures errors against it (its ``cond``).  NaN and
    inf entries count as 0."""
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    qa = np.abs(np.nan_to_num(np.asarray(q).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    ka = np.abs(np.nan_to_num(np.asarray(k).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    if qa.size == 0 or ka.size == 0:
        return 1.0
    return max(1.0, abs(scale) * qa.reshape(-1, qa.shape[-1]).sum(1).max() * ka.max())


def _num_keys(case):
    """The longest key range a row of ``case`` can see."""
    if case.fn == "paged_attention":
        return int(np.max(case.args[1], initial=0))
    if case.fn == "attention_varlen":
        return int(np.max(np.diff(case.args[1]), initial=0))
    if case.fn == "shared_prefix_attention":
        P = case.k.shape[0 if case.kwargs.get("layout") == "blhd" else 1]
        return P + int(np.max(case.kwargs["key_lens"], initial=0))
    if case.fn == "shared_prefix_paged_attention":
        return case.args[1] + int(np.max(case.args[3], initial=0))
    k = case.k
    if k.ndim == 4 and case.kwargs.get("layout", "bhld") == "blhd":
        return k.shape[1]
    if k.ndim == 3 and case.kwargs.get("layout", "bhld") == "blhd":
        return k.shape[0]
    return k.shape[-2]


def _magnitude(a):
    """Largest finite |value| of an optional array (0 for None)."""
    if a is None:
        return 0.0
    a = np.abs(np.asarray(a, dtype=np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def assert_close(actual, expected, dtype, *, cond=1.0, vmax=1.0, what="out", context=""):
    """Assert ``actual`` matches the oracle's ``expected`` within the table's
    tolerance for ``dtype``: NaN, +inf and -inf at the same places, finite
    values within ``tol * cond * vmax``."""
    tol = TOLERANCES[np.dtype(dtype).name]
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}. {context}")
    for label, fa, fe in (("NaN", np.isnan(a), np.isnan(e)),
                          ("+inf", np.isposinf(a), np.isposinf(e)),
                          ("-inf", np.isneginf(a), np.isneginf(e))):
        if not np.array_equal(fa, fe):
            bad = np.argwhere(fa != fe)[:5].tolist()
            raise AssertionError(f"{what}: {label} positions differ from the oracle at {bad}. {context}")
    fin = np.isfinite(e)
    if fin.any():
        err = np.abs(a[fin] - e[fin]).max()
        bound = tol * cond * max(vmax, 1e-300)
        if not err <= bound:
            idx = np.argwhere(fin)[np.argmax(np.abs(a[fin] - e[fin]))].tolist()
            raise AssertionError(
                f"{what}: max abs error {err:.3e} exceeds {bound:.3e} (tol {tol:g} x cond {cond:.3g} "
                f"x scale {vmax:.3g}) at {idx}: got {a[tuple(idx)]!r}, oracle {e[tuple(idx)]!r}. {context}")


@contextlib.contextmanager
def threads(n):
    """Run the block with the kernels' thread count set to ``n`` (``None``:
    leave it as it is); the previous count is restored on exit."""
    if n is None:
        yield
        return
    old = _dispatch.get_num_threads()
    _dispatch.set_num_threads(n)
    try:
        yield
    finally:
        _dispatch.set_num_threads(old)


def _out_for(case, shape, dtype):
    if case.out_strided:
        big = np.empty(shape[:-1] + (2 * shape[-1] + 1,), dtype)
        big[...] = np.nan
        return big[..., 1::2][..., : shape[-1]]
    out = np.empty(shape, dtype)
    out[...] = np.nan
    return out


def case_bounds(case):
    """``(cond, vmax)`` of :func:`assert_close` for the output of ``case``:
    the score condition (:func:`condition_number`, softcap, bias and ALiBi
    magnitudes, sums over the keys) and the largest finite ``|v|``."""
    kw = case.kwargs
    scale = kw.get("scale") or 1.0 / np.sqrt(case.q.shape[-1])
    k, v = _dequantized(case)
    if case.fn == "shared_prefix_attention":                    # the suffixes too
        k, v = (np.concatenate([x.ravel(), np.asarray(s, np.float64).ravel()])[None]
                for x, s in ((k, case.args[0]), (v, case.args[1])))
    cond = condition_number(case.q, k, scale)
    if kw.get("softcap"):
        cond = min(cond, max(1.0, 2 * kw["softcap"]))
    cond += _magnitude(kw.get("bias"))                           # bias is rounded with the score
    if kw.get("alibi_slopes") is not None:
        span = case.k.shape[-2] + case.q.shape[-2] if case.fn == "attention" else 2 * _num_keys(case)
        cond += _magnitude(kw["alibi_slopes"]) * span
    cond += np.sqrt(_num_keys(case))                             # rounding of sums over the keys
    vfin = np.abs(v[np.isfinite(v)])
    vmax = max(1.0, vfin.max()) if vfin.size else 1.0
    return cond, vmax


def check_case(case, backend="auto", num_threads=None):
    """Run ``case`` on ``backend`` and compare with the oracle (raises
    AssertionError); returns the backend's ``(out, lse)``."""
    ref_out, ref_lse = case.call(reference, return_lse=True)
    saved = {name: np.array(a, copy=True) for name, a in case.arrays().items()}
    out = _out_for(case, ref_out.shape, ref_out.dtype)
    with threads(num_threads):
        got, lse = case.call(_api, return_lse=True, out=out, backend=backend)
    ctx = f"backend={backend!r} threads={num_threads}; {case.describe()}"
    if got is not out:
        raise AssertionError(f"{case.fn} did not return the out= array. {ctx}")
    cond, vmax = case_bounds(case)
    assert_close(got, ref_out, case.q.dtype, cond=cond, vmax=vmax, what="out", context=ctx)
    assert_close(lse, ref_lse, case.q.dtype, cond=cond + _magnitude(ref_lse), what="lse", context=ctx)
    if lse.dtype != ref_lse.dtype:
        raise AssertionError(f"lse dtype {lse.dtype} != {ref_lse.dtype}. {ctx}")
    for name, after in case.arrays().items():
        if not np.array_equal(saved[name], after, equal_nan=True):
            raise AssertionError(f"input {name} was modified. {ctx}")
    return got, lse
