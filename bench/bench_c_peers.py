"""fastqkv's c backend against PyTorch SDPA and ONNX Runtime (com.microsoft
GroupQueryAttention / MultiHeadAttention), same process, same thread count.

    python bench/bench_c_peers.py [--threads 2] [--repeat 15] [--only prefill|decode]

Decode rows (dense and paged with block size 16, float32 and bfloat16) print
the K/V bytes read per second and their share of the read bandwidth (the C
probe of `fastqkv bench`: a float32 sum over 512 MiB on every thread), the
probe taking its turns with the decode contenders of the same shape.  The
dense peers of a decode row are torch SDPA and ORT MultiHeadAttention with
each KV head's query group folded into the query axis (their fastest form for
one query position: no K/V copy), and ORT GroupQueryAttention.

Contenders run in alternating blocks separated by a short sleep (see
time_interleaved).  Prints ms (median), GFLOP/s (4 * B * Hq * visible pairs * D) and the ratio
c / peer (speed-up, > 1 means c is faster), next to this machine's sgemm
GFLOP/s (numpy 2048^2 float32 matmul, measured in a subprocess with
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset) and the per-call overhead on a
tiny problem.  Peers that are not installed are skipped.  ONNX models are
encoded directly as protobuf bytes, so the `onnx` package is not needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import fastqkv
from fastqkv import _c, _problem
from fastqkv._bench import onnx_model, torch_sdpa

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover
    ort = None


def timeit(fn, repeat, warmup=2, min_time=0.0):
    for _ in range(warmup):
        fn()
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cpu_ticks():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class ForeignLoad:
    """CPU cores used by other processes while the block ran (this machine
    may be shared: a benchmark is only meaningful when this is near 0)."""

    def __enter__(self):
        self.t0, self.c0, self.s0 = time.perf_counter(), time.process_time(), _cpu_ticks()
        return self

    def __exit__(self, *exc):
        s1 = _cpu_ticks()
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.c0
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        if self.s0 is None or s1 is None or wall <= 0:
            self.cores = float("nan")
        else:
            self.cores = max(0.0, ((s1[0] - self.s0[0]) / hz - own) / wall)
        return False


def wait_quiet(max_seconds, idle_share=0.8, window=1.0):
    """Wait (at most max_seconds) until the machine was idle for at least
    `idle_share` of its CPU time over `window` seconds; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_seconds:
        a = _cpu_ticks()
        time.sleep(window)
        b = _cpu_ticks()
        if a is None or b is None:
            break
        busy, total = b[0] - a[0], b[1] - a[1]
        if total and 1 - busy / total >= idle_share:
            break
    return time.perf_counter() - t0


def time_interleaved(fns, repeat, warmup=2, rounds=3, gap=0.3):
    """Median seconds of each function.  The contenders take turns in blocks
    (`rounds` rotations) so that other load on the machine hits all of them
    alike; each block starts after a `gap` of sleep and one untimed call, so
    the spinning worker threads of the previous contender (OpenMP, ONNX
    Runtime's pool, OpenBLAS) have gone to sleep and do not steal a core from
    the next one, while calls inside a block find their own threads warm."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_block = max(1, -(-repeat // rounds))
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(gap)
            fn()
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def sgemm_gflops(threads):
    code = ("import numpy as np, time, statistics\n"
            "a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)\n"
            "b = a.copy(); a @ b\n"
            "ts = []\n"
            "for _ in range(15):\n"
            "    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
            "print(2 * 2048 ** 3 / statistics.median(ts) / 1e9)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


# ---------------------------------------------------------------------------
# one-node com.microsoft ONNX models (encoded by fastqkv._bench.onnx_model)

F32, I32 = "float32", "int32"


def ort_session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_gqa(B, Hq, Hkv, Lq, Lk, D, threads):
    """com.microsoft.GroupQueryAttention (always causal, bottom-right); the
    first Lk - Lq keys are the past KV cache."""
    past = Lk - Lq
    rng = np.random.default_rng(0)
    feeds = {
        "q": rng.standard_normal((B, Lq, Hq * D)).astype(np.float32),
        "k": rng.standard_normal((B, Lq, Hkv * D)).astype(np.float32),
        "v": rng.standard_normal((B, Lq, Hkv * D)).astype(np.float32),
        "pk": rng.standard_normal((B, Hkv, past, D)).astype(np.float32),
        "pv": rng.standard_normal((B, Hkv, past, D)).astype(np.float32),
        "seqlens_k": np.full((B,), Lk - 1, np.int32),
        "total": np.array([Lk], np.int32),
    }
    inputs = [("q", F32, (B, Lq, Hq * D)), ("k", F32, (B, Lq, Hkv * D)), ("v", F32, (B, Lq, Hkv * D)),
              ("pk", F32, (B, Hkv, past, D)), ("pv", F32, (B, Hkv, past, D)),
              ("seqlens_k", I32, (B,)), ("total", I32, (1,))]
    outputs = [("o", F32, (B, Lq, Hq * D)), ("pko", F32, (B, Hkv, Lk, D)), ("pvo", F32, (B, Hkv, Lk, D))]
    model = onnx_model("GroupQueryAttention", inputs, outputs,
                       {"num_heads": Hq, "kv_num_heads": Hkv, "scale": float(1 / np.sqrt(D))})
    sess = ort_session(model, threads)
    return lambda: sess.run(["o"], feeds)


def ort_mha_decode(B, Hq, Hkv, Lk, D, threads):
    """com.microsoft.MultiHeadAttention for one query position of GQA: each
    KV head's Hq/Hkv query heads as its query rows (q (B, Hq/Hkv, Hkv*D)),
    K/V read in place as (B, Hkv, Lk, D).  ORT 1.32, B8 Hq32 Hkv8 Lk4096 D128,
    2 threads: 31 ms, against 106 ms for GroupQueryAttention, which copies
    the past K/V into its present outputs on every call."""
    G = Hq // Hkv
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((B, G, Hkv * D)).astype(np.float32),
             "k": rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32),
             "v": rng.standard_normal((B, Hkv, Lk, D)).astype(np.float32)}
    inputs = [("q", F32, (B, G, Hkv * D)), ("k", F32, (B, Hkv, Lk, D)), ("v", F32, (B, Hkv, Lk, D))]
    model = onnx_model("MultiHeadAttention", inputs, [("o", F32, (B, G, Hkv * D))],
                       {"num_heads": Hkv, "scale": float(1 / np.sqrt(D))})
    sess = ort_session(model, threads)
    return lambda: sess.run(["o"], feeds)


def ort_mha(B, H, L, D, threads, key_padding):
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, L, H * D)).astype(np.float32) for n in "qkv"}
    inputs = [("q", F32, (B, L, H * D)), ("k", F32, (B, L, H * D)), ("v", F32, (B, L, H * D))]
    if key_padding:
        lens = np.array([L - (b * L) // (2 * B) for b in range(B)], np.int32)
        feeds["kpm"] = (np.arange(L)[None, :] < lens[:, None]).astype(np.int32)
        inputs += [("", F32, ()), ("kpm", I32, (B, L))]
    model = onnx_model("MultiHeadAttention", inputs, [("o", F32, (B, L, H * D))],
                       {"num_heads": H, "scale": float(1 / np.sqrt(D))})
    sess = ort_session(model, threads)
    return lambda: sess.run(["o"], feeds)


# ---------------------------------------------------------------------------

def visible_pairs(Lq, Lk, causal, key_lens=None, B=1):
    tot = 0
    for b in range(B):
        lk = Lk if key_lens is None else int(key_lens[b])
        if causal:
            i = np.arange(Lq) + (lk - Lq)
            tot += int(np.clip(i + 1, 0, lk).sum())
        else:
            tot += Lq * lk
    return tot


def bench_case(name, B, Hq, Hkv, Lq, Lk, D, *, causal, dtype=np.float32, key_padding=False,
               threads=2, repeat=15, peers=("torch", "ort")):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    mask = key_lens = None
    if key_padding:
        key_lens = np.array([Lk - (b * Lk) // (2 * B) for b in range(B)], np.int64)
        mask = (np.arange(Lk)[None, :] < key_lens[:, None])[:, None, None, :]
    flops = 4.0 * Hq * D * visible_pairs(Lq, Lk, causal, key_lens, B)
    out = np.empty((B, Hq, Lq, D), dtype)
    fastqkv.set_num_threads(threads)
    fns = {"c": lambda: fastqkv.attention(q, k, v, causal=causal, mask=mask, out=out, backend="c")}
    if torch is not None and "torch" in peers:
        torch.set_num_threads(threads)
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        kw = {}
        if causal and Lq != Lk:
            from torch.nn.attention.bias import causal_lower_right
            kw["attn_mask"] = causal_lower_right(Lq, Lk)
        elif causal:
            kw["is_causal"] = True
        if key_padding:
            kw["attn_mask"] = torch.from_numpy(mask)
        fns["torch"] = torch_sdpa(torch, tq, tk, tv, **kw)
    if ort is not None and "ort" in peers and dtype == np.float32:
        if causal:
            fns["ort"] = ort_gqa(B, Hq, Hkv, Lq, Lk, D, threads)
        else:
            fns["ort"] = ort_mha(B, Hq, Lq, D, threads, key_padding)
    row = {"case": name}
    row.update(time_interleaved(fns, repeat))
    t_c = row["c"]
    row["gflops"] = flops / t_c / 1e9
    return row


CASES = {
    "prefill-mha-1k": dict(B=1, Hq=32, Hkv=32, Lq=1024, Lk=1024, D=128, causal=True),
    "prefill-gqa-1k": dict(B=1, Hq=32, Hkv=8, Lq=1024, Lk=1024, D=128, causal=True),
    "prefill-gqa-2k": dict(B=1, Hq=32, Hkv=8, Lq=2048, Lk=2048, D=128, causal=True),
    "chunked-prefill": dict(B=1, Hq=32, Hkv=8, Lq=128, Lk=4096, D=128, causal=True),
    "encoder-128": dict(B=8, Hq=12, Hkv=12, Lq=128, Lk=128, D=64, causal=False),
    "encoder-512-pad": dict(B=8, Hq=12, Hkv=12, Lq=512, Lk=512, D=64, causal=False, key_padding=True),
    "float64-prefill-512": dict(B=1, Hq=8, Hkv=8, Lq=512, Lk=512, D=64, causal=True, dtype=np.float64,
                                peers=("torch",)),
}


# ---------------------------------------------------------------------------
# decode: one query position per sequence against a long KV cache

DECODE_CASES = {
    "decode-B8-4k": dict(B=8, Hq=32, Hkv=8, Lk=4096, D=128),
    "decode-B1-32k": dict(B=1, Hq=32, Hkv=8, Lk=32768, D=128),
}
DECODE_BLOCK = 16


def _paged_copy(k, v, bs, rng):
    """(num_blocks, bs, Hkv, D) caches holding k/v in shuffled blocks, and the table."""
    B, Hkv, Lk, D = k.shape
    nb = Lk // bs
    perm = rng.permutation(B * nb)
    kc = np.empty((B * nb, bs, Hkv, D), k.dtype)
    vc = np.empty_like(kc)
    kc[perm] = k.reshape(B, Hkv, nb, bs, D).transpose(0, 2, 3, 1, 4).reshape(B * nb, bs, Hkv, D)
    vc[perm] = v.reshape(B, Hkv, nb, bs, D).transpose(0, 2, 3, 1, 4).reshape(B * nb, bs, Hkv, D)
    return kc, vc, perm.reshape(B, nb).astype(np.int64)


def decode_contenders(B, Hq, Hkv, Lk, D, *, dtypes, threads):
    """{name: fn} for one decode shape: c dense and paged (block size
    DECODE_BLOCK) in every dtype, torch SDPA in every dtype, ORT
    GroupQueryAttention in float32; and {name: K/V bytes read}."""
    rng = np.random.default_rng(0)
    fastqkv.set_num_threads(threads)
    fns, nbytes = {}, {}
    for dt_name, dtype in dtypes:
        q = rng.standard_normal((B, Hq, 1, D)).astype(dtype)
        k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
        v = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
        out = np.empty_like(q)
        kc, vc, table = _paged_copy(k, v, DECODE_BLOCK, rng)
        lens = np.full(B, Lk, np.int64)
        fns[f"{dt_name}-dense"] = lambda q=q, k=k, v=v, out=out: fastqkv.attention(
            q, k, v, out=out, backend="c")
        fns[f"{dt_name}-paged"] = lambda q=q, kc=kc, vc=vc, t=table, n=lens, out=out: (
            fastqkv.paged_attention(q, kc, vc, t, n, out=out, backend="c"))
        nbytes[f"{dt_name}-dense"] = nbytes[f"{dt_name}-paged"] = k.nbytes + v.nbytes
        if torch is not None:
            torch.set_num_threads(threads)
            if dtype == np.float32:
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            else:   # bfloat16: same bits in a torch.bfloat16 tensor
                tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (q, k, v))
            fns[f"{dt_name}-torch"] = torch_sdpa(torch, tq, tk, tv)
        if ort is not None and dtype == np.float32:
            fns[f"{dt_name}-ort"] = ort_gqa(B, Hq, Hkv, 1, Lk, D, threads)
            fns[f"{dt_name}-mha"] = ort_mha_decode(B, Hq, Hkv, Lk, D, threads)
    return fns, nbytes


def decode_table(threads, repeat, only=""):
    """Decode rows: GB/s of K/V read, % of the read bandwidth, ratios vs torch
    SDPA (query groups folded, see fastqkv._bench.torch_sdpa), ORT
    GroupQueryAttention and ORT MultiHeadAttention with the query groups
    folded (ort_mha_decode) (dense peers), bf16 vs float32 and paged vs dense
    speed-ups.  Every contender of a shape, the read probe included,
    takes turns in one time_interleaved group, so every ratio of a row is
    measured under the same load."""
    import ml_dtypes
    from fastqkv import _ckernels

    dtypes = (("f32", np.dtype(np.float32)), ("bf16", np.dtype(ml_dtypes.bfloat16)))
    big = np.ones(512 << 18, np.float32)
    print(f"read bandwidth (C probe, float32 sum over 512 MiB, {threads} threads) taken in turns with "
          f"the decode contenders; load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':30s} {'c ms':>8s} {'GB/s':>6s} {'%bw':>5s} {'torch ms':>9s} {'x torch':>8s} "
          f"{'ort ms':>8s} {'x ort':>6s} {'mha ms':>8s} {'x mha':>6s} {'vs f32':>7s} {'vs dense':>8s}")
    nan = float("nan")
    for name, kw in DECODE_CASES.items():
        if only and only not in name:
            continue
        fns, nbytes = decode_contenders(dtypes=dtypes, threads=threads, **kw)
        fns["probe"] = lambda: _ckernels.read_sum(big, threads)
        # one timed call per turn: this machine's load swings within a
        # second, and a slow block of several calls could take a median
        r = time_interleaved(fns, repeat, rounds=repeat)
        bw = big.nbytes / r["probe"] / 1e9
        for dt_name, _ in dtypes:
            for kind in ("dense", "paged"):
                key = f"{dt_name}-{kind}"
                tc = r[key]
                gbs = nbytes[key] / tc / 1e9
                t = r.get(f"{dt_name}-torch") if kind == "dense" else None
                o = r.get(f"{dt_name}-ort") if kind == "dense" else None
                mh = r.get(f"{dt_name}-mha") if kind == "dense" else None
                vs32 = r[f"f32-{kind}"] / tc if dt_name != "f32" else nan
                vsd = r[f"{dt_name}-dense"] / tc if kind == "paged" else nan
                print(f"{name + '-' + key:30s} {tc * 1e3:8.2f} {gbs:6.1f} {100 * gbs / bw:4.0f}% "
                      f"{t * 1e3 if t else nan:9.2f} {t / tc if t else nan:8.2f} "
                      f"{o * 1e3 if o else nan:8.2f} {o / tc if o else nan:6.2f} "
                      f"{mh * 1e3 if mh else nan:8.2f} {mh / tc if mh else nan:6.2f} "
                      f"{vs32:7.2f} {vsd:8.2f}", flush=True)
        print(f"{'':30s} read probe in the same turns: {bw:.1f} GB/s")


def overhead(repeat=2000):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 1, 64)).astype(np.float32) for _ in range(3))
    out = np.empty_like(q)
    fastqkv.set_num_threads(2)
    full = timeit(lambda: fastqkv.attention(q, k, v, out=out, backend="c"), repeat, warmup=100)
    p = _problem.plan_attention(q, k, v, out=out)
    run = timeit(lambda: _c.run(p, 2), repeat, warmup=100)
    from fastqkv import _ckernels
    raw = timeit(lambda: _ckernels.attention(q, k, v, out, None, None, None, None, None, 0.125, 0.0,
                                             -1, -1, 2, 1, None, 0), repeat, warmup=100)
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
    sg = sgemm_gflops(args.threads)
    print(f"sgemm (numpy 2048^2 float32, {args.threads} threads): {sg:.1f} GFLOP/s")
    if not args.only or "decode" in args.only:
        decode_table(args.threads, args.repeat, "" if args.only in ("", "decode") else args.only)
        if args.only:
            return
    hdr = (f"{'case':22s} {'c ms':>8s} {'GFLOP/s':>8s} {'%sgemm':>7s} {'torch ms':>9s} {'x torch':>8s} "
           f"{'ort ms':>8s} {'x ort':>6s} {'foreign load':>13s}")
    print(hdr)
    for name, kw in CASES.items():
        if args.only and args.only not in name:
            continue
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        with ForeignLoad() as load:
            r = bench_case(name, threads=args.threads, repeat=args.repeat, **kw)
        t, o = r.get("torch"), r.get("ort")
        print(f"{name:22s} {r['c'] * 1e3:8.2f} {r['gflops']:8.1f} {100 * r['gflops'] / sg:6.0f}% "
              f"{t * 1e3 if t else float('nan'):9.2f} {t / r['c'] if t else float('nan'):8.2f} "
              f"{o * 1e3 if o else float('nan'):8.2f} {o / r['c'] if o else float('nan'):6.2f} "
              f"{load.cores:8.2f} cores", flush=True)
    if not args.only or "overhead" in args.only:
        full, run, raw = overhead()
        print(f"tiny B1 H1 L1 D64 per call: fastqkv.attention {full * 1e6:.2f} us, "
              f"_c.run {run * 1e6:.2f} us, _ckernels.attention {raw * 1e6:.2f} us")


if __name__ == "__main__":
    main()
