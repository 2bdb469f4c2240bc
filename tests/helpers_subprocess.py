"""Helpers for the reliability tests: the backends under test, and running a
Python snippet in a child process that imports the same fastqkv as this one
(so a segfault or a hang fails one test instead of killing pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import fastqkv

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# the directory holding the fastqkv package this process imported (source tree
# or site-packages): children import exactly that one
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastqkv.__file__)))

# compiled backends run their risky matrices in a child process
COMPILED = ("c", "numba")


def available_backends():
    """Names of the backends available at run time.  ``$FASTQKV_TEST_BACKENDS``
    (comma-separated) narrows the list, e.g. to ``c`` for the sanitizer run."""
    names = [n for n, i in fastqkv.backends().items() if i.available]
    only = os.environ.get("FASTQKV_TEST_BACKENDS", "").strip()
    if only:
        wanted = {s.strip() for s in only.split(",") if s.strip()}
        names = [n for n in names if n in wanted]
    return names


def child_env(extra=None):
    env = dict(os.environ)
    paths = [PACKAGE_PARENT, TESTS_DIR]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONFAULTHANDLER", "1")
    if extra:
        env.update(extra)
    return env


def run_python(code, *, timeout=120, env=None, cwd=None):
    """Run ``code`` (dedented) with this interpreter; returns CompletedProcess
    (``returncode`` negative = killed by that signal).  A timeout is reported
    as returncode ``None`` with whatever output was captured."""
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env(env), cwd=cwd or TESTS_DIR)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(cmd, None, out, err + f"\n[timeout after {timeout} s]")


RECORD_PREFIX = "@@fastqkv-record "


def emit(record):
    """In a child: print one JSON record on its own line, flushed at once (so
    the records before a crash survive it)."""
    sys.stdout.write(RECORD_PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def records(stdout):
    """The records a child emitted, in order."""
    out = []
    for line in stdout.splitlines():
        if line.startswith(RECORD_PREFIX):
            out.append(json.loads(line[len(RECORD_PREFIX):]))
    return out


def run_record(code, *, timeout=300, env=None):
    """Run ``code`` in a child that must exit 0 after emitting a record;
    returns the first record (fails the calling test otherwise)."""
    proc = run_python(code, timeout=timeout, env=env)
    recs = records(proc.stdout)
    if proc.returncode != 0 or not recs:
        import pytest
        pytest.fail(describe(proc))
    return recs[0]


def describe(proc, tail=3000):
    """A failure message for a finished child."""
    rc = proc.returncode
    how = "timed out" if rc is None else (f"was killed by signal {-rc}" if rc < 0 else f"exited {rc}")
    return f"child process {how}\n--- stdout (tail) ---\n{proc.stdout[-tail:]}\n--- stderr (tail) ---\n{proc.stderr[-tail:]}"
