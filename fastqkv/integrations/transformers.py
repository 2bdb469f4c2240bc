"""fastqkv as an attention implementation of Hugging Face transformers.

    import fastqkv.integrations.transformers as fq_hf
    fq_hf.register()                      # -> "fastqkv"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastqkv")

:func:`register` puts two functions under one name: :func:`mask_interface`
in transformers' ``AttentionMaskInterface`` and :func:`attention_forward` in
its ``AttentionInterface``.  The mask function is called once per forward
and mask type; instead of a dense ``(B, 1, Lq, Lk)`` mask it returns a
:class:`KernelMask`: the mask's structure as kernel options (causal, a
sliding window as ``window=``, the valid cache length as ``key_lens``, right
padding of a bidirectional model as ``key_lens``, other padding as a
``(B, 1, 1, Lk)`` key mask read in place), found by evaluating the model's
mask function and checked equal to what the kernel will apply; a pattern
that is none of these travels as a boolean mask read in place.  The
attention function reads query, keys and values (and the cache tensors) in
place through their strides, GQA without ``repeat_kv``, with ``scaling``,
``softcap`` and the sinks ``s_aux``, and writes the ``(B, Lq, Hq, Dv)``
result transformers expects.

torch and transformers are imported with this module (``pip install
fastqkv[hf]``); ``import fastqkv`` does not import it.  Tensors must be on
the CPU, in float32, float64, float16 or bfloat16 (through ml_dtypes).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                        causal_mask_function, prepare_padding_mask, sdpa_mask)

from .. import _api, _validate

__all__ = ["register", "attention_forward", "mask_interface", "KernelMask", "NAME"]

NAME = "fastqkv"


def register(name: str = NAME) -> str:
    """Register the attention and mask functions as ``name`` in transformers
    (idempotent); returns ``name`` for ``attn_implementation=``."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)
    return name


# ---------------------------------------------------------------------------
# tensors

def _numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """A NumPy view of CPU tensor ``t`` (same memory, same strides);
    bfloat16 through ml_dtypes."""
    if t.device.type != "cpu":
        raise ValueError(f"fastqkv runs on the CPU: {name} is on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        bf16 = _validate.bfloat16()
        if bf16 is None:
            raise TypeError(f"{name} is bfloat16, which needs ml_dtypes (pip install ml_dtypes)")
        return t.view(torch.int16).numpy().view(bf16)
    return t.numpy()


# ---------------------------------------------------------------------------
# masks

class KernelMask:
    """What a transformers mask means to the kernel, for keys ``[0, kv_length)``:
    ``window`` ``(left, right)`` (``(-1, 0)`` is causal, None is none),
    ``key_lens`` ``(B,)`` int64 or None, ``mask`` a boolean array
    broadcastable to ``(B, Hq, Lq, Lk)`` or None.  The alignment of causal
    and window rows is bottom-right against ``key_lens`` (or ``kv_length``)."""

    __slots__ = ("kv_length", "window", "key_lens", "mask", "_keep")

    # a finished mask: transformers passes a mask whose ``ndim`` is not 2
    # (not a padding mask) on to the mask function, which returns it as is
    # (generate() builds the masks of a static cache before each step)
    ndim = 4

    def __init__(self, kv_length, window=None, key_lens=None, mask=None, keep=None):
        self.kv_length = kv_length
        self.window = window
        self.key_lens = key_lens
        self.mask = mask
        self._keep = keep          # the tensor ``mask`` views

    def __repr__(self):
        return (f"KernelMask(kv_length={self.kv_length}, window={self.window}, "
                f"key_lens={None if self.key_lens is None else self.key_lens.tolist()}, "
                f"mask={None if self.mask is None else self.mask.shape})")


def _kernel_rule(q_length, kv_length, n, left, right):
    """The keys the kernel shows query row i, as a ``(Lq, Lk)`` bool tensor:
    ``j < n`` and ``i' - left <= j <= i' + right`` (-1: unbounded), with
    ``i' = i + n - Lq``."""
    i = torch.arange(q_length)[:, None] + (n - q_length)
    j = torch.arange(kv_length)[None, :]
    vis = j < n
    if left >= 0:
        vis = vis & (j >= i - left)
    if right >= 0:
        vis = vis & (j <= i + right)
    return vis


def _band(pattern):
    """``(n, left, right)`` if the ``(B, 1, Lq, Lk)`` boolean ``pattern`` is
    the same for every batch row and equals :func:`_kernel_rule` for them,
    else None."""
    p = pattern[:, 0]
    if not bool((p == p[:1]).all()):
        return None
    p = p[0]
    q_length, kv_length = p.shape
    cnt = p.sum(1)
    if q_length == 0 or kv_length == 0 or not bool((cnt > 0).all()):
        return None
    lo = p.to(torch.int8).argmax(1)
    hi = kv_length - 1 - p.flip(1).to(torch.int8).argmax(1)
    n = int(hi[-1]) + 1
    a = n - q_length
    right = -1 if bool((hi == n - 1).all()) else int(hi[0]) - a
    left = -1 if bool((lo == 0).all()) else q_length - 1 + a - int(lo[-1])
    if right < -1 or left < -1:
        return None
    if not torch.equal(p, _kernel_rule(q_length, kv_length, n, left, right)):
        return None
    return n, left, right


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask=None, use_vmap: bool = False,
                   device="cpu", **kwargs) -> KernelMask:
    """transformers' mask function for fastqkv (the ``AttentionMaskInterface``
    signature): the mask of ``mask_function`` and the 2-D padding mask
    ``attention_mask`` as a :class:`KernelMask` (a KernelMask already made
    for this step, passed as ``attention_mask``, is returned as is)."""
    if isinstance(attention_mask, KernelMask):
        return attention_mask
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    n = q_offset - kv_offset + q_length              # keys up to the last query's position
    band = None
    if mask_function is causal_mask_function and 0 < n <= kv_length:
        band = (n, -1, 0)
    elif mask_function is bidirectional_mask_function:
        band = (kv_length, -1, -1)
    else:
        pattern = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                            q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                            attention_mask=None, allow_is_causal_skip=False,
                            allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
        band = _band(pattern)
    pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if pad is not None:
        pad = pad[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if band is None:                                 # no structure: the mask itself, in place
        full = pattern if pad is None else pattern & pad[:, None, None, :]
        return KernelMask(kv_length, mask=_numpy(full, "attention_mask"), keep=full)
    n, left, right = band
    window = None if (left, right) == (-1, -1) else (left, right)
    key_lens = None if n == kv_length else np.full(batch_size, n, np.int64)
    if pad is None or bool(pad[:, :n].all()):
        return KernelMask(kv_length, window, key_lens)
    if window is None:                               # bidirectional: right padding is a length
        lens = pad[:, :n].sum(1)
        if bool((pad[:, :n].cumsum(1) == torch.arange(1, n + 1).clamp(max=lens[:, None])).all()):
            return KernelMask(kv_length, None, lens.numpy().astype(np.int64))
    if key_lens is None:
        key_lens = np.full(batch_size, n, np.int64)
    keys = pad.contiguous()
    return KernelMask(kv_length, window, key_lens, _numpy(keys, "attention_mask")[:, None, None, :],
                      keep=keys)


# ---------------------------------------------------------------------------
# attention

def attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, softcap: Optional[float] = None,
                      s_aux: Optional[torch.Tensor] = None,
                      position_bias: Optional[torch.Tensor] = None,
                      **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention function for fastqkv (the ``AttentionInterface``
    signature): ``query (B, Hq, Lq, D)``, ``key``/``value (B, Hkv, Lk, D)``,
    ``attention_mask`` a :class:`KernelMask`, a 4-D tensor (boolean: True
    attends; float: added to the scores) or None (causal as ``is_causal``
    or ``module.is_causal`` says).  Returns ``(out (B, Lq, Hq, Dv), None)``."""
    if dropout and getattr(module, "training", False):
        raise ValueError("fastqkv does not implement attention dropout: train with "
                         "attn_implementation='sdpa' or 'eager', or call model.eval()")
    if kwargs.get("output_attentions"):
        raise ValueError("fastqkv does not return attention weights: use "
                         "attn_implementation='eager' to output attentions")
    Lk = key.shape[2]
    opts = {}
    m = attention_mask
    if isinstance(m, KernelMask):
        if m.kv_length > Lk:
            raise ValueError(f"the attention mask covers {m.kv_length} keys but the cache holds {Lk}")
        key, value = key[:, :, :m.kv_length], value[:, :, :m.kv_length]
        opts.update(window=m.window, key_lens=m.key_lens, mask=m.mask)
    elif m is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        opts["causal"] = bool(causal)
    elif isinstance(m, torch.Tensor) and m.dim() == 4:
        m = m[..., :Lk]
        if m.dtype == torch.bool:
            opts["mask"] = _numpy(m, "attention_mask")
        else:
            opts["bias"] = _numpy(m, "attention_mask")
    else:
        raise TypeError(f"fastqkv cannot use an attention mask of type {type(m).__name__}; "
                        "register() its mask function too (fastqkv.integrations.transformers.register)")
    if position_bias is not None:
        if "bias" in opts:
            opts["bias"] = opts["bias"] + _numpy(position_bias, "position_bias")
        else:
            opts["bias"] = _numpy(position_bias, "position_bias")
    if s_aux is not None:
        acc = np.float64 if query.dtype == torch.float64 else np.float32
        opts["sinks"] = s_aux.detach().to(torch.float64).numpy().astype(acc)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    B, Hq, Lq, _ = query.shape
    out = torch.empty((B, Lq, Hq, value.shape[3]), dtype=query.dtype)
    _api.attention(_numpy(query, "query"), _numpy(key, "key"), _numpy(value, "value"),
                   scale=scaling, softcap=softcap or None,
                   out=_numpy(out, "out").transpose(0, 2, 1, 3), **opts)
    return out, None
