"""Dropout: x (any shape) float32|float16|bfloat16 (cpp CPU also float64) -> same shape, dtype, memory format.

Every backend but `torch` draws the same mask for the same seed (docs/ARCHITECTURE.md, "The dropout stream"):
element i (row-major index in the LOGICAL shape, so NCHW and NHWC agree) is kept iff
u(seed, i) > float32(p), u the Philox4x32-10 uniform of tl.rand(seed, i); kept values are scaled
by 1/(1-p), dropped ones multiplied by 0 (a NaN stays NaN, as in torch). Each call draws a fresh
64-bit seed from torch's default CPU generator (no GPU sync; torch.manual_seed reproduces a run).

The compiled op `dropout(x, p, seed)` takes the seed as an int, so opcheck and torch.compile see a
pure function; its backward is the same op on grad_out with the saved seed: the mask is regenerated,
never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.common import dense_format, draw_seed
from fusedcnn.ops._registry import CompiledOps, define, dispatch, implement, op, register

FAMILY = "dropout"
__all__ = ["dropout"]  # the public functionals (fusedcnn.functional)

# ---- the compiled op (schema; launcher of the same name in fusedcnn.triton_kernels.dropout)
define("dropout", {"dropout": "(Tensor x, float p, SymInt seed) -> Tensor"})


# ---- fake function and autograd, shared by triton and cpp
def _fake(x: Tensor, p: float, seed: int) -> Tensor:
    # NHWC stays NHWC; every other input gives a contiguous output (both kernels' rule).
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed = inputs  # the seed, not the mask: backward regenerates it


def _backward_factory(backend: str):
    dropout_op = op(backend, "dropout")

    def backward(ctx, grad_out):
        return dropout_op(grad_out, ctx.p, ctx.seed), None, None

    return backward


register("dropout", fake=_fake, setup_context=_setup_context, backward_factory=_backward_factory)


# ---- one implementation per backend: dropout(x, p, training, inplace) -> Tensor
class _Torch:
    dropout = staticmethod(F.dropout)


class _Philox:
    """reference / triton / cpp: the Philox stream, `kernels.dropout(x, p, seed)` with a fresh seed per call."""

    def __init__(self, kernels):
        self.kernels = kernels  # the reference package, or a compiled backend's ops

    def dropout(self, x: Tensor, p: float, training: bool, inplace: bool) -> Tensor:
        if not training or p == 0.0 or x.numel() == 0:
            return x  # as torch: the input itself, no random draw
        if p == 1.0:
            return x.mul_(0.0) if inplace else x * 0.0  # as torch: zeros, NaN stays NaN; no draw
        out = self.kernels.dropout(x, p, draw_seed())
        return x.copy_(out) if inplace else out


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": _Philox(reference),
                                     "triton": _Philox(CompiledOps("triton")), "cpp": _Philox(CompiledOps("cpp"))})


# ---- public functional entry point
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.dropout with a `backend=` choice."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not isinstance(input, Tensor):
        raise TypeError(f"dropout(): argument 'input' must be Tensor, not {type(input).__name__}")
    return dispatch(FAMILY, backend, input).dropout(input, p, training, inplace)
