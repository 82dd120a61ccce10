"""BatchNorm2d and BatchNormReLU2d: torch.nn.BatchNorm2d's arguments, buffers, state_dict keys and repr, plus `backend=`.

BatchNorm2d IS a torch.nn.BatchNorm2d (it computes BatchNorm and nothing more), so torch's BatchNorm rewrites
(SyncBatchNorm.convert_sync_batchnorm, fuse_conv_bn_eval, quantization fusers) treat it as one.
BatchNormReLU2d, relu(BatchNorm2d(x)) in one pass, is deliberately NOT an nn.BatchNorm2d / _BatchNorm (it
derives from _NormBase, which gives the same parameters, buffers and state_dict keys): a tool that rewrites
BatchNorms must not strip its ReLU.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _NormBase

from fusedcnn.backends import check_backend_arg
from fusedcnn.ops.batchnorm import batch_norm, batch_norm_relu

__all__ = ["BatchNorm2d", "BatchNormReLU2d"]


def batch_norm_arguments(bn: _NormBase) -> tuple:
    """(running_mean, running_var, use_batch_stats, momentum) for one forward of BatchNorm-like module `bn`,
    exactly as torch.nn.modules.batchnorm._BatchNorm.forward decides them (num_batches_tracked counts this
    call; momentum=None is the cumulative average). Shared by the modules and FusedSequential's fused runs."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats  # running stats updated only when tracked
    return (bn.running_mean if track else None, bn.running_var if track else None, use_batch_stats, momentum)


def _check_4d(input: torch.Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in torch.nn.BatchNorm2d. `backend`: "auto" (default), "torch", "reference", "triton" or "cpp"."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = check_backend_arg(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum = batch_norm_arguments(self)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                          self.eps, backend=self.backend)


class BatchNormReLU2d(_NormBase):
    """relu(BatchNorm2d(x)) in one fused pass; BatchNorm2d's arguments, parameters, buffers and state_dict keys.

    Not an nn.BatchNorm2d (module docstring). sync=True reduces the batch statistics across the processes of
    torch.distributed's default group (as torch.nn.SyncBatchNorm) before normalizing.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, backend: str = "auto", sync: bool = False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = check_backend_arg(backend)
        self.sync = bool(sync)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_4d(input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, momentum = batch_norm_arguments(self)
        return batch_norm_relu(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                               self.eps, backend=self.backend, sync=self.sync)
