"""Conv2d. STUB (foundation skeleton): only the torch backend; the conv family replaces this file."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fusedcnn import backends

FAMILY = "conv"


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.conv2d with a `backend=` choice."""
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    raise NotImplementedError(f"conv2d: backend {name!r} not written yet")
