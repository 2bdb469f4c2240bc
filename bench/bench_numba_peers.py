"""fastqkv's numba backend next to the C backend and PyTorch SDPA, in one run.

    python bench/bench_numba_peers.py [--threads 2] [--repeat 15] [--quick] [--decode-only]

The shapes are the ``numba-peers`` selection of the package's one list
(``fastqkv._bench.cases``), timed by its one timer.  Prints one line per
(shape, implementation): median ms, GFLOP/s (4 * B * Hq * visible pairs * D)
or, for decode, GB/s of K/V read, and the ratio to PyTorch measured in the
same run.  The machine's read bandwidth (the C probe of `fastqkv bench`, a
float32 sum over 512 MiB on every thread, best of the repeats) is measured
in the same run; kernel times are medians.
A decode table follows: dense and paged (block size 16, shuffled blocks)
KV caches in float32, bfloat16 and float16, with GB/s, % of the read
bandwidth, the ratio to PyTorch SDPA (dense, same dtype), the 16-bit vs
float32 speed-up and paged vs dense.
Peers that are not installed (torch, the C backend) are skipped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

import fastqkv
from fastqkv._bench import Skip, make_inputs, prepare, shape_classes
from fastqkv._bench.inputs import paged_copy
from fastqkv._bench.machine import read_bandwidth as _read_bandwidth
from fastqkv._bench.peers import torch_sdpa, torch_tensor
from fastqkv._bench.timing import median_seconds

CLOCK = time.perf_counter
PAGE = 16


def median_ms(fn, repeat):
    return 1e3 * median_seconds(fn, repeat, min_time=0.2, most=10 * repeat, clock=CLOCK)


def read_bandwidth(threads, repeat):
    """(best, median) GB/s of a parallel read over 512 MiB (the decode
    roofline): the probe of `fastqkv bench`."""
    best, med, _how = _read_bandwidth(512 << 20, threads, max(5, repeat))
    return best, med


def shapes(quick):
    """The prefill, encoder and decode cases of the first table."""
    cases = [c for c in shape_classes("numba-peers") if c.dtype == "float32" or c.kind != "decode"]
    return [c for c in cases if not quick or (c.Lq < 2048 and c.Lk <= 4096)]


def decode_shapes(quick):
    """(case, page size or None): each decode case in float32, bfloat16 and
    float16, dense and paged."""
    rows = []
    for case in shape_classes("numba-peers"):
        if case.kind != "decode" or (quick and case.Lk > 4096):
            continue
        for dt in ("float32", "bfloat16", "float16"):
            for bs in (None, PAGE):
                rows.append((replace(case, dtype=dt), bs))
    return rows


def _short(case, bs):
    dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[case.dtype]
    return f"decode B{case.B} Lk{case.Lk} {dt}{' paged16' if bs else ''}"


def _runnable(backend, inp, threads):
    """The prepared call of ``backend``, or None where it cannot run ``inp``."""
    try:
        return prepare(backend, inp, threads)[0]
    except Skip:
        return None


def bench_decode(args, ours, torch, bw):
    """Decode (Lq 1, GQA) dense and paged, float32 and 16-bit KV: GB/s of K/V
    read, % of the read bandwidth measured in this run, ratio to PyTorch SDPA
    (dense, same dtype), 16-bit vs float32 and paged vs dense speed."""
    print(f"\n{'decode':28s} {'impl':7s} {'ms':>9s} {'GB/s':>7s} {'% bw':>6s} {'vs torch':>8s} {'vs f32':>7s} {'vs dense':>8s}")
    rng = np.random.default_rng(1)
    base = {}
    dense = {}
    for case, bs in decode_shapes(args.quick):
        try:
            inp = make_inputs(case, seed=1)
        except Skip as exc:
            print(f"{_short(case, bs):28s} skipped: {exc}")
            continue
        key, dtn = (case.B, case.Lk), case.dtype
        q, k, v = inp.q, inp.k, inp.v
        out = np.empty_like(q)
        kv_bytes = k.nbytes + v.nbytes
        results = {}
        calls = {be: _runnable(be, inp, args.threads) for be in ours}
        if bs:
            kc, vc, bt = paged_copy(k, v, bs, rng)
            sl = np.full(case.B, case.Lk, np.int64)
            for be in ours:
                if calls[be] is not None:
                    results[be] = median_ms(lambda be=be: fastqkv.paged_attention(
                        q, kc, vc, bt, sl, out=out, backend=be), args.repeat)
        else:
            for be in ours:
                if calls[be] is not None:
                    results[be] = median_ms(calls[be], args.repeat)
            if torch is not None:
                results["torch"] = median_ms(torch_sdpa(torch, *(torch_tensor(torch, x) for x in (q, k, v))),
                                             args.repeat)
                base[(key, dtn)] = results["torch"]
        tref = base.get((key, dtn))
        for impl, ms in results.items():
            gbs = kv_bytes / ms / 1e6
            vs_torch = f"{tref / ms:7.2f}x" if tref and impl != "torch" else "      -"
            f32 = dense.get((key, "float32", impl)) if dtn != "float32" and not bs else None
            vs_f32 = f"{f32 / ms:6.2f}x" if f32 else "      -"
            d = dense.get((key, dtn, impl)) if bs else None
            vs_dense = f"{d / ms:7.2f}x" if d else "       -"
            print(f"{_short(case, bs):28s} {impl:7s} {ms:9.3f} {gbs:7.1f} {gbs / bw:6.0%} {vs_torch} {vs_f32} {vs_dense}")
            if not bs:
                dense[(key, dtn, impl)] = ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decode table")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock (with --threads 1: robust on a busy machine)")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    T = args.threads
    fastqkv.set_num_threads(T)
    try:
        import torch
        torch.set_num_threads(T)
    except ImportError:
        torch = None
    avail = {n: i.available for n, i in fastqkv.backends().items()}
    ours = [b for b in ("numba", "c") if avail.get(b)]

    bw, bw_med = read_bandwidth(T, args.repeat)
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}")
    print(f"threads={T}  read bandwidth {bw:.1f} GB/s best, {bw_med:.1f} median "
          f"(C probe of fastqkv bench, 512 MiB float32)")
    if torch is not None:
        n = 2048
        a = torch.randn(n, n)
        ms = median_ms(lambda: a @ a, 5)
        print(f"torch sgemm {n}: {2 * n**3 / ms / 1e6:.1f} GFLOP/s   torch {torch.__version__}")
    print(f"{'shape':24s} {'impl':7s} {'ms':>9s} {'GFLOP/s':>8s} {'GB/s':>7s} {'vs torch':>8s}")

    for case in ([] if args.decode_only else shapes(args.quick)):
        inp = make_inputs(case)
        kv_bytes = inp.k.nbytes + inp.v.nbytes
        results = {}
        for be in ours:
            call = _runnable(be, inp, T)
            if call is not None:
                results[be] = median_ms(call, args.repeat)
        # torch's causal is top-left aligned: equal to ours only when Lq == Lk
        if torch is not None and (not case.causal or case.Lq == case.Lk):
            tq, tk, tv = (torch_tensor(torch, x) for x in (inp.q, inp.k, inp.v))
            tm = torch.from_numpy(inp.kwargs["mask"]) if "mask" in inp.kwargs else None
            results["torch"] = median_ms(torch_sdpa(torch, tq, tk, tv, attn_mask=tm, is_causal=case.causal),
                                         args.repeat)
        ref = results.get("torch")
        for impl, ms in results.items():
            gbs = kv_bytes / ms / 1e6
            ratio = f"{ref / ms:7.2f}x" if ref else "      -"
            gb = f"{gbs:7.1f}" if case.Lq == 1 else "      -"
            print(f"{case.name:24s} {impl:7s} {ms:9.3f} {case.flops() / ms / 1e6:8.1f} {gb} {ratio}")
        if case.Lq == 1:
            for impl in ours:
                if impl in results:
                    print(f"{'':24s} {impl:7s} decode at {kv_bytes / results[impl] / 1e6 / bw:5.0%} of read bandwidth")
    bench_decode(args, ours, torch, bw)
    bw2, bw2_med = read_bandwidth(T, args.repeat)
    print(f"read bandwidth again after the runs: {bw2:.1f} GB/s best, {bw2_med:.1f} median")


if __name__ == "__main__":
    main()
