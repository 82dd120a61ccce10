"""BatchNorm2d (+ReLU) from first principles: explicit batch statistics, running-stat updates, autograd backward.

x: (N, C, H, W) float16|bfloat16|float32|float64, NCHW or NHWC (any strides; the output keeps x's
memory format because every step is an elementwise op or a reduction over (N, H, W)).
Statistics are computed in float32 (float64 for float64 input): mean, then the biased variance as
the mean of squared deviations from that mean (two passes: exact, no sum-of-squares cancellation).

    training:  mean_c = sum(x) / M,  var_c = sum((x - mean_c)^2) / M,  M = N*H*W (over all ranks with sync)
    eval:      mean_c, var_c = running_mean, running_var
    y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c      (then relu(y) for BatchNormReLU2d)
    running_mean <- (1 - momentum) * running_mean + momentum * mean_c
    running_var  <- (1 - momentum) * running_var  + momentum * var_c * M / (M - 1)   (unbiased, as torch)

The backward is autograd's derivative of these tensor expressions (checked in float64 with gradcheck).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusedcnn.common import accumulation_dtype

__all__ = ["batch_norm", "batch_norm_stats"]


def _per_channel(t: Tensor) -> Tensor:
    """A (C,) tensor as (1, C, 1, 1), broadcasting over (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def batch_norm_stats(x: Tensor, process_group=None) -> tuple[Tensor, Tensor, int]:
    """(mean, biased variance, count M) per channel of x: (N, C, H, W); float32 (float64 for float64 x).

    With a torch.distributed process group the sums run over every rank's batch (differentiably,
    through torch.distributed.nn.functional.all_reduce).
    """
    xf = x.to(accumulation_dtype(x.dtype))
    dims = (0, 2, 3)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums = xf.sum(dim=dims)
    if process_group is not None:
        from torch.distributed.nn.functional import all_reduce
        n = torch.tensor([float(count)], dtype=sums.dtype)
        sums = all_reduce(torch.cat([sums, n.to(sums.device)]), group=process_group)
        sums, count = sums[:-1], int(sums[-1].item())
    mean = sums / count
    sq = ((xf - _per_channel(mean)) ** 2).sum(dim=dims)
    if process_group is not None:
        from torch.distributed.nn.functional import all_reduce
        sq = all_reduce(sq, group=process_group)
    return mean, sq / count, count


@torch.no_grad()
def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch, in place (lerp_: one op per statistic, the same
    value to rounding); the variance unbiased (var * M / (M-1)). An empty batch (count 0) leaves them unchanged,
    as torch does."""
    if isinstance(count, int) and count == 0:
        return
    if running_mean is not None:
        running_mean.lerp_(mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        unbiased = var * (count / max(count - 1, 1))
        running_var.lerp_(unbiased if unbiased.dtype == running_var.dtype else unbiased.to(running_var.dtype),
                          momentum)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, training: bool, momentum: float, eps: float, relu: bool = False,
               process_group=None) -> Tensor:
    """relu?(batch_norm(x)) for x: (N, C, H, W); arguments as torch.nn.functional.batch_norm (validated by the caller)."""
    acc = accumulation_dtype(x.dtype)
    if training:
        mean, var, count = batch_norm_stats(x, process_group)
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    y = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
    if weight is not None:
        y = y * _per_channel(weight.to(acc))
    if bias is not None:
        y = y + _per_channel(bias.to(acc))
    if relu:
        # y <= 0 is False for NaN: NaN propagates as in torch.relu
        y = torch.where(y <= 0, torch.zeros((), dtype=y.dtype, device=y.device), y)
    return y.to(x.dtype)
