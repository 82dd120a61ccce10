"""Dropout from first principles, driven by the Philox stream (docs/ARCHITECTURE.md, "The dropout stream").

x: any shape, float16|bfloat16|float32|float64, any memory format.
Element i (its row-major index in the logical shape, whatever the memory
format) is kept iff u(seed, i) > float32(p); out = x * (kept ? 1/(1-p) : 0),
computed in float32 (float64 for float64 input), so a dropped NaN/inf stays NaN
as in torch. Backward regenerates the mask from the seed: grad_in = dropout(grad_out).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusedcnn.common import accumulation_dtype

from fusedcnn.reference import philox

__all__ = ["dropout", "dropout_keep"]


def dropout_keep(seed: int, shape, p: float, device=None) -> Tensor:
    """The keep mask (bool, contiguous, logical `shape`): u(seed, i) > float32(p) for every row-major index i."""
    numel = 1
    for s in shape:
        numel *= int(s)
    offsets = torch.arange(numel, dtype=torch.int64, device=device).view(tuple(shape))
    return philox.rand(seed, offsets) > torch.tensor(p, dtype=torch.float32, device=device)


def _apply(x: Tensor, p: float, seed: int) -> Tensor:
    """x * (kept ? scale : 0) in the compute dtype; the result keeps x's dtype and memory format."""
    acc = accumulation_dtype(x.dtype)
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1.0 else 0.0, dtype=acc, device=x.device)  # rounded once
    factor = torch.where(dropout_keep(seed, x.shape, p, x.device), scale, torch.zeros((), dtype=acc, device=x.device))
    out = torch.empty_like(x)  # x's memory format where x is dense (as torch's dropout)
    return out.copy_((x.to(acc) * factor).to(x.dtype))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed  # the mask is not saved: backward regenerates it
        return _apply(x, p, seed)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _Dropout.apply(grad_out, ctx.p, ctx.seed), None, None


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """Dropout of x with probability p and mask seed `seed` (an int in [-2**63, 2**64)); differentiable."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return _Dropout.apply(x, p, seed)
