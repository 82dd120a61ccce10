"""Fused Conv2d + BatchNorm2d + ReLU (+ MaxPool2d 2x2) and Linear + ReLU + Dropout: Triton-only ops.

Ops (torch.library custom ops over fusedcnn.triton_kernels.fused; each with register_fake and
register_autograd, so opcheck and torch.compile(fullgraph=True) go through them):

  triton_conv_bn_relu(x, weight, bias?, in_scale?, in_shift?, stride, padding, dilation, compute_stats)
      -> (y, mean, var)
      x: (N, C_in, H, W) float32|float16|bfloat16 NCHW|NHWC; weight (C_out, C_in, KH, KW) x's dtype;
      bias, in_scale, in_shift: (C,) float32. y = conv2d(a, weight, bias) with a = relu(x*in_scale+in_shift)
      when in_scale is given (the previous layer's pending BatchNorm+ReLU, applied while loading) else a = x;
      mean, var: fp32 batch mean / biased variance of y per channel (statistics epilogue), or empty.
  triton_conv_bn_relu_backward(...) -> (dx, dweight, dbias, d_in_scale, d_in_shift)
  triton_bn_relu_apply(y, scale, shift) -> relu(y*scale + shift)           (+ _backward)
  triton_bn_relu_maxpool2d(y, scale, shift) -> max_pool2d(relu(y*scale+shift), 2, 2)   (+ _backward)
  triton_linear_relu_dropout(x, weight, bias?, p, seed) -> dropout(relu(x @ weight.T + bias))  (+ _backward)

BatchNorm's own arithmetic on (C,) vectors (scale = gamma*rsqrt(var+eps), shift = beta - mean*scale, the
running-stat update) is plain torch code in fusedcnn.nn.fused: autograd carries the gradients of scale and
shift back to gamma, beta, mean and var, and the gradients of mean/var arrive at the conv op's backward,
which folds them into the grad loads of its dgrad and wgrad GEMMs (g' = g + alpha*y + beta).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _kernels():
    from fusedcnn.triton_kernels import fused  # lazily: triton is optional
    return fused


def _fmt(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ============================================================================ conv + BN statistics / prologue
@torch.library.custom_op("fusedcnn::triton_conv_bn_relu", mutates_args=())
def _conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                  in_shift: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                  compute_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().conv_fwd(x, weight, bias, in_scale, in_shift, stride, padding, dilation, compute_stats)


@torch.library.custom_op("fusedcnn::triton_conv_bn_relu_backward", mutates_args=())
def _conv_bn_relu_backward(grad: Tensor, y: Optional[Tensor], grad_mean: Optional[Tensor],
                           grad_var: Optional[Tensor], mean: Optional[Tensor], x: Tensor, weight: Tensor,
                           in_scale: Optional[Tensor], in_shift: Optional[Tensor],
                           stride: list[int], padding: list[int], dilation: list[int],
                           has_bias: bool, compute_dx: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().conv_bwd(grad, y, grad_mean, grad_var, mean, x, weight, in_scale, in_shift, stride, padding,
                               dilation, has_bias, compute_dx)


def _conv_out_shape(x, weight, stride, padding, dilation):
    N, _, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, C_out, OH, OW


@torch.library.register_fake("fusedcnn::triton_conv_bn_relu")
def _conv_bn_relu_fake(x, weight, bias, in_scale, in_shift, stride, padding, dilation, compute_stats):
    y = torch.empty(_conv_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device,
                    memory_format=_fmt(x))
    n = weight.shape[0] if compute_stats else 0
    return y, x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake("fusedcnn::triton_conv_bn_relu_backward")
def _conv_bn_relu_backward_fake(grad, y, grad_mean, grad_var, mean, x, weight, in_scale, in_shift, stride, padding,
                                dilation, has_bias, compute_dx):
    if compute_dx or in_scale is not None:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_fmt(x))
    else:
        dx = x.new_empty((0,))
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    db = x.new_empty((weight.shape[0] if has_bias else 0,), dtype=torch.float32)
    n = x.shape[1] if in_scale is not None else 0
    return dx, dw, db, x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, in_scale, in_shift, stride, padding, dilation, compute_stats = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y if compute_stats else None, mean if compute_stats else None)
    ctx.conv = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.compute_stats = compute_stats


def _conv_backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    if not ctx.compute_stats:
        grad_mean = grad_var = None
    if grad_y is None:
        grad_y = torch.zeros(_conv_out_shape(x, weight, stride, padding, dilation), dtype=x.dtype, device=x.device)
    stats_used = grad_mean is not None or grad_var is not None
    grad_mean, grad_var = (None if g is None else g.float().contiguous() for g in (grad_mean, grad_var))
    dx, dw, db, ds, dt = _conv_bn_relu_backward(grad_y, y if stats_used else None, grad_mean, grad_var,
                                                mean if stats_used else None, x, weight, in_scale, in_shift,
                                                stride, padding, dilation, ctx.has_bias, ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None, dw, db if ctx.has_bias else None,
            ds if in_scale is not None else None, dt if in_shift is not None else None, None, None, None, None)


torch.library.register_autograd("fusedcnn::triton_conv_bn_relu", _conv_backward, setup_context=_conv_setup_context)


# ============================================================================ BN apply + ReLU (+ 2x2 max pool)
@torch.library.custom_op("fusedcnn::triton_bn_relu_apply", mutates_args=())
def _bn_relu_apply(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _kernels().bn_relu_apply_fwd(y, scale, shift)


@torch.library.custom_op("fusedcnn::triton_bn_relu_apply_backward", mutates_args=())
def _bn_relu_apply_backward(grad: Tensor, y: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().bn_relu_apply_bwd(grad, y, scale, shift)


@torch.library.custom_op("fusedcnn::triton_bn_relu_maxpool2d", mutates_args=())
def _bn_relu_maxpool2d(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _kernels().bn_relu_pool_fwd(y, scale, shift)


@torch.library.custom_op("fusedcnn::triton_bn_relu_maxpool2d_backward", mutates_args=())
def _bn_relu_maxpool2d_backward(grad: Tensor, y: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().bn_relu_pool_bwd(grad, y, scale, shift)


def _like(y: Tensor, shape=None) -> Tensor:
    return torch.empty(shape if shape is not None else y.shape, dtype=y.dtype, device=y.device,
                       memory_format=_fmt(y))


def _bn_relu_backward_fake(grad, y, scale, shift):
    return _like(y), torch.empty_like(scale), torch.empty_like(shift)


torch.library.register_fake("fusedcnn::triton_bn_relu_apply")(lambda y, scale, shift: _like(y))
torch.library.register_fake("fusedcnn::triton_bn_relu_apply_backward")(_bn_relu_backward_fake)
torch.library.register_fake("fusedcnn::triton_bn_relu_maxpool2d")(
    lambda y, scale, shift: _like(y, (y.shape[0], y.shape[1], y.shape[2] // 2, y.shape[3] // 2)))
torch.library.register_fake("fusedcnn::triton_bn_relu_maxpool2d_backward")(_bn_relu_backward_fake)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bn_relu_grad(backward_op):
    def backward(ctx, grad):
        y, scale, shift = ctx.saved_tensors
        return backward_op(grad, y, scale, shift)
    return backward


torch.library.register_autograd("fusedcnn::triton_bn_relu_apply", _bn_relu_grad(_bn_relu_apply_backward),
                                setup_context=_save_inputs)
torch.library.register_autograd("fusedcnn::triton_bn_relu_maxpool2d", _bn_relu_grad(_bn_relu_maxpool2d_backward),
                                setup_context=_save_inputs)


# ============================================================================ Linear + ReLU + dropout
@torch.library.custom_op("fusedcnn::triton_linear_relu_dropout", mutates_args=())
def _linear_relu_dropout(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: int) -> Tensor:
    return _kernels().linear_relu_dropout_fwd(x, weight, bias, p, seed)


@torch.library.custom_op("fusedcnn::triton_linear_relu_dropout_backward", mutates_args=())
def _linear_relu_dropout_backward(grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, p: float,
                                  has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().linear_relu_dropout_bwd(grad, out, x, weight, p, has_bias)


@torch.library.register_fake("fusedcnn::triton_linear_relu_dropout")
def _linear_fake(x, weight, bias, p, seed):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("fusedcnn::triton_linear_relu_dropout_backward")
def _linear_backward_fake(grad, out, x, weight, p, has_bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, p, seed = inputs
    ctx.save_for_backward(x, weight, output)  # output > 0 <=> kept and ReLU active: no mask regeneration
    ctx.p = p
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    dx, dw, db = _linear_relu_dropout_backward(grad, out, x, weight, ctx.p, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None, None, None


torch.library.register_autograd("fusedcnn::triton_linear_relu_dropout", _linear_backward,
                                setup_context=_linear_setup_context)


# ============================================================================ functional entry points
def conv_bn_relu_raw(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_scale: Optional[Tensor],
                     in_shift: Optional[Tensor], stride, padding, dilation, compute_stats: bool):
    """(y, mean, var) of the fused conv (see triton_conv_bn_relu); bias/in_scale/in_shift cast to float32."""
    f = (lambda t: None if t is None else t.float().contiguous())
    y, mean, var = _conv_bn_relu(x, weight, f(bias), f(in_scale), f(in_shift), list(stride), list(padding),
                                 list(dilation), compute_stats)
    return y, (mean if compute_stats else None), (var if compute_stats else None)


def bn_relu_apply(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(y * scale[c] + shift[c]) (scale, shift: (C,), computed in float32)."""
    return _bn_relu_apply(y, scale.float().contiguous(), shift.float().contiguous())


def bn_relu_maxpool2d(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """max_pool2d(relu(y * scale[c] + shift[c]), kernel_size=2, stride=2)."""
    return _bn_relu_maxpool2d(y, scale.float().contiguous(), shift.float().contiguous())


def draw_seed() -> int:
    """A fresh 64-bit dropout seed from torch's default CPU generator (no GPU sync; manual_seed reproduces it).

    Returned as a signed int64 (the op schema's int); the kernel uses its 64 bits as the unsigned Philox key."""
    return int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64).item())


def linear_relu_dropout(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, p: float = 0.5,
                        training: bool = True, *, seed: Optional[int] = None) -> Tensor:
    """dropout(relu(F.linear(input, weight, bias)), p, training) in one GEMM; input (*, in_features).

    The dropout mask is DESIGN.md's Philox stream over the row-major index of the (*, out_features) output.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"linear(): argument 'input' must be Tensor, not {type(input).__name__}")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() == 0:
        raise RuntimeError("both arguments to linear need to be at least 1D, but they are 0D and 2D")
    p = float(p) if training else 0.0
    if seed is None:
        seed = draw_seed() if 0.0 < p < 1.0 else 0
    x2 = input.reshape(-1, input.shape[-1])
    out = _linear_relu_dropout(x2, weight, bias, p, seed)
    return out.reshape(*input.shape[:-1], weight.shape[0])
