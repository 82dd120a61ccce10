"""ReLU: x (any shape) float32|float64|float16|bfloat16 -> same shape, dtype and memory format.

relu(x) = x where x > 0, else 0; NaN propagates (as torch.relu).
Backward: grad_in = grad_out where out > 0, else 0 (from the saved output).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import backends, reference
from fusedcnn.ops._registry import op, register
from fusedcnn.triton_kernels._common import dense_format

FAMILY = "activation"


# ---- triton: custom ops over fusedcnn.triton_kernels.activation (imported lazily: triton is optional)
@torch.library.custom_op("fusedcnn::triton_relu", mutates_args=())
def _triton_relu(x: Tensor) -> Tensor:
    from fusedcnn.triton_kernels.activation import relu_fwd
    return relu_fwd(x)


@torch.library.custom_op("fusedcnn::triton_relu_backward", mutates_args=())
def _triton_relu_backward(grad_out: Tensor, out: Tensor) -> Tensor:
    from fusedcnn.triton_kernels.activation import relu_bwd
    return relu_bwd(grad_out, out)


# ---- fake functions and autograd, shared by triton and cpp
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


register("relu", fake=_fake_like, setup_context=_setup_context, backward_factory=_backward_factory)
register("relu_backward", fake=lambda g, y: _fake_like(y))


# ---- public functional entry point
def relu(input: Tensor, inplace: bool = False, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.relu with a `backend=` choice."""
    if not isinstance(input, Tensor):
        raise TypeError(f"relu(): argument 'input' must be Tensor, not {type(input).__name__}")
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.relu(input, inplace=inplace)
    out = reference.relu(input) if name == "reference" else op(name, "relu")(input)
    return input.copy_(out) if inplace else out
