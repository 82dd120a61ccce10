"""convert(): swap a model's torch.nn CNN layers for their fusedcnn twins, and let its Sequentials fuse.

    model = torchvision.models.vgg16_bn()
    model = fusedcnn.convert(model, backend="triton")

Replaced (exact types only, so a user's subclass with its own forward is left alone; fusedcnn layers are
rebuilt with the new backend): every torch.nn layer that a fusedcnn.nn layer subclasses -- Conv2d, BatchNorm2d,
ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d, Dropout -- found from fusedcnn.nn itself (a
new family's modules convert with no edit here), and fusedcnn's BatchNormReLU2d. Each twin computes exactly what its torch layer
does -- a BatchNorm2d stays a BatchNorm2d and computes BatchNorm, nothing more -- so torch's own module
rewrites (SyncBatchNorm.convert_sync_batchnorm, fuse_conv_bn_eval, quantization fusers) still see the model
they expect. Parameters and buffers are the very same tensors (an optimizer built before keeps working), and
device, dtype and training mode are kept; module names, state_dict keys and parameter order do not change.

Fusion is an execution plan, not a rewrite: every exact nn.Sequential that holds a fusable run (the patterns
of fusedcnn.nn.fused: Conv2d->BatchNorm2d->ReLU[->2x2 MaxPool2d], BatchNorm2d->ReLU, Linear->ReLU[->Dropout])
has its class swapped for FusedSequential (an nn.Sequential subclass with no state of its own), which runs those
runs through the fused functionals of `backend` -- every backend has them. Layers called from a custom forward
(torchvision's ResNet blocks) are only swapped, never fused: only a Sequential's order proves that one layer
feeds the next. The counts are logged (logger "fusedcnn.convert", INFO).

sync_bn=True: BatchNorm2d layers become torch.nn.SyncBatchNorm and BatchNormReLU2d layers reduce their batch
statistics across torch.distributed ranks (sync=True); neither takes part in a fused run.
"""
from __future__ import annotations

import logging

from torch import nn

import fusedcnn.nn as fnn
from fusedcnn.backends import check_backend_arg
from fusedcnn.nn.fused import FusedSequential, find_runs

log = logging.getLogger("fusedcnn.convert")


def _twins() -> dict[type, type]:
    """{torch.nn layer class: its fusedcnn.nn twin}: every fusedcnn.nn class that directly subclasses a torch.nn
    layer (the containers of the fusion plan excepted)."""
    out = {}
    for name in fnn.__all__:
        cls = getattr(fnn, name)
        if isinstance(cls, type) and not issubclass(cls, nn.Sequential):
            base = cls.__bases__[0]
            if getattr(nn, base.__name__, None) is base:
                out[base] = cls
    return out


TWINS = _twins()


def _convertible(m: nn.Module) -> bool:
    return type(m) in TWINS or type(m) in TWINS.values() or type(m) is fnn.BatchNormReLU2d


def _as_class(m: nn.Module, cls: type) -> nn.Module:
    """A `cls` module with m's state: the very same parameters, buffers, submodules, hooks and settings (the
    containers are copied, their tensors shared). cls is m's class or its fusedcnn twin, which adds `backend`."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()})
    return new


def _twin(m: nn.Module, backend: str, sync_bn: bool) -> nn.Module:
    """The fusedcnn layer for torch (or fusedcnn) layer m on `backend`, holding m's own tensors."""
    if sync_bn and isinstance(m, nn.BatchNorm2d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(m)  # fusedcnn has no synchronized BatchNorm2d
    new = _as_class(m, TWINS.get(type(m), type(m)))
    new.backend = backend
    if type(new) is fnn.BatchNormReLU2d:
        new.sync = m.sync or sync_bn
    return new


def convert(model: nn.Module, backend: str = "auto", sync_bn: bool = False) -> nn.Module:
    """Replace model's CNN layers by fusedcnn's on `backend` (module docstring); returns the model.

    The model is changed in place; the return value matters only when `model` itself is one layer.
    """
    check_backend_arg(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    stats = {"replaced": 0, "sequentials": 0, "fused_runs": 0}
    new_for: dict[int, nn.Module] = {}  # a module reached twice is converted once (sharing is kept)

    def twin(m: nn.Module) -> nn.Module:
        if id(m) not in new_for:
            new_for[id(m)] = _twin(m, backend, sync_bn)
            stats["replaced"] += 1
        return new_for[id(m)]

    def visit(parent: nn.Module) -> None:
        for name, child in parent._modules.items():
            if child is not None and _convertible(child):
                parent._modules[name] = twin(child)
            elif child is not None:
                visit(child)
        if type(parent) in (nn.Sequential, FusedSequential):
            runs = [s for s in find_runs(list(parent._modules.values())) if s.pattern is not None]
            if runs:
                parent.__class__ = FusedSequential  # no state of its own: only forward() differs
                stats["sequentials"] += 1
                stats["fused_runs"] += len(runs)

    if _convertible(model):
        return twin(model)
    visit(model)
    log.info("convert(backend=%r): %d layers replaced; %d Sequentials run %d fusable layer runs fused",
             backend, stats["replaced"], stats["sequentials"], stats["fused_runs"])
    return model
