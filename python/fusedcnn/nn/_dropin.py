"""The constructors of the drop-in layers: torch.nn's own arguments, whatever the installed torch's are.

A fusedcnn layer's __init__ takes exactly the arguments of its torch.nn counterpart's __init__ in the installed
torch version (names, order, defaults, keyword-only ones such as torch 2.14's BatchNorm2d(..., *, bias=)), hands
them to it unchanged -- so they mean, default and fail as in torch -- and adds its own keyword-only arguments
(backend="auto", ...). inspect.signature shows that signature.
"""
from __future__ import annotations

import inspect
from typing import Callable

__all__: list[str] = []


def drop_in_init(torch_cls: type, **extra) -> Callable:
    """Decorator for `def __init__(self, *args, <extra keyword-only arguments>, **kwargs)`: its signature becomes
    torch_cls.__init__'s followed by the keyword-only `extra` {name: default} (they must be the function's own
    keyword-only arguments, with the same defaults). The function passes *args and **kwargs to torch's."""
    torch_sig = inspect.signature(torch_cls.__init__)
    params = [p for p in torch_sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    clash = set(extra) & {p.name for p in params}
    if clash:
        raise TypeError(f"{torch_cls.__name__} already takes {sorted(clash)}")
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
               for name, default in extra.items()]
    signature = torch_sig.replace(parameters=params)

    def decorate(init: Callable) -> Callable:
        own = {name: p.default for name, p in inspect.signature(init).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if own != extra:
            raise TypeError(f"{init.__qualname__}: keyword-only arguments {own} != {extra}")
        init.__signature__ = signature  # what inspect.signature (help(), IDEs) shows
        return init

    return decorate
