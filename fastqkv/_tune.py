"""The measured choice of ``backend="auto"``: call classes, the tune file and
the measurement behind ``fastqkv tune``.

A call's class is ``(kind, dtype, size, options)``: kind ``decode`` (the
streaming route), ``prefill`` (tiled, causal or windowed) or ``encoder``
(tiled, full); the dtype the kernel reads (half storage on the tiled route is
widened, so it counts as float32 there); a size bucket of the work
``B*Hq*Lq*Lk*(D+Dv)`` (:data:`SIZE_BOUNDS`); and ``plain``, ``paged`` or
``options`` (mask, bias, ALiBi or softcap).

``fastqkv tune`` times the fast backends on one representative call per
class (:func:`representatives`) and writes, per machine, the backends of each
class fastest first into a small versioned JSON file
(``$FASTQKV_TUNE_FILE``, else ``fastqkv/tune.json`` in the user's cache
directory).  The file holds one entry per machine key (CPU model, the ISA
each backend compiled for, thread count, fastqkv version); auto uses the
entry of this machine and thread count, and the neutral order
``_config.AUTO_ORDER`` for a class the entry lacks or without an entry.  A
measurement of some classes only (``fastqkv bench`` times those its cases
need) is merged into the entry.  A corrupt, foreign or stale file is ignored
with one warning line.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings

from . import _config
from ._validate import storage_name

__all__ = ["call_class", "class_name", "order", "table", "tune", "tune_file", "machine_key",
           "representatives", "SIZE_BOUNDS"]

FORMAT = 1

# upper bounds of the size buckets tiny, small, medium (large above)
SIZE_BOUNDS = (1 << 18, 1 << 24, 1 << 28)
SIZES = ("tiny", "small", "medium", "large")
# a quick measurement (``fastqkv tune --quick``, ``fastqkv bench --quick``)
# leaves out the size buckets from this index on: the largest representative
# costs more than all the others
QUICK_SIZES = 3
KINDS = ("decode", "prefill", "encoder")
OPTIONS = ("plain", "paged", "options")


_B0, _B1, _B2 = SIZE_BOUNDS


def _bucket(work):
    """The size index of ``work`` (:data:`SIZE_BOUNDS`)."""
    return 0 if work < _B0 else 1 if work < _B1 else 2 if work < _B2 else 3


def _tile_dtype(name):
    """The dtype a tiled call computes in (half storage is widened)."""
    return "float64" if name == "float64" else "float32"


def _variant(p):
    """The route-and-options index of a planned Problem: streaming, plain 0
    or paged 1; tiled, ``2 + 3 * prefill`` (causal or windowed; else an
    encoder) plus its options index: plain 0, paged 1, ``options`` 2 (mask,
    bias, ALiBi or softcap, whether paged or not)."""
    paged = 1 if p.block_table is not None else 0
    if p.route == "stream":
        return paged
    opts = 2 if (p.mask is not None or p.bias is not None or p.alibi is not None or p.softcap) else paged
    return 2 + 3 * (p.window_right >= 0 or p.window_left >= 0) + opts


# (kind index, options index) of each _variant
_VARIANTS = ((0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (1, 0), (1, 1), (1, 2))


def call_class(p):
    """The class of a planned Problem, as a hashable tuple ``(kind, dtype
    name, size index, options index)``."""
    kind, opts = _VARIANTS[_variant(p)]
    name = storage_name(p.dtype)
    return (kind, name if kind == 0 else _tile_dtype(name), _bucket(p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv)),
            opts)


def class_name(cls):
    """``"decode/float32/large/plain"`` for a :func:`call_class` tuple."""
    kind, dtype, size, opts = cls
    return f"{KINDS[kind]}/{dtype}/{SIZES[size]}/{OPTIONS[opts]}"


def _parse_class(name):
    kind, dtype, size, opts = name.split("/")
    return KINDS.index(kind), dtype, SIZES.index(size), OPTIONS.index(opts)


# ---------------------------------------------------------------------------
# the file

def tune_file():
    """The tune file's path: ``$FASTQKV_TUNE_FILE``, else ``fastqkv/tune.json``
    under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    env = os.environ.get(_config.ENV_TUNE_FILE, "").strip()
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastqkv", "tune.json")


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads):
    """What a measurement depends on: CPU model, each available backend's
    ISA, the thread count and fastqkv's version."""
    from . import __version__, _dispatch
    isas = []
    for name, info in _dispatch.backends().items():
        if info.available and name != "numpy":
            isas.append(f"{name}:{info.details.get('isa', '?')}")
    return f"{cpu_model()} | {' '.join(isas)} | threads {threads} | fastqkv {__version__}"


_loaded = {}          # threads -> {class tuple: backend names}, or None (no entry)
_index = {}           # threads -> {dtype: variants, None: table} (see order), or AUTO_ORDER
_warned = []


def _warn_once(msg):
    if not _warned:
        _warned.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _read(path):
    """The file's entries ``{machine key: {class name: [backends]}}``; {} when
    there is no file; raises ValueError when it is not a tune file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("machines"), dict):
        raise ValueError(f"not a fastqkv tune file of format {FORMAT}")
    return doc["machines"]


def table(threads):
    """``{class tuple: (backend, ...)}`` measured on this machine at
    ``threads`` threads (each order completed by ``_config.AUTO_ORDER``),
    or None when the tune file has no such entry."""
    if threads in _loaded:
        return _loaded[threads]
    path = tune_file()
    result = None
    try:
        entry = _read(path).get(machine_key(threads))
        if entry is not None:
            result = {}
            for name, measured in entry["order"].items():
                if not all(isinstance(b, str) for b in measured):
                    raise ValueError(f"class {name!r} lists {measured!r}")
                result[_parse_class(name)] = tuple(measured) + tuple(
                    n for n in _config.AUTO_ORDER if n not in measured)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        _warn_once(f"fastqkv: ignoring the tune file {path}: {exc}; "
                   f"run `fastqkv tune` to measure this machine again")
        result = None
    _loaded[threads] = result
    return result


_AUTO = _config.AUTO_ORDER


def _ladder(t, kind, dtype, opts):
    """The orders of one class over the size buckets: the order itself
    (a tuple) when every size has the same one, else a list by size index."""
    orders = [t.get((kind, dtype, size, opts), _AUTO) for size in range(len(SIZES))]
    return orders[0] if orders.count(orders[0]) == len(orders) else orders


def _variants(t, name):
    """The ladders of storage dtype ``name``, by :func:`_variant`."""
    dt = _tile_dtype(name)
    return [_ladder(t, kind, name if kind == 0 else dt, opts) for kind, opts in _VARIANTS]


def order(p, threads):
    """The backend names auto tries for Problem ``p``, fastest first: the
    measured order of :func:`call_class` of ``p``, else ``_config.AUTO_ORDER``.

    The table read from the file is indexed by the problem's dtype object
    (an entry built at the first call with that dtype), then by
    :func:`_variant`; each holds one order, or a list by size bucket when
    the class's orders differ by size, so only then is the size computed
    (:func:`_bucket`; it and the streaming part of :func:`_variant` are
    inlined, and ``tests/test_dispatch.py`` holds this lookup equal to
    :func:`call_class`)."""
    t = _index.get(threads)
    if t is None:
        t = table(threads)
        t = _index[threads] = _AUTO if t is None else {None: t}
    if t is _AUTO:
        return _AUTO
    try:
        v = t[p.dtype]
    except KeyError:
        v = t[p.dtype] = _variants(t[None], storage_name(p.dtype))
    if p.route == "stream":                                 # _variant, inlined for decode
        ladder = v[p.block_table is not None]
    else:
        ladder = v[_variant(p)]
    if ladder.__class__ is tuple:
        return ladder
    work = p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv)        # _bucket, inlined
    return ladder[0 if work < _B0 else 1 if work < _B1 else 2 if work < _B2 else 3]


def forget():
    """Drop what was read from the tune file (it is read again on next use)."""
    _loaded.clear()
    _index.clear()
    _warned.clear()


# ---------------------------------------------------------------------------
# the measurement

# representative calls per (kind, size): (B, Hq, Hkv, Lq, Lk, D)
_SHAPES = {
    "decode": [(1, 8, 8, 1, 64, 64), (1, 32, 8, 1, 1024, 128), (4, 32, 8, 1, 2048, 128),
               (8, 32, 8, 1, 4096, 128)],
    "prefill": [(1, 1, 1, 32, 32, 32), (1, 2, 2, 128, 128, 64), (1, 8, 8, 256, 256, 64),
                (1, 32, 8, 1024, 1024, 128)],
    "encoder": [(2, 1, 1, 32, 32, 32), (2, 2, 2, 128, 128, 64), (8, 12, 12, 128, 128, 64),
                (8, 12, 12, 512, 512, 64)],
}


def representatives(quick=False):
    """``[(class name, shape, dtype name, options)]``: one call per class
    that ``fastqkv tune`` measures (``quick``: float32 and bfloat16 only,
    without the largest size)."""
    from ._validate import bfloat16
    half = ["float16"] + (["bfloat16"] if bfloat16() is not None else [])
    out = []
    for kind, shapes in _SHAPES.items():
        for size, shape in enumerate(shapes):
            if quick and size >= QUICK_SIZES:
                continue
            if kind == "decode":
                dtypes = ["float32"] + half + ["float64"]
                opts = ["plain", "paged"]
            else:
                dtypes = ["float32", "float64"]
                opts = ["plain", "options"]
            if quick:
                dtypes = [d for d in dtypes if d in ("float32", "bfloat16")]
            for dt in dtypes:
                for opt in opts:
                    name = f"{kind}/{dt}/{SIZES[size]}/{opt}"
                    out.append((name, shape, dt, opt))
    return out


def _call(shape, dtype, opt, kind, rng):
    """``fn(backend)`` running the representative call of one class."""
    import numpy as np

    from . import _api, testing
    B, Hq, Hkv, Lq, Lk, D = shape
    dt = testing.as_dtype(dtype)
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dt)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dt)
    v = rng.standard_normal((B, Hkv, Lk, D)).astype(dt)
    kw = {"causal": kind != "encoder"}
    if opt == "options":
        pad = np.ones((B, 1, 1, Lk), bool)
        pad[..., Lk - Lk // 8:] = False
        kw["mask"] = pad
    out = np.empty((B, Hq, Lq, D), dt)
    if opt == "paged":
        bs = 16
        kc, vc, bt = testing.paged_cache(k, v, bs, rng, np.full(B, Lk))
        return lambda name: _api.paged_attention(q, kc, vc, bt, np.full(B, Lk), out=out, backend=name)
    return lambda name: _api.attention(q, k, v, out=out, backend=name, **kw)


# backends within this factor of the fastest count as tied (timing noise of a
# shared machine): they keep the neutral order among themselves
TIE = 1.03


def _rank(seconds):
    """Backend names by median ``seconds``, fastest first; the ones tied with
    the fastest in ``_config.AUTO_ORDER``'s order."""
    best = min(seconds.values())
    tied = [b for b in _config.AUTO_ORDER if b in seconds and seconds[b] <= best * TIE]
    return tied + sorted((b for b in seconds if b not in tied), key=seconds.get)


def tune(threads=None, quick=False, path=None, progress=print, budget=0.15, only=None):
    """Measure every class of :func:`representatives` on the available fast
    backends at ``threads`` threads and write this machine's entry to the
    tune file (``path``, else :func:`tune_file`).  ``only``: the classes of
    these names (of all representatives, whatever ``quick``), merged into the
    entry the file holds.  Returns the entry."""
    import numpy as np

    from . import _dispatch
    from ._bench.timing import time_interleaved
    threads = threads or _dispatch.get_num_threads()
    names = [n for n, i in _dispatch.backends().items() if i.available and n != "numpy"]
    path = path or tune_file()
    rng = np.random.default_rng(0)
    orders, medians = {}, {}
    reps = representatives(quick) if only is None else [r for r in representatives() if r[0] in only]
    prev = _dispatch.get_num_threads()
    _dispatch.set_num_threads(threads)
    try:
        for i, (name, shape, dtype, opt) in enumerate(reps):
            progress(f"[{i + 1}/{len(reps)}] {name} {'x'.join(map(str, shape))}")
            run = _call(shape, dtype, opt, name.split("/")[0], rng)
            fns = {}
            for b in names:
                try:
                    run(b)                      # the first call: compile, caches
                except ValueError:              # the backend does not take this call
                    continue
                fns[b] = (lambda b=b: run(b))
            if not fns:
                continue
            t0 = time.perf_counter()
            next(iter(fns.values()))()          # a warm call sizes the samples
            one = time.perf_counter() - t0
            repeat = max(3, min(15, int(budget / max(one, 1e-6))))
            t = time_interleaved(fns, repeat, warmup=0, rounds=3, gap=0.05)
            orders[name] = _rank(t)
            medians[name] = {b: round(s * 1e6, 2) for b, s in t.items()}
    finally:
        _dispatch.set_num_threads(prev)
    entry = {"order": orders, "median_us": medians}
    key = machine_key(threads)
    try:
        machines = _read(path)
    except ValueError:
        machines = {}
    held = machines.get(key)
    if only is not None and isinstance(held, dict):
        entry = {field: {**(held.get(field) if isinstance(held.get(field), dict) else {}), **value}
                 for field, value in entry.items()}
    machines[key] = entry
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "machines": machines}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    forget()
    return entry


def describe(threads):
    """Lines for ``fastqkv info``: the tune file and the order of each class."""
    path = tune_file()
    t = table(threads)
    if t is None:
        return [f"tune file: {path}: no entry for this machine at {threads} threads "
                f"(auto uses {', '.join(_config.AUTO_ORDER)}; `fastqkv tune` measures)"]
    lines = [f"tune file: {path} ({machine_key(threads)})"]
    for cls in sorted(t):
        lines.append(f"  {class_name(cls):34s} {', '.join(t[cls])}")
    return lines

