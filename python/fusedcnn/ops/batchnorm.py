"""BatchNorm2d (+ReLU). STUB (foundation skeleton): only the torch backend; the batchnorm family replaces this file."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fusedcnn import backends

FAMILY = "batchnorm"


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.batch_norm with a `backend=` choice."""
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    raise NotImplementedError(f"batch_norm: backend {name!r} not written yet")


def batch_norm_relu(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """relu(batch_norm(...)) in one pass."""
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    raise NotImplementedError(f"batch_norm_relu: backend {name!r} not written yet")
