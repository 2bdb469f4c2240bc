"""What the drivers receive besides the arrays: flag bits and workspace carving.

Contract: the ``flags`` bits a driver call carries (which optional inputs
are real, and whether K/V are a paged cache), and the jitted helpers that
cut a thread's scratch out of the caller's flat workspace.
"""

from __future__ import annotations

from numba import njit

# bits of the `flags` argument
HAS_LSE = 1
HAS_MASK = 2
HAS_BIAS = 4
HAS_KEY_LENS = 8
HAS_ALIBI = 16
PAGED = 32            # streaming driver only: K/V are a paged cache


@njit(nogil=True, cache=True, inline="always")
def _a16(n):
    """``n`` rounded up to 16 elements (64 bytes or more)."""
    return (n + 15) & ~15


@njit(nogil=True, cache=True, inline="always")
def _carve(ws, at, n):
    """``ws[at:at+n]`` and ``at + n``."""
    return ws[at:at + n], at + n


@njit(nogil=True, cache=True, inline="always")
def _carve16(ws, at, n):
    """``ws[at:at+n]`` and the next start, rounded up to 16 elements: with
    ``ws`` 64-byte aligned, every scratch array starts on a cache line."""
    return ws[at:at + n], at + _a16(n)
