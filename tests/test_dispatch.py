"""Backend registry, selection, overrides and thread count."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import _dispatch


def test_backends_report_every_backend():
    info = fastqkv.backends()
    assert set(info) == {"c", "numba", "numpy"}
    assert info["numpy"].available
    for name, i in info.items():
        assert i.name == name and isinstance(i.reason, str) and i.reason
        assert isinstance(i.details, dict)


def test_auto_picks_first_available_in_order():
    q = np.zeros((1, 1, 2, 4), np.float32)
    p = fastqkv._problem.plan_attention(q, q, q)
    _, name = _dispatch.resolve("auto", p)
    avail = [n for n in fastqkv._config.AUTO_ORDER
             if fastqkv.backends()[n].available and _dispatch._modules[n].supports(p) is None]
    assert name == avail[0]


def test_use_backend_and_set_backend():
    q = np.zeros((1, 1, 2, 4), np.float32)
    p = fastqkv._problem.plan_attention(q, q, q)
    with fastqkv.use_backend("numpy"):
        assert _dispatch.resolve("auto", p)[1] == "numpy"
        assert fastqkv.get_backend() == "numpy"
    fastqkv.set_backend("numpy")
    try:
        assert _dispatch.resolve("auto", p)[1] == "numpy"
    finally:
        fastqkv.set_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        fastqkv.set_backend("gpu")
    with pytest.raises(ValueError, match="backend"):
        with fastqkv.use_backend("gpu"):
            pass


def test_unavailable_backend_explains():
    missing = [n for n, i in fastqkv.backends().items() if not i.available]
    for name in missing:
        with pytest.raises(RuntimeError, match="not available"):
            fastqkv.attention(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)), backend=name)


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=120)


def test_env_backend_override():
    r = _run("import fastqkv, numpy as np;"
             "p = fastqkv._problem.plan_attention(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)));"
             "print(fastqkv._dispatch.resolve('auto', p)[1])", FASTQKV_BACKEND="numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "numpy"


def test_env_backend_unknown_raises():
    r = _run("import fastqkv, numpy as np; fastqkv.attention(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)))",
             FASTQKV_BACKEND="tpu")
    assert r.returncode != 0
    assert "FASTQKV_BACKEND" in r.stderr and "tpu" in r.stderr


def test_num_threads_default_env_and_setter():
    r = _run("import fastqkv; print(fastqkv.get_num_threads())", FASTQKV_NUM_THREADS="3")
    assert r.stdout.strip() == "3", r.stderr
    r = _run("import fastqkv; fastqkv.get_num_threads()", FASTQKV_NUM_THREADS="zero")
    assert r.returncode != 0 and "FASTQKV_NUM_THREADS" in r.stderr
    old = fastqkv.get_num_threads()
    fastqkv.set_num_threads(1)
    assert fastqkv.get_num_threads() == 1
    fastqkv.set_num_threads(None)
    assert fastqkv.get_num_threads() >= 1
    fastqkv.set_num_threads(old)


def test_import_does_not_import_numba():
    r = _run("import sys, fastqkv; print('numba' in sys.modules)")
    assert r.stdout.strip() == "False", r.stderr


def test_auto_prefers_the_streaming_order_for_large_decode():
    from fastqkv import _config
    small = np.zeros((1, 4, 1, 64), np.float32)
    big_kv = np.zeros((1, 1, _config.DECODE_MIN_KV_BYTES // (2 * 64 * 4), 64), np.float32)
    p_small = fastqkv._problem.plan_attention(small, small[:, :1], small[:, :1])
    p_big = fastqkv._problem.plan_attention(small, big_kv, big_kv)
    p_masked = fastqkv._problem.plan_attention(small, big_kv, big_kv, mask=np.ones(big_kv.shape[2], bool))
    assert not _dispatch._streaming_decode(p_small)
    assert _dispatch._streaming_decode(p_big)
    assert not _dispatch._streaming_decode(p_masked)
    avail = [n for n in _dispatch.decode_order() if fastqkv.backends()[n].available]
    assert _dispatch.resolve("auto", p_big)[1] == avail[0]


def test_decode_order_follows_the_cpu_vendor(monkeypatch):
    from fastqkv import _config
    for vendor in _config.DECODE_ORDER_VENDORS:
        monkeypatch.setattr(_dispatch, "_vendor_cache", [vendor])
        assert _dispatch.decode_order() == _config.DECODE_ORDER
    for vendor in ("GenuineIntel", ""):
        monkeypatch.setattr(_dispatch, "_vendor_cache", [vendor])
        assert _dispatch.decode_order() == _config.AUTO_ORDER
    monkeypatch.setattr(_dispatch, "_vendor_cache", [])
    assert isinstance(_dispatch.cpu_vendor(), str)
