"""The one dispatch point: which implementation runs an op.

Backends (docs/ARCHITECTURE.md):
  torch      PyTorch's own layers (cuDNN / oneDNN): the baseline
  reference  first-principles PyTorch tensor code: readable, the test oracle
  triton     Triton kernels: CUDA tensors; CPU tensors only under TRITON_INTERPRET=1
  cpp        the compiled extension fusedcnn._C: CPU always, CUDA when built with nvcc

Choice, strongest first: an explicit ``backend=`` argument (a module's or a
functional's), ``with fusedcnn.use_backend(name):``, the environment variable
``FUSEDCNN_BACKEND``, then ``"auto"``. Only ``"auto"`` falls back quietly to
the next available backend; a backend asked for by name that cannot serve the
call raises a RuntimeError that says why.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

from fusedcnn.common import triton_interpreted

BACKENDS = ("torch", "reference", "triton", "cpp")
CHOICES = BACKENDS + ("auto",)

# "auto" measures (fusedcnn.autotune: the fastest backend that agrees with torch, per call signature). This is
# the static order it falls back to: with FUSEDCNN_AUTOTUNE=0, under torch.compile tracing, and for calls it
# cannot replay. It follows the committed measurements (benchmarks/NOTES.md): on CPU per family; on CUDA torch
# until a GPU record shows a fusedcnn kernel ahead. On CPU the Triton interpreter is never an automatic choice.
_AUTO_ORDER = {
    "cuda": ("torch",),
    "cpu": ("torch",),
}
# Families where another order is faster (measured; see benchmarks/NOTES.md).
_AUTO_ORDER_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {}
# (backend, device type) -> {family: dtypes its kernels do not take there}; "auto" passes over such a backend.
# cpp on CUDA: the BatchNorm and pooling kernels take float32, float16 and bfloat16 (the fused family composes them).
_UNSUPPORTED_DTYPES: dict[tuple[str, str], dict[str, tuple[torch.dtype, ...]]] = {
    ("cpp", "cuda"): {"batchnorm": (torch.float64,), "pooling": (torch.float64,), "fused": (torch.float64,)},
}

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedcnn_backend", default=None)
# torch.compile traces _chosen.get() from torch 2.14 on (read at trace time, guarded). torch 2.13's Dynamo cannot
# (a graph break; an error under fullgraph=True), so there use_backend also keeps the choice in this module global,
# which compiled code reads instead: Dynamo guards on it, so a new choice recompiles. (Process-wide, not per thread
# or task: on torch 2.13, compiled code in two threads under different use_backend blocks sees the latest choice.)
_TRACE_CONTEXTVAR = torch.__version__ >= (2, 14)
_chosen_for_compile: str | None = None


_ENV = getattr(os.environ, "_data", None)  # the dict behind os.environ (POSIX: encoded bytes keys and values)


def getenv(name: str) -> str | None:
    """os.environ.get(name), read on every layer call: os.environ.get costs ~1 us (it encodes the key each
    time), a lookup in the dict behind it with the key encoded once ~0.1 us. Sees every os.environ change."""
    if _ENV is None or torch.compiler.is_compiling():
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    value = _ENV.get(key)
    return None if value is None else os.environ.decodevalue(value)


_ENV_KEYS: dict[str, object] = {}


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"fusedcnn: unknown backend {name!r}{where}; expected one of {', '.join(CHOICES)}")
    return name


def check_backend_arg(name: str) -> str:
    """Validate a module's or functional's `backend=` argument (ValueError for an unknown name)."""
    return _check_name(name, "")


# ---------------------------------------------------------------- availability
_import_errors: dict[str, str | None] = {}  # checked once per process (a plain dict: torch.compile traces it)


def _cpp_import_error() -> str | None:
    """None when fusedcnn._C loaded, else why not."""
    if "cpp" not in _import_errors:
        try:
            from fusedcnn import _C  # noqa: F401  (registers the torch.ops.fusedcnn schemas)
            _import_errors["cpp"] = None
        except ImportError as e:
            _import_errors["cpp"] = f"the compiled extension fusedcnn._C is not built or failed to load ({e})"
    return _import_errors["cpp"]


def cpp_built_with_cuda() -> bool:
    """True when fusedcnn._C holds CUDA kernels (nvcc was present at build time)."""
    if _cpp_import_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedcnn::relu", "CUDA")


def _triton_import_error() -> str | None:
    if "triton" not in _import_errors:
        missing = importlib.util.find_spec("triton") is None
        _import_errors["triton"] = "the triton package is not installed (pip install triton)" if missing else None
    return _import_errors["triton"]



def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on `device_type` tensors, or None if it can."""
    if name in ("torch", "reference"):
        return None
    if name == "triton":
        why = _triton_import_error()
        if why:
            return why
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            return None if triton_interpreted() else (
                "Triton kernels run on CUDA tensors; on CPU tensors only under the interpreter "
                "(set TRITON_INTERPRET=1 before importing fusedcnn)")
        return f"Triton kernels do not run on {device_type} tensors"
    if name == "cpp":
        why = _cpp_import_error()
        if why:
            return why
        if device_type == "cpu":
            return None
        if device_type == "cuda":
            return None if cpp_built_with_cuda() else (
                "fusedcnn._C was built without CUDA (no nvcc at build time, or FUSEDCNN_BUILD_CUDA=0); "
                "rebuild with nvcc on PATH to run the cpp backend on CUDA tensors")
        return f"the cpp backend does not run on {device_type} tensors"
    raise ValueError(f"fusedcnn: unknown backend {name!r}")


def dtype_supported(name: str, device_type: str, family: str, dtype: torch.dtype) -> bool:
    """Whether backend `name`'s kernels of layer family `family` take `dtype` on `device_type` tensors."""
    return dtype not in _UNSUPPORTED_DTYPES.get((name, device_type), {}).get(family, ())


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The backends that can run on `device` (default: cuda if a GPU is present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


# ---------------------------------------------------------------- selection
@contextlib.contextmanager
def use_backend(name: str):
    """Run the fusedcnn layers inside the block with backend `name` (unless a layer names its own)."""
    global _chosen_for_compile
    token = _chosen.set(_check_name(name, " in use_backend()"))
    outer, _chosen_for_compile = _chosen_for_compile, name
    try:
        yield
    finally:
        _chosen.reset(token)
        _chosen_for_compile = outer


def current_backend() -> str:
    """The backend in force here when no layer names one: use_backend, else FUSEDCNN_BACKEND, else auto."""
    if _TRACE_CONTEXTVAR or not torch.compiler.is_compiling():
        name = _chosen.get()
    else:
        name = _chosen_for_compile
    if name is not None and name != "auto":
        return name
    env = getenv("FUSEDCNN_BACKEND")
    if env:
        return _check_name(env.strip(), " in the environment variable FUSEDCNN_BACKEND")
    return "auto"


def device_type_of(x: torch.Tensor) -> str:
    """x.device.type, in ~0.1 us instead of ~0.4 (x.device builds a torch.device object) for CPU and CUDA."""
    return "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type


def choose(requested: str | None, x: torch.Tensor, family: str) -> str | None:
    """The backend named for layer family `family` on tensor x, or None for "auto" (fusedcnn.autotune measures;
    static_choice is its fallback). `requested` is the layer's own choice: None or "auto" defer to the context.
    A named backend that cannot run here raises."""
    if requested is not None and requested not in CHOICES:
        _check_name(requested, "")
    name = requested if requested not in (None, "auto") else current_backend()
    if name == "auto":
        return None
    device_type = device_type_of(x)
    why = unavailable_reason(name, device_type)
    if why is not None:
        raise RuntimeError(f"fusedcnn: backend '{name}' cannot run {family} on {device_type} tensors: {why}")
    return name


def static_choice(family: str, x: torch.Tensor) -> str:
    """"auto" without measuring: the first backend of the static order that can run `family` on x."""
    device_type = x.device.type
    order = _AUTO_ORDER_OVERRIDES.get((device_type, family), _AUTO_ORDER.get(device_type, ("torch",)))
    for candidate in order:
        if unavailable_reason(candidate, device_type) is None and dtype_supported(candidate, device_type, family,
                                                                                   x.dtype):
            return candidate
    return "torch"


def resolve(requested: str | None, x: torch.Tensor, family: str) -> str:
    """The backend that runs layer family `family` on tensor x ("auto": the static order's choice)."""
    return choose(requested, x, family) or static_choice(family, x)
