"""BatchNorm2d and BatchNormReLU2d: torch.nn.BatchNorm2d's arguments, buffers, state_dict keys and repr, plus `backend=`."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.ops.batchnorm import batch_norm, batch_norm_relu


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in torch.nn.BatchNorm2d. `backend`: "auto" (default), "torch", "reference", "triton" or "cpp"."""

    _apply_relu = False
    sync = False  # BatchNormReLU2d(sync=True) reduces the statistics across processes

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = check_backend_arg(backend)

    def _momentum_and_mode(self):
        """(momentum for this call, use batch statistics?) exactly as torch.nn.modules.batchnorm._BatchNorm."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            # momentum=None: cumulative moving average over the batches seen so far
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return momentum, use_batch_stats

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum, use_batch_stats = self._momentum_and_mode()
        # Running stats are updated only in training with tracking on; eval uses them if present.
        track = not self.training or self.track_running_stats
        fn = batch_norm_relu if self._apply_relu else batch_norm
        return fn(input, self.running_mean if track else None, self.running_var if track else None,
                  self.weight, self.bias, use_batch_stats, momentum, self.eps, backend=self.backend, sync=self.sync)


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x)) in one fused pass; same arguments, buffers and state_dict keys as BatchNorm2d.

    sync=True reduces the batch statistics across the processes of torch.distributed's
    default group (as torch.nn.SyncBatchNorm) before normalizing.
    """

    _apply_relu = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, backend: str = "auto", sync: bool = False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        self.sync = bool(sync)
