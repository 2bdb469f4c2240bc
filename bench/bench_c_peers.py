"""fastqkv's c backend against PyTorch SDPA and ONNX Runtime (com.microsoft
GroupQueryAttention / MultiHeadAttention), same process, same thread count.

    python bench/bench_c_peers.py [--threads 2] [--repeat 15] [--only prefill|decode]

The shapes are the ``c-peers`` selection of the package's one list
(``fastqkv._bench.cases``), timed by its one timer (contenders take turns in
blocks, ``fastqkv._bench.timing.time_interleaved``).

Decode rows (dense and paged with block size 16, float32 and bfloat16) print
the K/V bytes read per second and their share of the read bandwidth (the C
probe of `fastqkv bench` over 512 MiB on every thread), the probe taking its
turns with the decode contenders of the same shape.  The dense peers of a
decode row are torch SDPA and ORT MultiHeadAttention with each KV head's
query group folded into the query axis (their fastest form for one query
position: no K/V copy), and ORT GroupQueryAttention.

The other rows print ms (median), GFLOP/s (4 * B * Hq * visible pairs * D)
and the ratio c / peer (speed-up, > 1 means c is faster), next to this
machine's sgemm GFLOP/s (machine.sgemm_clean_env) and the per-call overhead
on a tiny problem.  Peers that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import numpy as np

import fastqkv
from fastqkv import _c
from fastqkv._bench import BenchCase, Skip, make_inputs, prepare, shape_classes
from fastqkv._bench.checks import plan
from fastqkv._bench.inputs import paged_copy
from fastqkv._bench.machine import ForeignLoad, read_probe, sgemm_clean_env, wait_quiet
from fastqkv._bench.peers import missing_module, prepare_ort, torch_sdpa, torch_tensor
from fastqkv._bench.timing import median_seconds, time_interleaved

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover
    ort = None

DECODE_BLOCK = 16
NAN = float("nan")


def _ort(inp, threads, form=None):
    """The ORT call of ``inp`` (None when ORT cannot run it or is missing)."""
    if ort is None or missing_module("ort") is not None:
        return None
    try:
        return prepare_ort(inp, threads, form)[0]
    except Skip:
        return None


def bench_case(case, threads, repeat):
    inp = make_inputs(case)
    fastqkv.set_num_threads(threads)
    fns = {"c": prepare("c", inp, threads)[0]}
    if torch is not None:
        torch.set_num_threads(threads)
        tq, tk, tv = (torch_tensor(torch, x) for x in (inp.q, inp.k, inp.v))
        kw = {}
        if case.causal and case.Lq != case.Lk:
            from torch.nn.attention.bias import causal_lower_right
            kw["attn_mask"] = causal_lower_right(case.Lq, case.Lk)
        elif case.causal:
            kw["is_causal"] = True
        if "mask" in inp.kwargs:
            kw["attn_mask"] = torch.from_numpy(inp.kwargs["mask"])
        fns["torch"] = torch_sdpa(torch, tq, tk, tv, **kw)
    o = _ort(inp, threads)
    if o is not None:
        fns["ort"] = o
    row = time_interleaved(fns, repeat)
    row["gflops"] = case.flops() / row["c"] / 1e9
    return row


def decode_contenders(case, threads):
    """{name: fn} for one decode shape: c dense and paged (block size
    DECODE_BLOCK) in float32 and bfloat16, torch SDPA in both, ORT
    GroupQueryAttention and MultiHeadAttention (query groups folded) in
    float32; and {name: K/V bytes read}."""
    rng = np.random.default_rng(0)
    fastqkv.set_num_threads(threads)
    fns, nbytes = {}, {}
    for dt_name, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        inp = make_inputs(replace(case, dtype=dtype))
        q, k, v = inp.q, inp.k, inp.v
        out = np.empty_like(q)
        kc, vc, table = paged_copy(k, v, DECODE_BLOCK, rng)
        lens = np.full(case.B, case.Lk, np.int64)
        fns[f"{dt_name}-dense"] = prepare("c", inp, threads)[0]
        fns[f"{dt_name}-paged"] = lambda q=q, kc=kc, vc=vc, t=table, n=lens, out=out: (
            fastqkv.paged_attention(q, kc, vc, t, n, out=out, backend="c"))
        nbytes[f"{dt_name}-dense"] = nbytes[f"{dt_name}-paged"] = k.nbytes + v.nbytes
        if torch is not None:
            torch.set_num_threads(threads)
            fns[f"{dt_name}-torch"] = torch_sdpa(torch, *(torch_tensor(torch, x) for x in (q, k, v)))
        if dtype == "float32":
            for key, form in ((f"{dt_name}-ort", "gqa"), (f"{dt_name}-mha", "folded")):
                o = _ort(inp, threads, form)
                if o is not None:
                    fns[key] = o
    return fns, nbytes


def decode_table(threads, repeat, only=""):
    """Decode rows: GB/s of K/V read, % of the read bandwidth, ratios vs torch
    SDPA, ORT GroupQueryAttention and ORT MultiHeadAttention with the query
    groups folded (dense peers), bf16 vs float32 and paged vs dense
    speed-ups.  Every contender of a shape, the read probe included, takes
    turns in one time_interleaved group, so every ratio of a row is measured
    under the same load."""
    read, big, _how, _ = read_probe(512 << 20, threads)
    print(f"read bandwidth (C probe, float32 sum over 512 MiB, {threads} threads) taken in turns with "
          f"the decode contenders; load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':30s} {'c ms':>8s} {'GB/s':>6s} {'%bw':>5s} {'torch ms':>9s} {'x torch':>8s} "
          f"{'ort ms':>8s} {'x ort':>6s} {'mha ms':>8s} {'x mha':>6s} {'vs f32':>7s} {'vs dense':>8s}")
    for case in shape_classes("c-peers"):
        if case.kind != "decode" or (only and only not in case.name):
            continue
        fns, nbytes = decode_contenders(case, threads)
        fns["probe"] = read
        # one timed call per turn: a shared machine's load swings within a
        # second, and a slow block of several calls could take a median
        r = time_interleaved(fns, repeat, rounds=repeat)
        bw = big.nbytes / r["probe"] / 1e9
        for dt_name in ("f32", "bf16"):
            for kind in ("dense", "paged"):
                key = f"{dt_name}-{kind}"
                tc = r[key]
                gbs = nbytes[key] / tc / 1e9
                t, o, mh = ((r.get(f"{dt_name}-{p}") if kind == "dense" else None)
                            for p in ("torch", "ort", "mha"))
                vs32 = r[f"f32-{kind}"] / tc if dt_name != "f32" else NAN
                vsd = r[f"{dt_name}-dense"] / tc if kind == "paged" else NAN
                print(f"{case.name + '-' + key:30s} {tc * 1e3:8.2f} {gbs:6.1f} {100 * gbs / bw:4.0f}% "
                      f"{t * 1e3 if t else NAN:9.2f} {t / tc if t else NAN:8.2f} "
                      f"{o * 1e3 if o else NAN:8.2f} {o / tc if o else NAN:6.2f} "
                      f"{mh * 1e3 if mh else NAN:8.2f} {mh / tc if mh else NAN:6.2f} "
                      f"{vs32:7.2f} {vsd:8.2f}", flush=True)
        print(f"{'':30s} read probe in the same turns: {bw:.1f} GB/s")


def overhead(repeat=2000):
    inp = make_inputs(BenchCase("overhead", "small", 1, 1, 1, 1, 1, 64, causal=False))
    q, k, v = inp.q, inp.k, inp.v
    out = np.empty_like(q)
    fastqkv.set_num_threads(2)
    full = median_seconds(lambda: fastqkv.attention(q, k, v, out=out, backend="c"), repeat, warmup=100)
    p = plan(inp, out=out)
    run = median_seconds(lambda: _c.run(p, 2), repeat, warmup=100)
    from fastqkv import _ckernels
    raw = median_seconds(lambda: _ckernels.attention(q, k, v, out, None, None, None, None, None, None,
                                                     0.125, 0.0, -1, -1, 2, 1, None, 0),
                         repeat, warmup=100)
    return full, run, raw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--only", default="", help="substring of the case names to run")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each case wait up to S seconds for an idle machine")
    args = ap.parse_args(argv)
    info = fastqkv.backends()["c"]
    if not info.available:
        sys.exit(f"c backend unavailable: {info.reason}")
    print(f"c backend: {info.details}; threads={args.threads}")
    print(f"peers: torch {torch.__version__ if torch else 'missing'}, "
          f"onnxruntime {ort.__version__ if ort else 'missing'}")
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    sg = sgemm_clean_env(args.threads)
    print(f"sgemm (numpy 2048^2 float32, {args.threads} threads): {sg:.1f} GFLOP/s")
    if not args.only or "decode" in args.only:
        decode_table(args.threads, args.repeat, "" if args.only in ("", "decode") else args.only)
        if args.only:
            return
    hdr = (f"{'case':24s} {'c ms':>8s} {'GFLOP/s':>8s} {'%sgemm':>7s} {'torch ms':>9s} {'x torch':>8s} "
           f"{'ort ms':>8s} {'x ort':>6s} {'foreign load':>13s}")
    print(hdr)
    for case in shape_classes("c-peers"):
        if case.kind == "decode" or (args.only and args.only not in case.name):
            continue
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        with ForeignLoad() as load:
            r = bench_case(case, args.threads, args.repeat)
        t, o = r.get("torch"), r.get("ort")
        print(f"{case.name:24s} {r['c'] * 1e3:8.2f} {r['gflops']:8.1f} {100 * r['gflops'] / sg:6.0f}% "
              f"{t * 1e3 if t else NAN:9.2f} {t / r['c'] if t else NAN:8.2f} "
              f"{o * 1e3 if o else NAN:8.2f} {o / r['c'] if o else NAN:6.2f} "
              f"{load.cores:8.2f} cores", flush=True)
    if not args.only or "overhead" in args.only:
        full, run, raw = overhead()
        print(f"tiny B1 H1 L1 D64 per call: fastqkv.attention {full * 1e6:.2f} us, "
              f"_c.run {run * 1e6:.2f} us, _ckernels.attention {raw * 1e6:.2f} us")


if __name__ == "__main__":
    main()
