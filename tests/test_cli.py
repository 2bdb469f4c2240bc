"""The command line: info and check."""

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
