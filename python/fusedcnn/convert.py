"""convert(): swap a model's torch.nn CNN layers for fusedcnn's, fusing BatchNorm2d + ReLU where it is safe.

    model = torchvision.models.resnet18()
    model = fusedcnn.convert(model, backend="triton")

Replaced (exact types only, so a user's subclass with its own forward is left alone; fusedcnn layers are
rebuilt with the new backend): Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
AdaptiveMaxPool2d, Dropout. Parameters and buffers are the very same tensors (an optimizer built before
keeps working), and device, dtype and training mode are kept.

Fusion: a BatchNorm2d immediately followed by a ReLU inside a plain nn.Sequential (whose forward runs its
children in order) becomes one BatchNormReLU2d, and the ReLU's slot becomes nn.Identity, so state_dict
keys do not change. Only the order of a Sequential proves that one layer feeds the next: a BatchNorm and
ReLU called from a custom forward are left unfused — torchvision's ResNet BasicBlock/Bottleneck call one
`self.relu` after several BatchNorms (and after the residual addition), so their BatchNorms stay
BatchNorm2d and their ReLU a ReLU. A BatchNorm or ReLU module that occurs more than once in the model is
never fused either. The counts are logged (logger "fusedcnn.convert", INFO).

sync_bn=True: fused BatchNormReLU2d layers reduce their batch statistics across torch.distributed ranks
(sync=True); a BatchNorm2d that could not be fused becomes torch.nn.SyncBatchNorm (fusedcnn has no
unfused synchronized BatchNorm).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

import fusedcnn.nn as fnn
from fusedcnn.backends import check_backend_arg

log = logging.getLogger("fusedcnn.convert")

# Constructor arguments that define each layer (beyond its tensors), read from an existing module.
_ARGS = {
    "Conv2d": lambda m: dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                             stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                             bias=m.bias is not None, padding_mode=m.padding_mode),
    "BatchNorm2d": lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                  track_running_stats=m.track_running_stats),
    "ReLU": lambda m: dict(inplace=m.inplace),
    "MaxPool2d": lambda m: dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                return_indices=m.return_indices, ceil_mode=m.ceil_mode),
    "AvgPool2d": lambda m: dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                                divisor_override=m.divisor_override),
    "AdaptiveAvgPool2d": lambda m: dict(output_size=m.output_size),
    "AdaptiveMaxPool2d": lambda m: dict(output_size=m.output_size, return_indices=m.return_indices),
    "Dropout": lambda m: dict(p=m.p, inplace=m.inplace),
}
_TENSOR_LAYERS = ("Conv2d", "BatchNorm2d")  # built on the meta device, then handed the original tensors


def _kind(m: nn.Module) -> str | None:
    """The layer name in _ARGS if `m` is exactly that torch.nn layer or its fusedcnn replacement."""
    for name in _ARGS:
        if type(m) in (getattr(nn, name), getattr(fnn, name)):
            return name
    if type(m) in (nn.SyncBatchNorm, fnn.BatchNormReLU2d):
        return "BatchNorm2d"
    return None


def _rebuild(old: nn.Module, cls: type, **extra) -> nn.Module:
    """A `cls` layer configured like `old`, owning old's own parameters and buffers, in old's training mode."""
    kind = _kind(old)
    args = _ARGS[kind](old)
    if kind in _TENSOR_LAYERS:
        args["device"] = "meta"  # no allocation: the tensors come from `old` below
    new = cls(**args, **extra)
    for name in list(new._parameters):
        new._parameters[name] = old._parameters[name]
    for name in list(new._buffers):
        new._buffers[name] = old._buffers[name]
    new.train(old.training)
    return new


def _is_relu(m: nn.Module) -> bool:
    return type(m) in (nn.ReLU, fnn.ReLU)


def _runs_in_order(seq: nn.Module) -> bool:
    return isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward


def convert(model: nn.Module, backend: str = "auto", sync_bn: bool = False) -> nn.Module:
    """Replace model's CNN layers by fusedcnn's on `backend` (module docstring); returns the model.

    The model is changed in place; the return value matters only when `model` itself is one layer.
    """
    check_backend_arg(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    stats = {"replaced": 0, "fused": 0, "unfused_bn": 0}
    new_for: dict[int, nn.Module] = {}  # a module reached twice is converted once (sharing is kept)

    def convert_one(m: nn.Module, fuse_relu: bool) -> nn.Module:
        kind = _kind(m)
        if kind is None:
            return m
        if id(m) in new_for:
            return new_for[id(m)]
        if kind == "BatchNorm2d":
            sync = sync_bn or getattr(m, "sync", False) or isinstance(m, nn.SyncBatchNorm)
            if fuse_relu or type(m) is fnn.BatchNormReLU2d:
                new = _rebuild(m, fnn.BatchNormReLU2d, backend=backend, sync=sync)
                stats["fused"] += fuse_relu
            else:
                stats["unfused_bn"] += 1
                new = _rebuild(m, nn.SyncBatchNorm) if sync else _rebuild(m, fnn.BatchNorm2d, backend=backend)
        else:
            new = _rebuild(m, getattr(fnn, kind), backend=backend)
        stats["replaced"] += 1
        new_for[id(m)] = new
        return new

    def visit(parent: nn.Module) -> None:
        names = list(parent._modules)
        in_order = _runs_in_order(parent)
        skip_next = False
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            if skip_next:  # the ReLU just fused into the BatchNorm before it
                parent._modules[name] = nn.Identity().train(child.training)
                skip_next = False
                continue
            nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            fuse = (in_order and _kind(child) == "BatchNorm2d" and type(child) is not fnn.BatchNormReLU2d
                    and nxt is not None and _is_relu(nxt) and uses[id(child)] == 1 and uses[id(nxt)] == 1)
            if _kind(child) is None:
                visit(child)
            else:
                parent._modules[name] = convert_one(child, fuse)
                skip_next = fuse

    if _kind(model) is not None:
        model = convert_one(model, False)
    else:
        visit(model)
    log.info("convert(backend=%r): %d layers replaced, %d BatchNorm2d+ReLU pairs fused, %d BatchNorm2d left "
             "unfused (not directly followed by a ReLU in an nn.Sequential)", backend, stats["replaced"],
             stats["fused"], stats["unfused_bn"])
    return model
