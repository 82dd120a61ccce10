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

backend="triton" fuses more, inside an exact nn.Sequential (or a FusedSequential) only: a Conv2d (groups=1,
padding_mode "zeros") directly followed by BatchNorm2d and ReLU (or by a BatchNormReLU2d) becomes one
ConvBNReLU2d at the conv's slot, nn.Identity in the others, and that Sequential becomes a FusedSequential
(in place), which hands each conv's pending BatchNorm+ReLU to the next fused conv or 2x2 max pool; a Linear
directly followed by ReLU (and Dropout) becomes one LinearReLUDropout the same way. Each layer must be used
once in the model. state_dict keys and parameter order do not change (FusedSequential saves and loads the
unfused keys), so checkpoints and optimizer states work across backends. Converting a model with these
fused layers to another backend (or with sync_bn=True) splits them back into Conv2d + BatchNormReLU2d and
Linear + ReLU (+ Dropout) in the same slots.

sync_bn=True: fused BatchNormReLU2d layers reduce their batch statistics across torch.distributed ranks
(sync=True); a BatchNorm2d that could not be fused becomes torch.nn.SyncBatchNorm (fusedcnn has no
unfused synchronized BatchNorm). No conv is fused with its BatchNorm then: the fused kernels reduce the
statistics on one process only.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

import fusedcnn.nn as fnn
from fusedcnn.backends import check_backend_arg
from fusedcnn.nn.fused import ConvBNReLU2d, FusedSequential, LinearReLUDropout, fused_slots

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
    return isinstance(seq, nn.Sequential) and (type(seq).forward is nn.Sequential.forward
                                               or type(seq) is FusedSequential)


def _as_torch(m: nn.Module) -> nn.Module:
    """The plain torch.nn Conv2d / BatchNorm2d a ConvBNReLU2d holds for m (m's own tensors)."""
    if _kind(m) == "Conv2d":
        return m if type(m) is nn.Conv2d else _rebuild(m, nn.Conv2d)
    return m if type(m) is nn.BatchNorm2d else _rebuild(m, nn.BatchNorm2d)


def _plain_linear(m: nn.Linear) -> nn.Linear:
    """A torch.nn.Linear holding m's own weight and bias."""
    new = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
    new.weight, new.bias = m.weight, m.bias
    return new.train(m.training)


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
    stats = {"replaced": 0, "fused": 0, "unfused_bn": 0, "conv_fused": 0, "linear_fused": 0}
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

    fuse_conv = backend == "triton" and not sync_bn  # the fused kernels have no cross-process statistics
    fuse_linear = backend == "triton"

    def fusable(m: nn.Module) -> bool:  # exact types (a subclass may have its own forward), used once
        kind = "Linear" if type(m) is nn.Linear else _kind(m)
        if kind in ("Conv2d", "BatchNorm2d") and not fuse_conv or kind in ("Linear", "Dropout") and not fuse_linear:
            return False
        return kind in ("Conv2d", "BatchNorm2d", "ReLU", "Linear", "Dropout") and uses.get(id(m), 1) == 1

    def fuse_slots(parent: nn.Sequential) -> None:
        """Conv+BN+ReLU / Linear+ReLU(+Dropout) runs -> fused modules in place (fusedcnn.nn.fused's slot layout)."""
        names = list(parent._modules)
        new, counts = fused_slots([parent._modules[n] for n in names], fusable, _as_torch)
        for name, m in zip(names, new):
            parent._modules[name] = m
        stats["conv_fused"] += counts["conv"]
        stats["linear_fused"] += counts["linear"]
        if counts["conv"]:
            parent.__class__ = FusedSequential  # no state of its own: forward + state_dict key mapping

    def unfuse_slots(parent: nn.Sequential) -> None:
        """The inverse for layers this backend / sync_bn cannot fuse: ConvBNReLU2d, Identity -> Conv2d,
        BatchNormReLU2d; LinearReLUDropout, Identity[, Identity] -> Linear, ReLU[, Dropout]."""
        names = list(parent._modules)
        for k, name in enumerate(names):
            m, after = parent._modules[name], [parent._modules[n] for n in names[k + 1:k + 3]]
            free = [type(a) is nn.Identity for a in after] + [False, False]  # the slots that follow are free
            if isinstance(m, ConvBNReLU2d) and not fuse_conv and free[0]:
                parent._modules[name] = m.conv
                parent._modules[names[k + 1]] = _rebuild(m.bn, fnn.BatchNormReLU2d, backend=backend, sync=sync_bn)
            elif isinstance(m, LinearReLUDropout) and not fuse_linear and free[0] and (m.p == 0 or free[1]):
                parent._modules[name] = _plain_linear(m)
                parent._modules[names[k + 1]] = nn.ReLU().train(m.training)
                if m.p > 0:
                    parent._modules[names[k + 2]] = nn.Dropout(m.p).train(m.training)
        if type(parent) is FusedSequential and not any(isinstance(c, ConvBNReLU2d) for c in parent.children()):
            parent.__class__ = nn.Sequential

    def visit(parent: nn.Module) -> None:
        if type(parent) in (nn.Sequential, FusedSequential):
            fuse_slots(parent)
            unfuse_slots(parent)
        names = list(parent._modules)
        in_order = _runs_in_order(parent)
        skip_next = False
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            if isinstance(child, (ConvBNReLU2d, LinearReLUDropout)):
                keep = fuse_conv if isinstance(child, ConvBNReLU2d) else fuse_linear
                if not keep:
                    where = "(the model itself)" if parent is root else f"{name!r} of {type(parent).__name__}"
                    raise ValueError(f"convert(backend={backend!r}, sync_bn={sync_bn}): {type(child).__name__} "
                                     f"{where} is a fused Triton layer outside the fused slot layout "
                                     f"(fusedcnn.nn.fused), which cannot be split here")
                continue  # a leaf: its conv / bn / weight are read by the fused kernels directly
            if skip_next:  # the ReLU just fused into the BatchNorm before it
                parent._modules[name] = nn.Identity().train(child.training)
                skip_next = False
                continue
            nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            fuse = (in_order and _kind(child) == "BatchNorm2d" and type(child) is not fnn.BatchNormReLU2d
                    and nxt is not None and _is_relu(nxt) and uses.get(id(child), 1) == 1
                    and uses.get(id(nxt), 1) == 1)
            if _kind(child) is None:
                visit(child)
            else:
                parent._modules[name] = convert_one(child, fuse)
                skip_next = fuse

    root = nn.Sequential(model)  # the model as a child, so that a fused layer as the model is kept or refused
    if _kind(model) is not None:
        model = convert_one(model, False)
    else:
        visit(root)
    log.info("convert(backend=%r): %d layers replaced, %d BatchNorm2d+ReLU pairs fused, %d BatchNorm2d left "
             "unfused (not directly followed by a ReLU in an nn.Sequential), %d conv+BN+ReLU fused, "
             "%d Linear+ReLU(+Dropout) fused", backend, stats["replaced"], stats["fused"], stats["unfused_bn"],
             stats["conv_fused"], stats["linear_fused"])
    return model
