"""``fastqkv.attention`` inside a user's ``@numba.njit`` code (nopython mode).

Role: the Numba overload (``numba.extending.overload``) of
:func:`fastqkv.attention`.  Inside jitted code a call fills the problem
struct of the C API (``fastqkv_args``, 49 words of 8 bytes, see
``fastqkv/include/fastqkv/fastqkv_api.h``) in a buffer on the stack and
calls the C entry point ``attention`` of the table in the capsule
``fastqkv._ckernels._C_API`` directly: no Python object, no GIL, and no
allocation when ``out=`` is given.

Registration.  ``import fastqkv`` does not import numba.  An installed
fastqkv registers this module through Numba's extension entry point
(``[project.entry-points.numba_extensions] init = "fastqkv._njit:_init"``
in pyproject.toml), which Numba runs before its first compilation; a
source tree that is not installed needs ``import fastqkv._njit`` before the
first compilation of a function that calls ``fastqkv.attention``.

Arguments are those of :func:`fastqkv.attention`.  Compile-time constants
(they choose the types or the return value): ``layout``, ``return_lse`` and
``backend`` must be written as constants, and whether each optional array
(``mask``, ``bias``, ``key_lens``, ``alibi_slopes``, ``sinks``, ``out``) and
``scale``/``softcap``/``window`` is given or None must be known when the
function compiles (an Optional type is refused).  ``backend`` is ``"auto"``
or ``"c"``: both call the C entry point.  ``causal``, ``scale``,
``softcap`` and ``window`` may be run-time values.

Each call runs on the calling thread (``num_threads = 1``): call it inside
``numba.prange`` to run a batch of problems in parallel; the caller
parallelises.

Checks.  What Numba sees when it compiles (array dtypes and ranks, the
kinds of scalars, constants) and the shapes the struct cannot express
(batch, heads and lengths of q, k and v agreeing, mask/bias broadcasting,
ALiBi and sinks shapes, ``out``'s shape and overlap) are checked here, and
a failure runs the checks of :mod:`fastqkv._validate` on the same arguments
(in ``numba.objmode``, taking the GIL) to raise exactly the TypeError or
ValueError, with the message, that the Python call raises.  Every other
check is the C entry point's: a non-zero status raises ValueError
(``FASTQKV_EVALUE``), TypeError (``FASTQKV_ETYPE``), MemoryError or
KeyboardInterrupt with the message it wrote.  No value check is repeated
here.

Allocations: ``out`` (and ``lse``) with ``np.empty`` when not given; copies
where the C entry point cannot read an argument in place: q/k/v (or
``out``) with a non-unit last stride, a ``bias`` that is not in the
accumulation dtype.  ALiBi slopes, sinks and key_lens that need a
contiguous copy in the accumulation dtype (int64 for key_lens), e.g.
``(Hq,)`` slopes broadcast to ``(B, Hq)``, are built in the stack buffer up
to 512, 128 and 128 values, on the heap beyond.

Without the C extension (or with a build whose C API has another ABI
version), the overload compiles to a call that raises RuntimeError saying
why; it does not fall back to the Numba backend.  Storage is float32 or
float64: Numba cannot type bfloat16 arrays (ml_dtypes) and types but cannot
compile float16 arrays on the CPU.
Unaligned q/k/v arrays (Numba types them apart) and inputs that are not
arrays (lists, tensors) raise TypeError where the Python call copies or
converts them.
"""


from .entry import (ARGS_WORDS, MESSAGE_BYTES, _FRAME_WORDS, _call_entry, _frame,  # noqa: F401
                    entry_status)
from . import overload  # noqa: F401  (registers the overload)

__all__ = ["entry_status"]


def _init():
    """Numba's extension entry point: importing this package registered the
    overload (and linked the C entry point, for functions loaded from
    Numba's cache)."""

