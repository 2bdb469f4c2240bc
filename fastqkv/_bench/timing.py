"""The one timer of the benchmarks.

Contract: a :class:`Timer` wraps one call; :meth:`Timer.warm` pays the first
call (JIT compile, caches) and sizes a sample so that it lasts about a target
time; :meth:`Timer.sample` times ``inner`` consecutive calls and records the
mean; :meth:`Timer.run` samples until a count and a time budget are met (or,
asked to, sooner once the spread of the samples is small);
:meth:`Timer.stats` gives the median and the spread.  Contenders that must
see the same load take turns through :func:`take_turns` (blocks of calls,
each after :func:`settle`, which waits until the previous contender's
spinning worker threads are asleep).  The clock is ``time.perf_counter`` unless a
timer is given another (``time.process_time`` for CPU time).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


# Timer.run with ``steady``: samples in all, and from the call, before it may stop early
STEADY_SAMPLES = 5
STEADY_FRESH = 2


@dataclass
class Timer:
    name: str
    call: Callable
    inner: int = 1
    clock: Callable = time.perf_counter
    samples: list = field(default_factory=list)
    spent: float = 0.0
    first_ms: float = 0.0

    def warm(self, target=None, calls=1):
        """Make the first ``calls`` untimed calls (the first one's time is
        ``first_ms``); with ``target`` seconds, time one more call and set
        ``inner`` so a sample lasts about ``target``.  Returns the first
        call's result."""
        t0 = self.clock()
        raw = self.call()                      # first call: JIT compile, caches
        self.first_ms = (self.clock() - t0) * 1e3
        for _ in range(calls - 1):
            self.call()
        if target is not None:
            t1 = self.clock()
            self.call()
            dt = max(self.clock() - t1, 1e-7)
            self.inner = max(1, min(10000, int(target / dt)))
        return raw

    def sample(self):
        call, n, clock = self.call, self.inner, self.clock
        t0 = clock()
        for _ in range(n):
            call()
        dt = clock() - t0
        self.spent += dt
        self.samples.append(dt / n)

    def run(self, samples, budget=0.0, cap=math.inf, most=math.inf, steady=0.0):
        """Sample until there are ``samples`` samples and ``budget`` seconds
        spent (or ``most`` samples), or, past 3 samples, ``cap`` seconds.
        With ``steady``, stop before the budget once there are ``samples``
        and :data:`STEADY_SAMPLES` samples, :data:`STEADY_FRESH` of them from
        this call, and their spread (:meth:`stats`) is at most ``steady`` (a
        fraction of the median)."""
        first = len(self.samples)
        while True:
            n = len(self.samples)
            if n >= 3 and self.spent >= cap:
                return self
            if n >= samples and (self.spent >= budget or n >= most):
                return self
            if (steady and n >= max(samples, STEADY_SAMPLES) and n - first >= STEADY_FRESH
                    and self.stats()[1] <= 100.0 * steady):
                return self
            self.sample()

    def median(self):
        """Median seconds per call."""
        return statistics.median(self.samples)

    def stats(self):
        """Median ms and spread: half the interquartile range, in % of the median."""
        s = self.samples
        med = statistics.median(s)
        if len(s) < 2 or med <= 0:
            return med * 1e3, 0.0
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return med * 1e3, 50.0 * (q3 - q1) / med


# settle: windows of this many seconds, this many quiet ones in a row, and
# the CPU share (of one core) under which a window is quiet
SETTLE_WINDOW_S = 0.005
SETTLE_QUIET = 4
SETTLE_BUSY = 0.1


def settle(most):
    """Sleep until this process's other threads are idle (the worker threads
    of the contender that ran last spin a while before they sleep: ONNX
    Runtime's pool for about 0.1 s, OpenMP and TBB pools for milliseconds):
    ``SETTLE_QUIET`` windows in a row in which the process used under
    ``SETTLE_BUSY`` of a core; at most ``most`` seconds."""
    if most <= 0:
        return
    end = time.perf_counter() + most
    quiet = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while quiet < SETTLE_QUIET and t0 < end:
        time.sleep(SETTLE_WINDOW_S)
        c1, t1 = time.process_time(), time.perf_counter()
        quiet = quiet + 1 if c1 - c0 < SETTLE_BUSY * (t1 - t0) else 0
        c0, t0 = c1, t1


def take_turns(timers, rounds, gap, block):
    """``rounds`` rotations over ``timers``: before each timer's turn
    :func:`settle` (at most ``gap`` seconds), then call ``block(timer,
    round)``.  Load changes of a shared machine so hit every contender alike."""
    for r in range(rounds):
        for t in timers:
            settle(gap)
            block(t, r)


# time_interleaved opens a block with an untimed call unless the contender's
# last sample took at least this long (waking its threads is then noise)
OPEN_BELOW_S = 0.002


def time_interleaved(fns, repeat, warmup=2, rounds=3, gap=0.3):
    """Median seconds of each function of ``{name: fn}``: ``warmup`` calls
    each (none: the caller made them), then :func:`take_turns` in ``rounds``
    blocks of single-call samples (about ``repeat`` in all), each block opened
    by one untimed call so the contender's own threads are awake, unless its
    calls take ``OPEN_BELOW_S`` or longer."""
    timers = [Timer(name, fn) for name, fn in fns.items()]
    if warmup:
        for t in timers:
            t.warm(calls=warmup)
    per_block = max(1, -(-repeat // rounds))

    def block(t, _r):
        if not t.samples or t.samples[-1] < OPEN_BELOW_S:
            t.call()
        for _ in range(per_block):
            t.sample()

    take_turns(timers, rounds, gap, block)
    return {t.name: t.median() for t in timers}


def median_seconds(fn, repeat, warmup=2, min_time=0.0, most=math.inf, clock=time.perf_counter):
    """Median seconds of ``fn`` after ``warmup`` calls: at least ``repeat``
    single-call samples and ``min_time`` seconds (at most ``most`` samples)."""
    t = Timer("", fn, clock=clock)
    t.warm(calls=warmup)
    return t.run(repeat, budget=min_time, most=most).median()
