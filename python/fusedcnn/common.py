"""Helpers every layer family needs, at the bottom of the import graph (imports torch only).

The reference backend, the Triton launchers, the ops and the modules all import these; nothing here imports
another fusedcnn module, so the kernels and the oracle never depend on each other.

  layout        is_channels_last, dense_format
  dtypes        accumulation_dtype (what reductions and per-channel statistics accumulate in)
  conv          pair, explicit_padding, conv_output_size
  pooling       pooled_size, regular_geometry, adaptive_geometry (PyTorch's checks and messages)
  dropout       draw_seed
  triton        triton_interpreted
  autocast      entry_point (a functional's decorator: torch's autocast policy, fx_traceable), autocast_inputs,
                autocast_device
  torch.fx      fx_traceable, is_fx_proxy
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
from torch import Tensor


# ---------------------------------------------------------------- layout
def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC and not also plain contiguous -- or, with one channel (both then),
    when its strides are NHWC's own (channel stride 1: torch's conv returns NHWC for it). csrc/common.h's
    dense_format is the same rule."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return not x.is_contiguous() or (x.shape[1] == 1 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1)


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format an elementwise kernel keeps: NHWC if x is NHWC-dense (and not NCHW), else NCHW."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


# ---------------------------------------------------------------- dtypes
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and per-channel statistics accumulate in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- conv geometry
def pair(v, name: str) -> tuple[int, int]:
    """int or 1-/2-sequence of ints -> (int, int), with torch's message for a wrong length."""
    t = (v,) if isinstance(v, int) else tuple(v)
    if len(t) == 1:
        t = t * 2
    if len(t) != 2:
        raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to match the "
                           f"convolution dimensions, but got {name}={list(t)}")
    return int(t[0]), int(t[1])


def explicit_padding(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """padding (int, pair, "same" or "valid") -> (top, bottom, left, right).

    "same" keeps H and W (stride 1): the total dH*(kH-1) is split with the extra row/column,
    when it is odd, on the bottom/right, as torch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        raise RuntimeError(f"Invalid padding string: {padding!r}")
    ph, pw = pair(padding, "padding")
    return ph, ph, pw, pw


def conv_output_size(size: int, pad_total: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


# ---------------------------------------------------------------- pooling geometry (PyTorch's order and messages)
def pooled_size(n: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Number of windows along a dimension of size n (PyTorch's pooling_output_shape)."""
    span = dilation * (kernel - 1) + 1
    out = (n + 2 * pad - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= n + pad:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _pool_pair(v, fn: str, what: str, default=None) -> tuple[int, int]:
    hint = {"kernel_size": "must either be a single int, or a tuple of two ints",
            "stride": "must either be omitted, a single int, or a tuple of two ints",
            "padding": "must either be a single int, or a tuple of two ints",
            "dilation": "must be either a single int, or a tuple of two ints"}[what]
    if v is None or (what == "stride" and isinstance(v, (tuple, list)) and len(v) == 0):
        return default
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(e, int) for e in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    raise RuntimeError(f"{fn}: {what} {hint}")


def _cdiv_trunc(a: int, b: int) -> int:
    """C's integer division (toward zero), as PyTorch's checks compute it."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def regular_geometry(fn: str, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """Normalise and check max/avg pooling arguments like PyTorch.

    Returns (kernel, stride, padding, dilation, (OH, OW)) as int pairs; raises RuntimeError
    with PyTorch's message for bad input. x: (C, H, W) or (N, C, H, W).
    """
    k = _pool_pair(kernel_size, fn, "kernel_size")
    s = _pool_pair(stride, fn, "stride", default=k)
    p = _pool_pair(padding, fn, "padding")
    d = _pool_pair(dilation, fn, "dilation")
    if x.dim() not in (3, 4) or x.numel() == 0 and x.dim() == 3:
        raise RuntimeError("non-empty 3D or 4D (batch mode) tensor expected for input")
    out = []
    for i in range(2):  # pooling_output_shape, H then W
        if s[i] == 0:
            raise RuntimeError("stride should not be zero")
        if p[i] < 0:
            raise RuntimeError(f"pad must be non-negative, but got pad: {p[i]}")
        if p[i] > _cdiv_trunc((k[i] - 1) * d[i] + 1, 2):
            raise RuntimeError(f"pad should be at most half of effective kernel size, but got pad={p[i]}, "
                               f"kernel_size={k[i]} and dilation={d[i]}")
        out.append(pooled_size(x.shape[i - 2], k[i], s[i], p[i], d[i], ceil_mode) if s[i] > 0 else 0)
    if k[0] <= 0 or k[1] <= 0:
        raise RuntimeError(f"kernel size should be greater than zero, but got kH: {k[0]} kW: {k[1]}")
    if s[0] <= 0 or s[1] <= 0:
        raise RuntimeError(f"stride should be greater than zero, but got dH: {s[0]} dW: {s[1]}")
    if d[0] <= 0 or d[1] <= 0:
        raise RuntimeError(f"dilation should be greater than zero, but got dilationH: {d[0]} dilationW: {d[1]}")
    if any(n == 0 for n in x.shape[-3:]):
        raise RuntimeError("Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got:{list(x.shape)}")
    if k[1] // 2 < p[1] or k[0] // 2 < p[0]:
        raise RuntimeError(f"pad should be smaller than or equal to half of kernel size, but got padW = {p[1]}, "
                           f"padH = {p[0]}, kW = {k[1]}, kH = {k[0]}")
    if out[0] < 1 or out[1] < 1:
        C, H, W = x.shape[-3:]
        raise RuntimeError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{out[0]}x{out[1]}). "
                           "Output size is too small")
    return k, s, p, d, (out[0], out[1])


def adaptive_geometry(fn: str, x: Tensor, output_size) -> tuple[int, int]:
    """Normalise and check an adaptive pooling output_size like PyTorch (None = the input's size)."""
    if x.dim() not in (3, 4):
        sep = ": " if fn == "adaptive_max_pool2d" else " "
        raise RuntimeError(f"{fn}(): Expected 3D or 4D tensor, but got{sep}{list(x.shape)}")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if not isinstance(output_size, (tuple, list)) or len(output_size) != 2:
        raise RuntimeError(f"{fn}: output_size must be 2")
    out = tuple(x.shape[i - 2] if v is None else int(v) for i, v in enumerate(output_size))
    for i in range(1, x.dim()) if x.dim() == 4 else range(x.dim()):
        if x.shape[i] == 0:
            raise RuntimeError(f"{fn}(): Expected input to have non-zero size for non-batch dimensions, "
                               f"but input has sizes {list(x.shape)} with dimension {i} being empty")
    if out[0] < 0 or out[1] < 0:
        raise RuntimeError(f"{fn}: elements of output_size must be greater than or equal to 0 "
                           f"but received {{{out[0]}, {out[1]}}}")
    return out


# ---------------------------------------------------------------- dropout seed
def draw_seed() -> Tensor:
    """A fresh 64-bit dropout seed: a 0-dim int64 CPU tensor (a signed int64) from torch's default CPU generator
    -- no GPU sync, and torch.manual_seed reproduces it. Kernels use its 64 bits as the unsigned Philox key.

    A tensor, not an int: torch.export and torch.compile trace the draw as a graph op, where reading its value
    (int(), .item()) would be a data-dependent guard; only the ops' bodies read it (ops/dropout.py)."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


# ---------------------------------------------------------------- triton
def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors: TRITON_INTERPRET=1 was set before triton was imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------- autocast
# torch's autocast (aten/src/ATen/autocast_mode.cpp) casts the inputs of conv and linear ("lower_precision_fp")
# to the autocast dtype and runs them with autocast off; BatchNorm, pooling, ReLU and dropout are in none of its
# lists: they run on what they are handed (bf16 activations with float32 BatchNorm parameters give bf16).
def autocast_device(*args) -> str | None:
    """The device type of the first tensor among args when torch.autocast is on for it, else None."""
    for a in args:
        if isinstance(a, Tensor):
            device_type = "cuda" if a.is_cuda else "cpu" if a.is_cpu else a.device.type  # is_*: cheaper than .device
            if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):  # "meta": none
                return device_type if torch.is_autocast_enabled(device_type) else None
            return None
    return None


def _autocast_cast(t, dtype: torch.dtype, device_type: str):
    # autocast_mode.cpp's is_eligible: a floating tensor on the autocast device, not float64
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type:
        return t.to(dtype)
    return t


def autocast_inputs(*tensors):
    """The tensors as torch's autocast hands them to a lower-precision op (conv, linear): floating ones on the
    autocast device cast to the autocast dtype when autocast is on; float64, integer and None pass unchanged."""
    device_type = autocast_device(*tensors)
    if device_type is None:
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_autocast_cast(t, dtype, device_type) for t in tensors)


def entry_point(*lower_precision: str):
    """Decorator of a public functional entry point: fx_traceable's behaviour and the autocast behaviour of its
    torch counterpart, in one wrapper (one Python frame per layer call).

    torch.fx: as fx_traceable (the call of a Proxy is recorded as one call_function node of the entry point).
    Autocast: when autocast is on for the device of the call's first tensor argument, the arguments named in
    lower_precision (conv, linear: "input", "weight", "bias") are cast to the autocast dtype (autocast_inputs);
    with none named (BatchNorm, pooling, ReLU, dropout) every argument passes unchanged. The body then runs
    with autocast off, as torch runs an autocast-wrapped op and torch.library.register_autocast a custom op:
    the torch calls inside an implementation (the reference backend, BatchNorm's (C,) arithmetic) keep the
    dtypes they are handed, so every backend gives torch's output dtype. Without autocast: fn itself.
    """
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)
        where = [(names.index(name), name) for name in lower_precision]

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            proxy = _fx_proxy(args, kwargs)
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", entry, args, kwargs)
            # one flag read (~0.1 us) before autocast_device (~1.5 us): autocast is off in most calls
            if not _any_autocast_enabled():
                return fn(*args, **kwargs)
            device_type = autocast_device(*args, *kwargs.values())
            if device_type is None:
                return fn(*args, **kwargs)
            if where:
                dtype = torch.get_autocast_dtype(device_type)
                args = list(args)
                for i, name in where:
                    if i < len(args):
                        args[i] = _autocast_cast(args[i], dtype, device_type)
                    elif name in kwargs:
                        kwargs[name] = _autocast_cast(kwargs[name], dtype, device_type)
            if torch.compiler.is_compiling():  # torch.compile traces the context manager
                with torch.autocast(device_type, enabled=False):
                    return fn(*args, **kwargs)
            # eager: toggling the flag costs ~2 us a call, torch.autocast(enabled=False) ~25 us
            torch.set_autocast_enabled(device_type, False)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_autocast_enabled(device_type, True)
        return entry
    return decorate


# ---------------------------------------------------------------- torch.fx
def is_fx_proxy(x) -> bool:
    """True for a torch.fx.Proxy: the value of a tensor while torch.fx symbolically traces a module."""
    return isinstance(x, torch.fx.Proxy)


def fx_traceable(fn):
    """Decorator for a functional entry point: under torch.fx symbolic tracing (an argument is a Proxy) the call
    is recorded as one call_function node of fn itself, instead of running fn's argument checks (which read
    shapes, dtypes and values a Proxy does not have): they run when the traced graph runs. Any other call
    (eager, torch.compile, torch.export) runs fn unchanged."""
    @functools.wraps(fn)
    def traceable(*args, **kwargs):
        proxy = _fx_proxy(args, kwargs)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", traceable, args, kwargs)
        return fn(*args, **kwargs)
    return traceable


def _fx_proxy(args: tuple, kwargs: dict):
    """The first torch.fx.Proxy among a call's arguments (the caller is being symbolically traced), or None."""
    if _has_torch_function(args):  # one C call (~0.1 us) for the usual case: a Proxy overrides __torch_function__
        for a in args:
            if isinstance(a, _Proxy):
                return a
    for a in kwargs.values():
        if isinstance(a, _Proxy):
            return a
    return None


_Proxy = torch.fx.Proxy
_any_autocast_enabled = torch._C._is_any_autocast_enabled  # one global read in entry_point, not three lookups
_has_torch_function = torch._C._has_torch_function
