"""fastqkv's numba backend next to the C backend and PyTorch SDPA, in one run.

    python bench/bench_numba_peers.py [--threads 2] [--repeat 15] [--quick] [--decode-only]

Prints one line per (shape, implementation): median ms, GFLOP/s
(4 * B * Hq * visible pairs * D) or, for decode, GB/s of K/V read, and the
ratio to PyTorch measured in the same run.  The machine's read bandwidth
(a Numba parallel sum over 512 MiB of float32, best of the repeats) is
measured in the same run; kernel times are medians.
A decode table follows: dense and paged (block size 16, shuffled blocks)
KV caches in float32, bfloat16 and float16, with GB/s, % of the read
bandwidth, the ratio to PyTorch SDPA (dense, same dtype), the 16-bit vs
float32 speed-up and paged vs dense.
Peers that are not installed (torch, the C backend) are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fastqkv
from fastqkv._bench import torch_sdpa


CLOCK = time.perf_counter


def median_ms(fn, repeat, min_time=0.2):
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
        if len(times) >= 10 * repeat:
            break
    return 1e3 * statistics.median(times)


def read_bandwidth(threads, repeat):
    """(best, median) GB/s of a parallel read over 512 MiB (the decode
    roofline): the probe of `fastqkv bench`."""
    from fastqkv._bench import _bandwidth

    best, med, _how = _bandwidth(512 << 20, threads, max(5, repeat))
    return best, med


def visible_pairs(Lq, Lk, causal, key_lens=None, B=1):
    """Visible (i, j) pairs per (batch, head), summed over the batch."""
    total = 0
    for b in range(B):
        lk = Lk if key_lens is None else int(key_lens[b])
        if causal:
            i = np.arange(Lq) + (lk - Lq)
            total += int(np.clip(i + 1, 0, lk).sum())
        else:
            total += Lq * lk
    return total


def shapes(quick):
    rows = [
        # name, B, Hq, Hkv, Lq, Lk, D, causal, extra
        ("prefill-gqa L1024", 1, 32, 8, 1024, 1024, 128, True, None),
        ("prefill-gqa L2048", 1, 32, 8, 2048, 2048, 128, True, None),
        ("prefill-mha L1024", 1, 16, 16, 1024, 1024, 128, True, None),
        ("encoder L128", 8, 12, 12, 128, 128, 64, False, None),
        ("encoder L512 pad", 8, 12, 12, 512, 512, 64, False, "pad"),
        ("decode Lk4096", 8, 32, 8, 1, 4096, 128, False, None),
        ("decode Lk32768 B1", 1, 32, 8, 1, 32768, 128, False, None),
        ("float64 L512", 1, 8, 8, 512, 512, 64, True, "f64"),
    ]
    if quick:
        rows = [r for r in rows if "2048" not in r[0] and "32768" not in r[0]]
    return rows


def decode_shapes(quick):
    """(name, B, Hq, Hkv, Lk, D, dtype name, page size or None)."""
    rows = []
    for B, Lk in ((8, 4096), (1, 32768)):
        if quick and Lk > 4096:
            continue
        for dt in ("float32", "bfloat16", "float16"):
            for bs in (None, 16):
                short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dt]
                name = f"decode B{B} Lk{Lk} {short}{' paged16' if bs else ''}"
                rows.append((name, B, 32, 8, Lk, 128, dt, bs))
    return rows


def _paged(rng, k, v, bs):
    """A shuffled paged cache (num_blocks, bs, Hkv, D) holding dense k/v, and its block table."""
    B, Hkv, Lk, D = k.shape
    nb = Lk // bs
    perm = rng.permutation(B * nb)
    kc = np.empty((B * nb, bs, Hkv, D), k.dtype)
    vc = np.empty((B * nb, bs, Hkv, v.shape[3]), v.dtype)
    kc[perm] = k.transpose(0, 2, 1, 3).reshape(B * nb, bs, Hkv, D)
    vc[perm] = v.transpose(0, 2, 1, 3).reshape(B * nb, bs, Hkv, v.shape[3])
    return kc, vc, perm.reshape(B, nb).astype(np.int64)


def _mod_supports(backend, q, k, v):
    """Whether ``backend`` takes this dtype (the C backend may refuse 16-bit)."""
    from fastqkv import _dispatch, _problem
    mod = _dispatch._modules.get(backend)
    return mod is not None and mod.supports(_problem.plan_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1])) is None


def bench_decode(args, ours, torch, bw):
    """Decode (Lq 1, GQA) dense and paged, float32 and 16-bit KV: GB/s of K/V
    read, % of the read bandwidth measured in this run, ratio to PyTorch SDPA
    (dense, same dtype), 16-bit vs float32 and paged vs dense speed."""
    from fastqkv import _validate
    print(f"\n{'decode':28s} {'impl':7s} {'ms':>9s} {'GB/s':>7s} {'% bw':>6s} {'vs torch':>8s} {'vs f32':>7s} {'vs dense':>8s}")
    rng = np.random.default_rng(1)
    base = {}
    dense = {}
    for name, B, Hq, Hkv, Lk, D, dtn, bs in decode_shapes(args.quick):
        dt = _validate.BFLOAT16 if dtn == "bfloat16" else np.dtype(dtn)
        if dt is None:
            continue
        key = (B, Lk)
        q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32).astype(dt)
        k = rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32).astype(dt)
        v = rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32).astype(dt)
        out = np.empty((B, Hq, 1, D), dt)
        kv_bytes = k.nbytes + v.nbytes
        results = {}
        be_ok = [be for be in ours if _mod_supports(be, q, k, v)]
        if bs:
            kc, vc, bt = _paged(rng, k, v, bs)
            sl = np.full(B, Lk, np.int64)
            del k, v
            for be in be_ok:
                results[be] = median_ms(lambda be=be: fastqkv.paged_attention(
                    q, kc, vc, bt, sl, out=out, backend=be), args.repeat)
        else:
            for be in be_ok:
                results[be] = median_ms(lambda be=be: fastqkv.attention(q, k, v, out=out, backend=be),
                                        args.repeat)
            if torch is not None:
                def tt(x):
                    if dtn == "bfloat16":
                        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
                    return torch.from_numpy(x)
                tq, tk, tv = tt(q), tt(k), tt(v)

                results["torch"] = median_ms(torch_sdpa(torch, tq, tk, tv), args.repeat)
                base[(key, dtn)] = results["torch"]
        tref = base.get((key, dtn))
        for impl, ms in results.items():
            gbs = kv_bytes / ms / 1e6
            vs_torch = f"{tref / ms:7.2f}x" if tref and impl != "torch" else "      -"
            f32 = dense.get((key, "float32", impl)) if dtn != "float32" and not bs else None
            vs_f32 = f"{f32 / ms:6.2f}x" if f32 else "      -"
            d = dense.get((key, dtn, impl)) if bs else None
            vs_dense = f"{d / ms:7.2f}x" if d else "       -"
            print(f"{name:28s} {impl:7s} {ms:9.3f} {gbs:7.1f} {gbs / bw:6.0%} {vs_torch} {vs_f32} {vs_dense}")
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
          f"(numba parallel sum, 512 MiB float32)")
    if torch is not None:
        n = 2048
        a = torch.randn(n, n)
        ms = median_ms(lambda: a @ a, 5)
        print(f"torch sgemm {n}: {2 * n**3 / ms / 1e6:.1f} GFLOP/s   torch {torch.__version__}")
    print(f"{'shape':22s} {'impl':7s} {'ms':>9s} {'GFLOP/s':>8s} {'GB/s':>7s} {'vs torch':>8s}")

    rng = np.random.default_rng(0)
    for name, B, Hq, Hkv, Lq, Lk, D, causal, extra in ([] if args.decode_only else shapes(args.quick)):
        dt = np.float64 if extra == "f64" else np.float32
        q = rng.standard_normal((B, Hq, Lq, D)).astype(dt)
        k = rng.standard_normal((B, Hkv, Lk, D)).astype(dt)
        v = rng.standard_normal((B, Hkv, Lk, D)).astype(dt)
        kw = {"causal": causal}
        key_lens = None
        tmask = None
        if extra == "pad":
            key_lens = rng.integers(Lk // 2, Lk + 1, B)
            mask = np.arange(Lk)[None, :] < key_lens[:, None]
            kw["mask"] = mask[:, None, None, :]
            tmask = kw["mask"]
        pairs = visible_pairs(Lq, Lk, causal, key_lens, B if key_lens is not None else 1)
        flops = 4.0 * Hq * pairs * D * (1 if key_lens is not None else B)
        kv_bytes = (k.nbytes + v.nbytes)
        out = np.empty((B, Hq, Lq, D), dt)
        results = {}
        for be in ours:
            results[be] = median_ms(lambda be=be: fastqkv.attention(q, k, v, out=out, backend=be, **kw),
                                    args.repeat)
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            tm = None if tmask is None else torch.from_numpy(tmask)
            # torch's causal is top-left aligned: equal to ours only when Lq == Lk
            tc = causal and Lq == Lk

            run_torch = torch_sdpa(torch, tq, tk, tv, attn_mask=tm, is_causal=tc)
            if not causal or tc:
                results["torch"] = median_ms(run_torch, args.repeat)
        ref = results.get("torch")
        for impl, ms in results.items():
            gbs = kv_bytes / ms / 1e6
            ratio = f"{ref / ms:7.2f}x" if ref else "      -"
            gb = f"{gbs:7.1f}" if Lq == 1 else "      -"
            print(f"{name:22s} {impl:7s} {ms:9.3f} {flops / ms / 1e6:8.1f} {gb} {ratio}")
        if Lq == 1:
            for impl in ours:
                if impl in results:
                    print(f"{'':22s} {impl:7s} decode at {kv_bytes / results[impl] / 1e6 / bw:5.0%} of read bandwidth")
    bench_decode(args, ours, torch, bw)
    bw2, bw2_med = read_bandwidth(T, args.repeat)
    print(f"read bandwidth again after the runs: {bw2:.1f} GB/s best, {bw2_med:.1f} median")


if __name__ == "__main__":
    main()
