"""Pooling modules: torch.nn's (same arguments, nn/_dropin.py, and repr) plus `backend=`."""
import torch

from fusedcnn.backends import check_backend_arg
from fusedcnn.nn._dropin import drop_in_init
from fusedcnn.ops import pooling as P

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d"]


class MaxPool2d(torch.nn.MaxPool2d):
    @drop_in_init(torch.nn.MaxPool2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                            self.return_indices, backend=self.backend)


class AvgPool2d(torch.nn.AvgPool2d):
    @drop_in_init(torch.nn.AvgPool2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override, backend=self.backend)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    @drop_in_init(torch.nn.AdaptiveAvgPool2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.adaptive_avg_pool2d(input, self.output_size, backend=self.backend)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    @drop_in_init(torch.nn.AdaptiveMaxPool2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def forward(self, input):
        return P.adaptive_max_pool2d(input, self.output_size, self.return_indices, backend=self.backend)
