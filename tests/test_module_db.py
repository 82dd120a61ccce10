"""torch's own module test inputs (torch.testing._internal.common_modules.module_db) against fusedcnn's layers.

For each torch layer fusedcnn replaces, every input module_db generates on CPU (module_inputs_func, for each
dtype module_db lists for CPU, in training and -- where they differ -- eval mode) is run through the torch module
and through fusedcnn.nn.<same name>(*args, **kwargs, backend=...) holding a copy of its state. Forward outputs
(indices included), the gradients of the inputs and parameters for a random output gradient, and the module state
afterwards (running stats, num_batches_tracked) must equal torch's within helpers.TOLERANCES.

One test per module x backend x dtype; it runs all of that module's inputs and, when some differ, fails listing
each one (module_db's description, mode, and what differed), so one failure never hides another.
"""
import os

import pytest
import torch
from torch import nn

import fusedcnn.nn as fnn
from helpers import TOLERANCES, backend_params

MODULES = ["Conv2d", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "ReLU"]


def _load_module_db():
    """module_db. Importing torch.testing._internal.common_utils freezes torch.backends' flags (an assignment such
    as torch.backends.cudnn.benchmark = True then raises) and sets TORCHINDUCTOR_CACHE_DIR: both undone, so the
    other tests of the session see the process as it was."""
    env = set(os.environ)
    with getattr(torch.backends, "__allow_nonbracketed_mutation")():  # restores the flag's value on exit
        from torch.testing._internal.common_modules import module_db
    for key in set(os.environ) - env:
        del os.environ[key]
    return module_db


MODULE_INFOS = {mi.module_cls.__name__: mi for mi in _load_module_db()
                if mi.module_cls.__name__ in MODULES and mi.module_cls is getattr(nn, mi.module_cls.__name__)}
CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype).split('.')[-1]}")
         for name in MODULES for dtype in MODULE_INFOS[name].supported_dtypes("cpu")]


def _randomize(module: nn.Module) -> None:
    """Fresh non-trivial state where torch's default is constant: BatchNorm's affine parameters (1, 0) and running
    stats (0, 1), so eval mode and the affine terms are tested on random values."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name in ("weight", "running_var") and isinstance(module, nn.modules.batchnorm._BatchNorm):
                t.uniform_(0.5, 1.5)
            elif name in ("bias", "running_mean") and isinstance(module, nn.modules.batchnorm._BatchNorm):
                t.uniform_(-0.5, 0.5)


def _copy_args(args):
    """Fresh leaves for one module: each tensor cloned, detached, requires_grad as given."""
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _shape(a):
    return tuple(a.shape) if isinstance(a, torch.Tensor) else a


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _close(what: str, actual, expected) -> None:
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual is None=} but torch's is {expected is None=}"
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, torch {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, torch {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: differs from torch's"
        return
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m.splitlines()[0]} {' '.join(m.splitlines()[1:3])}")


def _run_case(mi, name, backend, module_input, dtype, training) -> None:
    """One module_db input: construct both modules, forward, backward, compare (AssertionError says what differs)."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = mi.module_cls(*args, **kwargs).to(dtype)
    _randomize(theirs)
    ours = getattr(fnn, name)(*args, **kwargs, backend=backend).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training), ours.train(training)

    fwd_args, fwd_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
    in_t, in_o = _copy_args(fwd_args), _copy_args(fwd_args)
    out_t, out_o = _as_tuple(theirs(*in_t, **fwd_kwargs)), _as_tuple(ours(*in_o, **fwd_kwargs))
    assert len(out_o) == len(out_t), f"{len(out_o)} outputs, torch returns {len(out_t)}"
    for i, (o, t) in enumerate(zip(out_o, out_t)):
        _close(f"output {i}", o, t)

    diff = [i for i, t in enumerate(out_t) if isinstance(t, torch.Tensor) and t.requires_grad]
    if diff:
        grads = [torch.randn_like(out_t[i]) for i in diff]
        torch.autograd.backward([out_t[i] for i in diff], grads)
        torch.autograd.backward([out_o[i] for i in diff], grads)
        for i, (a, b) in enumerate(zip(in_o, in_t)):
            if isinstance(b, torch.Tensor) and b.requires_grad:
                _close(f"grad of input {i}", a.grad, b.grad)
        params_o = dict(ours.named_parameters())
        for pname, p in theirs.named_parameters():
            _close(f"grad of {pname}", params_o[pname].grad, p.grad)
    buffers_o = dict(ours.named_buffers())
    for bname, b in theirs.named_buffers():
        _close(f"{bname} after the forward", buffers_o.get(bname), b)


@pytest.mark.parametrize("backend", backend_params(("torch", "reference", "triton", "cpp")))
@pytest.mark.parametrize("name, dtype", CASES)
def test_module_db_inputs_match_torch(name, dtype, backend):
    mi = MODULE_INFOS[name]
    failures, count = [], 0
    for training in (True, False) if mi.train_and_eval_differ else (True,):
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=training)
        for i, module_input in enumerate(inputs):
            count += 1
            c = module_input.constructor_input
            label = (f"#{i} {module_input.desc or '(no desc)'} [{'train' if training else 'eval'}] "
                     f"{name}(*{c.args}, **{c.kwargs}) on {[_shape(a) for a in module_input.forward_input.args]}")
            try:
                _run_case(mi, name, backend, module_input, dtype, training)
            except Exception as e:  # every input runs; the test fails below listing each one that differs
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failures.append(f"{label}: {type(e).__name__}: {first[:300]}")
    assert count > 0, f"module_db has no CPU input for {name}"
    if failures:
        pytest.fail(f"{len(failures)} of {count} module_db inputs differ from torch:\n  " + "\n  ".join(failures),
                    pytrace=False)
