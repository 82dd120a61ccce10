"""Pooling modules: torch.nn's (same arguments and repr) plus `backend=`."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.ops import pooling as P

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"]


class MaxPool2d(torch.nn.MaxPool2d):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False,
                 *, backend: str = "auto"):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices, backend=self.backend)


class AvgPool2d(torch.nn.AvgPool2d):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None, *, backend: str = "auto"):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override, backend=self.backend)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    def __init__(self, output_size, *, backend: str = "auto"):
        super().__init__(output_size)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.adaptive_avg_pool2d(input, self.output_size, backend=self.backend)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    def __init__(self, output_size, return_indices=False, *, backend: str = "auto"):
        super().__init__(output_size, return_indices)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.adaptive_max_pool2d(input, self.output_size, self.return_indices, backend=self.backend)
