"""Helpers shared by the launchers: argument checks and output allocation."""
import os

import torch

# FUSEDCNN_POISON=1 (set by the tests): fresh outputs are filled with NaN so an
# element a kernel forgets to write fails the comparison.
_POISON = os.environ.get("FUSEDCNN_POISON", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def new_output(shape, like: torch.Tensor, dtype=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def check_tensor(t: torch.Tensor, name: str, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    """Raise a clear error (never an out-of-bounds access) for a tensor a kernel cannot take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format an elementwise kernel keeps: NHWC if x is NHWC-dense (and not NCHW), else NCHW."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format
