"""Conv2d from first principles: unfold + matmul forward, hand-written backward (the coursework way).

    x:      (N, C, H, W)               any floating dtype, NCHW or NHWC
    weight: (C_out, C // groups, kH, kW)
    bias:   (C_out,) or None
    out:    (N, C_out, H_out, W_out)   H_out = (H + pad_top + pad_bottom - dH*(kH-1) - 1) // sH + 1

With U = unfold(pad(x)): (N, G, C/G*kH*kW, L) (L = H_out*W_out, one column per output pixel)
and W viewed as (G, C_out/G, C/G*kH*kW):
    forward   Y  = W · U + b
    backward  dW = sum over the batch of dY · Uᵀ
              dX = crop(fold(Wᵀ · dY))      (fold sums the overlapping patches back)
              db = sum of dY over N, H_out, W_out
No F.conv2d anywhere: this is the oracle the fast backends are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn.common import conv_output_size, dense_format, explicit_padding, pair

__all__ = ["conv2d"]


class _Conv2dFunction(torch.autograd.Function):
    """Y = W·unfold(pad(x)) + b with the backward written out by hand."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad, dilation, groups):
        kernel = tuple(weight.shape[2:])
        n, g = x.shape[0], groups
        rows = x.shape[1] // g * kernel[0] * kernel[1]                       # C/G*kH*kW
        xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))  # F.pad takes (left, right, top, bottom)
        h_out = conv_output_size(xp.shape[2], 0, kernel[0], stride[0], dilation[0])
        w_out = conv_output_size(xp.shape[3], 0, kernel[1], stride[1], dilation[1])
        u = F.unfold(xp, kernel, dilation=dilation, stride=stride)           # (N, C*kH*kW, L)
        u = u.view(n, g, rows, h_out * w_out)                                # (N, G, C/G*kH*kW, L)
        w = weight.reshape(g, weight.shape[0] // g, -1)                      # (G, C_out/G, C/G*kH*kW)
        y = torch.matmul(w, u)                                               # (N, G, C_out/G, L)
        y = y.reshape(n, weight.shape[0], h_out, w_out)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, pad, dilation, groups, tuple(xp.shape[2:]))
        ctx.has_bias = bias is not None
        return y.contiguous(memory_format=dense_format(x))  # NHWC in -> NHWC out, as torch

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, pad, dilation, g, padded_size = ctx.geometry
        kernel = tuple(weight.shape[2:])
        n, rows, length = x.shape[0], weight[0].numel(), grad_out.shape[2] * grad_out.shape[3]
        dy = grad_out.reshape(n, g, weight.shape[0] // g, length)            # (N, G, C_out/G, L)
        w = weight.reshape(g, weight.shape[0] // g, -1)                      # (G, C_out/G, C/G*kH*kW)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            du = torch.matmul(w.transpose(1, 2), dy)                         # (N, G, C/G*kH*kW, L)
            dxp = F.fold(du.reshape(n, g * rows, length), padded_size, kernel, dilation=dilation, stride=stride)
            grad_x = dxp[:, :, pad[0]:padded_size[0] - pad[1], pad[2]:padded_size[1] - pad[3]]
            grad_x = grad_x.contiguous(memory_format=dense_format(x))
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
            u = F.unfold(xp, kernel, dilation=dilation, stride=stride).view(n, g, rows, length)
            grad_w = torch.matmul(dy, u.transpose(2, 3)).sum(0).reshape(weight.shape)  # sum_n dY·Uᵀ
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """torch.nn.functional.conv2d's arguments; input (N, C, H, W) or unbatched (C, H, W).

    Arguments are assumed valid (fusedcnn.functional.conv2d checks them with torch's messages).
    """
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    pad = explicit_padding(padding, tuple(weight.shape[2:]), dilation)
    y = _Conv2dFunction.apply(x, weight, bias, stride, pad, dilation, groups)
    return y.squeeze(0) if unbatched else y
