"""Backend registry, selection, overrides and thread count."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import _config, _dispatch, _tune


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


def _tune_file(tmp_path, monkeypatch, doc):
    """Point auto at a tune file holding ``doc`` (a str is written as is)."""
    path = tmp_path / "tune.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    monkeypatch.setenv("FASTQKV_TUNE_FILE", str(path))
    _tune.forget()
    return path


def _decode_problem():
    q = np.zeros((1, 4, 1, 64), np.float32)
    k = np.zeros((1, 1, 64, 64), np.float32)
    return fastqkv._problem.plan_attention(q, k, k)


AVAILABLE = [n for n, i in fastqkv.backends().items() if i.available]


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs two available backends")
def test_auto_follows_the_measured_table(tmp_path, monkeypatch):
    p = _decode_problem()
    cls = _tune.class_name(_tune.call_class(p))
    assert cls == "decode/float32/tiny/plain"
    threads = fastqkv.get_num_threads()
    for first in AVAILABLE:
        order = [first] + [n for n in AVAILABLE if n != first]
        doc = {"format": _tune.FORMAT,
               "machines": {_tune.machine_key(threads): {"order": {cls: order}}}}
        _tune_file(tmp_path, monkeypatch, doc)
        try:
            assert _dispatch.resolve("auto", p)[1] == first
            # another thread count has no entry: the neutral order
            assert _tune.order(p, threads + 1) == _config.AUTO_ORDER
        finally:
            _tune.forget()


@pytest.mark.parametrize("doc", [
    "{not json",
    {"format": 999, "machines": {}},
    {"format": 1, "machines": "x"},
    "KEY",
], ids=["corrupt", "future-format", "bad-machines", "bad-order"])
def test_a_bad_tune_file_is_ignored_with_one_warning(tmp_path, monkeypatch, doc):
    threads = fastqkv.get_num_threads()
    if doc == "KEY":
        doc = {"format": 1, "machines": {_tune.machine_key(threads): {"order": {"decode/x/tiny": 3}}}}
    _tune_file(tmp_path, monkeypatch, doc)
    p = _decode_problem()
    try:
        with pytest.warns(RuntimeWarning, match="ignoring the tune file") as rec:
            assert _tune.order(p, threads) == _config.AUTO_ORDER
            _tune.order(p, threads + 1)
        assert len(rec) == 1
    finally:
        _tune.forget()


def test_a_foreign_or_stale_entry_is_not_used(tmp_path, monkeypatch):
    threads = fastqkv.get_num_threads()
    key = _tune.machine_key(threads)
    stale = key.replace(f"fastqkv {fastqkv.__version__}", "fastqkv 0.0.1")
    doc = {"format": 1, "machines": {stale: {"order": {"decode/float32/tiny/plain": ["numpy"]}},
                                     "Other CPU | c:avx512 | threads 2 | x": {"order": {}}}}
    _tune_file(tmp_path, monkeypatch, doc)
    try:
        assert _tune.order(_decode_problem(), threads) == _config.AUTO_ORDER
    finally:
        _tune.forget()


def test_tune_writes_an_entry_auto_uses(tmp_path, monkeypatch):
    path = _tune_file(tmp_path, monkeypatch, {"format": 1, "machines": {"elsewhere": {"order": {}}}})
    lines = []
    try:
        entry = _tune.tune(quick=True, progress=lines.append, budget=0.001,
                           only=["decode/float32/tiny/plain", "encoder/float32/small/options"])
        doc = json.loads(path.read_text())
        assert set(doc["machines"]) == {"elsewhere", _tune.machine_key(fastqkv.get_num_threads())}
        assert set(entry["order"]) == {"decode/float32/tiny/plain", "encoder/float32/small/options"}
        assert len(lines) == 2
        fast = [n for n in AVAILABLE if n != "numpy"]
        for order in entry["order"].values():
            assert sorted(order) == sorted(fast)
        p = _decode_problem()
        assert _tune.order(p, fastqkv.get_num_threads())[: len(fast)] == \
            tuple(entry["order"]["decode/float32/tiny/plain"])
    finally:
        _tune.forget()


def _class_grid():
    """Planned problems over every part of a call class: both routes, the
    storage dtypes, paged caches, score options, windows and each size bucket."""
    from fastqkv import testing
    rng = np.random.default_rng(0)
    half = [testing.as_dtype(n) for n in ("float16", "bfloat16")]
    dtypes = [np.float32, np.float64] + [d for d in half if d is not None]
    probs = []
    for dt in dtypes:
        for Hq, Lq, Lk, D in ((1, 1, 8, 8), (8, 1, 4096, 64), (32, 1, 65536, 128), (64, 1, 262144, 128),
                              (1, 32, 32, 32), (8, 256, 256, 64), (32, 512, 2048, 128)):
            q = np.zeros((1, Hq, Lq, D), dt)
            k = np.zeros((1, 1, Lk, D), dt)
            probs.append(fastqkv._problem.plan_attention(q, k, k))
            probs.append(fastqkv._problem.plan_attention(q, k, k, causal=True))
            probs.append(fastqkv._problem.plan_attention(q, k, k, window=(16, 0)))
            probs.append(fastqkv._problem.plan_attention(q, k, k, softcap=30.0))
            probs.append(fastqkv._problem.plan_attention(q, k, k, mask=np.ones((1, 1, 1, Lk), bool)))
            if Lk <= 4096:
                kc, vc, bt = testing.paged_cache(k, k, 16, rng, spare_blocks=0, spare_cols=0)
                probs.append(fastqkv._problem.plan_paged(q, kc, vc, bt, np.array([Lk])))
    return probs


def test_the_index_of_order_agrees_with_call_class(tmp_path, monkeypatch):
    # every class of the table names a backend of its own, so a call looked
    # up in the wrong class gets the wrong order
    threads = fastqkv.get_num_threads()
    names = [f"{k}/{d}/{s}/{o}" for k in _tune.KINDS for d in ("float32", "float64", "float16", "bfloat16")
             for s in _tune.SIZES for o in _tune.OPTIONS]
    # half the classes measured: the others fall back to the neutral order
    doc = {"format": _tune.FORMAT, "machines": {_tune.machine_key(threads): {
        "order": {name: [f"backend{i}"] for i, name in enumerate(names) if i % 2 == 0}}}}
    _tune_file(tmp_path, monkeypatch, doc)
    try:
        table = _tune.table(threads)
        probs = _class_grid()
        seen = set()
        for p in probs:
            cls = _tune.call_class(p)
            seen.add(cls)
            assert _tune.order(p, threads) == table.get(cls, _config.AUTO_ORDER), _tune.class_name(cls)
        assert {c[0] for c in seen} == {0, 1, 2}
        assert {c[2] for c in seen} == {0, 1, 2, 3}
        assert {c[3] for c in seen} == {0, 1, 2}
    finally:
        _tune.forget()


def test_a_partial_tune_keeps_the_other_classes(tmp_path, monkeypatch):
    threads = fastqkv.get_num_threads()
    key = _tune.machine_key(threads)
    kept = {"prefill/float64/large/options": ["numpy"]}
    path = _tune_file(tmp_path, monkeypatch, {"format": 1, "machines": {key: {"order": dict(kept)}}})
    try:
        entry = _tune.tune(progress=lambda line: None, budget=0.001, only=["decode/float32/tiny/plain"])
        order = json.loads(path.read_text())["machines"][key]["order"]
        assert order == entry["order"]
        assert set(order) == {"decode/float32/tiny/plain"} | set(kept)
        assert order["prefill/float64/large/options"] == ["numpy"]
    finally:
        _tune.forget()
