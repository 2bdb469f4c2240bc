"""The numba backend against the NumPy oracle, plus its backend interface.

Every case of :func:`fastqkv.testing.generate_cases` runs at 1 and 2 threads;
the extra cases below sweep head dims, lengths, GQA ratios, strides and the
numerical corner cases that need the fused kernel's tile logic (several key
and query tiles, partially visible tiles, invisible non-finite values), and
attention sinks in the tiled kernel's epilogue (rows without keys included).
"""

import subprocess
import sys

import numpy as np
import pytest

import fastqkv
from fastqkv import reference, testing

numba = pytest.importorskip("numba")

from fastqkv import _numba  # noqa: E402

BACKEND = "numba"
THREADS = (1, 2)
CASES = testing.generate_cases(quick=False, seed=0)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_generated_case(case, threads):
    testing.check_case(case, BACKEND, num_threads=threads)


def _case(name, rng, *shape, **kw):
    return testing.make_case(name, rng, *shape, **kw)


def _sweep():
    rng = np.random.default_rng(1)
    out = []
    for D in (1, 3, 64, 80, 128):
        for L in (1, 7, 113):
            for dtype in (np.float32, np.float64):
                out.append(_case(f"D{D}-L{L}-{np.dtype(dtype).name}-causal", rng, 1, 2, 2, L, L, D,
                                 dtype=dtype, causal=True))
    for g in (1, 4, 8):
        out.append(_case(f"gqa{g}-prefill", rng, 2, 8, 8 // g, 70, 70, 32, causal=True))
        out.append(_case(f"gqa{g}-decode-long", rng, 2, 8, 8 // g, 1, 600, 32,
                         key_lens=np.array([600, 257])))
        out.append(_case(f"gqa{g}-chunked-causal", rng, 1, 8, 8 // g, 40, 300, 16, causal=True))
    out.append(_case("window-both-sides-multi-tile", rng, 1, 4, 2, 150, 150, 16, window=(40, 17)))
    out.append(_case("window-left-only", rng, 1, 2, 1, 90, 200, 8, window=(30, -1)))
    out.append(_case("negative-scale", rng, 1, 2, 1, 9, 70, 16, scale=-0.7, causal=True))
    out.append(_case("zero-scale", rng, 1, 2, 1, 9, 70, 16, scale=0.0))
    out.append(_case("blhd-strided-mask-bias", rng, 2, 4, 2, 19, 77, 24, strides="transposed",
                     mask=rng.random((2, 1, 19, 77)) < 0.7, bias=rng.standard_normal((19, 77)),
                     out_strided=True))
    return out


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", _sweep(), ids=lambda c: c.name)
def test_sweep_case(case, threads):
    testing.check_case(case, BACKEND, num_threads=threads)


def _compare(q, k, v, threads=2, **kw):
    return testing.check_case(testing.Case("numba", q, k, v, kw), BACKEND, num_threads=threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_and_negative_strides(dtype):
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 2, 50, 16)).astype(dtype)[:, :, ::-1]      # negative L stride
    v = np.broadcast_to(rng.standard_normal((1, 2, 1, 12)).astype(dtype), (1, 2, 50, 12))  # zero stride
    q = rng.standard_normal((1, 6, 9, 16)).astype(dtype)[:, ::-1]          # negative H stride
    _compare(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_nonfinite_values_do_not_leak(dtype):
    """NaN/inf in K and V of keys a mask hides, inside a tile that other rows see."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 4, 6, 8)).astype(dtype)
    k = rng.standard_normal((1, 2, 70, 8)).astype(dtype)
    v = rng.standard_normal((1, 2, 70, 8)).astype(dtype)
    mask = np.ones((1, 4, 6, 70), bool)
    mask[0, :2, :, 5] = False                 # heads 0-1 hide key 5, heads 2-3 see it
    mask[0, :, :, 66] = False                 # nobody sees key 66
    k[0, 1, 66] = np.nan
    v[0, 1, 66] = np.inf
    v[0, 0, 5] = np.nan                       # kv head 0 = query heads 0, 1: hidden
    out, lse = _compare(q, k, v, mask=mask)
    assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_huge_logits_both_signs():
    rng = np.random.default_rng(4)
    q = (rng.standard_normal((1, 2, 5, 16)) * 400).astype(np.float32)
    k = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    for scale in (1.0, -1.0):
        _compare(q, k, v, scale=scale)


def test_nan_in_visible_score_reaches_row():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 1, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 1, 200, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 200, 8)).astype(np.float32)
    k[0, 0, 150, 2] = np.nan                  # a later key tile than the row max
    out, lse = _compare(q, k, v)
    assert np.isnan(out).all() and np.isnan(lse).all()


def test_readonly_inputs_and_float64_out():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 4, 9, 8)) for _ in range(3))
    for a in (q, k, v):
        a.setflags(write=False)
    out = np.full((2, 4, 9, 8), np.nan)
    got = fastqkv.attention(q, k, v, out=out, backend=BACKEND)
    assert got is out
    testing.assert_close(out, reference.attention(q, k, v), np.float64)


def test_thread_count_is_restored():
    before = numba.get_num_threads()
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    fastqkv.set_num_threads(1)
    try:
        fastqkv.attention(q, q, q, backend=BACKEND)
    finally:
        fastqkv.set_num_threads(None)
    assert numba.get_num_threads() == before


def test_interface():
    ok, reason, details = _numba.probe()
    assert ok and reason and "numba" in details
    p = fastqkv._problem.plan_attention(np.zeros((1, 2, 3), np.float16), np.zeros((1, 2, 3), np.float16),
                                         np.zeros((1, 2, 3), np.float16))
    assert _numba.supports(p) is None               # float16 / bfloat16: the streaming kernel
    assert "paged" in _numba.FEATURES
    p32 = fastqkv._problem.plan_attention(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.float32),
                                           np.zeros((1, 2, 3), np.float32))
    assert _numba.supports(p32) is None
    status = _numba.warmup()
    assert status["warm"] is True, status
    assert _numba.cache_status()["warm"] is True


def test_import_does_not_import_numba():
    code = ("import sys, fastqkv, fastqkv._numba as nb; nb.probe(); "
            "assert 'numba' not in sys.modules, 'numba imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", ["prefix", "holes", "all-true", "empty-row", "with-causal"])
def test_key_padding_masks(kind):
    """Key-padding masks are read as lengths (tiles skipped); same results."""
    rng = np.random.default_rng(8)
    B, Lk = 3, 300
    q = rng.standard_normal((B, 4, 20, 16)).astype(np.float32)
    k = rng.standard_normal((B, 2, Lk, 16)).astype(np.float32)
    v = rng.standard_normal((B, 2, Lk, 16)).astype(np.float32)
    lens = np.array([300, 130, 7])
    mask = np.arange(Lk)[None, :] < lens[:, None]
    kw = {}
    if kind == "holes":
        mask[1, 50:60] = False
        mask[2, 0] = False
    elif kind == "all-true":
        mask[:] = True
    elif kind == "empty-row":
        mask[2] = False
    elif kind == "with-causal":
        kw["causal"] = True
    v[1, :, 200:] = np.nan                    # beyond batch 1's padding: never read
    k[1, :, 200:] = np.nan
    if kind == "all-true":
        v[1, :, 200:] = 0.0
        k[1, :, 200:] = 0.0
    _compare(q, k, v, mask=mask[:, None, None, :], **kw)


@pytest.fixture
def small_tiles(force):
    """Tiny work items and key tiles: every case then spans many query and
    key tiles (packed-once and per-item paths, partial and skipped tiles)."""
    force(rows=8, keys=8, decode_keys=12)


@pytest.mark.parametrize("case", CASES + _sweep(), ids=lambda c: c.name)
def test_case_small_tiles(case, small_tiles):
    testing.check_case(case, BACKEND, num_threads=2)


def test_workspace_threads_and_release():
    """Each Python thread has its own kernel workspace; calls of different
    shapes interleave safely, and release_workspace frees this thread's."""
    import threading

    from fastqkv._numba import launch

    rng = np.random.default_rng(9)
    shapes = [(1, 8, 2, 70, 90, 16), (2, 4, 4, 1, 300, 32), (1, 2, 1, 130, 130, 8)]
    data = [tuple(rng.standard_normal(s).astype(np.float32) for s in
                  ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
            for B, Hq, Hkv, Lq, Lk, D in shapes]
    refs = [reference.attention(*x, causal=True) for x in data]
    conds = [testing.condition_number(q, k) for q, k, _ in data]
    errors = []

    def worker(idx):
        try:
            for _ in range(5):
                out = fastqkv.attention(*data[idx], causal=True, backend=BACKEND)
                testing.assert_close(out, refs[idx], np.float32, cond=conds[idx])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i % 3,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    launch.release_workspace()
    out = fastqkv.attention(*data[0], causal=True, backend=BACKEND)
    testing.assert_close(out, refs[0], np.float32, cond=conds[0])


@pytest.mark.parametrize("tiny", [False, True], ids=["default-tiles", "small-tiles"])
def test_visible_nan_behind_zero_weight_many_tiles(tiny, force):
    """NaN in the V row of a *visible* key whose weight underflows to 0
    (ALiBi distance) reaches the row, as in the oracle (0 * NaN), on packed
    multi-tile items too; hidden keys' NaN still does not."""
    if tiny:
        force(rows=8, keys=16)
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 200, 16), (1, 1, 640, 16), (1, 1, 640, 16)))
    v[0, 0, 639, 0] = np.nan
    case = testing.Case("alibi-underflow", q, k, v, {"scale": 0.01, "alibi_slopes": np.array([0.45])})
    testing.check_case(case, BACKEND, num_threads=2)
    mask = np.ones((1, 1, 200, 640), bool)
    mask[0, 0, :100, 639] = False               # hidden from the first 100 rows only
    case = testing.Case("alibi-underflow-masked", q, k, v,
                        {"scale": 0.01, "alibi_slopes": np.array([0.45]), "mask": mask})
    testing.check_case(case, BACKEND, num_threads=2)


# ---------------------------------------------------------------------------
# attention sinks on the tiled kernel

def _sinks(rng, Hq):
    """One sink logit per query head, of either sign, head 1 without one (-inf)."""
    sinks = rng.standard_normal(Hq) * 3
    sinks[1] = -np.inf
    return sinks


@pytest.mark.parametrize("tiles", ["default-tiles", "small-tiles"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Hkv", [8, 2, 1], ids=["mha", "gqa4", "mqa"])
def test_sinks_prefill(Hkv, dtype, tiles, force):
    """Causal prefill, a chunk after a cache (one batch without keys) and a
    windowed call with a bias, each with a sink per query head: the sink
    counted once per row in the epilogue of every item, prepacked or not."""
    if tiles == "small-tiles":
        force(rows=8, keys=8, decode_keys=12)
    rng = np.random.default_rng(40 + Hkv)
    sinks = _sinks(rng, 8)
    for case in (_case("causal", rng, 2, 8, Hkv, 70, 70, 32, dtype=dtype, causal=True, sinks=sinks),
                 _case("chunk-keyless", rng, 2, 8, Hkv, 40, 300, 16, dtype=dtype, causal=True,
                       key_lens=np.array([300, 0]), sinks=sinks),
                 _case("window-bias", rng, 1, 8, Hkv, 50, 90, 16, dtype=dtype, window=(20, 5),
                       bias=rng.standard_normal((50, 90)), sinks=sinks)):
        assert fastqkv._problem.plan_attention(case.q, case.k, case.v, **case.kwargs).route == "tile"
        for threads in THREADS:
            testing.check_case(case, BACKEND, num_threads=threads)


def test_sinks_dominant_and_no_sink_is_exact():
    """A sink far above every score leaves the output near 0 and lse near
    the sink; sinks of -inf give bit for bit the result without sinks."""
    rng = np.random.default_rng(41)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 30, 16), (1, 2, 30, 16), (1, 2, 30, 16)))
    _compare(q, k, v, causal=True, sinks=np.full(4, 60.0))
    base, base_lse = fastqkv.attention(q, k, v, causal=True, return_lse=True, backend=BACKEND)
    out, lse = fastqkv.attention(q, k, v, causal=True, sinks=np.full(4, -np.inf), return_lse=True,
                                 backend=BACKEND)
    assert np.array_equal(out, base) and np.array_equal(lse, base_lse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sinks_fully_masked_rows(dtype):
    """Rows that see no key (a mask all False for some rows; a key-padding
    mask all False for batch 1, read as a length of 0) give 0 and lse = the
    sink of their head (-inf for head 1, which has none)."""
    rng = np.random.default_rng(42)
    q = rng.standard_normal((2, 4, 6, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 40, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, 40, 16)).astype(dtype)
    sinks = _sinks(rng, 4)
    mask = rng.random((2, 4, 6, 40)) < 0.5
    mask[:, :, 2] = False
    out, lse = _compare(q, k, v, mask=mask, sinks=sinks)
    assert np.all(out[:, :, 2] == 0)
    assert np.array_equal(lse[:, :, 2], np.broadcast_to(sinks.astype(lse.dtype)[None, :], (2, 4)))
    padding = np.ones((2, 1, 1, 40), bool)
    padding[1] = False
    out, lse = _compare(q, k, v, mask=padding, sinks=sinks)
    assert np.all(out[1] == 0)
    assert np.array_equal(lse[1], np.broadcast_to(sinks.astype(lse.dtype)[:, None], (4, 6)))


@pytest.mark.parametrize("native", [True, False], ids=["llvm.maximum", "compare-select"])
def test_maximum_propagates_nan_in_both_lowerings(monkeypatch, native):
    """The row maximum keeps NaN with llvm.maximum and with the
    compare-and-select form older LLVMs get."""
    from numba import njit

    from fastqkv._numba import vec
    monkeypatch.setattr(vec, "_LLVM_MAXIMUM", native)

    @njit(cache=False)
    def row_max(x):
        m = x[0]
        for i in range(1, x.shape[0]):
            m = vec._maximum(m, x[i])
        return m

    for dt in (np.float32, np.float64):
        x = np.array([1.0, -np.inf, 3.0, 2.0], dt)
        assert row_max(x) == 3.0
        x[1] = np.nan
        assert np.isnan(row_max(x))
        x[1], x[0] = 0.0, np.nan
        assert np.isnan(row_max(x))
        assert row_max(np.full(3, -np.inf, dt)) == -np.inf


def test_precompile_groups_the_kernels_of_each_driver_in_one_process():
    from fastqkv._numba import precompile
    keys = [("tile", "float32"), ("stream", "float32"), ("tile", "float64"), ("stream", "uint16")]
    groups = precompile._groups(keys, 2)
    assert groups == [[("tile", "float32"), ("tile", "float64")], [("stream", "float32"), ("stream", "uint16")]]
    assert precompile._groups(keys, 1) == [groups[0] + groups[1]]
    assert precompile._groups(keys[:1], 2) == [keys[:1]]
    assert precompile.parallelism(keys, 2) == 2 and precompile.parallelism(keys, 1) == 1
    assert precompile.describe(("stream", "uint16")) == "streaming float16/bfloat16"
    p = fastqkv._problem.plan_attention(np.zeros((1, 2, 1, 8), np.float16), np.zeros((1, 2, 5, 8), np.float16),
                                         np.zeros((1, 2, 5, 8), np.float16))
    assert precompile.kernel(p) == ("stream", "uint16")
    p = fastqkv._problem.plan_attention(np.zeros((1, 2, 40, 8), np.float16), np.zeros((1, 2, 40, 8), np.float16),
                                         np.zeros((1, 2, 40, 8), np.float16), softcap=5.0)
    assert precompile.kernel(p) == ("tile", "float32")          # half storage widened on the tiled route


def test_a_failing_compile_process_is_reported_in_one_line(monkeypatch):
    from fastqkv._numba import precompile
    monkeypatch.setattr(precompile, "_compile", lambda keys, done: None)    # nothing to compile here
    lines = []
    took = precompile.precompile([("tile", "float32"), ("stream", "nosuch")], 2, lines.append)
    assert took == {}
    assert len(lines) == 1 and lines[0].startswith("  numba: the process compiling streaming nosuch failed ("), lines
    assert lines[0].endswith("they compile at first use")


def test_cache_saves_hold_a_lock_while_precompiling(tmp_path, monkeypatch):
    import fcntl

    from numba.core.caching import IndexDataCacheFile

    from fastqkv._numba import precompile
    plain = IndexDataCacheFile.save
    held = []

    def probe(self, *args, **kwargs):
        with open(tmp_path / precompile.LOCK_NAME, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(args)

    monkeypatch.setattr(IndexDataCacheFile, "save", probe)

    class File:
        _cache_path = str(tmp_path)

    with precompile._serialised_saves():
        IndexDataCacheFile.save(File(), "key", "data")
    assert held == [("key", "data")]
    assert IndexDataCacheFile.save is probe
    monkeypatch.setattr(IndexDataCacheFile, "save", plain)
