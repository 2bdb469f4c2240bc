"""`fastqkv bench`: a smoke run on tiny shapes, the JSON schema, the plot, and
the one-line skips of missing optional pieces (torch, onnxruntime, rich,
matplotlib).  Only the numpy backend is timed, so no JIT compile is paid."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastqkv import _bench, cli, reference
from fastqkv._bench import checks, report

TINY = ["bench", "--tiny", "--no-progress", "--backend", "numpy"]


def run(capsys, *extra):
    code = cli.main(TINY + list(extra))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_smoke_run_prints_machine_table_and_auto_lines(capsys):
    code, out, err = run(capsys, "--no-peers")
    assert code == 0, out + err
    assert "Traceback" not in out + err
    assert "sgemm" in out and "read bandwidth" in out
    assert "GFLOP/s" in out and "GB/s" in out
    names = [c.name for c in _bench.shape_classes("tiny")]
    for name in names:
        assert f"auto {name}: picks" in out
    assert "MISMATCH" not in out


def test_case_filter_and_json_schema(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, _ = run(capsys, "--no-peers", "--case", "decode", "--json", str(path))
    assert code == 0
    data = json.loads(path.read_text())
    m = data["machine"]
    for key in ("threads", "sgemm_gflops", "dgemm_gflops", "bandwidth_gbs", "sgemm_method",
                "bandwidth_method", "versions", "backends"):
        assert key in m
    assert m["sgemm_gflops"] > 0 and m["bandwidth_gbs"] > 0
    assert data["size"] == "tiny"
    names = [c["name"] for c in data["cases"]]
    assert names and all("decode" in n for n in names)
    for c in data["cases"]:
        assert c["bound"] == "memory" and c["flops"] > 0 and c["kv_bytes"] > 0
        assert {"choice", "auto_ms"} <= set(c["auto"])
        r = next(r for r in c["results"] if r["runner"] == "numpy")
        for key in ("ms", "spread_pct", "samples", "gflops", "gbs", "check", "first_call_ms"):
            assert key in r
        assert r["check"] == "ok" and r["ms"] > 0 and r["gbs"] > 0


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    code, out, _ = run(capsys, "--no-peers", "--case", "prefill-mha", "--case", "decode",
                       "--plot", str(path))
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "bench.png"
    code, out, err = run(capsys, "--no-peers", "--case", "prefill-mha", "--plot", str(path))
    assert code == 0 and not path.exists()
    assert [ln for ln in out.splitlines() if "plot skipped" in ln] == \
        ["plot skipped: matplotlib is not installed (pip install matplotlib)"]
    assert "Traceback" not in out + err


def test_missing_peers_are_one_line_each(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = run(capsys, "--backend", "torch", "--backend", "ort", "--case", "prefill-mha")
    assert code == 0
    lines = out.splitlines()
    assert sum("torch" in ln and "not installed" in ln for ln in lines) == 1
    assert sum("onnxruntime" in ln and "not installed" in ln for ln in lines) == 1
    assert "Traceback" not in out + err


def test_missing_onnx_skips_the_ort_peer_in_one_line(capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, out, err = run(capsys, "--backend", "ort", "--case", "prefill-mha")
    assert code == 0
    assert [ln for ln in out.splitlines() if "not installed" in ln] == \
        ["peer ort skipped: onnx is not installed (pip install onnx)"]
    assert "Traceback" not in out + err


def test_missing_rich_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    prog = report.Progress(1, want_bar=True)
    prog.advance("done")
    prog.close()
    out = capsys.readouterr().out
    assert "rich is not installed" in out and "[1/1] done" in out


def test_bad_arguments(capsys):
    assert cli.main(["bench", "--tiny", "--backend", "gpu"]) == 2
    assert cli.main(["bench", "--tiny", "--case", "no-such-case"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_a_wrong_backend_result_is_marked(capsys, monkeypatch):
    from fastqkv import _numpy_backend

    def broken(p, n):
        _numpy_backend.compute(p)
        p.out[..., 0] += 1.0

    monkeypatch.setattr(_numpy_backend, "run", broken)
    code, out, _ = run(capsys, "--no-peers", "--case", "prefill-mha")
    assert code == 1
    assert "!!! MISMATCH prefill-mha numpy" in out


@pytest.mark.parametrize("size", _bench.SIZES)
def test_shape_classes_cover_the_design(size):
    cases = _bench.shape_classes(size)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    kinds = {c.kind for c in cases}
    assert {"prefill", "encoder", "decode", "chunked"} <= kinds
    assert any(c.Hq != c.Hkv for c in cases)                        # GQA
    assert any(c.ragged == "key_lens" for c in cases)               # ragged decode
    assert any(c.ragged == "padding" for c in cases)                # key padding
    assert {"float32", "float64", "float16"} <= {c.dtype for c in cases}
    assert any(c.Lq < c.Lk and c.causal and c.Lq > 1 for c in cases)  # chunked prefill


@pytest.mark.parametrize("case", _bench.shape_classes("tiny"), ids=lambda c: c.name)
def test_flops_count_visible_pairs(case):
    inp = _bench.make_inputs(case)
    p = checks.plan(inp)
    pairs = sum(int(p.visible_keys(b)[0].sum()) for b in range(p.B))
    assert case.visible_pairs() == pairs
    assert case.flops() == 4.0 * case.Hq * pairs * case.D


@pytest.mark.parametrize("peer", ["torch", "ort"])
@pytest.mark.parametrize("case", _bench.shape_classes("tiny"), ids=lambda c: c.name)
def test_peers_agree_with_the_oracle(peer, case):
    pytest.importorskip({"torch": "torch", "ort": "onnxruntime"}[peer])
    inp = _bench.make_inputs(case)
    try:
        call, fetch, note = _bench.prepare(peer, inp, 1)
    except _bench.Skip as exc:
        pytest.skip(str(exc))
    assert _bench.check(inp, fetch(call())) is None
    # one-position decode: each peer's fastest form (query groups folded, no K/V copy)
    folds = case.Lq == 1 and (case.Hq != case.Hkv if peer == "torch" else case.dtype == "float32")
    assert ("query groups folded into the query axis" in note) == folds


def test_check_flags_a_wrong_output():
    inp = _bench.make_inputs(_bench.shape_classes("tiny")[0])
    good = reference.attention(inp.q, inp.k, inp.v, **inp.kwargs)
    assert _bench.check(inp, good) is None
    bad = good.copy()
    bad[0, 0, -1, 0] += 1
    assert "max abs error" in _bench.check(inp, bad)


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastqkv", "bench", "--tiny", "--no-peers", "--backend", "numpy",
                        "--case", "float64"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "auto float64-prefill: picks" in r.stdout


def test_missing_ml_dtypes_skips_the_bfloat16_case_in_one_line(capsys, monkeypatch):
    from fastqkv._bench import cli as bench_cli
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    case = _bench.BenchCase("bfloat16-decode", "decode", 2, 4, 2, 1, 40, 16, dtype="bfloat16",
                            ragged="key_lens")
    res = bench_cli.run_case(case, ["numpy"], 1, "tiny", report.Progress(1, want_bar=False))
    assert res["results"] == [] and res["kv_bytes"] == case.kv_bytes() > 0
    assert res["skipped"] == [{"runner": "*", "reason": "bfloat16 needs ml_dtypes (pip install ml_dtypes)"}]
    out = capsys.readouterr().out
    assert out.splitlines() == ["bfloat16-decode: skipped, bfloat16 needs ml_dtypes (pip install ml_dtypes)"]


def test_a_quick_sample_stops_early_only_when_steady():
    from fastqkv._bench import timing
    ticks = iter(range(10 ** 6))
    t = timing.Timer("steady", lambda: None, clock=lambda: next(ticks) * 1e-3)
    t.run(3, budget=10.0, steady=0.01)
    assert len(t.samples) == timing.STEADY_SAMPLES
    t.run(3, budget=10.0, steady=0.01)                 # a second block samples again
    assert len(t.samples) == timing.STEADY_SAMPLES + timing.STEADY_FRESH

    def jittery():                                     # samples of 1 and 3 ms in turn
        now, k = 0, 0
        while True:
            yield now * 1e-3
            now += 1 if k % 2 else 3
            yield now * 1e-3
            k += 1

    clock = jittery()
    t = timing.Timer("noisy", lambda: None, clock=lambda: next(clock))
    t.run(3, budget=0.05, steady=0.01)
    assert t.spent >= 0.05


def test_settle_waits_for_a_spinning_thread():
    import threading
    import time

    from fastqkv._bench import timing
    stop = time.perf_counter() + 0.15

    def spin():
        while time.perf_counter() < stop:
            pass

    th = threading.Thread(target=spin)
    th.start()
    t0 = time.perf_counter()
    timing.settle(2.0)
    assert time.perf_counter() - t0 >= 0.1
    th.join()
    t0 = time.perf_counter()
    timing.settle(0.05)                                # at most the given seconds
    assert time.perf_counter() - t0 < 1.0


def test_the_run_compiles_the_numba_kernels_of_its_runners_only(monkeypatch):
    from fastqkv._bench import cli as bench_cli
    pytest.importorskip("numba")
    plans = bench_cli.case_plans(_bench.shape_classes("tiny"))
    assert bench_cli.numba_kernels(plans, ["c", "numpy"], []) == set()
    from fastqkv import _tune
    from fastqkv._numba import precompile
    every = {precompile.kernel(p) for p in plans.values()}
    assert {("tile", "float32"), ("stream", "float32"), ("stream", "uint16")} <= every
    assert bench_cli.numba_kernels(plans, ["numba"], []) == every
    # auto alone: kernels of the classes about to be tuned (the tune times
    # numba on them) and of those auto picks numba for
    name = _tune.class_name(_tune.call_class(plans[sorted(plans)[0]]))
    monkeypatch.setattr(bench_cli, "_auto_choice", lambda p: "c")
    want = {precompile.kernel(p) for p in plans.values() if _tune.class_name(_tune.call_class(p)) == name}
    assert bench_cli.numba_kernels(plans, ["auto", "c"], [name]) == want
    monkeypatch.setattr(bench_cli, "_auto_choice", lambda p: "numba")
    assert bench_cli.numba_kernels(plans, ["auto", "c"], []) == every


def test_the_run_tunes_the_classes_of_its_cases_that_auto_lacks():
    from fastqkv import _tune
    from fastqkv._bench import cli as bench_cli
    plans = bench_cli.case_plans(_bench.shape_classes("quick"))
    classes = {_tune.class_name(_tune.call_class(p)) for p in plans.values()}
    untuned = bench_cli.untuned_classes(plans, 2)       # the session's tune file has no entry
    assert set(untuned) == classes and any("/large/" in c for c in classes)
    quick = bench_cli.untuned_classes(plans, 2, quick=True)
    assert set(quick) == {c for c in classes if "/large/" not in c}
