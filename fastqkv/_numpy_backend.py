"""The ``numpy`` backend: the oracle's dense float64 computation.

Always available; slow (it materialises the ``Lq x Lk`` scores per batch).
"""

from . import reference


def probe():
    return True, "always available (dense NumPy, float64 inside)", {}


def supports(problem):
    return None


def run(problem, num_threads):
    reference._attention_problem(problem)
