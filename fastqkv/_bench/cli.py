"""``fastqkv bench``: the command line and the run.

Contract: :func:`add_arguments` declares the options on an argparse parser;
:func:`main` runs the selected cases over the selected runners and returns
the exit status: 0, 1 when a fastqkv backend disagrees with the oracle (a
peer's mismatch is reported but does not fail the run), 2 for bad arguments
or an output file that cannot be written.  A run first compiles the Numba
kernels its runners need and the disk cache lacks (:func:`compile_numba`,
before anything is timed), then measures the machine, times the call classes
of its cases that auto has no measured order for (:func:`untuned_classes`)
and the cases.  Each case is warmed up and checked against the oracle before
it is timed; a runner or case that cannot run is skipped with one line,
through :func:`_skip` only.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict

from .. import _dispatch, _tune
from .cases import Skip, shape_classes
from .checks import check, plan
from .inputs import make_inputs
from .machine import PROBE_MIB, cpu_name, measure_machine, read_bandwidth, read_probe, versions
from .peers import PEERS, missing_module
from .report import Progress, format_table, write_json, write_plot
from .runners import check_numpy_cost, fastqkv_names, prepare, resolve
from .timing import Timer, take_turns

# most seconds of the settling pause before each runner's block of samples (see run_case)
_SETTLE_S = {"full": 0.3, "quick": 0.2, "tiny": 0.0}
_PLAN = {  # repeats, seconds of samples per runner, target seconds per sample, cap per runner,
    #         spread (of the median) under which sampling stops before the seconds are spent
    "full": (7, 1.0, 0.02, 6.0, 0.0),
    "quick": (3, 0.15, 0.01, 1.0, 0.01),
    "tiny": (2, 0.0, 0.001, 0.05, 0.0),
}


def add_arguments(p):
    """Options of ``fastqkv bench``."""
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (0.5-2 minutes once compiled)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for smoke tests")
    p.add_argument("--threads", type=int, default=None, help="thread count (default: fastqkv.get_num_threads())")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="run only this runner (repeatable): a fastqkv backend, auto, torch or ort")
    p.add_argument("--case", action="append", metavar="SUBSTRING", help="run only cases whose name contains this")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch and ONNX Runtime")
    p.add_argument("--repeat", type=int, default=None, help="samples per runner (default by size)")
    p.add_argument("--json", metavar="PATH", help="write all results and machine info as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of each backend against the machine limits")
    p.add_argument("--no-progress", action="store_true", help="plain progress lines, no progress bar")
    p.add_argument("--no-tune", action="store_true",
                   help="do not run `fastqkv tune` first when auto has no measured table for this machine")


def time_runner(t, size, repeats=None, frac=1.0):
    """Sample one warmed-up timer until it has ``frac`` of its ``repeats``
    samples and of its time budget, or, in ``--quick``, a small spread."""
    rep, budget, _, cap, steady = _PLAN[size]
    t.run(math.ceil((repeats or rep) * frac), budget * frac, cap * frac, most=50, steady=steady)


def _skip(res, runner, reason, progress, failed=False):
    """The one way a runner (``"*"``: the whole case) is skipped: a record in
    the case's results and one line of progress."""
    res["skipped"].append({"runner": runner, "reason": f"failed: {reason}" if failed else str(reason)})
    what = f"{runner} FAILED" if failed else ("skipped" if runner == "*" else f"{runner} skipped")
    progress.log(f"{res['name']}: {what}, {reason}")


def run_case(case, names, threads, size, progress, repeats=None):
    """Time every runner on one case and check it against the oracle."""
    res = {"case": asdict(case), "name": case.name, "describe": case.describe(), "bound": case.bound,
           "flops": case.flops(), "kv_bytes": case.kv_bytes(), "results": [], "skipped": []}
    try:
        inp = make_inputs(case)
    except Skip as exc:
        _skip(res, "*", exc, progress)
        return res
    timers, meta = [], {}
    for name in names:
        progress.stage(f"{case.name}: {name} (warm-up, check)")
        try:
            if name == "numpy":
                check_numpy_cost(case, size)
            call, fetch, note = prepare(name, inp, threads)
            t = Timer(name, call)
            bad = check(inp, fetch(t.warm(_PLAN[size][2])))
        except Skip as exc:
            _skip(res, name, exc, progress)
            continue
        except Exception as exc:  # noqa: BLE001 - one failing runner must not end the bench
            _skip(res, name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  progress, failed=True)
            continue
        if bad:
            progress.log(f"!!! MISMATCH {case.name} {name}: {bad}")
        timers.append(t)
        meta[name] = (note, bad)
    # Each runner is timed in a block of consecutive calls (interleaving single
    # calls would let one runtime's spinning thread pool slow the next); two
    # blocks per runner spread load changes of a shared machine over all, and
    # the pause before a block lets the previous runner's worker threads stop
    # spinning (OpenBLAS under the numpy oracle, OpenMP pools).
    blocks = 1 if size == "tiny" else 2

    def block(t, b):
        progress.stage(f"{case.name}: timing {t.name} ({b + 1}/{blocks})")
        time_runner(t, size, repeats, (b + 1) / blocks)

    take_turns(timers, blocks, _SETTLE_S[size], block)
    for t in timers:
        ms, spread = t.stats()
        note, bad = meta[t.name]
        res["results"].append({
            "runner": t.name, "peer": t.name in PEERS, "ms": ms, "spread_pct": spread,
            "samples": len(t.samples), "calls_per_sample": t.inner, "first_call_ms": t.first_ms,
            "gflops": case.flops() / (ms * 1e-3) / 1e9,
            "gbs": case.kv_bytes() / (ms * 1e-3) / 1e9 if case.bound == "memory" else None,
            "check": "ok" if not bad else f"MISMATCH: {bad}", "note": note})
    res["auto"] = _auto_verdict(inp, res, {t.name: t for t in timers}, size, progress)
    progress.advance(f"{case.name}: " + ", ".join(f"{r['runner']} {r['ms']:.3g} ms" for r in res["results"]))
    return res


def _confirm(a, b, size, progress, rounds=4, per_block=3):
    """Re-time two runners in alternating blocks (so load changes hit both)
    and return their medians and ratio ``a / b``."""
    progress.stage(f"confirming {a.name} vs {b.name}")
    ta, tb = Timer(a.name, a.call, a.inner), Timer(b.name, b.call, b.inner)

    def block(t, _r):
        for _ in range(per_block):
            t.sample()

    take_turns((ta, tb), rounds, _SETTLE_S[size], block)
    ma, mb = ta.stats()[0], tb.stats()[0]
    return {a.name + "_ms": ma, b.name + "_ms": mb, "ratio": ma / mb, "samples": rounds * per_block}


def _auto_verdict(inp, res, timers, size, progress):
    try:
        choice, _ = resolve("auto", inp)
    except Skip as exc:
        return {"choice": None, "reason": str(exc)}
    ms = {r["runner"]: r["ms"] for r in res["results"] if not r["peer"] and r["runner"] != "auto"}
    out = {"choice": choice, "auto_ms": next((r["ms"] for r in res["results"] if r["runner"] == "auto"), None)}
    if ms:
        fastest = min(ms, key=ms.get)
        out.update(fastest=fastest, fastest_ms=ms[fastest], choice_ms=ms.get(choice))
        if ms.get(choice) is not None:
            out["ratio"] = ms[choice] / ms[fastest]
            if out["ratio"] > 1.05 and size != "tiny":
                out["confirm"] = _confirm(timers[choice], timers[fastest], size, progress)
                out["ratio"] = out["confirm"]["ratio"]
            out["within_5pct"] = out["ratio"] <= 1.05
    peers = {r["runner"]: r["ms"] for r in res["results"] if r["peer"]}
    if peers:
        best = min(peers, key=peers.get)
        out.update(fastest_peer=best, fastest_peer_ms=peers[best])
    return out


def case_plans(cases):
    """``{case name: planned Problem}`` of the cases whose inputs can be made
    here, planned on uninitialised arrays."""
    out = {}
    for case in cases:
        try:
            out[case.name] = plan(make_inputs(case, fill=False))
        except Skip:
            continue
    return out


def untuned_classes(plans, threads, quick=False):
    """Names of the call classes of ``plans`` that auto has no measured
    order for at ``threads`` threads and ``fastqkv tune`` can measure
    (``quick``: below the size ``_tune.QUICK_SIZES``), sorted."""
    measured = {_tune.class_name(c) for c in _tune.table(threads) or {}}
    tunable = {r[0] for r in _tune.representatives()}
    wanted = {_tune.class_name(c) for c in map(_tune.call_class, plans.values())
              if not quick or c[2] < _tune.QUICK_SIZES}
    return sorted(wanted & tunable - measured)


def numba_kernels(plans, names, untuned):
    """The Numba kernels the runners ``names`` need for ``plans``: each
    case's under the numba runner; under auto, where its class is about to
    be tuned (``untuned``: the tune times numba on a call of the class, which
    runs on the same kernel) or auto picks numba."""
    if not _dispatch.backends()["numba"].available or not {"numba", "auto"} & set(names):
        return set()
    from .._numba import precompile
    keys = set()
    for p in plans.values():
        if ("numba" in names or _tune.class_name(_tune.call_class(p)) in untuned
                or _auto_choice(p) == "numba"):
            keys.add(precompile.kernel(p))
    return keys


def _auto_choice(p):
    try:
        return _dispatch.resolve("auto", p)[1]
    except (ValueError, RuntimeError):
        return None


def compile_numba(keys, log):
    """Compile the Numba kernels of ``keys`` that the disk cache lacks, in
    parallel processes, before anything is timed, saying what and that it
    happens once."""
    from .._numba import precompile
    todo, where = precompile.missing(keys)
    if not todo:
        return
    processes = precompile.parallelism(todo, _dispatch.available_cpus())
    log(f"numba: compiling the {len(todo)} kernels this run needs ({', '.join(map(precompile.describe, todo))})"
        f"{f' in {processes} processes' if processes > 1 else ''}; this happens once, the code is cached "
        f"on disk ({where or 'Numba cache'})")
    t0 = time.perf_counter()
    precompile.precompile(todo, _dispatch.available_cpus(), log)
    log(f"  compiled in {time.perf_counter() - t0:.0f} s")


def main(args):
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    threads = args.threads or _dispatch.get_num_threads()
    if threads < 1:
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    known = ["auto"] + fastqkv_names() + list(PEERS)
    names = args.backend or known
    bad = [n for n in names if n not in known]
    if bad:
        print(f"unknown backend(s): {', '.join(bad)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.no_peers:
        names = [n for n in names if n not in PEERS]
    names = [n for n in known if n in names]          # canonical order, no duplicates
    cases = [c for c in shape_classes(size) if not args.case or any(s in c.name for s in args.case)]
    if not cases:
        print(f"no case matches {args.case}; cases: {', '.join(c.name for c in shape_classes(size))}",
              file=sys.stderr)
        return 2
    old_threads = _dispatch._num_threads
    try:
        return _run(args, size, threads, names, cases)
    finally:
        _dispatch._num_threads = old_threads


def _run(args, size, threads, names, cases):
    print(f"fastqkv bench ({size}): {len(cases)} cases, runners {', '.join(names)}, {threads} threads")
    names = list(names)
    machine = {"threads": threads, "cpu": cpu_name(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "versions": versions(),
               "backends": {n: {"available": i.available, "reason": i.reason, "details": i.details}
                            for n, i in _dispatch.backends().items()}}
    for name, info in _dispatch.backends().items():
        if name in names and not info.available:
            print(f"backend {name} skipped: not available ({info.reason})")
            names.remove(name)
    for peer in PEERS:
        module = missing_module(peer) if peer in names else None
        if module is not None:
            print(f"peer {peer} skipped: {module} is not installed (pip install {module})")
            names.remove(peer)
    plans = case_plans(cases)
    untuned = (untuned_classes(plans, threads, quick=size == "quick")
               if "auto" in names and size != "tiny" and not args.no_tune else [])
    compile_numba(numba_kernels(plans, names, untuned), print)
    probe = read_probe(PROBE_MIB[size] << 20, threads)
    try:
        return _measure(args, size, threads, names, cases, machine, untuned, probe)
    finally:
        if probe[3] is not None:
            probe[3].shutdown()


def _measure(args, size, threads, names, cases, machine, untuned, probe):
    """The machine probes, the tuning auto lacks, the cases and the report."""
    machine.update(measure_machine(threads, size, probe))
    print(f"machine: {machine['cpu']}, {threads} threads")
    print(f"  sgemm {machine['sgemm_gflops']:.1f} GFLOP/s (best {machine['sgemm_gflops_best']:.1f}; "
          f"{machine['sgemm_method']}); dgemm {machine['dgemm_gflops']:.1f} GFLOP/s")
    print(f"  read bandwidth {machine['bandwidth_gbs']:.1f} GB/s (best {machine['bandwidth_gbs_best']:.1f}; "
          f"{machine['bandwidth_method']})")
    if untuned:
        print(f"auto has no measured order for {len(untuned)} call classes of these cases at {threads} "
              f"threads: timing them once (`fastqkv tune` for these classes, written to {_tune.tune_file()})")
        t_tune = time.perf_counter()
        _tune.tune(threads=threads, only=untuned, progress=lambda line: print(f"  tune {line}", flush=True))
        print(f"  tuned {len(untuned)} call classes in {time.perf_counter() - t_tune:.0f} s")
    want_bar = not args.no_progress and sys.stdout.isatty()
    progress = Progress(len(cases), want_bar)
    results = []
    t0 = time.perf_counter()
    try:
        for case in cases:
            if case.bound == "memory":
                # the read bandwidth of a shared machine drifts: probe it again
                # next to every memory-bound case; the best run of all is the roofline
                best, _med, _how = read_bandwidth(0, threads, 3, probe)
                machine["bandwidth_gbs_best"] = max(machine["bandwidth_gbs_best"], best)
            results.append(run_case(case, names, threads, size, progress, args.repeat))
    finally:
        progress.close()
    if any(c.bound == "memory" for c in cases):
        print(f"read bandwidth, best of the probes before and next to the memory-bound cases: "
              f"{machine['bandwidth_gbs_best']:.1f} GB/s")
    print()
    print(format_table(results, machine))
    print(f"\n{len(cases)} cases in {time.perf_counter() - t0:.1f} s")
    mismatches = [(c["name"], r["runner"]) for c in results for r in c["results"] if r["check"] != "ok"]
    status = 0
    if mismatches:
        print("!!! MISMATCH against the oracle: " + ", ".join(f"{c} {r}" for c, r in mismatches))
        if any(r not in PEERS for _, r in mismatches):
            status = 1
    if args.json:
        try:
            write_json(args.json, machine, size, results)
            print(f"wrote {args.json}")
        except OSError as exc:
            print(f"--json not written: {exc}")
            status = status or 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        else:
            try:
                write_plot(args.plot, results, machine)
                print(f"wrote {args.plot}")
            except OSError as exc:
                print(f"--plot not written: {exc}")
                status = status or 2
    return status
