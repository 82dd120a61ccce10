"""BatchNorm2d and fused BatchNorm2d+ReLU on every backend.

x: (N, C, H, W) float16|bfloat16|float32 (cpp CPU and reference also float64), NCHW or NHWC;
the output has x's dtype, shape and memory format. Per-channel statistics are float32 (float64 for
float64 input); weight/bias/running stats have x's dtype, or all float32 (float16/bfloat16/float64 x).

Four compiled ops per backend (cpp: torch.ops.fusedcnn.<name>; triton: torch.ops.fusedcnn.triton_<name>):
  batch_norm_stats(x) -> (mean, var)                       per-channel mean, biased variance (stable merge)
  batch_norm_apply(x, mean, invstd, weight?, bias?, relu) -> y = relu?((x - mean) * invstd * weight + bias)
  batch_norm_backward_reduce(g, x, mean, invstd, weight?, bias?, relu) -> (sum_dy, sum_dy_xmu)
  batch_norm_backward_elemt(g, x, mean, invstd, weight?, bias?, sum_dy?, sum_dy_xmu?, count, relu) -> dx
They are split where sync BN (torch.distributed) has to reduce across ranks:

  training forward:  stats (1 read of x)  ->  [sync: all_gather (count, mean, var), Chan merge]
                     ->  running-stat update (tiny, (C,) tensors)  ->  apply (1 read of x, 1 write of y)
  eval forward:      apply with the running stats (1 read, 1 write)
  backward:          reduce (1 read of g, 1 read of x)  ->  [sync: all_reduce (sum_dy, sum_dy_xmu)]
                     ->  elemt (1 read of g, 1 read of x, 1 write of dx)
  = the minimum the math allows: the statistics must be complete before any element is normalized,
  and sum_dy / sum_dy_xmu before any dx.
The cpp backend also has each direction as one op, used in training without sync:
  batch_norm_train_forward(x, weight?, bias?, running_mean?, running_var?, momentum, eps, relu)
      -> (y, mean, var, invstd), the running statistics updated in place (as aten::native_batch_norm)
  batch_norm_train_backward(g, x, mean, invstd, weight?, bias?, relu) -> (dx, sum_dy, sum_dy_xmu)
On CPU, when one channel (N*H*W values, NCHW) fits in L2, a task per channel reads it from memory once for
the statistics (or the reduction) and again from cache for y (or dx): 2 and 3 passes over memory instead
of 3 and 5, and two op calls per layer instead of four plus the (C,)-vector arithmetic between them.

Saved for backward: x (not y) and the per-channel mean and invstd. The ReLU mask is recomputed from x
as ((x - mean) * a + bias > 0) with the forward's own per-channel a = weight * invstd, in float32
-- the value the forward rounded to y, so the same sign -- which costs no extra memory or bytes (x is
read anyway for x - mean); saving y as well (what torch's BatchNorm2d + ReLU does) would cost a tensor.

Backward formulas (M = elements per channel over all ranks, g' = g * relu mask):
  sum_dy = sum(g'),  sum_dy_xmu = sum(g' * (x - mean)),  dbias = sum_dy,  dweight = sum_dy_xmu * invstd
  training: dx = weight * invstd * (g' - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M)
  eval:     dx = weight * invstd * g'
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn import reference
from fusedcnn.ops._registry import define, dispatch, eager_op, has_op, implement, op, register
from fusedcnn.common import accumulation_dtype, entry_point
from fusedcnn.reference.batchnorm import update_running_stats
from fusedcnn.common import dense_format

FAMILY = "batchnorm"
__all__ = ["batch_norm", "batch_norm_relu"]  # the public functionals (fusedcnn.functional)

# ---- the compiled ops (schemas; launchers of the same names in fusedcnn.triton_kernels.batchnorm)
define("batchnorm", {
    "batch_norm_stats": "(Tensor x) -> (Tensor mean, Tensor var)",
    "batch_norm_apply": "(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, bool relu) -> Tensor",
    "batch_norm_backward_reduce": "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
                                  "Tensor? bias, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "batch_norm_backward_elemt": "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
                                 "Tensor? bias, Tensor? sum_dy, Tensor? sum_dy_xmu, float count, bool relu) -> Tensor",
})
define("batchnorm", {  # cpp only: the training forward / backward in one call each
    "batch_norm_train_forward": "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
                                "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> "
                                "(Tensor y, Tensor mean, Tensor var, Tensor invstd)",
    "batch_norm_train_backward": "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
                                 "Tensor? bias, bool relu) -> (Tensor grad_x, Tensor sum_dy, Tensor sum_dy_xmu)",
}, only="cpp")


# ---- fake functions, shared by triton and cpp
def _fake_channel_pair(x: Tensor, *rest) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    dt = accumulation_dtype(x.dtype)
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


def _fake_like_x(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


register("batch_norm_stats", fake=_fake_channel_pair)
register("batch_norm_apply", fake=lambda x, *rest: _fake_like_x(x))
register("batch_norm_backward_reduce", fake=lambda g, x, *rest: _fake_channel_pair(x))
register("batch_norm_backward_elemt", fake=lambda g, x, *rest: _fake_like_x(x))
# cpp only: the training forward / backward in one call each (CPU: a channel stays in cache between passes)
register("batch_norm_train_forward",
         fake=lambda x, *rest: (_fake_like_x(x), *_fake_channel_pair(x), _fake_channel_pair(x)[0]))
register("batch_norm_train_backward",
         fake=lambda g, x, *rest: (_fake_like_x(x), *_fake_channel_pair(x)))


def _affine_grads(sum_dy, sum_dy_xmu, invstd, weight, bias, need_w, need_b):
    """(dweight, dbias) from the backward reduction: dweight = sum_dy_xmu * invstd, dbias = sum_dy (None if not needed)."""
    dw = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
    db = sum_dy.to(bias.dtype) if need_b else None
    return dw, db


def _differentiable_grads(grad_out, x, weight, bias, mean, invstd, eps, training, relu, group, needs):
    """(dx, dweight, dbias) from differentiable torch ops, for double backward (the kernels have no autograd).

    x: (N, C, H, W) with its autograd history; mean, invstd: the forward's (C,) statistics (acc dtype, constant).
    In training the statistics are functions of x: they are recomputed differentiably (over every rank of
    `group`), so d(dx)/dx includes their derivative. The ReLU mask uses the forward's own statistics (constant).
    """
    need_x, need_w, need_b = needs
    acc, c = mean.dtype, (1, -1, 1, 1)
    w = None if weight is None else weight.to(acc).view(c)
    g = grad_out.to(acc)
    xf = x.to(acc)
    if relu:
        with torch.no_grad():
            z = (xf - mean.view(c)) * invstd.view(c)
            z = z if w is None else z * w
            z = z if bias is None else z + bias.to(acc).view(c)
        g = g * (z > 0)
    count = None
    if training:
        mean, var, count = reference.batch_norm_stats(x, group)
        invstd = torch.rsqrt(var + eps)
    xmu = xf - mean.view(c)
    sum_dy, sum_dy_xmu = g.sum((0, 2, 3)), (g * xmu).sum((0, 2, 3))
    dw = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None  # local, as the kernels' (and SyncBatchNorm)
    db = sum_dy.to(bias.dtype) if need_b else None
    dx = None
    if need_x:
        scale = invstd if w is None else invstd * w.view(-1)
        if training:
            if group is not None:
                from torch.distributed.nn.functional import all_reduce
                sum_dy, sum_dy_xmu = all_reduce(torch.cat([sum_dy, sum_dy_xmu]), group=group).split(sum_dy.numel())
            dx = g - (sum_dy / count).view(c) - xmu * (invstd * invstd * sum_dy_xmu / count).view(c)
            dx = dx * scale.view(c)
        else:
            dx = g * scale.view(c)
        dx = dx.to(x.dtype)
    return dx, dw, db


# ---- autograd over the compiled ops (one Function: sync BN needs collectives between the kernels)
class _BatchNormApply(torch.autograd.Function):
    """y = relu?((x - mean) * invstd * weight + bias); when `training`, mean/invstd are x's batch statistics
    (over every rank of `group`, invstd = rsqrt(var + eps)) and the backward differentiates through them."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, training, relu, backend, group, eps):
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.count, ctx.training, ctx.relu, ctx.backend, ctx.group = count, training, relu, backend, group
        ctx.eps = eps
        return eager_op(backend, "batch_norm_apply")(x, mean, invstd, weight, bias, relu)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if not (need_x or need_w or need_b):
            return (None,) * 11
        if torch.is_grad_enabled():  # double backward: differentiable torch ops instead of the kernels
            return _differentiable_grads(grad_out, x, weight, bias, mean, invstd, ctx.eps, ctx.training, ctx.relu,
                                         ctx.group, (need_x, need_w, need_b)) + (None,) * 8
        sum_dy = sum_dy_xmu = None
        if ctx.training or need_w or need_b:  # pass 1: per-channel reduction
            sum_dy, sum_dy_xmu = op(ctx.backend, "batch_norm_backward_reduce")(
                grad_out, x, mean, invstd, weight, bias, ctx.relu)
            dw, db = _affine_grads(sum_dy, sum_dy_xmu, invstd, weight, bias, need_w, need_b)
        if need_x:
            if ctx.training and ctx.group is not None:  # local dweight/dbias stay local, as torch.nn.SyncBatchNorm
                both = torch.cat([sum_dy, sum_dy_xmu])
                torch.distributed.all_reduce(both, group=ctx.group)
                sum_dy, sum_dy_xmu = both.split(sum_dy.numel())
            if not ctx.training:
                sum_dy = sum_dy_xmu = None
            dx = op(ctx.backend, "batch_norm_backward_elemt")(  # pass 2: elementwise
                grad_out, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, float(ctx.count), ctx.relu)
        return dx, dw, db, None, None, None, None, None, None, None, None


def _sync_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """Merge every rank's (count, mean, biased var) exactly (Chan et al.): one all_gather of 2C+1 numbers."""
    world = torch.distributed.get_world_size(group)
    mine = torch.cat([mean, var, mean.new_tensor([float(count)])])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine, group=group)
    allr = torch.stack(gathered)  # (world, 2C+1)
    c = mean.numel()
    means, vars_, counts = allr[:, :c], allr[:, c:2 * c], allr[:, 2 * c:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (vars_ + (means - g_mean) ** 2)).sum(0) / total
    return g_mean, g_var, int(total.item())


def _compiled_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, relu, backend, group):
    """x: (N, C, H, W). The training forward's three steps (stats, running update, apply) around _BatchNormApply."""
    if training and group is None and has_op(backend, "batch_norm_train_forward"):
        # One op: statistics, running-stat update and apply; its autograd is C++ (csrc/batchnorm/*_autograd.cpp).
        return eager_op(backend, "batch_norm_train_forward")(x, weight, bias, running_mean, running_var, momentum,
                                                             eps, relu)[0]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if training:
        mean, var = eager_op(backend, "batch_norm_stats")(x.detach())
        if group is not None:
            mean, var, count = _sync_stats(mean, var, count, group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        acc = accumulation_dtype(x.dtype)
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    invstd = torch.rsqrt(var + eps)
    return _BatchNormApply.apply(x, weight, bias, mean, invstd, count, training, relu, backend, group, eps)


# ---- argument checks (torch's messages), shared by both functionals
def _check_args(input, running_mean, running_var, weight, bias, training):
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"batch_norm" not implemented for \'{str(input.dtype).split(".")[-1].capitalize()}\'')
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(f"running_{'mean' if running_mean is None else 'var'} must be defined in evaluation mode")
    if training:
        size = input.numel() // c if c else 0
        if size <= 1 and input.numel() > 0:  # message and type of torch.nn.functional._verify_batch_size
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must either both be None or neither be None")
    check_parameter_dtypes(input.dtype, weight, bias, running_mean, running_var)


_TYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def check_parameter_dtypes(dtype: torch.dtype, *params) -> None:
    """torch's BatchNorm rule for the dtypes of (weight, bias, running_mean, running_var) with input `dtype`
    (and its messages, those of ATen's CPU kernels): all of the input's dtype, or -- when the first one given
    differs ("mixed dtype") -- all float32 with float16 or bfloat16 input (AMP). One extension: float64 input
    with float32 parameters runs (in float64), where torch raises "all inputs must share same datatype"."""
    given = [t for t in params if t is not None]
    if given and given[0].dtype != dtype:
        if any(t.dtype != torch.float32 for t in given):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if dtype not in (torch.float16, torch.bfloat16, torch.float64):
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    for t in given:
        if t.dtype != dtype:
            raise RuntimeError(f"expected scalar type {_TYPE_NAMES.get(dtype, dtype)} but found "
                               f"{_TYPE_NAMES.get(t.dtype, t.dtype)}")


def _as_4d(x: Tensor) -> Tensor:
    """(N, C, *) as (N, C, H, W): a view for 2-D/3-D and contiguous 5-D+ input."""
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1, 1)


# ---- one implementation per backend:
#   batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, relu, group) -> y
#   x: (N, C, H, W); group: a torch.distributed group to reduce the batch statistics over, or None
class _Torch:
    @staticmethod
    def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, relu, group):
        if group is not None:
            raise RuntimeError("fusedcnn: backend 'torch' has no synchronized batch norm here; "
                               "use torch.nn.SyncBatchNorm, or backend 'reference', 'triton' or 'cpp' with sync=True")
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y


class _Compiled:
    def __init__(self, backend: str):
        self.backend = backend

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps, relu, group):
        return _compiled_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                                    self.backend, group)


IMPLEMENTATIONS = implement(FAMILY, {"torch": _Torch, "reference": reference, "triton": _Compiled("triton"),
                                     "cpp": _Compiled("cpp")})


def _process_group(sync: bool, training: bool):
    """torch.distributed's default group when sync=True applies (training, initialized, > 1 process), else None."""
    dist = torch.distributed
    if sync and training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu, backend, sync):
    _check_args(input, running_mean, running_var, weight, bias, training)
    impl = dispatch(FAMILY, backend, input)
    if momentum is None:
        momentum = 0.0  # F.batch_norm's momentum=None with given running stats: the module computes 1/n
    y = impl.batch_norm(_as_4d(input), running_mean, running_var, weight, bias, training, momentum, eps, relu,
                        _process_group(sync, training))
    return y if input.dim() == 4 else y.reshape(input.shape)


# ---- public functional entry points
@entry_point()  # under autocast: the input's dtype, parameters as given (torch's batch_norm)
def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               *, backend: str | None = None, sync: bool = False) -> Tensor:
    """torch.nn.functional.batch_norm with a `backend=` choice; sync=True reduces the batch statistics
    over torch.distributed's default group (when initialized with more than one process)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, False, backend, sync)


@entry_point()
def batch_norm_relu(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, *, backend: str | None = None,
                    sync: bool = False) -> Tensor:
    """relu(batch_norm(...)) fused: one apply pass forward, one reduction + one elementwise pass backward."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, True, backend, sync)
