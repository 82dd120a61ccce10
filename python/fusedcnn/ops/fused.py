"""The "fused" family: Conv2d + BatchNorm2d + ReLU (+ 2x2 MaxPool2d) and Linear + ReLU (+ Dropout) as one call.

Functionals (tensors of the unfused modules; fusedcnn.nn.FusedSequential calls them for the runs it finds):
  conv_bn_relu(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
               stride, padding, dilation, groups, pool=False)
      = [max_pool2d(., 2, 2) of] relu(batch_norm(conv2d(x, weight, bias, ...), ...))
      x: (N, C_in, H, W) float32|float16|bfloat16 (float64 where the backend's conv and BatchNorm take it),
      NCHW or NHWC; the result has x's dtype and memory format
  linear_relu_dropout(x, weight, bias, p, training) = dropout(relu(F.linear(x, weight, bias)), p, training)
      x: (*, in_features)

Implementations:
  torch, reference, cpp   composition of that backend's conv2d, batch_norm_relu, max_pool2d, relu, dropout
  triton                  the fused kernels (ops below): the conv reduces the batch statistics of its output in
                          its epilogue; the BatchNorm+ReLU is applied by the NEXT conv while it loads its input
                          (`defer=True` returns a Pending record instead of the activation), or by the fused
                          BN+ReLU+2x2-max-pool kernel, or by one elementwise pass; Linear+ReLU+dropout is one GEMM
                          whose epilogue draws the same Philox mask as the dropout family (mask never stored).

Triton ops (schemas in fusedcnn.ops._registry.SCHEMAS; fakes and autograd here):
  conv_bn_relu(x, weight, bias?, in_scale?, in_shift?, stride, padding, dilation, groups, compute_stats)
      -> (y, mean, var): y = conv2d(a, weight, bias), a = relu(x*in_scale + in_shift) when in_scale is given
      (the previous layer's pending BatchNorm+ReLU) else x; mean/var: float32 batch statistics of y per channel
  bn_relu_apply(y, scale, shift) -> relu(y*scale + shift);  bn_relu_maxpool2d(y, scale, shift) -> its 2x2 max
  linear_relu_dropout(x, weight, bias?, p, seed) -> dropout(relu(x @ weight.T + bias))
  each with a *_backward op. BatchNorm's (C,)-vector arithmetic (scale = gamma*rsqrt(var+eps), shift = beta -
  mean*scale, running stats) is plain torch code here: autograd carries the gradients of scale and shift back
  to gamma, beta, mean and var, and the conv op's backward folds those of mean/var into its grad loads.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn.common import accumulation_dtype, conv_output_size, dense_format, draw_seed, entry_point
from fusedcnn.ops._registry import define, dispatch, implement, op, register
from fusedcnn.ops.activation import relu
from fusedcnn.ops.batchnorm import batch_norm_relu, check_parameter_dtypes
from fusedcnn.ops.conv import check_conv2d_args, conv2d
from fusedcnn.ops.dropout import dropout
from fusedcnn.ops.pooling import max_pool2d
from fusedcnn.reference.batchnorm import update_running_stats

FAMILY = "fused"
__all__ = ["conv_bn_relu", "linear_relu_dropout"]  # the public functionals (fusedcnn.functional)

# ---- the compiled ops (Triton only; schemas; launchers of the same names in fusedcnn.triton_kernels.conv / .fused)
define("conv", {
    "conv_bn_relu": "(Tensor x, Tensor weight, Tensor? bias, Tensor? in_scale, Tensor? in_shift, int[2] stride, "
                    "int[2] padding, int[2] dilation, int groups, bool compute_stats) -> (Tensor, Tensor, Tensor)",
    "conv_bn_relu_backward": "(Tensor grad, Tensor? y, Tensor? grad_mean, Tensor? grad_var, Tensor? mean, Tensor x, "
                             "Tensor weight, Tensor? in_scale, Tensor? in_shift, int[2] stride, int[2] padding, "
                             "int[2] dilation, int groups, bool has_bias, bool compute_dx) -> "
                             "(Tensor, Tensor, Tensor, Tensor, Tensor)",
}, only="triton")
define("fused", {
    "bn_relu_apply": "(Tensor y, Tensor scale, Tensor shift) -> Tensor",
    "bn_relu_apply_backward": "(Tensor grad, Tensor y, Tensor scale, Tensor shift) -> (Tensor, Tensor, Tensor)",
    "bn_relu_maxpool2d": "(Tensor y, Tensor scale, Tensor shift) -> Tensor",
    "bn_relu_maxpool2d_backward": "(Tensor grad, Tensor y, Tensor scale, Tensor shift) -> (Tensor, Tensor, Tensor)",
    "linear_relu_dropout": "(Tensor x, Tensor weight, Tensor? bias, float p, SymInt seed) -> Tensor",
    "linear_relu_dropout_backward": "(Tensor grad, Tensor out, Tensor x, Tensor weight, float p, bool has_bias) -> "
                                    "(Tensor, Tensor, Tensor)",
}, only="triton")
_triton = (lambda name: op("triton", name))


# ============================================================================ fakes and autograd (triton ops)
def _like(t: Tensor, shape=None, dtype=None) -> Tensor:
    return torch.empty(t.shape if shape is None else shape, dtype=dtype or t.dtype, device=t.device,
                       memory_format=dense_format(t))


def _conv_out_shape(x, weight, stride, padding, dilation):
    return (x.shape[0], weight.shape[0],
            conv_output_size(x.shape[2], 2 * padding[0], weight.shape[2], stride[0], dilation[0]),
            conv_output_size(x.shape[3], 2 * padding[1], weight.shape[3], stride[1], dilation[1]))


def _conv_bn_relu_fake(x, weight, bias, in_scale, in_shift, stride, padding, dilation, groups, compute_stats):
    n = weight.shape[0] if compute_stats else 0
    acc = accumulation_dtype(x.dtype)
    return (_like(x, _conv_out_shape(x, weight, stride, padding, dilation)),
            x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc))


def _conv_bn_relu_backward_fake(grad, y, grad_mean, grad_var, mean, x, weight, in_scale, in_shift, stride, padding,
                                dilation, groups, has_bias, compute_dx):
    dx = _like(x) if compute_dx or in_scale is not None else x.new_empty((0,))
    n = x.shape[1] if in_scale is not None else 0
    acc = accumulation_dtype(x.dtype)
    return (dx, weight.new_empty(weight.shape), x.new_empty((weight.shape[0] if has_bias else 0,), dtype=acc),
            x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, in_scale, in_shift, stride, padding, dilation, groups, compute_stats = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, weight, in_scale, in_shift, y if compute_stats else None, mean if compute_stats else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias, ctx.compute_stats = bias is not None, compute_stats
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward_factory(backend: str):
    backward_op = op(backend, "conv_bn_relu_backward")

    def backward(ctx, grad_y, grad_mean, grad_var):
        x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        if not ctx.compute_stats:
            grad_mean = grad_var = None
        if grad_y is None:
            grad_y = x.new_zeros(_conv_out_shape(x, weight, stride, padding, dilation))
        stats_used = grad_mean is not None or grad_var is not None
        acc = accumulation_dtype(x.dtype)
        grad_mean, grad_var = (None if g is None else g.to(acc).contiguous() for g in (grad_mean, grad_var))
        dx, dw, db, ds, dt = backward_op(grad_y, y if stats_used else None, grad_mean, grad_var,
                                         mean if stats_used else None, x, weight, in_scale, in_shift, stride, padding,
                                         dilation, groups, ctx.has_bias, ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None, dw, db if ctx.has_bias else None,
                ds if in_scale is not None else None, dt if in_shift is not None else None) + (None,) * 5

    return backward


def _bn_relu_backward_fake(grad, y, scale, shift):
    return _like(y), torch.empty_like(scale), torch.empty_like(shift)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bn_relu_backward_factory(name: str):
    def factory(backend: str):
        backward_op = op(backend, name)

        def backward(ctx, grad):
            y, scale, shift = ctx.saved_tensors
            return backward_op(grad, y, scale, shift)
        return backward
    return factory


def _linear_fake(x, weight, bias, p, seed):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_backward_fake(grad, out, x, weight, p, has_bias):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0] if has_bias else 0,)))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, p, seed = inputs
    ctx.save_for_backward(x, weight, output)  # output > 0 <=> kept and ReLU active: no mask regeneration
    ctx.p, ctx.has_bias = p, bias is not None


def _linear_backward_factory(backend: str):
    backward_op = op(backend, "linear_relu_dropout_backward")

    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        dx, dw, db = backward_op(grad, out, x, weight, ctx.p, ctx.has_bias)
        return dx, dw, db if ctx.has_bias else None, None, None
    return backward


# ---- double backward (grad mode on in backward): the same gradients from differentiable torch ops. Saved inputs
# and outputs unpack with their autograd history, so the gradients stay functions of them; ReLU masks and max-pool
# argmaxes are piecewise constant (no derivative) and computed without grad.
_PER_CHANNEL = (1, -1, 1, 1)


def _acc(t: Tensor) -> torch.dtype:
    """The compute dtype of the gradients: float64 for float64, else float32."""
    return accumulation_dtype(t.dtype)


def _bn_relu_grads(g: Tensor, y: Tensor, scale: Tensor, shift: Tensor):
    """(dy, dscale, dshift) of relu(y * scale + shift) for the gradient g (y's shape, _acc(y)) of its output."""
    yf = y.to(g.dtype)
    with torch.no_grad():
        active = yf * scale.view(_PER_CHANNEL) + shift.view(_PER_CHANNEL) > 0
    g = g * active
    return ((g * scale.view(_PER_CHANNEL)).to(y.dtype), (g * yf).sum((0, 2, 3)).to(scale.dtype),
            g.sum((0, 2, 3)).to(shift.dtype))


def _bn_relu_apply_differentiable(ctx, grad):
    y, scale, shift = ctx.saved_tensors
    return _bn_relu_grads(grad.to(_acc(y)), y, scale, shift)


def _bn_relu_maxpool2d_differentiable(ctx, grad):
    y, scale, shift = ctx.saved_tensors
    with torch.no_grad():
        a = torch.relu(y.to(_acc(y)) * scale.view(_PER_CHANNEL) + shift.view(_PER_CHANNEL))
        _, indices = torch.ops.aten.max_pool2d_with_indices(a, [2, 2], [2, 2], [0, 0], [1, 1], False)
    g = torch.ops.aten.max_pool2d_with_indices_backward(grad.to(a.dtype), a, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                        indices)
    return _bn_relu_grads(g, y, scale, shift)


def _conv_differentiable(ctx, grad_y, grad_mean, grad_var):
    """y = conv2d(a, weight, bias), a = relu(x * in_scale + in_shift) or x; mean, var = batch statistics of y."""
    x, weight, in_scale, in_shift, y, mean = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    acc = _acc(x)
    g = grad_y.to(acc) if grad_y is not None else x.new_zeros(_conv_out_shape(x, weight, stride, padding, dilation),
                                                              dtype=acc)
    if ctx.compute_stats and (grad_mean is not None or grad_var is not None):
        # d mean / dy = 1/M, d var / dy = 2 (y - mean) / M (per channel, M = N*H*W); y and mean are the saved
        # outputs, so this term's own derivative flows back through this op.
        m = y.numel() // y.shape[1]
        extra = 0.0 if grad_mean is None else grad_mean.view(_PER_CHANNEL) / m
        if grad_var is not None:
            extra = extra + grad_var.view(_PER_CHANNEL) * 2.0 / m * (y.to(acc) - mean.view(_PER_CHANNEL))
        g = g + extra
    a = x
    if in_scale is not None:
        a = torch.relu(x.to(acc) * in_scale.view(_PER_CHANNEL) + in_shift.view(_PER_CHANNEL)).to(x.dtype)
    need_a = ctx.needs_input_grad[0] or in_scale is not None
    mask = [need_a, True, ctx.has_bias]
    da, dw, db = torch.ops.aten.convolution_backward(g.to(x.dtype), a, weight, [weight.shape[0]] if ctx.has_bias
                                                     else None, stride, padding, dilation, False, [0, 0], groups, mask)
    dx = ds = dt = None
    if in_scale is not None:
        # a = relu(x * s + t): the mask a > 0 is constant; d a / dx = s, d a / ds = x, d a / dt = 1 where active
        with torch.no_grad():
            active = x.to(acc) * in_scale.view(_PER_CHANNEL) + in_shift.view(_PER_CHANNEL) > 0
        da = da.to(acc) * active
        dx = (da * in_scale.view(_PER_CHANNEL)).to(x.dtype)
        ds, dt = (da * x.to(acc)).sum((0, 2, 3)).to(in_scale.dtype), da.sum((0, 2, 3)).to(in_shift.dtype)
    elif ctx.needs_input_grad[0]:
        dx = da
    db = db.to(ctx.bias_dtype) if ctx.has_bias else None
    return (dx if ctx.needs_input_grad[0] else None, dw, db, ds, dt) + (None,) * 5


def _linear_differentiable(ctx, grad):
    """out = dropout(relu(x @ weight.T + bias)): grad_pre = grad * (out > 0) / (1 - p) (out > 0 <=> kept and
    active; a constant mask), dx = grad_pre @ weight, dweight = grad_pre.T @ x, dbias = grad_pre summed."""
    x, weight, out = ctx.saved_tensors
    scale = 1.0 / (1.0 - ctx.p) if ctx.p < 1.0 else 0.0
    g = grad * (out.detach() > 0) * scale
    return g @ weight, g.t() @ x, g.sum(0) if ctx.has_bias else None, None, None


register("conv_bn_relu", fake=_conv_bn_relu_fake, setup_context=_conv_setup_context,
         backward_factory=_conv_backward_factory, differentiable_backward=_conv_differentiable)
register("conv_bn_relu_backward", fake=_conv_bn_relu_backward_fake)
register("bn_relu_apply", fake=lambda y, scale, shift: _like(y), setup_context=_save_inputs,
         backward_factory=_bn_relu_backward_factory("bn_relu_apply_backward"),
         differentiable_backward=_bn_relu_apply_differentiable)
register("bn_relu_apply_backward", fake=_bn_relu_backward_fake)
register("bn_relu_maxpool2d", fake=lambda y, scale, shift: _like(y, (*y.shape[:2], y.shape[2] // 2, y.shape[3] // 2)),
         setup_context=_save_inputs, backward_factory=_bn_relu_backward_factory("bn_relu_maxpool2d_backward"),
         differentiable_backward=_bn_relu_maxpool2d_differentiable)
register("bn_relu_maxpool2d_backward", fake=_bn_relu_backward_fake)
register("linear_relu_dropout", fake=_linear_fake, setup_context=_linear_setup_context,
         backward_factory=_linear_backward_factory, differentiable_backward=_linear_differentiable)
register("linear_relu_dropout_backward", fake=_linear_backward_fake)


# ---- linear_relu_dropout with the dropout seed as a tensor (common.draw_seed; see ops/dropout.py): the body reads
# the int on real tensors only, so torch.export / torch.compile trace no data-dependent int(). Autograd: the triton
# op's own formulas (same inputs, same ctx): its kernels, or differentiable torch ops when the backward itself is
# recorded (double backward).
@torch.library.custom_op("fusedcnn_seed::linear_relu_dropout", mutates_args=())
def seeded_linear_relu_dropout(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: Tensor) -> Tensor:
    """The triton op linear_relu_dropout(x, weight, bias, p, seed) with seed a 0-dim int64 CPU tensor."""
    return _triton("linear_relu_dropout")(x, weight, bias, p, int(seed))


@seeded_linear_relu_dropout.register_fake
def _seeded_linear_fake(x, weight, bias, p, seed):
    return _linear_fake(x, weight, bias, p, 0)


def _seeded_linear_backward(ctx, grad):
    if torch.is_grad_enabled():
        return _linear_differentiable(ctx, grad)
    return _linear_backward_factory("triton")(ctx, grad)


seeded_linear_relu_dropout.register_autograd(_seeded_linear_backward, setup_context=_linear_setup_context)


# ============================================================================ the pending BatchNorm + ReLU
class Pending:
    """A BatchNorm + ReLU not yet applied (triton): the activation is relu(raw * scale[c] + shift[c]).

    raw: (N, C, H, W) conv output (float32|float16|bfloat16, NCHW or NHWC); scale, shift: (C,) float32,
    differentiable (they carry the gradients of BatchNorm's gamma, beta and batch statistics).
    """

    __slots__ = ("raw", "scale", "shift")

    def __init__(self, raw: Tensor, scale: Tensor, shift: Tensor):
        self.raw, self.scale, self.shift = raw, scale, shift

    def materialize(self) -> Tensor:
        """The activation, in one elementwise pass (read raw, write the activation)."""
        return _triton("bn_relu_apply")(self.raw, self.scale, self.shift)

    def maxpool(self) -> Tensor:
        """max_pool2d(activation, 2, 2), reading raw once; the full-size activation is never written."""
        return _triton("bn_relu_maxpool2d")(self.raw, self.scale, self.shift)


def materialize(x: Union[Tensor, Pending]) -> Tensor:
    """x itself, or the activation a Pending stands for."""
    return x.materialize() if isinstance(x, Pending) else x


# ============================================================================ implementations
class _Composition:
    """torch / reference / cpp: the backend's own conv2d, batch_norm_relu, max_pool2d, relu and dropout; "auto" (the
    per-layer candidate): each of them on its own "auto" choice."""

    def __init__(self, backend: str):
        self.backend = backend

    def conv_bn_relu(self, x, weight, bias, bn, conv, pool, defer):
        b = self.backend
        y = conv2d(materialize(x), weight, bias, *conv, backend=b)
        y = batch_norm_relu(y, *bn, backend=b)
        return max_pool2d(y, 2, 2, backend=b) if pool else y

    def linear_relu_dropout(self, x, weight, bias, p, training):
        b = self.backend
        return dropout(relu(F.linear(x, weight, bias), backend=b), p, training, backend=b)


def _scale_shift(mean, var, count, bn, acc) -> tuple[Tensor, Tensor]:
    """BatchNorm as a per-channel affine map, (C,) of dtype acc (float32; float64 for float64 input): scale = gamma *
    rsqrt(var + eps), shift = beta - mean * scale; with batch statistics (mean given) the running stats are updated
    first (unbiased var)."""
    running_mean, running_var, bn_weight, bn_bias, training, momentum, eps = bn
    if training:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -mean * scale if bn_bias is None else bn_bias.to(acc) - mean * scale
    return scale, shift


def _vector(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(acc).contiguous()


class _Triton:
    """The fused Triton kernels (module docstring)."""

    @staticmethod
    def conv_bn_relu(x, weight, bias, bn, conv, pool, defer):
        raw = x.raw if isinstance(x, Pending) else x
        _, stride, (top, bottom, left, right), dilation = check_conv2d_args(raw, weight, bias, *conv, "auto")
        groups = conv[3]
        if (top, left) != (bottom, right):  # asymmetric "same": zero-pad the activation itself
            x = F.pad(materialize(x), (0, right - left, 0, bottom - top))
        scale_in = x.scale if isinstance(x, Pending) else None
        shift_in = x.shift if isinstance(x, Pending) else None
        training = bn[4]
        acc = accumulation_dtype(raw.dtype)   # the kernels' per-channel vectors: float64 for float64 input
        y, mean, var = _triton("conv_bn_relu")(x.raw if isinstance(x, Pending) else x, weight, _vector(bias, acc),
                                               _vector(scale_in, acc), _vector(shift_in, acc), list(stride),
                                               [top, left], list(dilation), groups, training)
        count = y.numel() // max(y.shape[1], 1)
        if training and count == 1:   # as torch: an empty batch passes (N = 0, DDP's uneven last batch)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
        out = Pending(y, *_scale_shift(mean, var, count, bn, acc))
        if pool:
            return out.maxpool()
        return out if defer else out.materialize()

    @staticmethod
    def linear_relu_dropout(x, weight, bias, p, training):
        p = float(p) if training else 0.0
        x2 = x.reshape(-1, x.shape[-1])
        if 0.0 < p < 1.0:
            out = seeded_linear_relu_dropout(x2, weight, bias, p, draw_seed())
        else:  # no mask: no random draw
            out = _triton("linear_relu_dropout")(x2, weight, bias, p, 0)
        return out.reshape(*x.shape[:-1], weight.shape[0])


# "per-layer" (auto's alone): the composition with each layer on its own "auto" choice -- on CPU, torch's conv on
# NHWC activations with cpp's BatchNorm+ReLU, say, where neither backend's whole run wins.
IMPLEMENTATIONS = implement(FAMILY, {"torch": _Composition("torch"), "reference": _Composition("reference"),
                                     "cpp": _Composition("cpp"), "triton": _Triton}, random=("linear_relu_dropout",),
                            extra={"per-layer": _Composition("auto")})


# ============================================================================ functional entry points
@entry_point("input", "weight", "bias")  # the conv's; a Pending input is already cast
def conv_bn_relu(input: Union[Tensor, Pending], weight: Tensor, bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], bn_weight: Optional[Tensor] = None,
                 bn_bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 stride=1, padding=0, dilation=1, groups: int = 1, *, pool: bool = False,
                 backend: Optional[str] = None, defer: bool = False):
    """relu(batch_norm(conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps)), then max_pool2d(., 2, 2) when pool=True.

    input: (N, C_in, H, W), or a Pending from a previous conv_bn_relu(defer=True) (triton: applied in this conv's
    input prologue). defer=True lets the triton backend return a Pending instead of the activation.
    """
    raw = input.raw if isinstance(input, Pending) else input
    if not isinstance(raw, Tensor):
        raise TypeError(f"conv2d(): argument 'input' must be Tensor, not {type(raw).__name__}")
    if raw.dim() != 4:
        raise ValueError(f"expected 4D input (got {raw.dim()}D input)")
    impl = dispatch(FAMILY, backend, raw)
    # The BatchNorm normalizes the conv's output, of the (autocast) input's dtype.
    check_parameter_dtypes(raw.dtype, bn_weight, bn_bias, running_mean, running_var)
    conv = (stride, padding, dilation, groups)
    bn = (running_mean, running_var, bn_weight, bn_bias, training, 0.0 if momentum is None else momentum, eps)
    return impl.conv_bn_relu(input, weight, bias, bn, conv, pool, defer)


@entry_point("input", "weight", "bias")  # as torch's linear: in the autocast dtype
def linear_relu_dropout(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, p: float = 0.5,
                        training: bool = True, *, backend: Optional[str] = None) -> Tensor:
    """dropout(relu(F.linear(input, weight, bias)), p, training); input (*, in_features).

    The dropout mask is the dropout family's Philox stream over the row-major index of the (*, out_features)
    output (the same mask on every backend but torch for the same seed)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"linear(): argument 'input' must be Tensor, not {type(input).__name__}")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if input.dim() == 0:
        raise RuntimeError("both arguments to linear need to be at least 1D, but they are 0D and 2D")
    impl = dispatch(FAMILY, backend, input)
    return impl.linear_relu_dropout(input, weight, bias, p, training)
