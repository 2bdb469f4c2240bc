"""The report of a ``fastqkv bench`` run: progress, the results table, the
auto lines, the plot and the JSON file.

Contract: every function here reads the result records built by the CLI
(``{"name", "case", "bound", "results": [...], "skipped": [...], "auto"}``
per case, and the machine dict of :mod:`.machine`) and only formats or
writes them; nothing here runs or times a kernel.  The ratio columns are
``peer ms / backend ms`` (> 1: fastqkv is faster).
"""

from __future__ import annotations

import json

from .peers import PEERS


class Progress:
    """Progress of a run: a rich bar when wanted and installed (one line when
    rich is missing), else one plain line per finished case."""

    def __init__(self, total, want_bar):
        self.bar = None
        self.done = 0
        self.total = total
        if want_bar:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn)
            except ImportError:
                print("progress bar skipped: rich is not installed (pip install rich)")
            else:
                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), transient=True)
                self.bar.start()
                self.task = self.bar.add_task("bench", total=total)

    def stage(self, text):
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def log(self, line):
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def advance(self, line):
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
        else:
            print(f"[{self.done}/{self.total}] {line}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()



def _best(machine, key):
    """The best run of a machine limit (on a shared machine the median moves
    with the neighbours' load; the best run is what the hardware delivered,
    the stricter yardstick); the median in results without it."""
    return machine.get(key + "_best", machine[key])


def _limit_for(case, machine):
    """The roofline of a case: the best run of its machine limit."""
    if case["bound"] == "memory":
        key, what = "bandwidth_gbs", "bw"
    elif case["case"]["dtype"] == "float64":
        key, what = "dgemm_gflops", "dgemm"
    else:
        key, what = "sgemm_gflops", "sgemm"
    return _best(machine, key), what


def format_table(results, machine):
    """The results table and the auto lines, as text."""
    peers = [p for p in PEERS if any(r["runner"] == p for c in results for r in c["results"])]
    head = (f"{'case':24s} {'backend':8s} {'ms':>9s} {'±%':>4s} {'GFLOP/s':>8s} {'GB/s':>6s} "
            f"{'%limit':>8s} " + " ".join(f"{'x ' + p:>8s}" for p in peers) + "  check")
    lines = [head, "-" * len(head)]
    for c in results:
        pm = {r["runner"]: r["ms"] for r in c["results"] if r["peer"]}
        for r in c["results"]:
            lim, what = _limit_for(c, machine)
            val = r["gbs"] if c["bound"] == "memory" else r["gflops"]
            gbs = f"{r['gbs']:6.1f}" if r["gbs"] is not None else f"{'':6s}"
            ratios = " ".join(f"{pm[p] / r['ms']:8.2f}" if p in pm and not r["peer"] else f"{'':8s}"
                              for p in peers)
            chk = r["check"] if not r["note"] else f"{r['check']} ({r['note']})"
            lines.append(f"{c['name']:24s} {r['runner']:8s} {r['ms']:9.3f} {min(r['spread_pct'], 999):4.0f} "
                         f"{r['gflops']:8.1f} {gbs} {100 * val / lim:5.0f}%{what[:2]:2s} {ratios}  {chk}")
        for s in c["skipped"]:
            lines.append(f"{c['name']:24s} {s['runner']:8s} skipped: {s['reason']}")
    lines.append("")
    lines.append("x PEER = PEER ms / backend ms (> 1: faster than the peer). %limit: of the best run of "
                 "sgemm (sg), dgemm (dg) or read bandwidth (bw). ±%: half the interquartile range of the samples.")
    lines.append("")
    for c in results:
        lines.append(auto_line(c))
    return "\n".join(lines)


def auto_line(c):
    a = c.get("auto") or {}
    if not a.get("choice"):
        return f"auto {c['name']}: no choice ({a.get('reason', 'no backend ran')})"
    s = f"auto {c['name']}: picks {a['choice']}"
    if a.get("auto_ms") is not None:
        s += f" (auto call {a['auto_ms']:.3f} ms)"
    if "fastest" in a:
        s += f"; fastest backend {a['fastest']} {a['fastest_ms']:.3f} ms"
        if "confirm" in a:
            cf = a["confirm"]
            s += (f"; re-timed alternately: {a['choice']} {cf[a['choice'] + '_ms']:.3f} ms vs "
                  f"{a['fastest']} {cf[a['fastest'] + '_ms']:.3f} ms, {a['choice']} "
                  f"{100 * (a['ratio'] - 1):+.1f} %: {'within 5 %' if a['within_5pct'] else 'NOT within 5 %'}")
        elif a.get("ratio") == 1.0:
            s += ": auto's choice is the fastest"
        elif "ratio" in a:
            s += (f"; {a['choice']} {a['choice_ms']:.3f} ms is {100 * (a['ratio'] - 1):.1f} % slower: "
                  f"{'within 5 %' if a['within_5pct'] else 'NOT within 5 %'}")
        else:
            s += f"; {a['choice']} was not measured"
    if "fastest_peer" in a:
        s += f"; fastest peer {a['fastest_peer']} {a['fastest_peer_ms']:.3f} ms"
    return s


def write_plot(path, results, machine):
    """A PNG: achieved GFLOP/s (compute-bound cases) and GB/s (decode) per
    backend, against the machine's limits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [("compute", "GFLOP/s", "gflops"), ("memory", "GB/s of K/V read", "gbs")]
    runners = []
    for c in results:
        for r in c["results"]:
            if r["runner"] not in runners:
                runners.append(r["runner"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(results) + 4), 9))
    for ax, (bound, label, key) in zip(axes, groups):
        cs = [c for c in results if c["bound"] == bound]
        width = 0.8 / max(1, len(runners))
        for i, name in enumerate(runners):
            xs, ys = [], []
            for j, c in enumerate(cs):
                r = next((r for r in c["results"] if r["runner"] == name), None)
                if r is not None and r[key] is not None:
                    xs.append(j + (i - (len(runners) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=name)
        if bound == "compute":
            ax.axhline(_best(machine, "sgemm_gflops"), color="k", ls="--",
                       label="sgemm (best run)")
            if any(c["case"]["dtype"] == "float64" for c in cs):
                ax.axhline(_best(machine, "dgemm_gflops"), color="gray", ls=":",
                           label="dgemm (best run)")
        else:
            ax.axhline(_best(machine, "bandwidth_gbs"), color="k", ls="--",
                       label="read bandwidth (best run)")
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels([c["name"] for c in cs], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"fastqkv bench, {machine['threads']} threads, {machine.get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path, machine, size, results):
    """All results and the machine info as JSON."""
    with open(path, "w") as f:
        json.dump({"machine": machine, "size": size, "cases": results}, f, indent=1, default=str)
