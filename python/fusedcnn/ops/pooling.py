"""Pooling. STUB (foundation skeleton): only the torch backend; the pooling family replaces this file."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fusedcnn import backends

FAMILY = "pooling"


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False, *, backend: str | None = None):
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    raise NotImplementedError(f"max_pool2d: backend {name!r} not written yet")


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None, *, backend: str | None = None):
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    raise NotImplementedError(f"avg_pool2d: backend {name!r} not written yet")


def adaptive_avg_pool2d(input: Tensor, output_size, *, backend: str | None = None):
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.adaptive_avg_pool2d(input, output_size)
    raise NotImplementedError(f"adaptive_avg_pool2d: backend {name!r} not written yet")


def adaptive_max_pool2d(input: Tensor, output_size, return_indices: bool = False, *, backend: str | None = None):
    name = backends.resolve(backend, input, FAMILY)
    if name == "torch":
        return F.adaptive_max_pool2d(input, output_size, return_indices)
    raise NotImplementedError(f"adaptive_max_pool2d: backend {name!r} not written yet")
