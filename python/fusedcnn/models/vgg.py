"""VGG16 with BatchNorm+ReLU after every convolution, built from fusedcnn layers.

    x: (N, in_channels, H, W) -> features: 13 x [Conv3x3 -> BatchNormReLU2d], five 2x2 max pools
      -> (N, C, H//32, W//32), C = 512 * width
    head "classic": flatten C x 7 x 7 -> 4096 -> 4096 -> classes (ReLU + Dropout between), 224x224 input
    head "avgpool" / "maxpool": global pooling to C x 1 x 1 first, then C -> 4096 -> 4096 -> classes;
      any input of at least 32x32 (the five pools need one pixel left)

`width` scales every channel count, the classifier's 4096 included (tests and CPU demos use width <= 1/8).
Every layer takes `backend=`; the module tree is the same for every backend.

fused (default True): `features` and `classifier` are FusedSequential containers, which run each
Conv2d -> BatchNormReLU2d [-> 2x2 MaxPool2d] and Linear -> ReLU -> Dropout run through the backend's fused
functional (on triton: the BatchNorm+ReLU applied in the next conv's input prologue or the fused 2x2 pool,
Linear+ReLU+dropout in one GEMM); fused=False uses plain nn.Sequential. The children, parameter names,
state_dict keys and order are the same either way, so checkpoints and optimizer states load into both.
"""
from __future__ import annotations

import torch
from torch import nn

import fusedcnn.nn as fnn
from fusedcnn.backends import check_backend_arg
from fusedcnn.common import fx_traceable
from fusedcnn.nn.fused import FusedSequential

# VGG16 ("configuration D"): output channels of the 13 convolutions, "M" = 2x2 max pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HEADS = ("classic", "avgpool", "maxpool")
DOWNSAMPLE = 32          # five 2x2 pools, each flooring
CLASSIC_FEATURES = 7     # the classic head flattens a 7x7 feature map
MIN_RESOLUTION = DOWNSAMPLE  # smallest input side that leaves one pixel after the pools


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG16(nn.Module):
    """VGG16-BN (see module docstring). Construct through `vgg16()`."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0, head: str = "classic",
                 dropout: float = 0.5, backend: str = "auto", fused: bool | None = True):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"vgg16: in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"vgg16: num_classes must be a positive integer, got {num_classes!r}")
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"vgg16: width must be a positive number, got {width!r}")
        if head not in HEADS:
            raise ValueError(f"vgg16: unknown head {head!r}; expected one of {', '.join(HEADS)}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        check_backend_arg(backend)
        self.head = head
        self.fused = fused is None or bool(fused)  # None: the default (fused), as in earlier versions' configs
        container = FusedSequential if self.fused else nn.Sequential

        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(fnn.MaxPool2d(2, 2, backend=backend))
                continue
            c_out = _scaled(v, width)
            # No conv bias: the BatchNorm right after subtracts any per-channel constant.
            layers += [fnn.Conv2d(c_in, c_out, 3, padding=1, bias=False, backend=backend),
                       fnn.BatchNormReLU2d(c_out, backend=backend)]
            c_in = c_out
        self.features = container(*layers)

        if head == "classic":
            self.pool = nn.Identity()
            flat = c_in * CLASSIC_FEATURES * CLASSIC_FEATURES
        else:
            pool = fnn.AdaptiveAvgPool2d if head == "avgpool" else fnn.AdaptiveMaxPool2d
            self.pool = pool(1, backend=backend)
            flat = c_in
        hidden = _scaled(4096, width)

        def linear_relu_dropout(n_in: int, n_out: int) -> list[nn.Module]:
            return [nn.Linear(n_in, n_out), fnn.ReLU(inplace=True, backend=backend),
                    fnn.Dropout(dropout, backend=backend)]

        self.classifier = container(
            nn.Flatten(1), *linear_relu_dropout(flat, hidden), *linear_relu_dropout(hidden, hidden),
            nn.Linear(hidden, num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's VGG initialisation: Kaiming-normal convs (fan_out, ReLU), BN 1/0, Linear N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm2d and BatchNormReLU2d
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_resolution(self, height: int, width: int) -> None:
        """ValueError, naming the resolutions that work, if this model cannot take (height, width) input."""
        check_resolution(self.head, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checked_input(x, self.head)
        return self.classifier(self.pool(self.features(x)))


@fx_traceable
def checked_input(x: torch.Tensor, head: str) -> torch.Tensor:
    """x itself, if a VGG16 with `head` can take it (check_resolution, for 4-D x). Under torch.fx a graph node:
    the traced model checks each input when it runs."""
    if x.dim() == 4:
        check_resolution(head, x.shape[-2], x.shape[-1])
    return x


def check_resolution(head: str, height: int, width: int) -> None:
    """ValueError, naming the resolutions that work, if a VGG16 with `head` cannot take (height, width) input."""
    if head == "classic":
        lo, hi = CLASSIC_FEATURES * DOWNSAMPLE, (CLASSIC_FEATURES + 1) * DOWNSAMPLE - 1
        if not (lo <= height <= hi and lo <= width <= hi):
            raise ValueError(
                f"vgg16: head='classic' flattens a 7x7 feature map, so it needs input height and width in "
                f"{lo}..{hi} (224x224 as in VGG16); got {height}x{width}. Use head='avgpool' or head='maxpool' "
                f"for any resolution of at least {MIN_RESOLUTION}x{MIN_RESOLUTION}")
    elif height < MIN_RESOLUTION or width < MIN_RESOLUTION:
        raise ValueError(
            f"vgg16: input {height}x{width} is too small: the five 2x2 max pools need height and width of at "
            f"least {MIN_RESOLUTION} (any resolution >= {MIN_RESOLUTION}x{MIN_RESOLUTION} works with "
            f"head={head!r})")


def vgg16(in_channels: int = 1, num_classes: int = 10, width: float = 1.0, head: str = "classic",
          dropout: float = 0.5, backend: str = "auto", fused: bool | None = True) -> VGG16:
    """VGG16 with BatchNormReLU2d after every conv (module docstring). Every layer runs on `backend`.

    fused: True (default; None means the same) = FusedSequential containers, False = plain nn.Sequential."""
    return VGG16(in_channels, num_classes, width, head, dropout, backend, fused)
