"""Dropout module: torch.nn.Dropout plus `backend=`. Masks come from the Philox stream (docs/ARCHITECTURE.md)."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.nn._dropin import drop_in_init
from fusedcnn.ops.dropout import dropout

__all__ = ["Dropout"]


class Dropout(torch.nn.Dropout):
    @drop_in_init(torch.nn.Dropout, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)  # torch.nn.Dropout raises for p outside [0, 1]
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace, backend=self.backend)
