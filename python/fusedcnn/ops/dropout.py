"""Dropout: x (any shape) float32|float16|bfloat16 (cpp CPU also float64) -> same shape, dtype, memory format.

Every backend but `torch` draws the same mask for the same seed (DESIGN.md, "The dropout stream"):
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

from fusedcnn import backends, reference
from fusedcnn.ops._registry import op, register
from fusedcnn.triton_kernels._common import dense_format

FAMILY = "dropout"


# ---- triton: a custom op over fusedcnn.triton_kernels.dropout (imported lazily: triton is optional)
@torch.library.custom_op("fusedcnn::triton_dropout", mutates_args=())
def _triton_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    from fusedcnn.triton_kernels.dropout import dropout_fwd
    return dropout_fwd(x, p, seed)


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


# ---- the seed
def draw_seed() -> int:
    """A fresh 64-bit seed (as a signed int64) from torch's default CPU generator: no GPU sync."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


# ---- public functional entry point
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.dropout with a `backend=` choice."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not isinstance(input, Tensor):
        raise TypeError(f"dropout(): argument 'input' must be Tensor, not {type(input).__name__}")
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.dropout(input, p, training, inplace)
    if not training or p == 0.0 or input.numel() == 0:
        return input  # as torch: the input itself, no random draw
    if p == 1.0:
        return input.mul_(0.0) if inplace else input * 0.0  # as torch: zeros, NaN stays NaN; no draw
    seed = draw_seed()
    out = reference.dropout(input, p, seed) if name == "reference" else op(name, "dropout")(input, p, seed)
    return input.copy_(out) if inplace else out
