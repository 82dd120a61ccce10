"""Pooling: max, average, adaptive average, adaptive max (global 1x1 included).

x: (N, C, H, W) or unbatched (C, H, W); float32|float64|float16|bfloat16 (cpp on CUDA: no float64),
NCHW or NHWC -> out (N, C, OH, OW) in x's memory format (as torch). Indices: flat h*W+w per plane, int64.

Ops (the same schema for cpp `torch.ops.fusedcnn.<name>` and triton `torch.ops.fusedcnn.triton_<name>`):
  max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices) -> (out, indices | empty)
  max_pool2d_backward(grad_out, x, kernel, stride, padding, dilation, ceil_mode) -> grad_in
      the argmax is recomputed from x instead of saved (fewer bytes: see triton_kernels/pooling.py)
  avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> out
  avg_pool2d_backward(grad_out, input_size, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
  adaptive_avg_pool2d(x, output_size) -> out;   adaptive_avg_pool2d_backward(grad_out, input_size)
  adaptive_max_pool2d(x, output_size) -> (out, indices)   (always: its backward reads them)
  adaptive_max_pool2d_backward(grad_out, indices, input_size)
Arguments are checked here, where the user calls, with PyTorch's messages (reference.pooling.*_geometry).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.common import adaptive_geometry, dense_format, entry_point, pooled_size, regular_geometry
from fusedcnn.ops._registry import CompiledOps, define, dispatch, eager_op, implement, op, register

FAMILY = "pooling"
__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"]  # the public functionals (fusedcnn.functional)

# ---- the compiled ops (schemas; launchers of the same names in fusedcnn.triton_kernels.pooling)
define("pooling", {
    "max_pool2d": "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
                  "bool return_indices) -> (Tensor, Tensor)",
    "max_pool2d_backward": "(Tensor grad_out, Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
                           "int[2] dilation, bool ceil_mode) -> Tensor",
    "avg_pool2d": "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
                  "bool count_include_pad, int? divisor_override) -> Tensor",
    "avg_pool2d_backward": "(Tensor grad_out, int[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
                           "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor",
    "adaptive_avg_pool2d": "(Tensor x, int[2] output_size) -> Tensor",
    "adaptive_avg_pool2d_backward": "(Tensor grad_out, int[4] input_size) -> Tensor",
    "adaptive_max_pool2d": "(Tensor x, int[2] output_size) -> (Tensor, Tensor)",
    "adaptive_max_pool2d_backward": "(Tensor grad_out, Tensor indices, int[4] input_size) -> Tensor",
})


# ---- fake functions (shapes, dtypes, memory formats), shared by triton and cpp
def _empty(x: Tensor, shape, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=dense_format(x))


def _fake_regular(x, kernel_size, stride, padding, dilation, ceil_mode):
    N, C, H, W = x.shape
    return (N, C, pooled_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
            pooled_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))


def _fake_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    shape = _fake_regular(x, kernel_size, stride, padding, dilation, ceil_mode)
    idx = _empty(x, shape, torch.int64) if return_indices else x.new_empty((0,), dtype=torch.int64)
    return _empty(x, shape), idx


def _fake_avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _empty(x, _fake_regular(x, kernel_size, stride, padding, (1, 1), ceil_mode))


def _fake_grad_in(grad_out, input_size, *args):
    return _empty(grad_out, input_size)


def _fake_adaptive(x, output_size):
    return _empty(x, (*x.shape[:2], *output_size))


register("max_pool2d_backward", fake=lambda g, x, *args: _empty(g, x.shape))
register("avg_pool2d_backward", fake=_fake_grad_in)
register("adaptive_avg_pool2d_backward", fake=_fake_grad_in)
register("adaptive_max_pool2d_backward", fake=lambda g, idx, input_size: _empty(g, input_size))


# ---- autograd (each backend's backward calls that backend's own backward op): triton; cpp has the same formulas
#      in csrc/pooling/pooling_autograd.cpp (these only for a fusedcnn._C without it)
def _save_x(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _save_shape(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape)
    ctx.args = inputs[1:]


def _save_indices(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.input_size = list(inputs[0].shape)


def _max_pool2d_backward(backend):
    bwd = op(backend, "max_pool2d_backward")

    def backward(ctx, grad_out, grad_indices):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode, _ = ctx.args
        return bwd(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode), *([None] * 6)
    return backward


def _avg_pool2d_backward(backend):
    bwd = op(backend, "avg_pool2d_backward")

    def backward(ctx, grad_out):
        return bwd(grad_out, ctx.input_size, *ctx.args), *([None] * 6)
    return backward


def _adaptive_avg_pool2d_backward(backend):
    bwd = op(backend, "adaptive_avg_pool2d_backward")
    return lambda ctx, grad_out: (bwd(grad_out, ctx.input_size), None)


def _adaptive_max_pool2d_backward(backend):
    bwd = op(backend, "adaptive_max_pool2d_backward")

    def backward(ctx, grad_out, grad_indices):
        (indices,) = ctx.saved_tensors
        return bwd(grad_out, indices, ctx.input_size), None
    return backward


# Double backward (grad mode on in backward): aten's pooling backward ops, differentiable in grad_out (each is
# linear in it). They take the input for its shape only where the ctx saves just the shape: an uninitialized one.
def _input_like(ctx, grad_out: Tensor) -> Tensor:
    return _empty(grad_out, ctx.input_size)


def _max_pool2d_differentiable(ctx, grad_out, grad_indices):
    (x,) = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode, _ = ctx.args
    # The argmax, as the kernels pick it (first maximum in scan order, NaN wins), from torch's forward.
    _, indices = torch.ops.aten.max_pool2d_with_indices(x.detach(), kernel_size, stride, padding, dilation, ceil_mode)
    grad = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation,
                                                           ceil_mode, indices)
    return grad, *([None] * 6)


def _avg_pool2d_differentiable(ctx, grad_out):
    return torch.ops.aten.avg_pool2d_backward(grad_out, _input_like(ctx, grad_out), *ctx.args), *([None] * 6)


def _adaptive_avg_pool2d_differentiable(ctx, grad_out):
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad_out, _input_like(ctx, grad_out)), None


def _adaptive_max_pool2d_differentiable(ctx, grad_out, grad_indices):
    (indices,) = ctx.saved_tensors
    return torch.ops.aten.adaptive_max_pool2d_backward(grad_out, _input_like(ctx, grad_out), indices), None


register("max_pool2d", fake=_fake_max_pool2d, setup_context=_save_x, backward_factory=_max_pool2d_backward,
         differentiable_backward=_max_pool2d_differentiable)
register("avg_pool2d", fake=_fake_avg_pool2d, setup_context=_save_shape, backward_factory=_avg_pool2d_backward,
         differentiable_backward=_avg_pool2d_differentiable)
register("adaptive_avg_pool2d", fake=_fake_adaptive, setup_context=_save_shape,
         backward_factory=_adaptive_avg_pool2d_backward, differentiable_backward=_adaptive_avg_pool2d_differentiable)
register("adaptive_max_pool2d", fake=lambda x, output_size: (_fake_adaptive(x, output_size),
                                                              _empty(x, (*x.shape[:2], *output_size), torch.int64)),
         setup_context=_save_indices, backward_factory=_adaptive_max_pool2d_backward,
         differentiable_backward=_adaptive_max_pool2d_differentiable)


# ---- one implementation per backend, with the compiled ops' arguments and results (x: (N, C, H, W)):
#   max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices) -> (out, indices | None)
#   avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> out
#   adaptive_avg_pool2d(x, output_size) -> out;   adaptive_max_pool2d(x, output_size) -> (out, indices)
class _Torch:
    @staticmethod
    def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices):
        res = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)
        return res if return_indices else (res, None)

    @staticmethod
    def avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)

    adaptive_avg_pool2d = staticmethod(F.adaptive_avg_pool2d)
    adaptive_max_pool2d = staticmethod(lambda x, output_size: F.adaptive_max_pool2d(x, output_size, True))


class _Reference:
    @staticmethod
    def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices):
        res = reference.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices)
        return res if return_indices else (res, None)

    avg_pool2d = staticmethod(reference.avg_pool2d)
    adaptive_avg_pool2d = staticmethod(reference.adaptive_avg_pool2d)
    adaptive_max_pool2d = staticmethod(lambda x, output_size: reference.adaptive_max_pool2d(x, output_size, True))


class _CppOps(CompiledOps):
    """The cpp ops; adaptive pooling with windows of more than _MAX_TAPS taps runs in two passes -- each row's
    windows (N, C, H, OW), then each column's (N, C, OH, OW) -- because the CPU kernels' tiled path (global
    pooling is one tile) keeps an int64 offset per window tap: 17 GB for a 46341x46341 plane. Adaptive windows are
    separable, so the result is the same (average: up to rounding; max: the same value and index, the first
    maximum in row-major order, the last NaN), and autograd runs through both passes."""

    _MAX_TAPS = 1 << 16

    def __init__(self):
        super().__init__("cpp")

    def _large(self, x: Tensor, output_size) -> bool:
        (H, W), (OH, OW) = x.shape[-2:], output_size
        return OH > 0 and OW > 0 and (-(-H // OH) + 1) * (-(-W // OW) + 1) > self._MAX_TAPS

    def adaptive_avg_pool2d(self, x: Tensor, output_size) -> Tensor:
        pool = eager_op("cpp", "adaptive_avg_pool2d")
        if not self._large(x, output_size):
            return pool(x, output_size)
        return pool(pool(x, [x.shape[2], output_size[1]]), output_size)

    def adaptive_max_pool2d(self, x: Tensor, output_size):
        pool = eager_op("cpp", "adaptive_max_pool2d")
        if not self._large(x, output_size):
            return pool(x, output_size)
        N, C = x.shape[:2]
        rows, row_idx = pool(x, [x.shape[2], output_size[1]])  # (N, C, H, OW), flat h*W+w into x
        out, idx = pool(rows, output_size)                      # (N, C, OH, OW), flat h*OW+ow into rows
        idx = row_idx.reshape(N, C, -1).gather(2, idx.reshape(N, C, -1)).view(out.shape)
        return out, idx.contiguous(memory_format=dense_format(out))


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": _Reference, "triton": CompiledOps("triton"),
                                     "cpp": _CppOps()})


# ---- public functional entry points (torch.nn.functional's signatures + backend=)
def _run_batched(fn, x: Tensor):
    """Run fn on a 4-D view of x; unbatched (C, H, W) input gets a batch of one, as in torch."""
    if x.dim() == 4:
        return fn(x)
    res = fn(x.unsqueeze(0))
    return tuple(r.squeeze(0) for r in res) if isinstance(res, tuple) else res.squeeze(0)


def _check_input(x, fn):
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}(): argument 'input' must be Tensor, not {type(x).__name__}")


# regular_geometry memoized on (function, input shape, arguments) for eager calls whose kernel_size, stride, padding
# and dilation are ints (nn.MaxPool2d(2), F.max_pool2d(x, 2)): its checks cost ~4 us a call, the lookup ~0.3 us.
# A bad call raises every time (errors are not stored); other argument types (tuples, floats, bools, SymInts) and
# traced calls are checked every time.
_GEOMETRY: dict[tuple, tuple] = {}
_GEOMETRY_SIZE = 1024


def _memoized(key, compute, *args):
    """_GEOMETRY[key], compute(*args) (stored) on a miss; key None: computed, not stored."""
    if key is not None:
        try:
            return _GEOMETRY[key]
        except KeyError:
            pass
        except TypeError:  # a symbolic shape (make_fx): not hashable
            key = None
    value = compute(*args)
    if key is not None:
        if len(_GEOMETRY) >= _GEOMETRY_SIZE:
            _GEOMETRY.clear()
        _GEOMETRY[key] = value
    return value


def _geometry(fn: str, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """regular_geometry's (kernel, stride, padding, dilation) as the ops' int[2] lists (shared: never mutated)."""
    key = None
    if (type(kernel_size) is int and (stride is None or type(stride) is int) and type(padding) is int
            and type(dilation) is int and not torch.compiler.is_compiling()):
        key = (fn, x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return _memoized(key, _regular_lists, fn, x, kernel_size, stride, padding, dilation, ceil_mode)


def _regular_lists(*args):
    k, s, p, d, _ = regular_geometry(*args)
    return list(k), list(s), list(p), list(d)


def _adaptive_size(fn: str, x: Tensor, output_size) -> list[int]:
    """adaptive_geometry's (OH, OW) as the ops' int[2] list (shared: never mutated), memoized like _geometry for
    eager calls whose output_size is an int or a pair of ints / None (its checks cost ~2 us a call)."""
    key = None
    kind = type(output_size)
    if (kind is int or (kind in (tuple, list) and len(output_size) == 2 and type(output_size[0]) in _SIZE_TYPES
                        and type(output_size[1]) in _SIZE_TYPES)) and not torch.compiler.is_compiling():
        key = (fn, x.shape, output_size if kind is not list else tuple(output_size))
    return _memoized(key, _adaptive_list, fn, x, output_size)


def _adaptive_list(*args):
    return list(adaptive_geometry(*args))


_SIZE_TYPES = (int, type(None))


def _out(res, return_indices: bool):
    """(out, indices) -> what torch returns: the pair, or out alone."""
    return (res[0], res[1]) if return_indices else res[0]


@entry_point()  # pooling under autocast: the input's dtype, as torch's
def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False, *, backend: str | None = None):
    """torch.nn.functional.max_pool2d with a `backend=` choice."""
    _check_input(input, "max_pool2d")
    impl = dispatch(FAMILY, backend, input)
    k, s, p, d = _geometry("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    if input.dim() == 4:  # the common case without _run_batched's closure (~0.5 us of a ~5 us call)
        return _out(impl.max_pool2d(input, k, s, p, d, ceil_mode, return_indices), return_indices)
    return _run_batched(lambda x: _out(impl.max_pool2d(x, k, s, p, d, ceil_mode, return_indices), return_indices),
                        input)


@entry_point()
def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None, *, backend: str | None = None):
    """torch.nn.functional.avg_pool2d with a `backend=` choice."""
    _check_input(input, "avg_pool2d")
    impl = dispatch(FAMILY, backend, input)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("divisor must be not zero")
    k, s, p, _ = _geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    # torch divides by a negative divisor_override as given; the kernels take a positive one, and
    # sum / -d == -(sum / d) exactly (round to nearest is symmetric), in every dtype.
    negative = divisor_override is not None and divisor_override < 0
    divisor = -divisor_override if negative else divisor_override
    out = _run_batched(lambda x: impl.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, divisor), input)
    return -out if negative else out


@entry_point()
def adaptive_avg_pool2d(input: Tensor, output_size, *, backend: str | None = None):
    """torch.nn.functional.adaptive_avg_pool2d with a `backend=` choice."""
    _check_input(input, "adaptive_avg_pool2d")
    impl = dispatch(FAMILY, backend, input)
    size = _adaptive_size("adaptive_avg_pool2d", input, output_size)
    if input.dim() == 4:  # without _run_batched's closure
        return impl.adaptive_avg_pool2d(input, size)
    return _run_batched(lambda x: impl.adaptive_avg_pool2d(x, size), input)


@entry_point()
def adaptive_max_pool2d(input: Tensor, output_size, return_indices: bool = False, *, backend: str | None = None):
    """torch.nn.functional.adaptive_max_pool2d with a `backend=` choice."""
    _check_input(input, "adaptive_max_pool2d")
    impl = dispatch(FAMILY, backend, input)
    size = _adaptive_size("adaptive_max_pool2d", input, output_size)
    if input.dim() == 4:  # without _run_batched's closure
        return _out(impl.adaptive_max_pool2d(input, size), return_indices)
    return _run_batched(lambda x: _out(impl.adaptive_max_pool2d(x, size), return_indices), input)
