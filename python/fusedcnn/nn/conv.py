"""Conv2d module: torch.nn.Conv2d (same arguments, parameters, state_dict and repr) plus `backend=`."""
import torch
import torch.nn.functional as F

from fusedcnn.backends import check_backend_arg
from fusedcnn.nn._dropin import drop_in_init
from fusedcnn.ops.conv import conv2d

__all__ = ["Conv2d"]


class Conv2d(torch.nn.Conv2d):
    """Drop-in torch.nn.Conv2d: its arguments (nn/_dropin.py) plus `backend`: "auto" (default), "torch",
    "reference", "triton" or "cpp"."""

    @drop_in_init(torch.nn.Conv2d, backend="auto")
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend_arg(backend)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":  # as torch.nn.Conv2d: pad explicitly, then convolve unpadded
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups, backend=self.backend)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                      backend=self.backend)
