"""Conv2d on every backend: the compiled ops, their shared fake and autograd, and the public conv2d.

    x:      (N, C, H, W) or unbatched (C, H, W)   float32|float64|float16|bfloat16
                                                  NCHW or NHWC
    weight: (C_out, C // groups, kH, kW)
    bias:   (C_out,) or None
    out:    (N, C_out, H_out, W_out)              channels_last when x is NHWC (as cuDNN), else contiguous

Compiled ops (one schema for both backends, symmetric int[2] padding: an asymmetric "same" is padded
here, explicitly, before the op is called):
    conv2d(x, weight, bias?, stride, padding, dilation, groups, algo) -> out
    conv2d_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask[3], algo)
        -> (grad_x, grad_weight, grad_bias), an empty (0,) tensor where output_mask is false;
           grad_x in x's memory format, grad_weight contiguous, grad_bias (C_out,)
cpp:    torch.ops.fusedcnn.conv2d / conv2d_backward (csrc/conv/): explicit im2col + GEMM
triton: torch.ops.fusedcnn.triton_conv2d / triton_conv2d_backward (fusedcnn.triton_kernels.conv)
algo:   "auto" | "implicit_gemm" (triton only) | "im2col"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.common import conv_output_size, dense_format, entry_point, explicit_padding, pair
from fusedcnn.ops._registry import CompiledOps, define, dispatch, implement, op, register

FAMILY = "conv"
__all__ = ["conv2d"]  # the public functionals (fusedcnn.functional)
ALGOS = ("auto", "implicit_gemm", "im2col")

# ---- the compiled ops (schemas; launchers of the same names in fusedcnn.triton_kernels.conv)
define("conv", {
    "conv2d": "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
              "str algo) -> Tensor",
    "conv2d_backward": "(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
                       "int groups, bool[3] output_mask, str algo) -> (Tensor, Tensor, Tensor)",
})

# ---- fake functions (triton and cpp) and autograd (triton; cpp: the same formulas in csrc/conv/conv_autograd.cpp,
#      these only for a fusedcnn._C without it)
def _conv2d_fake(x, weight, bias, stride, padding, dilation, groups, algo):
    h_out = conv_output_size(x.shape[2], 2 * padding[0], weight.shape[2], stride[0], dilation[0])
    w_out = conv_output_size(x.shape[3], 2 * padding[1], weight.shape[3], stride[1], dilation[1])
    return torch.empty((x.shape[0], weight.shape[0], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=dense_format(x))


def _conv2d_backward_fake(grad_out, x, weight, stride, padding, dilation, groups, output_mask, algo):
    need_x, need_w, need_b = output_mask
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x)) if need_x
            else x.new_empty((0,)),
            x.new_empty(weight.shape) if need_w else x.new_empty((0,)),
            x.new_empty((weight.shape[0],)) if need_b else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, groups)
    ctx.algo = algo
    ctx.has_bias = bias is not None


def _backward_factory(backend: str):
    conv2d_backward = op(backend, "conv2d_backward")

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if not any(mask):
            return (None,) * 8
        # Dense grad_out in the output's layout (a no-op when autograd hands it so already).
        grad_out = grad_out.contiguous(memory_format=dense_format(x))
        grads = conv2d_backward(grad_out, x, weight, *ctx.args, mask, ctx.algo)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 5

    return backward


def _differentiable_backward(ctx, grad_out):
    # Double backward: aten's convolution_backward is differentiable in grad_out, x and weight.
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return (None,) * 8
    stride, padding, dilation, groups = ctx.args
    grads = torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                                                stride, padding, dilation, False, [0, 0], groups, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 5


register("conv2d", fake=_conv2d_fake, setup_context=_setup_context, backward_factory=_backward_factory,
         differentiable_backward=_differentiable_backward)
register("conv2d_backward", fake=_conv2d_backward_fake)


# ---- argument checks, with PyTorch's messages
_C10_DTYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                    torch.bfloat16: "c10::BFloat16"}


def check_conv2d_args(input, weight, bias, stride, padding, dilation, groups, algo):
    """Validate as F.conv2d does; returns (x (N, C, H, W), stride, (top, bottom, left, right), dilation)."""
    for arg, what in ((input, "input"), (weight, "weight")):
        if not isinstance(arg, Tensor):
            raise TypeError(f"conv2d(): argument '{what}' must be Tensor, not {type(arg).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"conv2d(): argument 'bias' must be Tensor, not {type(bias).__name__}")
    if algo not in ALGOS:
        raise ValueError(f"conv2d: algo must be one of {', '.join(map(repr, ALGOS))}, got {algo!r}")
    if input.dim() not in (3, 4):
        raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(input.shape)}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if weight.dim() != 4:
        raise RuntimeError(f"expected stride to be a single integer value or a list of {max(weight.dim() - 2, 0)} "
                           "values to match the convolution dimensions, but got stride=" + str(list(stride)))
    if isinstance(padding, str) and padding == "same" and stride != (1, 1):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    pad = explicit_padding(padding, tuple(weight.shape[2:]), dilation)
    if not isinstance(groups, int) or groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if min(pad) < 0:
        raise RuntimeError("negative padding is not supported")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(dilation) <= 0:
        raise RuntimeError("non-positive dilation is not supported")
    x = input.unsqueeze(0) if input.dim() == 3 else input
    c_out = weight.shape[0]
    if c_out < groups:  # 0 output channels included (torch.nn.Conv2d(C, 0, k) builds; its forward raises this)
        raise RuntimeError(f"Given groups={groups}, expected weight to be at least {groups} at dimension 0, but got "
                           f"weight of size {list(weight.shape)} instead")
    if c_out % groups != 0:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
                           f"but got weight of size [{list(weight.shape)}] instead")
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(x.shape)} to have {weight.shape[1] * groups} channels, but got {x.shape[1]} "
                           "channels instead")
    padded = (x.shape[2] + pad[0] + pad[1], x.shape[3] + pad[2] + pad[3])
    kernel = tuple(d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation))
    if padded[0] < kernel[0] or padded[1] < kernel[1]:
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({kernel[0]} x {kernel[1]}). Kernel size can't be greater than actual input size")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{c_out} elements, but got bias of size {list(bias.shape)} instead")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"Input type ({x.type()}) and weight type ({weight.type()}) should be the same or input "
                           "should be a MKLDNN tensor and weight is a dense tensor")
    if bias is not None and bias.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {bias.device}!")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"Input type ({_C10_DTYPE_NAMES.get(x.dtype, x.dtype)}) and bias type "
                           f"({_C10_DTYPE_NAMES.get(bias.dtype, bias.dtype)}) should be the same")
    return x, stride, pad, dilation


# ---- one implementation per backend: conv2d(x, weight, bias, stride, padding, dilation, groups, algo) -> y
# x: (N, C, H, W); stride, padding (symmetric: (ph, pw)), dilation: int pairs.
class _Torch:
    @staticmethod
    def conv2d(x, weight, bias, stride, padding, dilation, groups, algo):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class _Reference:
    @staticmethod
    def conv2d(x, weight, bias, stride, padding, dilation, groups, algo):
        return reference.conv2d(x, weight, bias, stride, padding, dilation, groups)


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": _Reference, "triton": CompiledOps("triton"),
                                     "cpp": CompiledOps("cpp")})


# ---- public functional entry point
@entry_point("input", "weight", "bias")  # as torch's conv: in the autocast dtype
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, backend: str | None = None, algo: str = "auto") -> Tensor:
    """torch.nn.functional.conv2d with a `backend=` choice.

    algo picks the triton/cpp method: "auto", "implicit_gemm" (triton) or "im2col" (explicit
    im2col + GEMM); the torch and reference backends ignore it.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"conv2d(): argument 'input' must be Tensor, not {type(input).__name__}")
    impl = dispatch(FAMILY, backend, input)
    x, stride, (top, bottom, left, right), dilation = check_conv2d_args(input, weight, bias, stride, padding, dilation,
                                                             groups, algo)
    if (top, left) != (bottom, right):
        # "same" with an even dilated kernel: the extra row/column goes on the bottom/right (as torch);
        # pad it here so every implementation takes a symmetric (ph, pw) padding.
        x = F.pad(x, (0, right - left, 0, bottom - top))
    y = impl.conv2d(x, weight, bias, list(stride), [top, left], list(dilation), groups, algo)
    return y.squeeze(0) if input.dim() == 3 else y
