"""Fusion as an execution plan: FusedSequential, and the fused modules built on it (ConvBNReLU2d, LinearReLUDropout).

A FusedSequential is an nn.Sequential whose children stay exactly what they are (Conv2d, BatchNorm2d, ReLU, ...).
At its first forward it finds the fusable runs among its children (PATTERNS, longest first):

    Conv2d -> BatchNorm2d -> ReLU [-> MaxPool2d 2x2/s2]      fused.conv_bn_relu (pool=True with the pool)
    Conv2d -> BatchNormReLU2d [-> MaxPool2d 2x2/s2]          fused.conv_bn_relu
    BatchNorm2d -> ReLU                                      batchnorm.batch_norm_relu
    Linear -> ReLU [-> Dropout]                              fused.linear_relu_dropout

caches that plan (rebuilt when the children change), and calls the fused functional with the modules' own
parameters and buffers, on the backend the modules name (every backend implements the "fused" family: torch,
reference and cpp by composition, triton with fused kernels). A Conv+BN+ReLU run on triton hands its pending
BatchNorm+ReLU to a following Conv+BN+ReLU run, which applies it while loading its input.
A run runs unfused, module by module, when one of its modules carries hooks (or global module hooks are set),
when its fusedcnn modules name different backends, or when the input is not a 4-D tensor (conv runs).
torch.fx (symbolic_trace, torchvision's create_feature_extractor) traces the children one by one.
State_dict keys, parameter names and order, hooks and torch's module rewrites are those of the unfused model by
construction: nothing is renamed, nothing is replaced.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from fusedcnn import autotune, backends
from fusedcnn.backends import check_backend_arg
from fusedcnn.common import dense_format, is_fx_proxy
from fusedcnn.nn.activation import ReLU
from fusedcnn.nn.batchnorm import BatchNorm2d, BatchNormReLU2d, batch_norm_arguments
from fusedcnn.nn.conv import Conv2d
from fusedcnn.nn.dropout import Dropout
from fusedcnn.nn.pooling import MaxPool2d
from fusedcnn.ops import fused as F_fused
from fusedcnn.ops.batchnorm import batch_norm_relu

__all__ = ["FusedSequential", "ConvBNReLU2d", "LinearReLUDropout", "fuse_chain"]


# ---------------------------------------------------------------- which modules a run may hold
# Exact types only: a user's subclass may have its own forward, which a fused run would skip.
def _is_conv(m) -> bool:
    return type(m) in (nn.Conv2d, Conv2d) and m.padding_mode == "zeros"


def _is_bn(m) -> bool:
    return type(m) in (nn.BatchNorm2d, BatchNorm2d)


def _is_bn_relu(m) -> bool:
    return type(m) is BatchNormReLU2d and not m.sync  # the fused kernels reduce statistics on this process only


def _is_relu(m) -> bool:
    return type(m) in (nn.ReLU, ReLU)


def _is_pool2x2(m) -> bool:
    return (type(m) in (nn.MaxPool2d, MaxPool2d) and _pair(m.kernel_size) == (2, 2)
            and _pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1)
            and not m.ceil_mode and not m.return_indices)


def _is_linear(m) -> bool:
    return type(m) is nn.Linear


def _is_dropout(m) -> bool:
    return type(m) in (nn.Dropout, Dropout)


# ---------------------------------------------------------------- how a run is computed
def _bn_args(bn) -> tuple:
    """The BatchNorm module's tensors and flags for this call, in batch_norm's argument order."""
    running_mean, running_var, use_batch_stats, momentum = batch_norm_arguments(bn)
    return running_mean, running_var, bn.weight, bn.bias, use_batch_stats, momentum, bn.eps


def _run_conv_bn_relu(mods, x, backend, defer):
    conv, bn, pool = mods[0], mods[1], _is_pool2x2(mods[-1])
    w = conv.weight
    if backend is None and isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] > 1 and _is_nhwc(x) \
            and w.is_contiguous() and backends.current_backend() == "auto":
        # "auto" on NHWC activations (the layout decision): an NHWC copy of an NCHW weight (a few KB) spares
        # oneDNN a reorder in each of the conv's three passes (measured: the e2e step 5-10% faster)
        w = w.contiguous(memory_format=torch.channels_last)
    return F_fused.conv_bn_relu(x, w, conv.bias, *_bn_args(bn), conv.stride, conv.padding,
                                conv.dilation, conv.groups, pool=pool, backend=backend, defer=defer)


def _run_bn_relu(mods, x, backend, defer):
    return batch_norm_relu(F_fused.materialize(x), *_bn_args(mods[0]), backend=backend)


def _run_linear_relu_dropout(mods, x, backend, defer):
    linear, dropout = mods[0], (mods[2] if len(mods) == 3 else None)
    p, training = (dropout.p, dropout.training) if dropout is not None else (0.0, False)
    return F_fused.linear_relu_dropout(F_fused.materialize(x), linear.weight, linear.bias, p, training,
                                       backend=backend)


class Pattern(NamedTuple):
    name: str
    layers: tuple[Callable[[nn.Module], bool], ...]
    run: Callable  # run(modules, input, backend, defer) -> Tensor | Pending
    takes_pending: bool = False  # a conv run: applies a previous run's pending BatchNorm+ReLU itself


PATTERNS = (
    Pattern("conv_bn_relu_maxpool", (_is_conv, _is_bn, _is_relu, _is_pool2x2), _run_conv_bn_relu, True),
    Pattern("conv_bn_relu_maxpool", (_is_conv, _is_bn_relu, _is_pool2x2), _run_conv_bn_relu, True),
    Pattern("conv_bn_relu", (_is_conv, _is_bn, _is_relu), _run_conv_bn_relu, True),
    Pattern("conv_bn_relu", (_is_conv, _is_bn_relu), _run_conv_bn_relu, True),
    Pattern("bn_relu", (_is_bn, _is_relu), _run_bn_relu),
    Pattern("linear_relu_dropout", (_is_linear, _is_relu, _is_dropout), _run_linear_relu_dropout),
    Pattern("linear_relu", (_is_linear, _is_relu), _run_linear_relu_dropout),
)


def _consistent(mods: Sequence[nn.Module]) -> bool:
    """Shapes that chain: the BatchNorm normalizes the conv's output channels."""
    if _is_conv(mods[0]):
        return mods[1].num_features == mods[0].out_channels
    return True


class Step(NamedTuple):
    """One step of a plan: modules[start:start + len(modules)] run as `pattern` (None: one module, unfused)."""
    modules: tuple[nn.Module, ...]
    pattern: Optional[Pattern]


def find_runs(children: Sequence[nn.Module]) -> list[Step]:
    """The plan for a Sequential's children: fusable runs (PATTERNS, longest first) and single modules."""
    steps, i = [], 0
    while i < len(children):
        for pattern in PATTERNS:
            mods = tuple(children[i:i + len(pattern.layers)])
            if (len(mods) == len(pattern.layers) and all(ok(m) for ok, m in zip(pattern.layers, mods))
                    and _consistent(mods)):
                steps.append(Step(mods, pattern))
                i += len(mods)
                break
        else:
            steps.append(Step((children[i],), None))
            i += 1
    return steps


# ---------------------------------------------------------------- running a plan
def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _is_nhwc(x: Tensor) -> bool:
    """x (N, C, H, W) laid out NHWC with the channel stride 1 -- also when C is 1: a contiguous (N, 1, H, W) tensor is
    channels_last-dense too, but torch's conv returns NCHW for it, and NHWC for the same values strided NHWC."""
    return x.is_contiguous(memory_format=torch.channels_last) and (x.stride(1) == 1 or x.numel() == 0)


class _Relayout(torch.autograd.Function):
    """x copied into memory_format with that format's own strides (a (N, 1, H, W) input too: Tensor.contiguous
    would keep its NCHW strides); its gradient copied back into x's own format. (Tensor.contiguous hands the
    gradient back in the format it arrives in: an NHWC gradient reaching an NCHW layer sent torch's ReLU
    backward through its slow mixed-format path, 2.3x its time.)"""

    @staticmethod
    def forward(ctx, x, memory_format):
        ctx.source = dense_format(x)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format).copy_(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.source), None


def _layout_measurable(plan: list[Step], x) -> bool:
    """Whether "auto" may choose the memory format a FusedSequential runs in: an NCHW 4-D floating input, a plan
    with a conv run, every fusedcnn module on "auto" and no hooks, autotune on, no tracing (torch.compile makes
    its own layout choice) and no process group (measuring runs forward and backward on rank 0 alone, which
    would deadlock a synchronized BatchNorm)."""
    if not (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point() and x.is_contiguous() and x.numel()):
        return False
    if not autotune.enabled() or torch.compiler.is_compiling() or autotune._distributed() \
            or torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return False  # the plain plan under torch.func transforms and forward-mode AD (as dispatch runs torch)
    if backends.current_backend() != "auto":
        return False
    has_conv = False
    for step in plan:
        if any(getattr(m, "backend", "auto") not in ("auto", None) or _has_hooks(m) for m in step.modules):
            return False
        has_conv = has_conv or (step.pattern is not None and step.pattern.takes_pending)
    return has_conv


def _run_backend(mods: Sequence[nn.Module]) -> tuple[bool, Optional[str]]:
    """(can the run fuse, the backend its modules name: None = the context's). torch.nn modules (nn.Linear, or a
    model's own nn.Conv2d) name none and follow the others; fusedcnn modules naming different backends don't fuse."""
    names = {m.backend for m in mods if hasattr(m, "backend")}
    if len(names) > 1 or any(_has_hooks(m) for m in mods):
        return False, None
    name = names.pop() if names else "auto"
    return True, None if name == "auto" else name


class FusedSequential(nn.Sequential):
    """An nn.Sequential that runs fusable layer runs of its children through fused functionals (module docstring).

    Its children, state_dict keys, parameter names and hooks are exactly those of the nn.Sequential it replaces.
    """

    def _plan(self) -> list[Step]:
        return self._planned()[1]

    def _planned(self) -> tuple:
        """(children, plan, structure): structure names the children (types and weight shapes), the part of a
        layout decision's key that tells this Sequential from another one."""
        children = tuple(self._modules.values())
        cached = self.__dict__.get("_fusedcnn_plan")
        if cached is None or cached[0] != children:
            structure = ",".join(type(m).__name__ + ("" if getattr(m, "weight", None) is None
                                                     else "x".join(map(str, m.weight.shape))) for m in children)
            cached = (children, find_runs(children), structure)
            self.__dict__["_fusedcnn_plan"] = cached  # a plain attribute: not a submodule, not in state_dict
        return cached

    def forward(self, input):
        if _global_hooks() or is_fx_proxy(input):
            # torch.fx traces the children one by one: each records its own fusedcnn functional on its backend,
            # and every child's output is a node (torchvision's create_feature_extractor can return any of them).
            return super().forward(input)
        _, plan, structure = self._planned()
        if _layout_measurable(plan, input) and autotune.layout(self, structure, input,
                                                                self._run) == "channels_last":
            return self._run(input, "channels_last")
        return self._run(input)

    def _run(self, input, layout: str = "contiguous"):
        """The plan over input (a Tensor, or whatever the first child takes). layout="channels_last" (input NCHW):
        the activation entering a conv run is converted to NHWC where it is not NHWC already (_is_nhwc) -- the
        network's input, and after a run whose backend returned NCHW (cpp's conv keeps its 1-channel input's
        NCHW; torch's returns NHWC for it strided NHWC, which costs a 1-channel copy instead of converting its
        C-channel output) --, the runs keep it (torch's conv, BatchNorm and pooling kernels on CPU are often
        faster so), and the result is returned NCHW, as a plain Sequential gives it."""
        plan = self._plan()
        x = input
        nhwc = layout == "channels_last"
        for i, step in enumerate(plan):
            if nhwc and step.pattern is not None and step.pattern.takes_pending and isinstance(x, Tensor) \
                    and x.dim() == 4 and not _is_nhwc(x):
                x = _Relayout.apply(x, torch.channels_last)
            fusable, backend = _run_backend(step.modules) if step.pattern else (False, None)
            if fusable and step.pattern.takes_pending:
                raw = x.raw if isinstance(x, F_fused.Pending) else x
                fusable = isinstance(raw, Tensor) and raw.dim() == 4
            if not fusable:
                x = F_fused.materialize(x)
                for m in step.modules:
                    x = m(x)
                continue
            nxt = plan[i + 1] if i + 1 < len(plan) else None
            defer = nxt is not None and nxt.pattern is not None and nxt.pattern.takes_pending
            x = step.pattern.run(step.modules, x, backend, defer)
        x = F_fused.materialize(x)
        return _Relayout.apply(x, torch.contiguous_format) if layout == "channels_last" and isinstance(x, Tensor) \
            else x

    def fused_runs(self) -> list[tuple[str, list[str]]]:
        """The plan's fused runs as (pattern name, [child names]): what forward() fuses (hooks permitting)."""
        names = {id(m): n for n, m in self._modules.items()}
        return [(s.pattern.name, [names[id(m)] for m in s.modules]) for s in self._plan() if s.pattern is not None]


def fuse_chain(seq: nn.Sequential) -> FusedSequential:
    """A FusedSequential holding seq's own children (shared, not copied): same keys, parameters and order."""
    out = FusedSequential(OrderedDict(seq._modules.items()))
    return out.train(seq.training)


class _FusedModule(FusedSequential):
    """A named fused layer: a FusedSequential of fixed children, like torch.ao.nn.intrinsic's modules."""

    _legacy_prefixes: dict[str, str] = {}

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return FusedSequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Keys of the earlier layout of this module (e.g. "conv.weight") -> the child's ("0.weight").
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in self._legacy_prefixes.items():
                if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConvBNReLU2d(_FusedModule):
    """relu(BatchNorm2d(Conv2d(x))) = FusedSequential(Conv2d, BatchNorm2d, ReLU), one fused call on every backend.

    Arguments are Conv2d's followed by BatchNorm2d's (num_features = out_channels) and `backend=`. Children:
    0 = fusedcnn.nn.Conv2d, 1 = fusedcnn.nn.BatchNorm2d, 2 = fusedcnn.nn.ReLU (state_dict keys 0.weight, 1.weight,
    1.running_mean, ..., as torch.ao.nn.intrinsic.ConvBnReLU2d).
    """

    _legacy_prefixes = {"conv.": "0.", "bn.": "1."}

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        check_backend_arg(backend)
        super().__init__(
            Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                   device, dtype, backend=backend),
            BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device, dtype, backend=backend),
            ReLU(backend=backend))


class LinearReLUDropout(_FusedModule):
    """dropout(relu(Linear(x)), p) = FusedSequential(Linear, ReLU, Dropout), one fused call on every backend
    (triton: one GEMM with ReLU and the Philox dropout mask in its epilogue).

    Children: 0 = torch.nn.Linear, 1 = fusedcnn.nn.ReLU, 2 = fusedcnn.nn.Dropout (keys 0.weight, 0.bias).
    """

    _legacy_prefixes = {"weight": "0.weight", "bias": "0.bias"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5,
                 device=None, dtype=None, *, backend: str = "auto"):
        check_backend_arg(backend)
        super().__init__(nn.Linear(in_features, out_features, bias, device, dtype), ReLU(backend=backend),
                         Dropout(p, backend=backend))
