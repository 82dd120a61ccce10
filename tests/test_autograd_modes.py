"""Every autograd mode on every backend, against torch: double backward (gradcheck + gradgradcheck in float64, the
second derivatives in float32 against torch's in float64, a gradient penalty through a fused model), forward-mode
AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad dual tensors), vmap of every layer and per-sample gradients
(vmap(grad(functional_call))).

Double backward of the compiled backends runs torch's differentiable backward ops on the saved tensors (the ordinary
backward keeps the backend's kernels: test_backward_kernels); forward-mode AD and the torch.func transforms run each
family's torch implementation (ops/_registry.dispatch). Tensors are tiny: the Triton interpreter is slow.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedcnn
import fusedcnn.functional as F
import fusedcnn.nn as fnn
from fusedcnn.ops import _registry
from helpers import backend_params, check, randn

BACKENDS = backend_params()
SEED = 1234  # dropout cases reseed before every call, so each evaluation draws the same mask


def _leaf(*shape, dtype, grad=True):
    return randn(*shape, dtype=dtype, requires_grad=grad)


def _var(c, dtype):
    """A running variance: positive, fresh."""
    return (torch.rand(c) + 0.5).to(dtype)


def _seeded(f):
    def call(*args):
        torch.manual_seed(SEED)
        return f(*args)
    return call


# name -> (inputs(dtype): leaves (those requiring grad are differentiated), fn(backend) -> callable(*inputs),
#          oracle backend: torch, or reference where the result depends on the Philox dropout mask)
CASES = {
    "relu": (lambda d: (_leaf(2, 3, 3, 3, dtype=d),),
             lambda b: lambda x: F.relu(x, backend=b), "torch"),
    "conv2d": (lambda d: (_leaf(2, 2, 5, 5, dtype=d), _leaf(3, 2, 3, 3, dtype=d), _leaf(3, dtype=d)),
               lambda b: lambda x, w, bias: F.conv2d(x, w, bias, 1, 1, backend=b), "torch"),
    "conv2d_strided_groups": (lambda d: (_leaf(1, 4, 6, 6, dtype=d), _leaf(4, 2, 2, 3, dtype=d)),
                              lambda b: lambda x, w: F.conv2d(x, w, None, 2, (1, 0), (1, 2), 2, backend=b), "torch"),
    "batch_norm_train": (lambda d: (_leaf(3, 2, 3, 3, dtype=d), _leaf(2, dtype=d), _leaf(2, dtype=d)),
                         lambda b: lambda x, w, bias: F.batch_norm(x, None, None, w, bias, True, backend=b), "torch"),
    "batch_norm_train_no_affine": (lambda d: (_leaf(2, 3, 2, 3, dtype=d),),
                                   lambda b: lambda x: F.batch_norm(x, None, None, None, None, True, backend=b),
                                   "torch"),
    "batch_norm_eval": (lambda d: (_leaf(3, 2, 3, 3, dtype=d), _leaf(2, dtype=d), _leaf(2, dtype=d),
                                   randn(2, dtype=d), _var(2, d)),
                        lambda b: lambda x, w, bias, rm, rv: F.batch_norm(x, rm, rv, w, bias, False, backend=b),
                        "torch"),
    "batch_norm_relu_train": (lambda d: (_leaf(3, 2, 3, 3, dtype=d), _leaf(2, dtype=d), _leaf(2, dtype=d)),
                              lambda b: lambda x, w, bias: F.batch_norm_relu(x, None, None, w, bias, True, backend=b),
                              "torch"),
    "batch_norm_relu_eval": (lambda d: (_leaf(3, 2, 3, 3, dtype=d), _leaf(2, dtype=d), _leaf(2, dtype=d),
                                        randn(2, dtype=d), _var(2, d)),
                             lambda b: lambda x, w, bias, rm, rv: F.batch_norm_relu(x, rm, rv, w, bias, False,
                                                                                    backend=b), "torch"),
    "max_pool2d": (lambda d: (_leaf(2, 2, 5, 5, dtype=d),),
                   lambda b: lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True, backend=b), "torch"),
    "max_pool2d_dilated": (lambda d: (_leaf(1, 2, 5, 6, dtype=d),),
                           lambda b: lambda x: F.max_pool2d(x, 2, 1, 0, dilation=2, backend=b), "torch"),
    "avg_pool2d": (lambda d: (_leaf(2, 2, 5, 5, dtype=d),),
                   lambda b: lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False, backend=b),
                   "torch"),
    "avg_pool2d_divisor": (lambda d: (_leaf(1, 2, 4, 5, dtype=d),),
                           lambda b: lambda x: F.avg_pool2d(x, 2, divisor_override=3, backend=b), "torch"),
    "adaptive_avg_pool2d": (lambda d: (_leaf(2, 2, 5, 5, dtype=d),),
                            lambda b: lambda x: F.adaptive_avg_pool2d(x, (2, 3), backend=b), "torch"),
    "adaptive_max_pool2d": (lambda d: (_leaf(2, 2, 5, 5, dtype=d),),
                            lambda b: lambda x: F.adaptive_max_pool2d(x, (2, 3), backend=b), "torch"),
    "dropout": (lambda d: (_leaf(2, 3, 4, 4, dtype=d),),
                lambda b: _seeded(lambda x: F.dropout(x, 0.4, backend=b)), "reference"),
    "conv_bn_relu": (lambda d: (_leaf(2, 2, 4, 4, dtype=d), _leaf(3, 2, 3, 3, dtype=d), _leaf(3, dtype=d),
                                _leaf(3, dtype=d), _leaf(3, dtype=d)),
                     lambda b: lambda x, w, bias, g, beta: F.conv_bn_relu(x, w, bias, None, None, g, beta, True,
                                                                          padding=1, backend=b), "torch"),
    "conv_bn_relu_pool": (lambda d: (_leaf(2, 2, 4, 4, dtype=d), _leaf(3, 2, 3, 3, dtype=d), _leaf(3, dtype=d),
                                     _leaf(3, dtype=d), _leaf(3, dtype=d)),
                          lambda b: lambda x, w, bias, g, beta: F.conv_bn_relu(x, w, bias, None, None, g, beta, True,
                                                                               padding=1, pool=True, backend=b),
                          "torch"),
    "conv_bn_relu_eval": (lambda d: (_leaf(2, 2, 4, 4, dtype=d), _leaf(3, 2, 3, 3, dtype=d), _leaf(3, dtype=d),
                                     _leaf(3, dtype=d), randn(3, dtype=d), _var(3, d)),
                          lambda b: lambda x, w, g, beta, rm, rv: F.conv_bn_relu(x, w, None, rm, rv, g, beta, False,
                                                                                 padding=1, backend=b), "torch"),
    "linear_relu_dropout": (lambda d: (_leaf(3, 4, dtype=d), _leaf(5, 4, dtype=d), _leaf(5, dtype=d)),
                            lambda b: _seeded(lambda x, w, bias: F.linear_relu_dropout(x, w, bias, 0.3, backend=b)),
                            "reference"),
}
CASE_NAMES = list(CASES)


@contextlib.contextmanager
def _no_autograd_fallback():
    """Fail on torch's 'autograd kernel was not registered' warning (a backward through an op without autograd)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        yield


def _run_or_skip_float64(fn, inputs, backend):
    """fn(*inputs), or skip when the backend refuses float64 (Triton kernels without a float64 path)."""
    try:
        with torch.no_grad():
            fn(*inputs)
    except (TypeError, RuntimeError) as e:
        if "float64" in str(e) or "Double" in str(e):
            pytest.skip(f"backend {backend!r} cannot run this case in float64 here ({e}); its double backward is "
                        "tested in float32 against torch's (test_double_backward_vs_torch)")
        raise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradgradcheck(case, backend):
    make, fn, _ = CASES[case]
    inputs = make(torch.float64)
    f = fn(backend)
    _run_or_skip_float64(f, inputs, backend)
    with _no_autograd_fallback():
        # fast_mode: the Jacobians projected on random vectors, both ways (numerical vs analytical)
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def _first_and_second(f, inputs, v, u):
    """(grads of <f, v> w.r.t. the inputs that require grad, computed with create_graph=True; the gradients of
    sum <grad_i, u_i> w.r.t. those inputs and v): first and second derivatives."""
    leaves = [t for t in inputs if t.requires_grad]
    out = f(*inputs)
    grads = torch.autograd.grad(out, leaves, v, create_graph=True)
    penalty = sum((g * w).sum() for g, w in zip(grads, u))
    second = torch.autograd.grad(penalty, leaves + [v], allow_unused=True)
    return list(grads), [torch.zeros_like(t) if s is None else s for s, t in zip(second, leaves + [v])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_double_backward_vs_torch(case, backend):
    """float32 (every backend, triton included): first and second derivatives against the oracle in float64."""
    make, fn, oracle = CASES[case]
    oracle = "torch" if backend == "torch" else oracle  # torch's dropout mask is its own
    inputs = make(torch.float32)
    with torch.no_grad():
        out_shape = fn("torch")(*inputs).shape
    v = randn(*out_shape, requires_grad=True)
    u = [randn(*t.shape) for t in inputs if t.requires_grad]
    with _no_autograd_fallback():
        grads, second = _first_and_second(fn(backend), inputs, v, u)
    inputs64 = tuple(t.detach().double().requires_grad_(t.requires_grad) for t in inputs)
    grads64, second64 = _first_and_second(fn(oracle), inputs64, v.detach().double().requires_grad_(),
                                          [w.double() for w in u])
    for i, (a, r) in enumerate(zip(grads, grads64)):
        check(a, r, scale=10, msg=f"{case}/{backend}: first derivative {i}")
    for i, (a, r) in enumerate(zip(second, second64)):
        check(a, r, scale=100, msg=f"{case}/{backend}: second derivative {i}")


# ---------------------------------------------------------------- a gradient penalty through a fused model
def _model() -> nn.Sequential:
    """Conv-BN-ReLU, Conv-BN-ReLU, MaxPool (triton: a pending BN+ReLU, then the fused BN+ReLU+pool), Conv-BN-ReLU
    (materialized), global pooling, Linear-ReLU-Dropout, Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.0), nn.Linear(5, 2))


def _penalized_grads(model, x, v):
    """loss = <model(x), v> + |d<model(x), v>/dx|^2 (a gradient penalty); d loss / d(x, parameters)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (gx,) = torch.autograd.grad(out, x, v, create_graph=True)
    loss = (out * v).sum() + (gx ** 2).sum()
    params = list(model.parameters())
    return out, torch.autograd.grad(loss, [x] + params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty(backend):
    ref = _model().double().train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    ours = fusedcnn.convert(copy.deepcopy(ref).float(), backend=backend)
    assert ours.fused_runs(), "the model should run fused layers"
    x, v = randn(2, 2, 6, 6), randn(2, 2)
    with _no_autograd_fallback():
        out, grads = _penalized_grads(ours, x, v)
    out64, grads64 = _penalized_grads(ref, x.double(), v.double())
    check(out, out64, scale=10, msg="output")
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, r in zip(names, grads, grads64):
        check(a, r, scale=100, msg=f"{backend}: d(loss + penalty)/d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian(backend):
    """torch.autograd.functional.hessian (double backward, vectorized: the backward under vmap) against torch's."""
    x, w = randn(1, 1, 4, 4, dtype=torch.float64), randn(2, 1, 3, 3, dtype=torch.float64)

    def f(b):
        def scalar(x):
            y = F.batch_norm_relu(F.conv2d(x, w, padding=1, backend=b), None, None, None, None, True, backend=b)
            return (F.max_pool2d(y, 2, backend=b) ** 2).sum()
        return scalar

    _run_or_skip_float64(f(backend), (x,), backend)
    expected = torch.autograd.functional.hessian(f("torch"), x)
    check(torch.autograd.functional.hessian(f(backend), x, vectorize=True), expected, msg=f"{backend}: hessian")


# ---------------------------------------------------------------- forward-mode AD
def _primals(case, backend):
    """(f on `backend` and on torch, of the differentiable inputs alone (running stats closed over), those inputs,
    random tangents)."""
    make, fn, _ = CASES[case]
    inputs = make(torch.float32)
    which = [t.requires_grad for t in inputs]
    primals = tuple(t.detach() for t in inputs if t.requires_grad)

    def on(b):
        def f(*p):
            it = iter(p)
            return fn(b)(*(next(it) if w else t for t, w in zip(inputs, which)))
        return f
    return on(backend), on("torch"), primals, tuple(randn(*t.shape) for t in primals)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_jvp(case, backend):
    f, f_ref, primals, tangents = _primals(case, backend)
    out, tangent = torch.func.jvp(f, primals, tangents)
    out_ref, tangent_ref = torch.func.jvp(f_ref, primals, tangents)
    assert tangent.abs().max() > 0
    check(out, out_ref, msg=f"{case}/{backend}: jvp primal")
    check(tangent, tangent_ref, scale=10, msg=f"{case}/{backend}: jvp tangent")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_forward_ad_dual(case, backend):
    f, f_ref, primals, tangents = _primals(case, backend)

    def run(fn):
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
            return primal.clone(), tangent.clone()

    out, tangent = run(f)
    out_ref, tangent_ref = run(f_ref)
    check(out, out_ref, msg=f"{case}/{backend}: primal")
    check(tangent, tangent_ref, scale=10, msg=f"{case}/{backend}: tangent")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["relu", "conv2d", "batch_norm_relu_train", "max_pool2d", "adaptive_avg_pool2d",
                                  "conv_bn_relu_pool"])
def test_jacfwd(case, backend):
    make, fn, _ = CASES[case]
    inputs = tuple(t.detach() for t in make(torch.float32))
    jac = torch.func.jacfwd(fn(backend))(*inputs)
    # The oracle by reverse mode, one row per output element (torch backend, plain autograd).
    x = inputs[0].clone().requires_grad_()
    out = fn("torch")(x, *inputs[1:])
    rows = [torch.autograd.grad(o, x, retain_graph=True)[0] for o in out.reshape(-1)]
    check(jac, torch.stack(rows).reshape(*out.shape, *x.shape), scale=10, msg=f"{case}/{backend}: jacfwd")


# ---------------------------------------------------------------- vmap of every layer
def _bn(m):
    """Random affine parameters and running stats, so that eval mode is not the identity."""
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._NormBase):
            with torch.no_grad():
                if bn.weight is not None:
                    bn.weight.normal_()
                    bn.bias.normal_()
                if bn.running_mean is not None:
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 1.5)
    return m


# name -> (fusedcnn module(backend), its torch twin (same state_dict order), train?, input shape per vmapped sample)
LAYERS = {
    "Conv2d": (lambda b: fnn.Conv2d(2, 3, 3, padding=1, backend=b), lambda: nn.Conv2d(2, 3, 3, padding=1), False,
               (2, 2, 4, 4)),
    "Conv2d_unbatched": (lambda b: fnn.Conv2d(2, 3, 3, stride=2, backend=b), lambda: nn.Conv2d(2, 3, 3, stride=2),
                         False, (2, 5, 5)),
    "BatchNorm2d_eval": (lambda b: fnn.BatchNorm2d(3, backend=b), lambda: nn.BatchNorm2d(3), False, (2, 3, 3, 3)),
    "BatchNorm2d_batch_stats": (lambda b: fnn.BatchNorm2d(3, track_running_stats=False, backend=b),
                                lambda: nn.BatchNorm2d(3, track_running_stats=False), True, (2, 3, 3, 3)),
    "BatchNormReLU2d_eval": (lambda b: fnn.BatchNormReLU2d(3, backend=b),
                             lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), False, (2, 3, 3, 3)),
    "BatchNormReLU2d_batch_stats": (lambda b: fnn.BatchNormReLU2d(3, track_running_stats=False, backend=b),
                                    lambda: nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()),
                                    True, (2, 3, 3, 3)),
    "ReLU": (lambda b: fnn.ReLU(backend=b), nn.ReLU, False, (2, 3, 3, 3)),
    "MaxPool2d": (lambda b: fnn.MaxPool2d(3, 2, 1, ceil_mode=True, backend=b),
                  lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), False, (2, 2, 5, 5)),
    "MaxPool2d_indices": (lambda b: fnn.MaxPool2d(2, return_indices=True, backend=b),
                          lambda: nn.MaxPool2d(2, return_indices=True), False, (2, 2, 4, 4)),
    "AvgPool2d": (lambda b: fnn.AvgPool2d(3, 2, 1, count_include_pad=False, backend=b),
                  lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), False, (2, 2, 5, 5)),
    "AdaptiveAvgPool2d": (lambda b: fnn.AdaptiveAvgPool2d((2, 1), backend=b), lambda: nn.AdaptiveAvgPool2d((2, 1)),
                          False, (2, 2, 5, 5)),
    "AdaptiveMaxPool2d": (lambda b: fnn.AdaptiveMaxPool2d(2, backend=b), lambda: nn.AdaptiveMaxPool2d(2), False,
                          (2, 2, 5, 5)),
    "Dropout_eval": (lambda b: fnn.Dropout(0.5, backend=b), lambda: nn.Dropout(0.5), False, (2, 3, 4)),
    "ConvBNReLU2d_eval": (lambda b: fnn.ConvBNReLU2d(2, 3, 3, padding=1, backend=b),
                          lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()), False,
                          (2, 2, 4, 4)),
    "ConvBNReLU2d_batch_stats": (lambda b: fnn.ConvBNReLU2d(2, 3, 3, padding=1, track_running_stats=False, backend=b),
                                 lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1),
                                                       nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()),
                                 True, (2, 2, 4, 4)),
    "LinearReLUDropout_eval": (lambda b: fnn.LinearReLUDropout(4, 5, backend=b),
                               lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout()), False, (3, 4)),
}


def _twins(layer, backend):
    make, make_ref, train, shape = LAYERS[layer]
    ours = _bn(make(backend)).train(train)
    ref = make_ref().train(train)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert [t.shape for t in mine.values()] == [t.shape for t in theirs.values()]
    ref.load_state_dict(dict(zip(theirs, mine.values())))
    return ours, ref, shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_vmap(layer, backend):
    ours, ref, shape = _twins(layer, backend)
    x = randn(3, *shape)
    out = torch.func.vmap(ours)(x)
    expected = torch.func.vmap(ref)(x)
    looped = [ref(x[i]) for i in range(x.shape[0])]  # vmap's meaning: the layer on each sample
    if isinstance(out, tuple):
        for a, r, loop in zip(out, expected, zip(*looped)):
            assert torch.equal(a, r) and torch.equal(a, torch.stack(loop))
    else:
        check(out, expected, msg=f"{layer}/{backend}")
        check(out, torch.stack(looped), msg=f"{layer}/{backend}: against a loop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_dropout_randomness(backend):
    """Training dropout under vmap follows torch: an error by default, torch's mask with randomness='same'."""
    ours, ref = fnn.Dropout(0.5, backend=backend), nn.Dropout(0.5)
    x = randn(3, 4, 5)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(ours)(x)
    torch.manual_seed(SEED)
    out = torch.func.vmap(ours, randomness="same")(x)
    torch.manual_seed(SEED)
    assert torch.equal(out, torch.func.vmap(ref, randomness="same")(x))


# ---------------------------------------------------------------- per-sample gradients
def _small_model(train_bn: bool) -> nn.Sequential:
    bn = nn.BatchNorm2d(3, track_running_stats=False) if train_bn else nn.BatchNorm2d(3)
    return _bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(3 * 2 * 2, 4))).train(train_bn)


def _per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
@pytest.mark.parametrize("train_bn", [False, True], ids=["bn_eval", "bn_batch_stats"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_grads(backend, train_bn, fused):
    ref = _small_model(train_bn)
    ours = fusedcnn.convert(copy.deepcopy(ref), backend=backend)
    if not fused:  # the same layers in a plain nn.Sequential: each module runs by itself
        ours = nn.Sequential(*ours)
    else:
        assert ours.fused_runs()
    x, y = randn(4, 2, 4, 4), torch.randint(0, 4, (4,))
    grads = _per_sample_grads(ours, x, y)
    for i in range(x.shape[0]):  # the oracle: plain autograd through the torch model, one sample at a time
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in ref.named_parameters():
            check(grads[name][i], p.grad, scale=10, msg=f"{backend}: sample {i}, {name}")


# ---------------------------------------------------------------- the ordinary backward keeps the kernels
class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
@pytest.mark.parametrize("case, kernel, aten", [
    ("relu", "relu_backward", "aten::threshold_backward"),
    ("conv2d", "conv2d_backward", "aten::convolution_backward"),
    ("max_pool2d", "max_pool2d_backward", "aten::max_pool2d_with_indices_backward"),
    ("adaptive_avg_pool2d", "adaptive_avg_pool2d_backward", "aten::_adaptive_avg_pool2d_backward"),
    ("batch_norm_eval", "batch_norm_backward_elemt", None),
])
def test_backward_kernels(case, kernel, aten, backend):
    """create_graph=False runs the backend's backward kernel; create_graph=True the differentiable torch ops."""
    make, fn, _ = CASES[case]
    inputs = make(torch.float32)
    qualified = f"fusedcnn::{kernel if backend == 'cpp' else 'triton_' + kernel}"
    for create_graph in (False, True):
        out = fn(backend)(*inputs)
        with _RecordOps() as rec:
            torch.autograd.grad(out, inputs[0], torch.ones_like(out), create_graph=create_graph)
        assert (qualified in rec.names) != create_graph, (create_graph, sorted(rec.names))
        if aten is not None:
            assert (aten in rec.names) == create_graph, (create_graph, sorted(rec.names))


def test_backward_without_differentiable_formula_raises():
    """An op registered without a differentiable backward says so under create_graph instead of a wrong number."""
    backward = _registry._backward("my_op", lambda ctx, g: g * 2, None)
    with torch.no_grad():  # what autograd sets for backward(create_graph=False)
        assert torch.equal(backward(None, torch.ones(2)), torch.full((2,), 2.0))
    with torch.enable_grad(), pytest.raises(NotImplementedError, match="fusedcnn::my_op: double backward"):
        backward(None, torch.ones(2))
    twice = _registry._backward("my_op", lambda ctx, g: g * 2, lambda ctx, g: g * 3)
    with torch.enable_grad():
        assert torch.equal(twice(None, torch.ones(2)), torch.full((2,), 3.0))


# ---------------------------------------------------------------- synchronized BatchNorm's double backward
@pytest.fixture
def one_process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
def test_sync_batch_norm_gradgradcheck(backend, one_process_group):
    """The synchronized path (statistics and backward sums all-reduced) on a one-process group."""
    from fusedcnn.ops.batchnorm import _compiled_batch_norm

    x, w, b = _leaf(3, 2, 2, 3, dtype=torch.float64), _leaf(2, dtype=torch.float64), _leaf(2, dtype=torch.float64)

    def f(x, w, b):
        return _compiled_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, True, backend, one_process_group)

    _run_or_skip_float64(f, (x, w, b), backend)
    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)
