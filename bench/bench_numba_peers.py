"""fastqkv's numba backend next to the C backend and PyTorch SDPA, in one run.

    python bench/bench_numba_peers.py [--threads 2] [--repeat 15] [--quick]

Prints one line per (shape, implementation): median ms, GFLOP/s
(4 * B * Hq * visible pairs * D) or, for decode, GB/s of K/V read, and the
ratio to PyTorch measured in the same run.  The machine's read bandwidth
(a Numba parallel sum over 512 MiB of float32, best of the repeats) is
measured in the same run; kernel times are medians.
Peers that are not installed (torch, the C backend) are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fastqkv


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
    """GB/s of a parallel float32 sum over 512 MiB (the decode roofline)."""
    import numba

    @numba.njit(parallel=True, cache=True, fastmath={"reassoc"})
    def psum(a):
        n = a.shape[0]
        nchunk = 256
        per = (n + nchunk - 1) // nchunk
        total = 0.0
        for c in numba.prange(nchunk):
            chunk = a[c * per:min(n, (c + 1) * per)]
            s = np.float32(0)
            for i in range(chunk.shape[0]):     # 0-based: vectorised
                s += chunk[i]
            total += s
        return total

    a = np.ones(512 * 2**20 // 4, np.float32)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    psum(a)
    times = []
    for _ in range(max(5, repeat)):
        t = time.perf_counter()
        psum(a)
        times.append(time.perf_counter() - t)
    # the best run: the bandwidth the machine can deliver (a strict roofline)
    return a.nbytes / min(times) / 1e9, a.nbytes / statistics.median(times) / 1e9


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
        ("decode Lk16384 B1", 1, 32, 8, 1, 16384, 128, False, None),
        ("float64 L512", 1, 8, 8, 512, 512, 64, True, "f64"),
    ]
    if quick:
        rows = [r for r in rows if "2048" not in r[0] and "16384" not in r[0]]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
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
    for name, B, Hq, Hkv, Lq, Lk, D, causal, extra in shapes(args.quick):
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
            gqa = Hq != Hkv
            # torch's causal is top-left aligned: equal to ours only when Lq == Lk
            tc = causal and Lq == Lk

            def run_torch():
                with torch.no_grad():
                    torch.nn.functional.scaled_dot_product_attention(
                        tq, tk, tv, attn_mask=tm, is_causal=tc, enable_gqa=gqa)
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


if __name__ == "__main__":
    main()
