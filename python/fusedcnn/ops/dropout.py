"""Dropout. STUB (foundation skeleton): only the torch backend; the dropout family replaces this file."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fusedcnn import backends

FAMILY = "dropout"


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False,
            *, backend: str | None = None) -> Tensor:
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.dropout(input, p, training, inplace)
    raise NotImplementedError(f"dropout: backend {name!r} not written yet")
