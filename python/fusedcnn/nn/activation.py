"""ReLU module: torch.nn.ReLU plus `backend=`."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.ops.activation import relu

__all__ = ["ReLU"]


class ReLU(torch.nn.ReLU):
    """Drop-in torch.nn.ReLU. `backend`: "auto" (default), "torch", "reference", "triton" or "cpp"."""

    def __init__(self, inplace: bool = False, *, backend: str = "auto"):
        super().__init__(inplace=inplace)
        self.backend = check_backend_arg(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return relu(input, inplace=self.inplace, backend=self.backend)
