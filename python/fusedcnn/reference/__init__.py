"""The `reference` backend: every layer from first principles in plain PyTorch tensor code.

Readable, complete, and the oracle the tests compare the fast backends with. One module per layer family; this
package exports every module's __all__ (relu, batch_norm, conv2d, dropout, max_pool2d, ...), with the compiled ops'
names, so the ops modules can use it as an implementation like a compiled backend's ops.
"""
import importlib as _importlib
import pkgutil as _pkgutil

_MODULES = [_importlib.import_module(f"{__name__}.{name}") for _, name, _ in sorted(_pkgutil.iter_modules(__path__))]
__all__ = [name for module in _MODULES for name in module.__all__]
globals().update({name: getattr(module, name) for module in _MODULES for name in module.__all__})
