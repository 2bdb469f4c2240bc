"""The ``c`` backend: thin wrapper over the compiled module ``fastqkv._ckernels``."""

_IMPORT_ERROR = None
try:
    from . import _ckernels
except ImportError as exc:  # the extension was not built (no compiler, failed build)
    _ckernels = None
    _IMPORT_ERROR = exc


def probe():
    if _ckernels is None:
        return False, f"the compiled module fastqkv._ckernels is not importable ({_IMPORT_ERROR})", {}
    return True, "compiled", {}


def supports(problem):
    return "not implemented"


def run(problem, num_threads):
    raise NotImplementedError
