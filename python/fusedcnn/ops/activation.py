"""ReLU: x (any shape) float32|float64|float16|bfloat16 -> same shape, dtype and memory format.

relu(x) = x where x > 0, else 0; NaN propagates (as torch.relu).
Backward: grad_in = grad_out where out > 0, else 0 (from the saved output).
Ops (cpp and triton, one schema): relu(x), relu_backward(grad_out, out).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.common import dense_format, entry_point
from fusedcnn.ops._registry import CompiledOps, define, dispatch, implement, op, register

FAMILY = "activation"
__all__ = ["relu"]  # the public functionals (fusedcnn.functional)

# ---- the compiled ops (schemas; launchers of the same names in fusedcnn.triton_kernels.activation)
define("activation", {
    "relu": "(Tensor x) -> Tensor",
    "relu_backward": "(Tensor grad_out, Tensor out) -> Tensor",
})


# ---- fake function (triton and cpp) and autograd (triton; cpp: the same formulas in
#      csrc/activation/activation_autograd.cpp, these only for a fusedcnn._C without it)
def _fake_like(x: Tensor, *rest: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_factory(backend: str):
    relu_backward = op(backend, "relu_backward")

    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return relu_backward(grad_out, out)

    return backward


def _differentiable_backward(ctx, grad_out):
    # Double backward: aten's threshold_backward is differentiable in grad_out (the mask out > 0 is constant).
    (out,) = ctx.saved_tensors
    return torch.ops.aten.threshold_backward(grad_out, out, 0)


register("relu", fake=_fake_like, setup_context=_setup_context, backward_factory=_backward_factory,
         differentiable_backward=_differentiable_backward)
register("relu_backward", fake=lambda g, y: _fake_like(y))


# ---- one implementation per backend: relu(x, inplace) -> Tensor
class _Torch:
    relu = staticmethod(lambda x, inplace: F.relu(x, inplace=inplace))


class _Kernel:
    """reference / triton / cpp: `kernels.relu(x)` out of place; inplace copies the result back."""

    def __init__(self, kernels):
        self.kernels = kernels  # the reference package, or a compiled backend's ops

    def relu(self, x: Tensor, inplace: bool) -> Tensor:
        out = self.kernels.relu(x)
        return x.copy_(out) if inplace else out


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": _Kernel(reference),
                                     "triton": _Kernel(CompiledOps("triton")), "cpp": _Kernel(CompiledOps("cpp"))})


# ---- public functional entry point
@entry_point()  # under autocast: the input's dtype, as torch's relu
def relu(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.relu with a `backend=` choice."""
    if not isinstance(input, Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    return dispatch(FAMILY, backend, input).relu(input, inplace)
