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
corrupt, foreign or stale file is ignored with one warning line.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings

from . import _config
from ._validate import storage_name

__all__ = ["call_class", "class_name", "order", "table", "tune", "tune_file", "machine_key",
           "representatives", "SIZE_BOUNDS"]

FORMAT = 1

# upper bounds of the size buckets tiny, small, medium (large above)
SIZE_BOUNDS = (1 << 18, 1 << 24, 1 << 28)
SIZES = ("tiny", "small", "medium", "large")
KINDS = ("decode", "prefill", "encoder")
OPTIONS = ("plain", "paged", "options")


_B0, _B1, _B2 = SIZE_BOUNDS


def call_class(p):
    """The class of a planned Problem, as a hashable tuple ``(kind, dtype
    name, size index, options index)``."""
    work = p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv)
    size = 0 if work < _B0 else 1 if work < _B1 else 2 if work < _B2 else 3
    paged = p.block_table is not None
    if p.route == "stream":
        return 0, storage_name(p.dtype), size, paged
    opts = 2 if (p.mask is not None or p.bias is not None or p.alibi is not None or p.softcap) \
        else paged
    return (1 if p.window_right >= 0 or p.window_left >= 0 else 2,
            "float64" if p.dtype.char == "d" else "float32", size, opts)


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


_UNREAD = object()


def order(p, threads):
    """The backend names auto tries for Problem ``p``, fastest first (the
    class is computed only when this machine has a measured table)."""
    t = _loaded.get(threads, _UNREAD)
    if t is _UNREAD:
        t = table(threads)
    if t is None:
        return _config.AUTO_ORDER
    return t.get(call_class(p), _config.AUTO_ORDER)


def forget():
    """Drop what was read from the tune file (it is read again on next use)."""
    _loaded.clear()
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
            if quick and size == 3:
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
    """Measure every class of :func:`representatives` (``only``: those of
    these class names) on the available fast backends at ``threads``
    threads and write this machine's entry to the tune file (``path``, else
    :func:`tune_file`).  Returns the entry."""
    import numpy as np

    from . import _dispatch
    from ._bench.timing import time_interleaved
    threads = threads or _dispatch.get_num_threads()
    names = [n for n, i in _dispatch.backends().items() if i.available and n != "numpy"]
    path = path or tune_file()
    rng = np.random.default_rng(0)
    orders, medians = {}, {}
    reps = [r for r in representatives(quick) if only is None or r[0] in only]
    prev = _dispatch.get_num_threads()
    _dispatch.set_num_threads(threads)
    try:
        for i, (name, shape, dtype, opt) in enumerate(reps):
            progress(f"[{i + 1}/{len(reps)}] {name} {'x'.join(map(str, shape))}")
            run = _call(shape, dtype, opt, name.split("/")[0], rng)
            fns = {}
            for b in names:
                try:
                    run(b)
                except ValueError:              # the backend does not take this call
                    continue
                fns[b] = (lambda b=b: run(b))
            if not fns:
                continue
            one = time_interleaved({b: f for b, f in list(fns.items())[:1]}, 1, warmup=0, rounds=1,
                                   gap=0.0)
            repeat = max(3, min(15, int(budget / max(min(one.values()), 1e-6))))
            t = time_interleaved(fns, repeat, warmup=1, rounds=3, gap=0.05)
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

