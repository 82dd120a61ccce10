"""fusedcnn: fast drop-in CNN layers for PyTorch (Triton kernels and a C++/CUDA extension).

    import fusedcnn
    layer = fusedcnn.nn.Conv2d(3, 64, 3, padding=1, backend="auto")
    with fusedcnn.use_backend("reference"):
        y = layer(x)
    fusedcnn.available_backends()   # what can run here
    print(fusedcnn.autotune_report())  # what backend="auto" measured and chose, per call signature
"""
__version__ = "0.1.0"

from fusedcnn import backends as _backends

_backends._cpp_import_error()  # load fusedcnn._C (if built) before the ops register their autograd

from fusedcnn import functional, nn, ops, reference  # noqa: E402,F401
from fusedcnn.backends import BACKENDS, available_backends, current_backend, use_backend  # noqa: E402
from fusedcnn import models  # noqa: E402,F401
from fusedcnn.convert import convert  # noqa: E402  (the function shadows the submodule's name here)
from fusedcnn import autotune  # noqa: E402
from fusedcnn.autotune import report as autotune_report  # noqa: E402

__all__ = ["nn", "functional", "reference", "models", "convert", "use_backend", "available_backends", "current_backend", "BACKENDS",
           "autotune", "autotune_report", "__version__"]
