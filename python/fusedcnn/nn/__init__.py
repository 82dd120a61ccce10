"""Drop-in replacements for torch.nn's CNN layers; each takes an extra keyword `backend="auto"`.

One module per layer family; this package exports every module's __all__ (no list to keep by hand):
Conv2d, BatchNorm2d, BatchNormReLU2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d, Dropout,
and the fusion plan: FusedSequential, ConvBNReLU2d, LinearReLUDropout, fuse_chain.
"""
import importlib as _importlib
import pkgutil as _pkgutil

_MODULES = [_importlib.import_module(f"{__name__}.{name}") for _, name, _ in sorted(_pkgutil.iter_modules(__path__))]
__all__ = [name for module in _MODULES for name in module.__all__]
globals().update({name: getattr(module, name) for module in _MODULES for name in module.__all__})
