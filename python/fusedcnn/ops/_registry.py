"""The op registry: one schema table, the Triton custom ops generated from it, and one dispatch helper.

Compiled ops. Every kernel entry point is a `torch.library` op with ONE schema (SCHEMAS, declared by each family's
ops module with `define`):
  cpp:    torch.ops.fusedcnn.<name>          defined in csrc/ops.cpp (the same schema, word for word:
                                             tests/test_backends.py compares them), kernels in csrc/<family>/
  triton: torch.ops.fusedcnn.triton_<name>   generated here: a custom_op whose body calls the launcher of
                                             the same name in fusedcnn.triton_kernels.<family module>
A family's ops module registers the fake (shape) function once for both backends (`register`), so torch.compile
traces and torch.library.opcheck tests either one. Autograd: the cpp ops that have it differentiate in C++ --
csrc/<family>/<family>_autograd.cpp, an Autograd-key kernel per op (torch::autograd::Function) calling the forward
and backward ops through the dispatcher: relu, the pools, conv2d, dropout, batch_norm_train_forward -- and
`register` adds the Python autograd formula (backward_factory) to the triton ops, and to a cpp op only when its
fusedcnn._C has no C++ autograd for it (built from older sources).

Implementations. Each layer family keeps one table backend -> implementation (`implement`); the public
functionals normalize their arguments, then call `dispatch(family, backend, x)`, which resolves the backend
(fusedcnn.backends: explicit choice, use_backend(), FUSEDCNN_BACKEND, "auto") and returns that table entry.
No other module compares backend names.

Autograd modes. Backward (create_graph=False) runs each backend's own backward kernels. Double backward: when a
backward runs with grad mode on (create_graph=True), `register`'s backward runs the op's `differentiable_backward`
instead (torch's differentiable aten backward ops on the saved tensors), so the gradient is itself differentiable;
the C++ autograd of the cpp ops does the same with the same ATen ops.
Forward-mode AD and the torch.func transforms (vmap, grad, jvp, jacfwd, ...): `dispatch` runs the family's
`torch` implementation (see its docstring).
"""
from __future__ import annotations

import collections
import functools
import importlib
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from fusedcnn import autotune, backends

COMPILED_BACKENDS = ("triton", "cpp")

# The one schema table: op name -> (module of fusedcnn.triton_kernels holding its launcher, schema). Each family's
# ops module declares its ops with define(); the cpp schemas of csrc/ops.cpp must equal these word for word.
SCHEMAS: dict[str, tuple[str, str]] = {}
_ONLY: dict[str, str] = {}  # op name -> the one compiled backend that has it


def define(kernels: str, schemas: dict[str, str], *, only: str | None = None) -> None:
    """Declare ops {name: schema} whose Triton launchers live in fusedcnn.triton_kernels.<kernels> (same names);
    only="cpp" / "triton" for ops one compiled backend alone has. Generates the torch.ops.fusedcnn.triton_<name>
    custom ops (the cpp ones come from csrc/ops.cpp)."""
    for name, schema in schemas.items():
        SCHEMAS[name] = (kernels, schema)
        if only is not None:
            _ONLY[name] = only
        if only in (None, "triton"):
            torch.library.custom_op(f"fusedcnn::triton_{name}", _triton_body(name, kernels), mutates_args=(),
                                    schema=schema)


def has_op(backend: str, name: str) -> bool:
    """Whether compiled backend `backend` defines op `name` (by the schema table)."""
    return name in SCHEMAS and _ONLY.get(name, backend) == backend


def op(backend: str, name: str):
    """The torch.ops op (OpOverload) implementing `name` in `backend` ("triton" or "cpp")."""
    qualified = name if backend == "cpp" else f"triton_{name}"
    return getattr(torch.ops.fusedcnn, qualified).default


_compiling = torch.compiler.is_compiling


def eager_op(backend: str, name: str) -> Callable:
    """What a layer calls to run op `name` of compiled backend `backend`: op(backend, name), and for cpp, in eager
    mode, fusedcnn._C._fast_op's call of the same op (csrc/fast_call.cpp: the same kernels through the same
    dispatcher, without torch.ops' generic argument conversion, ~4 us a call with four int lists). While
    torch.compile traces, the OpOverload (Dynamo cannot trace into a C function)."""
    if _compiling():
        return op(backend, name)
    return _eager_op(backend, name)


@functools.cache
def _eager_op(backend: str, name: str) -> Callable:
    overload = op(backend, name)
    fast = getattr(importlib.import_module("fusedcnn._C"), "_fast_op", None) if backend == "cpp" else None
    if fast is None:  # triton, or a fusedcnn._C built before _fast_op
        return overload
    fast = fast(f"fusedcnn::{name}", overload)

    def call(*args):
        if _compiling():
            return overload(*args)
        return fast(*args)
    call.__name__ = name
    return call


def _triton_body(name: str, module: str) -> Callable:
    """The custom op's body: the launcher `name` of fusedcnn.triton_kernels.<module>, imported on first call
    (triton is optional: importing fusedcnn never imports it)."""
    def body(*args):
        launcher = getattr(importlib.import_module(f"fusedcnn.triton_kernels.{module}"), name)
        out = launcher(*args)
        return tuple(out) if isinstance(out, list) else out
    body.__name__ = f"triton_{name}"
    return body


def registered_backends() -> list[str]:
    """The compiled backends whose ops exist in this process (cpp only when fusedcnn._C loaded)."""
    return [b for b in COMPILED_BACKENDS if b != "cpp" or backends._cpp_import_error() is None]


def _backward(name: str, kernels: Callable, differentiable: Callable | None) -> Callable:
    """The registered backward: the backend's kernels (`kernels`), or, when the backward itself is being recorded
    (grad mode on: backward(create_graph=True), autograd.grad(..., create_graph=True)), `differentiable` -- the
    kernels have no autograd, so their result would be a constant and the second derivative silently wrong."""
    def backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return kernels(ctx, *grads)
        if differentiable is None:
            raise NotImplementedError(f"fusedcnn::{name}: double backward (create_graph=True) is not supported")
        return differentiable(ctx, *grads)
    return backward


def has_cpp_autograd(name: str) -> bool:
    """Whether the cpp op `name` has its autograd in C++ (csrc/<family>/<family>_autograd.cpp: an Autograd-key
    kernel). Asked before `register` adds the Python one; False with a fusedcnn._C built before it existed."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedcnn::{name}", "Autograd")
    except RuntimeError:  # no such op: fusedcnn._C not loaded, or built before the op
        return False


def register(name: str, *, fake: Callable, setup_context: Callable | None = None,
             backward_factory: Callable[[str], Callable] | None = None,
             differentiable_backward: Callable | None = None) -> None:
    """Register the fake function and (if given) the autograd formula of op `name` for every compiled backend
    that has it -- the autograd formula not for a cpp op with C++ autograd (has_cpp_autograd), whose
    csrc/<family>/<family>_autograd.cpp implements the same formulas. backward_factory(backend) returns the
    autograd backward for that backend, so each backend's backward calls that backend's own backward kernels.
    differentiable_backward(ctx, *grads) returns the same gradients computed with differentiable torch ops from
    ctx's saved tensors (saved inputs keep their autograd history); it runs instead when the backward runs with
    grad mode on (double backward). Without it, such a backward raises NotImplementedError."""
    for backend in (b for b in registered_backends() if _ONLY.get(name, b) == b):
        try:
            fwd = op(backend, name)
            stale = backend == "cpp" and _arguments(fwd._schema) != _arguments(_table_schema(name))
        except AttributeError:
            if backend != "cpp":
                raise
            fwd, stale = None, True
        if stale:
            # A fusedcnn._C built from older sources (no such op, or another schema): say so when the cpp
            # backend is asked for, instead of failing the whole import or calling it with the wrong arguments.
            backends._import_errors["cpp"] = (
                f"fusedcnn._C is out of date (its op '{name}' is missing or has another schema): rebuild it with "
                "`pip install --no-build-isolation -e .` (or bash scripts/setup.sh)")
            continue
        torch.library.register_fake(fwd)(fake)
        if backward_factory is not None and not (backend == "cpp" and has_cpp_autograd(name)):
            torch.library.register_autograd(fwd, _backward(name, backward_factory(backend), differentiable_backward),
                                            setup_context=setup_context)


def _table_schema(name: str) -> torch._C.FunctionSchema:
    return torch._C.parse_schema(f"fusedcnn::{name}{SCHEMAS[name][1]}")


def _arguments(schema: torch._C.FunctionSchema) -> list[tuple[str, str]]:
    """An op's arguments as (name, type) pairs: what a caller must pass."""
    return [(a.name, str(a.type)) for a in schema.arguments]


class CompiledOps:
    """A compiled backend's ops as attributes: CompiledOps("cpp").max_pool2d calls torch.ops.fusedcnn.max_pool2d
    (eager_op). The first lookup of a name stores the op on the instance, so later ones are plain attribute reads."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        if name.startswith("__") or not has_op(self.backend, name):
            raise AttributeError(name)
        if _compiling():  # traced: the OpOverload, not kept (eager calls keep eager_op's)
            return op(self.backend, name)
        call = eager_op(self.backend, name)
        setattr(self, name, call)
        return call


# ---------------------------------------------------------------- implementation tables and dispatch
_IMPLEMENTATIONS: dict[str, dict[str, object]] = {}  # family -> {backend: implementation}
_AUTO: dict[str, "_Measured"] = {}  # family -> its "auto" implementation


def families() -> tuple[str, ...]:
    """The layer families whose ops modules are loaded (fusedcnn.ops loads them all), sorted by name."""
    return tuple(sorted(_IMPLEMENTATIONS))


def implement(family: str, table: dict[str, object], *, random: tuple[str, ...] = (),
              extra: dict[str, object] | None = None) -> dict[str, object]:
    """Register family's table {backend: implementation}; every backend of fusedcnn.backends must appear.
    random: the methods that draw a dropout mask (autotune checks them against reference's Philox mask).
    extra: further candidates {name: implementation} for "auto" alone to measure, not backends a user can name
    (the fused family's "per-layer": each layer of the run on its own "auto" choice)."""
    missing = set(backends.BACKENDS) - set(table)
    if missing:
        raise ValueError(f"family {family!r} has no implementation for backend(s) {sorted(missing)}")
    _IMPLEMENTATIONS[family] = table
    # auto looks a name up in the table first, then in extra (a ChainMap: the live table, as tests patch it)
    _AUTO[family] = _Measured(family, collections.ChainMap(table, dict(extra or {})), random, tuple(extra or ()))
    return table


class _Measured:
    """A family's "auto" implementation: each method call runs on the backend fusedcnn.autotune chose for the
    call's signature (measured on first use), or on the static order's when the call cannot be replayed."""

    def __init__(self, family: str, table: dict[str, object], random: tuple[str, ...], extra: tuple[str, ...]):
        self.family, self.table, self.random, self.extra = family, table, random, extra

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        family, table, random, extra = self.family, self.table, method in self.random, self.extra
        # signature -> the chosen backend's method: after the first call of a signature, one dict lookup
        # (autotune.reset() empties it with the decisions)
        chosen = autotune.memo()

        def choose(key, args, kwargs):
            x = args[0]
            if not isinstance(x, torch.Tensor):  # a deferred triton activation first: the weight decides the device
                x = next(a for a in args if isinstance(a, torch.Tensor))
            if key is None:  # cannot be replayed: the static order, every call
                return getattr(table[backends.static_choice(family, x)], method)
            run = getattr(table[autotune.decide(family, method, table, args, kwargs, x, key, random, extra=extra)],
                          method)
            chosen[key] = run
            return run

        def call(*args, **kwargs):
            key = autotune.signature(family, method, args, kwargs)
            run = chosen.get(key)
            if run is None:
                run = choose(key, args, kwargs)
            return run(*args, **kwargs)

        call.__name__ = method
        setattr(self, method, call)  # later lookups skip __getattr__
        return call


_transforms_active = torch._C._are_functorch_transforms_active


def dispatch(family: str, backend: str | None, x: torch.Tensor):
    """The implementation that runs `family` on tensor x with the requested `backend` (None = the context's).

    "auto" measures (fusedcnn.autotune) unless FUSEDCNN_AUTOTUNE=0 or torch.compile is tracing: then the static
    order of fusedcnn.backends decides.

    Autograd modes: while a torch.func transform is active (vmap, grad, jvp, jacfwd, jacrev, functional_call
    under them) or forward-mode AD is (inside torch.autograd.forward_ad.dual_level()), the family's `torch`
    implementation runs whatever backend was asked for: the same math, with torch's own batching rules and
    forward-mode formulas (the compiled ops and the reference's autograd.Functions have neither). The backend is
    still resolved first, so an unknown or unavailable one raises as usual. Dropout then draws torch's mask (and
    follows vmap's `randomness=`), not the Philox stream.
    """
    name = backends.choose(backend, x, family)
    if _transforms_active() or _forward_ad._current_level >= 0:
        return _IMPLEMENTATIONS[family]["torch"]
    if name is None:  # "auto"
        if autotune.enabled() and not torch.compiler.is_compiling():
            return _AUTO[family]
        name = backends.static_choice(family, x)
    return _IMPLEMENTATIONS[family][name]
