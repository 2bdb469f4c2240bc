"""The ``numba`` backend (lazy: numba is imported on first use)."""


def probe():
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return False, f"numba is not installed ({exc})", {}
    return False, "the Numba kernels are not implemented yet", {}


def supports(problem):
    return "not implemented"


def run(problem, num_threads):
    raise NotImplementedError
