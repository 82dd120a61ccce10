"""ReLU module: torch.nn.ReLU plus `backend=`."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.nn._dropin import drop_in_init
from fusedcnn.ops.activation import relu

__all__ = ["ReLU"]


class ReLU(torch.nn.ReLU):
    """Drop-in torch.nn.ReLU. `backend`: "auto" (default), "torch", "reference", "triton" or "cpp"."""

    @drop_in_init(torch.nn.ReLU, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return relu(input, self.inplace, backend=self.backend)
