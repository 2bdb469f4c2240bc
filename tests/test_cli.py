"""The command line: info, check and tune."""

import subprocess
import sys

import fastqkv
from fastqkv import cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert fastqkv.__version__ in out
    for name in fastqkv.backends():
        assert name in out
    assert "threads" in out
    assert "no entry for this machine" in out          # the tests run without a tune file


def test_tune_then_info_prints_the_table(capsys, monkeypatch, tmp_path):
    from fastqkv import _tune
    monkeypatch.setenv("FASTQKV_TUNE_FILE", str(tmp_path / "t.json"))
    monkeypatch.setattr(_tune, "representatives",
                        lambda quick=False: [("decode/float32/tiny/plain", (1, 2, 1, 1, 16, 8),
                                              "float32", "plain")])
    _tune.forget()
    try:
        assert cli.main(["tune", "--quick"]) == 0
        assert "wrote 1 classes" in capsys.readouterr().out
        assert cli.main(["info"]) == 0
        out = capsys.readouterr().out
        assert "decode/float32/tiny/plain" in out and str(tmp_path / "t.json") in out
    finally:
        _tune.forget()


def test_check_passes_on_numpy(capsys):
    assert cli.main(["check", "--quick", "--backend", "numpy"]) == 0
    assert "agree with the oracle" in capsys.readouterr().out


def test_check_rejects_unknown_backend(capsys):
    assert cli.main(["check", "--backend", "gpu"]) == 2


def test_check_reports_a_mismatch(monkeypatch, capsys):
    from fastqkv import _numpy_backend

    def broken(p, n):
        _numpy_backend.compute(p)
        p.out[..., 0] += 1.0

    monkeypatch.setattr(_numpy_backend, "run", broken)
    assert cli.main(["check", "--quick", "--backend", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL numpy" in out and "case " in out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastqkv", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "backends:" in r.stdout
