"""Command line: ``fastqkv info | check | bench | tune`` (also ``python -m fastqkv``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from . import _config, _dispatch, _tune

__all__ = ["main"]


def cmd_info(args):
    import numpy as np

    from . import __version__
    print(f"fastqkv {__version__}")
    print(f"python {platform.python_version()} ({sys.executable}), numpy {np.__version__}, "
          f"machine {platform.machine()}")
    print(f"threads: {_dispatch.get_num_threads()} (set_num_threads / ${_config.ENV_NUM_THREADS})")
    print(f"backend for 'auto': {_dispatch.get_backend()} (per call class: the order measured by "
          f"`fastqkv tune`, else {', '.join(_config.AUTO_ORDER)}; ${_config.ENV_BACKEND} overrides)")
    for line in _tune.describe(_dispatch.get_num_threads()):
        print(line)
    for name in (_config.ENV_BACKEND, _config.ENV_NUM_THREADS, _config.ENV_ISA, _config.ENV_TUNE_FILE):
        if name in os.environ:
            print(f"  ${name}={os.environ[name]}")
    print("backends:")
    for name, info in _dispatch.backends().items():
        state = "available" if info.available else "not available"
        print(f"  {name:6s} {state}: {info.reason}")
        for key, val in info.details.items():
            print(f"         {key}: {val}")
    return 0


def cmd_check(args):
    from . import testing
    names = args.backend or [n for n, i in _dispatch.backends().items() if i.available]
    unknown = [n for n in names if n not in _dispatch.BACKEND_MODULES]
    if unknown:
        print(f"unknown backend(s): {', '.join(unknown)}; known: {', '.join(_dispatch.BACKEND_MODULES)}",
              file=sys.stderr)
        return 2
    threads = sorted({1, _dispatch.get_num_threads()})
    cases = testing.generate_cases(quick=args.quick, seed=args.seed)
    failures = 0
    for name in names:
        info = _dispatch.backends()[name]
        if not info.available:
            print(f"{name}: skipped, not available ({info.reason})")
            continue
        t0 = time.perf_counter()
        ran = skipped = 0
        for nt in threads:
            for case in cases:
                try:
                    testing.check_case(case, name, num_threads=nt)
                    ran += 1
                except ValueError as exc:
                    if "does not support" in str(exc):
                        skipped += 1
                        continue
                    raise
                except AssertionError as exc:
                    failures += 1
                    print(f"FAIL {name} threads={nt}: {exc}")
        dt = time.perf_counter() - t0
        note = f", {skipped} unsupported" if skipped else ""
        print(f"{name}: {ran} checks at threads {threads} in {dt:.1f} s{note}")
    if failures:
        print(f"{failures} mismatch(es) against the oracle")
        return 1
    print("all backends agree with the oracle")
    return 0


def cmd_bench(args):
    try:
        from . import _bench
    except ImportError as exc:
        print(f"fastqkv bench is not available in this installation ({exc})", file=sys.stderr)
        return 2
    return _bench.main(args)


def cmd_tune(args):
    threads = args.threads or _dispatch.get_num_threads()
    path = _tune.tune_file()
    print(f"fastqkv tune: timing the backends per call class at {threads} threads "
          f"({'quick' if args.quick else 'full'}); the first run compiles Numba kernels once")
    t0 = time.perf_counter()
    entry = _tune.tune(threads=threads, quick=args.quick,
                       progress=lambda line: print(f"  {line}", flush=True))
    print(f"wrote {len(entry['order'])} classes to {path} in {time.perf_counter() - t0:.0f} s")
    for line in _tune.describe(threads)[1:]:
        print(line)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="fastqkv", description="fused CPU attention: info, checks, benchmarks")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends (and why not), ISA, threads")
    c = sub.add_parser("check", help="every available backend against the NumPy oracle")
    c.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    c.add_argument("--quick", action="store_true", help="a smaller case list")
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tune", help="time the backends per call class; auto then follows the result")
    t.add_argument("--quick", action="store_true", help="float32/bfloat16 and the smaller sizes only")
    t.add_argument("--threads", type=int, default=None, help="thread count to tune for (default: current)")
    b = sub.add_parser("bench", help="benchmark the shape classes against the machine and peers")
    try:
        from . import _bench
        _bench.add_arguments(b)
    except ImportError:
        pass
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    handler = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "tune": cmd_tune}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
