"""``fastqkv bench``: this machine's limits, the shape classes of the design
(section 3) over every available backend and the peers PyTorch SDPA and ONNX
Runtime, checked against the oracle, with auto's choice next to the fastest.

The package, one module per role:

- :mod:`.cases`     THE shape list (:func:`shape_classes`), :class:`BenchCase`, :class:`Skip`
- :mod:`.inputs`    arrays for a case (:func:`make_inputs`), paged copies
- :mod:`.checks`    the oracle check, and the package's one use of the planner
- :mod:`.runners`   :func:`prepare`: a runner name -> ``(call, fetch, note)``
- :mod:`.peers`     PyTorch SDPA and ONNX Runtime in their fastest forms
- :mod:`.onnx_model` one-node ONNX models (the ``onnx`` package, imported lazily)
- :mod:`.machine`   sgemm, read bandwidth, load of a shared machine
- :mod:`.timing`    THE timer (:class:`Timer`) and turn-taking
- :mod:`.report`    progress, table, auto lines, plot, JSON
- :mod:`.cli`       :func:`add_arguments`, :func:`main`

The ``bench/`` scripts and the pytest-benchmark suite import these; the
package does not depend on that folder.  Optional pieces (rich, matplotlib,
torch, onnxruntime, onnx, threadpoolctl, ml_dtypes) are used when importable
and skipped with one line otherwise.
"""

from .cases import SIZES, BenchCase, Skip, shape_classes
from .checks import check
from .cli import add_arguments, main
from .inputs import Inputs, make_inputs
from .machine import measure_machine
from .peers import PEERS, torch_sdpa
from .runners import numpy_seconds, prepare

__all__ = ["BenchCase", "shape_classes", "make_inputs", "prepare", "check", "Skip", "Inputs",
           "measure_machine", "add_arguments", "main", "PEERS", "SIZES", "numpy_seconds", "torch_sdpa"]
