"""BatchNorm2d and BatchNormReLU2d: torch.nn.BatchNorm2d's arguments, buffers, state_dict keys and repr, plus `backend=`.

BatchNorm2d IS a torch.nn.BatchNorm2d (it computes BatchNorm and nothing more), so torch's BatchNorm rewrites
(SyncBatchNorm.convert_sync_batchnorm, fuse_conv_bn_eval, quantization fusers) treat it as one.
BatchNormReLU2d, relu(BatchNorm2d(x)) in one pass, is deliberately NOT an nn.BatchNorm2d / _BatchNorm (it
derives from _NormBase, which gives the same parameters, buffers and state_dict keys): a tool that rewrites
BatchNorms must not strip its ReLU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from fusedcnn.backends import check_backend_arg
from fusedcnn.common import fx_traceable, is_fx_proxy
from fusedcnn.nn._dropin import drop_in_init
from fusedcnn.ops.batchnorm import batch_norm, batch_norm_relu

__all__ = ["BatchNorm2d", "BatchNormReLU2d"]


def count_batch(num_batches_tracked: Tensor, momentum: Optional[float]) -> float:
    """num_batches_tracked += 1; the momentum of this call: `momentum`, or 1/num_batches_tracked (the cumulative
    average) when None -- as torch.nn.modules.batchnorm._BatchNorm.forward."""
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if momentum is None else momentum


def batch_norm_arguments(bn: _NormBase, input=None) -> tuple:
    """(running_mean, running_var, use_batch_stats, momentum) for one forward of BatchNorm-like module `bn`,
    exactly as torch.nn.modules.batchnorm._BatchNorm.forward decides them (num_batches_tracked counts this
    call; momentum=None is the cumulative average). Shared by the modules and FusedSequential's fused runs.
    Under torch.fx (`input` a Proxy) the count is a graph node, so it happens each time the traced graph runs."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if is_fx_proxy(input):
            momentum = input.tracer.create_proxy("call_function", count_batch,
                                                 (bn.num_batches_tracked, bn.momentum), {})
        else:
            momentum = count_batch(bn.num_batches_tracked, bn.momentum)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats  # running stats updated only when tracked
    return (bn.running_mean if track else None, bn.running_var if track else None, use_batch_stats, momentum)


@fx_traceable
def check_4d(input: Tensor) -> Tensor:
    """input itself, if 4-D (torch.nn.BatchNorm2d's check and message). Under torch.fx a graph node: the traced
    graph checks when it runs."""
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")
    return input


def _checked_input(bn: _NormBase, input):
    if is_fx_proxy(input):
        return check_4d(input)
    bn._check_input_dim(input)
    return input


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in torch.nn.BatchNorm2d: its arguments (nn/_dropin.py; torch 2.14 added the keyword-only `bias`) plus
    `backend`: "auto" (default), "torch", "reference", "triton" or "cpp"."""

    @drop_in_init(torch.nn.BatchNorm2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input: Tensor) -> Tensor:
        input = _checked_input(self, input)
        running_mean, running_var, use_batch_stats, momentum = batch_norm_arguments(self, input)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                          self.eps, backend=self.backend)


class BatchNormReLU2d(_NormBase):
    """relu(BatchNorm2d(x)) in one fused pass; BatchNorm2d's arguments (those of the installed torch), parameters,
    buffers and state_dict keys, plus `backend` and `sync`.

    Not an nn.BatchNorm2d (module docstring). sync=True reduces the batch statistics across the processes of
    torch.distributed's default group (as torch.nn.SyncBatchNorm) before normalizing.
    """

    @drop_in_init(torch.nn.BatchNorm2d, backend="auto", sync=False)
    def __init__(self, *args, backend: str = "auto", sync: bool = False, **kwargs):
        super().__init__(*args, **kwargs)  # _NormBase takes BatchNorm2d's arguments
        self.backend = check_backend_arg(backend)
        self.sync = bool(sync)

    def _check_input_dim(self, input: Tensor) -> None:
        check_4d(input)

    def forward(self, input: Tensor) -> Tensor:
        input = _checked_input(self, input)
        running_mean, running_var, use_batch_stats, momentum = batch_norm_arguments(self, input)
        return batch_norm_relu(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                               self.eps, backend=self.backend, sync=self.sync)
