"""What every family's ops module shares: the compiled ops of each backend and their registration.

A layer family has, per compiled backend, a forward op and a backward op:
  cpp:    torch.ops.fusedcnn.<name>          schema in csrc/ops.cpp, kernels in csrc/<family>/
  triton: torch.ops.fusedcnn.triton_<name>   a torch.library.custom_op over fusedcnn.triton_kernels
Both get the same fake (shape) function and the same autograd formula, so
torch.compile traces and torch.library.opcheck tests either one.
"""
from __future__ import annotations

from typing import Callable

import torch

from fusedcnn import backends

COMPILED_BACKENDS = ("triton", "cpp")


def op(backend: str, name: str):
    """The torch.ops op (OpOverload) implementing `name` in `backend` ("triton" or "cpp")."""
    qualified = name if backend == "cpp" else f"triton_{name}"
    return getattr(torch.ops.fusedcnn, qualified).default


def registered_backends() -> list[str]:
    """The compiled backends whose ops exist in this process (cpp only when fusedcnn._C loaded)."""
    return [b for b in COMPILED_BACKENDS if b != "cpp" or backends._cpp_import_error() is None]


def register(forward: str, *, fake: Callable, setup_context: Callable | None = None,
             backward_factory: Callable[[str], Callable] | None = None,
             only: tuple[str, ...] = COMPILED_BACKENDS) -> None:
    """Register the fake function and (if given) the autograd formula of op `forward` for every compiled backend
    (or those in `only`, for an op one backend alone has).

    backward_factory(backend) returns the autograd backward for that backend, so
    each backend's backward calls that backend's own backward kernels.
    """
    for backend in (b for b in registered_backends() if b in only):
        try:
            fwd = op(backend, forward)
        except AttributeError:
            if backend != "cpp":
                raise
            # A fusedcnn._C built from older sources: say so when the cpp backend is asked for,
            # instead of failing the whole import.
            backends._import_errors["cpp"] = (
                f"fusedcnn._C is out of date (it has no op '{forward}'): rebuild it with "
                "`pip install --no-build-isolation -e .` (or bash scripts/setup.sh)")
            continue
        torch.library.register_fake(fwd)(fake)
        if backward_factory is not None:
            torch.library.register_autograd(fwd, backward_factory(backend), setup_context=setup_context)
