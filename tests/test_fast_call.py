"""fusedcnn._C._fast_op (csrc/fast_call.cpp): the cpp ops' eager call from Python runs the same op as torch.ops --
same results, autograd, errors and dispatch modes -- and hands every call it does not convert to the OpOverload."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fusedcnn import backends
from fusedcnn.ops._registry import CompiledOps, eager_op, op

pytestmark = pytest.mark.skipif(backends._cpp_import_error() is not None,
                                reason="fusedcnn._C not built (or out of date)")

L2 = [2, 2]


def _fast(name):
    from fusedcnn import _C
    return _C._fast_op(f"fusedcnn::{name}", op("cpp", name))


def _pool_args(x):
    return (x, L2, L2, [0, 0], [1, 1], False, True)


def test_results_and_gradients_match_torch_ops():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, 6, generator=gen, dtype=torch.float64).requires_grad_()
    fast, overload = _fast("max_pool2d"), op("cpp", "max_pool2d")
    out, idx = fast(*_pool_args(x))
    ref, ref_idx = overload(*_pool_args(x))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(idx, ref_idx)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == type(ref.grad_fn).__name__
    torch.autograd.gradcheck(lambda t: _fast("max_pool2d")(*_pool_args(t))[0], (x,))
    w = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    conv_args = lambda t: (t, w, None, [1, 1], [1, 1], [1, 1], 1, "auto")  # noqa: E731  Tensor?, str, int
    torch.autograd.gradcheck(lambda t: _fast("conv2d")(*conv_args(t)), (x,))


def test_mutated_arguments_and_optional_none():
    """batch_norm_train_forward: Tensor? None, Tensor(a!)? running stats updated in place, float, bool."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen)
    rm_fast, rv_fast, rm_ref, rv_ref = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    fast, overload = _fast("batch_norm_train_forward"), op("cpp", "batch_norm_train_forward")
    y = fast(x, None, None, rm_fast, rv_fast, 0.1, 1e-5, True)
    y_ref = overload(x, None, None, rm_ref, rv_ref, 0.1, 1e-5, True)
    for a, b in zip(y, y_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(rm_fast, rm_ref, rtol=0, atol=0)
    torch.testing.assert_close(rv_fast, rv_ref, rtol=0, atol=0)
    assert rm_fast._version == rm_ref._version > 0
    # an int where the schema says float
    torch.testing.assert_close(fast(x, None, None, None, None, 0, 1, False)[0],
                               overload(x, None, None, None, None, 0.0, 1.0, False)[0], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["wrong dtype", "bad list length", "int overflow", "keyword", "missing argument"])
def test_errors_as_torch_ops(case):
    x = torch.randn(2, 3, 4, 4)
    args, kwargs = list(_pool_args(x)), {}
    if case == "wrong dtype":
        args[0] = x.to(torch.int32)
    elif case == "bad list length":
        args[1] = [2, 2, 2]
    elif case == "int overflow":
        args[1] = [2, 1 << 70]
    elif case == "keyword":
        kwargs = {"return_indices": args.pop()}
        args = args  # the OpOverload takes the keyword: same result either way
    elif case == "missing argument":
        args = args[:-1]
    outcomes = []
    for fn in (_fast("max_pool2d"), op("cpp", "max_pool2d")):
        try:
            outcomes.append(("ok", [t.shape for t in fn(*args, **kwargs)]))
        except Exception as e:  # noqa: BLE001  the same type and message are the point
            outcomes.append((type(e), str(e)))
    assert outcomes[0] == outcomes[1]
    if case in ("wrong dtype", "missing argument", "int overflow", "bad list length"):
        assert outcomes[0][0] != "ok"


def test_dispatch_and_function_modes_see_the_op():
    x = torch.randn(2, 3, 4, 4)
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class LogFunctions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(f"function {func}")
            return func(*args, **(kwargs or {}))

    with Log():
        _fast("relu")(x)
    assert seen == ["fusedcnn.relu.default"]
    seen.clear()
    with LogFunctions():
        _fast("relu")(x)
    assert seen == ["function fusedcnn.relu.default"]  # handed to the OpOverload, which honours the mode


def test_tensor_subclass_goes_to_torch_ops():
    class Tagged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(2, 3, 4, 4).as_subclass(Tagged)
    out = _fast("relu")(x)
    assert Tagged.calls >= 1 and isinstance(out, Tagged)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), x.as_subclass(torch.Tensor).clamp_min(0))


def test_eager_op_under_torch_compile_fullgraph():
    """Dynamo cannot trace a C function: eager_op gives it the OpOverload (no graph break under fullgraph=True)."""
    relu = eager_op("cpp", "relu")
    compiled = torch.compile(lambda t: relu(t) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 7)
    torch.testing.assert_close(compiled(x), x.clamp_min(0) * 2)


def test_first_use_under_compile_keeps_the_fast_call_for_eager():
    ops = CompiledOps("cpp")
    compiled = torch.compile(lambda t: ops.relu(t) + 1, fullgraph=True, backend="aot_eager")
    x = torch.randn(6)
    torch.testing.assert_close(compiled(x), x.clamp_min(0) + 1)
    assert "relu" not in vars(ops)  # the traced lookup left nothing behind
    ops.relu(x)
    assert vars(ops)["relu"] is eager_op("cpp", "relu") is not op("cpp", "relu")
