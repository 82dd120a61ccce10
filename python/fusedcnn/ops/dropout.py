"""Dropout: x (any shape) float32|float64|float16|bfloat16 -> same shape, dtype, memory format.

Every backend but `torch` draws the same mask for the same seed (docs/ARCHITECTURE.md, "The dropout stream"):
element i (row-major index in the LOGICAL shape, so NCHW and NHWC agree) is kept iff
u(seed, i) > float32(p), u the Philox4x32-10 uniform of tl.rand(seed, i); kept values are scaled
by 1/(1-p), dropped ones multiplied by 0 (a NaN stays NaN, as in torch). Each call draws a fresh
64-bit seed from torch's default CPU generator (no GPU sync; torch.manual_seed reproduces a run).

The compiled op `dropout(x, p, seed)` takes the seed as an int, so opcheck and torch.compile see a
pure function; its backward is the same op on grad_out with the saved seed: the mask is regenerated,
never stored. The functional draws the seed as a 0-dim int64 CPU tensor (common.draw_seed) and calls
`fusedcnn_seed::dropout(x, p, seed, backend)`, a custom op whose body reads the int and calls the backend's
kernel: torch.export and torch.compile trace the draw and that op, never a data-dependent int().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.common import dense_format, draw_seed, entry_point
from fusedcnn.ops._registry import CompiledOps, define, dispatch, implement, op, register

FAMILY = "dropout"
__all__ = ["dropout"]  # the public functionals (fusedcnn.functional)

# ---- the compiled op (schema; launcher of the same name in fusedcnn.triton_kernels.dropout)
define("dropout", {"dropout": "(Tensor x, float p, SymInt seed) -> Tensor"})


# ---- fake function (triton and cpp) and autograd (triton; cpp: the same formulas in
#      csrc/dropout/dropout_autograd.cpp, these only for a fusedcnn._C without it)
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


def _differentiable_backward(ctx, grad_out):
    # Double backward: grad_in = grad_out * mask * scale is linear in grad_out; the reference's dropout draws the
    # same mask from the seed and is differentiable (its backward is itself).
    return reference.dropout(grad_out, ctx.p, ctx.seed), None, None


register("dropout", fake=_fake, setup_context=_setup_context, backward_factory=_backward_factory,
         differentiable_backward=_differentiable_backward)


# ---- the seed as a tensor: one custom op over every Philox backend's kernel
# seed: the 0-dim int64 CPU tensor of common.draw_seed. The body runs on real tensors only (a trace sees the op
# and its fake), reads the int there -- no GPU sync: the seed lives on the CPU -- and calls the backend's kernel,
# whose op takes `SymInt seed`. The backward is this op on grad_out with the saved seed: the mask is regenerated,
# and the gradient is itself differentiable (double backward).
_PHILOX_KERNELS = {"reference": reference, "triton": CompiledOps("triton"), "cpp": CompiledOps("cpp")}


@torch.library.custom_op("fusedcnn_seed::dropout", mutates_args=())
def seeded_dropout(x: Tensor, p: float, seed: Tensor, backend: str) -> Tensor:
    """Dropout of x by Philox backend `backend` ("reference", "triton" or "cpp") with the seed tensor `seed`."""
    out = _PHILOX_KERNELS[backend].dropout(x, p, int(seed))
    return out.contiguous(memory_format=dense_format(x))  # the kernels' layout rule (_fake), the reference's too


@seeded_dropout.register_fake
def _seeded_fake(x, p, seed, backend):
    return _fake(x, p, 0)


def _seeded_setup_context(ctx, inputs, output):
    _, ctx.p, seed, ctx.backend = inputs
    ctx.save_for_backward(seed)


def _seeded_backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    return seeded_dropout(grad_out, ctx.p, seed, ctx.backend), None, None, None


seeded_dropout.register_autograd(_seeded_backward, setup_context=_seeded_setup_context)


# ---- one implementation per backend: dropout(x, p, training, inplace) -> Tensor
class _Torch:
    dropout = staticmethod(F.dropout)


class _Philox:
    """reference / triton / cpp: the Philox stream, that backend's kernel with a fresh seed per call."""

    def __init__(self, backend: str):
        self.backend = backend

    def dropout(self, x: Tensor, p: float, training: bool, inplace: bool) -> Tensor:
        if not training or p == 0.0 or x.numel() == 0:
            return x  # as torch: the input itself, no random draw
        if p == 1.0:
            return x.mul_(0.0) if inplace else x * 0.0  # as torch: zeros, NaN stays NaN; no draw
        out = seeded_dropout(x, p, draw_seed(), self.backend)
        return x.copy_(out) if inplace else out


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": _Philox("reference"),
                                     "triton": _Philox("triton"), "cpp": _Philox("cpp")}, random=("dropout",))


# ---- public functional entry point
@entry_point()  # under autocast: the input's dtype, as torch's dropout
def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.dropout with a `backend=` choice."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not isinstance(input, Tensor):
        raise TypeError(f"dropout(): argument 'input' must be Tensor, not {type(input).__name__}")
    return dispatch(FAMILY, backend, input).dropout(input, p, training, inplace)
