"""Dropout module: torch.nn.Dropout plus `backend=`. Masks come from the Philox stream (docs/ARCHITECTURE.md)."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.ops.dropout import dropout

__all__ = ["Dropout"]


class Dropout(torch.nn.Dropout):
    def __init__(self, p: float = 0.5, inplace: bool = False, *, backend: str = "auto"):
        super().__init__(p, inplace)  # torch.nn.Dropout raises for p outside [0, 1]
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace, backend=self.backend)
