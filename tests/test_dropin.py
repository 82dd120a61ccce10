"""Drop-in gaps: torch.nn's constructor arguments (BatchNorm2d's bias=), torch.fx symbolic tracing and torchvision's
feature extraction, torch.export with dropout, and torch's behaviour for divisor_override < 0, BatchNorm parameter
dtypes, convs with 0 output channels and global pooling of large planes."""
import copy
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fusedcnn
import fusedcnn.functional as F
import fusedcnn.nn as fnn
from fusedcnn.convert import TWINS
from fusedcnn.reference import dropout_keep
from helpers import assert_close, backend_params, randn

PHILOX = ("reference", "triton", "cpp")  # the backends that share the dropout stream
TORCH_HAS_BN_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _raises_like(torch_call, our_call):
    """our_call raises what torch_call raises: same type, same message."""
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(type(theirs.value)) as ours:
        our_call()
    assert str(ours.value) == str(theirs.value)


# ================================================================= constructor arguments
# Every fusedcnn.nn layer with a torch.nn counterpart; BatchNormReLU2d takes BatchNorm2d's arguments.
LAYERS = sorted([(ours, theirs) for theirs, ours in TWINS.items()] + [(fnn.BatchNormReLU2d, nn.BatchNorm2d)],
                key=lambda pair: pair[0].__name__)
OWN_KEYWORDS = {fnn.BatchNormReLU2d: {"backend": "auto", "sync": False}}


@pytest.mark.parametrize("ours,theirs", LAYERS, ids=[o.__name__ for o, _ in LAYERS])
def test_constructor_signature_is_torchs_plus_backend(ours, theirs):
    """inspect.signature of each layer's __init__ = its torch.nn counterpart's (installed torch) + keyword-only
    backend="auto" (BatchNormReLU2d: + sync=False), and every argument is accepted by name."""
    sig = inspect.signature(ours.__init__)
    own = OWN_KEYWORDS.get(ours, {"backend": "auto"})
    extra = [p for p in sig.parameters.values() if p.name in own]
    assert [(p.name, p.kind, p.default) for p in extra] == [
        (name, inspect.Parameter.KEYWORD_ONLY, default) for name, default in own.items()]
    rest = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in own])
    assert rest == inspect.signature(theirs.__init__)
    # each argument by name, with torch's default (the required ones given)
    required = {"num_features": 3, "in_channels": 4, "out_channels": 2, "kernel_size": 3, "output_size": 2}
    kwargs = {p.name: required[p.name] if p.default is inspect.Parameter.empty else p.default
              for p in rest.parameters.values() if p.name != "self"}
    a, b = ours(**kwargs, backend="reference"), theirs(**kwargs)
    assert a.extra_repr() == b.extra_repr() and list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize("ours,theirs,args,kwargs", [
    (fnn.Conv2d, nn.Conv2d, (4, 6, 3), dict(stride=2, padding="valid", dilation=2, groups=2, bias=False,
                                            padding_mode="reflect", dtype=torch.float64)),
    (fnn.BatchNorm2d, nn.BatchNorm2d, (5, 1e-3, None, False, False), {}),
    (fnn.BatchNormReLU2d, nn.BatchNorm2d, (5,), dict(momentum=0.3, track_running_stats=False)),
    (fnn.MaxPool2d, nn.MaxPool2d, ((2, 3), 1, 1, 2, True, True), {}),
    (fnn.AvgPool2d, nn.AvgPool2d, (3,), dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                                             divisor_override=4)),
    (fnn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool2d, ((2, None), True), {}),
    (fnn.Dropout, nn.Dropout, (0.25, True), {}),
    (fnn.ReLU, nn.ReLU, (True,), {}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_constructor_arguments_mean_what_they_mean_in_torch(ours, theirs, args, kwargs):
    a, b = ours(*args, **kwargs, backend="cpp"), theirs(*args, **kwargs)
    assert a.backend == "cpp"
    assert a.extra_repr() == b.extra_repr()
    assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in b.state_dict().items()}


def test_constructor_errors_are_torchs():
    _raises_like(lambda: nn.Conv2d(3), lambda: fnn.Conv2d(3))
    _raises_like(lambda: nn.Dropout(1.5), lambda: fnn.Dropout(1.5))
    _raises_like(lambda: nn.BatchNorm2d(3, nonsense=1), lambda: fnn.BatchNorm2d(3, nonsense=1))
    with pytest.raises(ValueError, match="unknown backend"):
        fnn.BatchNorm2d(3, backend="cudnn")


@pytest.mark.skipif(not TORCH_HAS_BN_BIAS, reason="torch.nn.BatchNorm2d has no bias= before torch 2.14")
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layer", ["bn", "bnrelu", "fused"])
def test_batchnorm_bias_false(backend, layer):
    """bias=False: no bias parameter or state_dict key (as torch); forward, backward and running stats match torch,
    unfused, fused BN+ReLU, and in the fused Conv+BN+ReLU(+2x2 pool) run."""
    torch.manual_seed(0)
    if layer == "fused":
        theirs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, bias=False), nn.ReLU(),
                               nn.MaxPool2d(2))
    else:
        theirs = nn.Sequential(nn.BatchNorm2d(4, bias=False), nn.ReLU())
        if layer == "bn":
            theirs = theirs[:1]
    bn = [m for m in theirs if isinstance(m, nn.BatchNorm2d)][0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    if layer == "bnrelu":
        ours = fnn.BatchNormReLU2d(4, bias=False, backend=backend)
        ours.load_state_dict(bn.state_dict())
    else:
        ours = fusedcnn.convert(copy.deepcopy(theirs), backend=backend)
        assert layer != "fused" or ours.fused_runs() == [("conv_bn_relu_maxpool", ["0", "1", "2", "3"])]
    assert list(ours.state_dict()) == list((bn if layer == "bnrelu" else theirs).state_dict())
    assert all(name != "bias" and not name.endswith("1.bias") for name, _ in ours.named_parameters())
    shape = (2, 3, 6, 6) if layer == "fused" else (2, 4, 3, 3)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        x = randn(*shape, requires_grad=True)
        y, y_ref = ours(x), theirs(x)
        g = randn(*y.shape)
        got = torch.autograd.grad(y, [x, *ours.parameters()], g)
        want = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
        assert_close(y, y_ref, msg=f"train={train}")
        for a, b in zip(got, want):
            assert_close(a, b, msg=f"grad, train={train}")
    ours_bn = ours if layer == "bnrelu" else [m for m in ours if isinstance(m, nn.modules.batchnorm._NormBase)][0]
    assert_close(ours_bn.running_mean, bn.running_mean)
    assert_close(ours_bn.running_var, bn.running_var)
    assert ours_bn.bias is None


# ================================================================= torch.fx
def _net(backend, momentum=0.1):
    """A converted model with every layer kind: a fused Conv+BN+ReLU+pool run, a lone BatchNorm, the pooling
    layers, a fused Linear+ReLU+Dropout run."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.AvgPool2d(2, divisor_override=3),
                        nn.AdaptiveMaxPool2d((2, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
                        nn.ReLU(), nn.Dropout(0.5))
    return fusedcnn.convert(net, backend=backend)


def _functional_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_symbolic_trace_converted_model(backend, train):
    """symbolic_trace of a converted model: every layer is a call of its fusedcnn functional on the module's backend
    (a graph node), and the GraphModule computes what the model does -- dropout masks (same seed), running stats
    and num_batches_tracked (momentum=None: the cumulative average) included."""
    model = _net(backend, momentum=None).train(train)
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    calls = _functional_calls(gm)
    targets = {n.target.__name__ for n in calls}
    assert {"conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
            "relu", "dropout"} <= targets
    for n in calls:
        if n.target.__module__.startswith("fusedcnn.ops"):
            assert n.target is getattr(F, n.target.__name__)
            assert n.kwargs["backend"] == backend, n
    assert not any(n.target in (TF.conv2d, TF.batch_norm, TF.dropout) for n in calls)
    assert ("count_batch" in targets) == train  # num_batches_tracked counted when the graph runs
    for step in range(2):
        x = randn(2, 3, 8, 8)
        torch.manual_seed(step)
        y = gm(x)  # the children one by one; the eager model fuses its runs
        torch.manual_seed(step)
        y_eager = twin(x)
        assert torch.equal(y != 0, y_eager != 0), f"step {step}: dropout masks"
        assert_close(y, y_eager, msg=f"step {step}")
        for name, a in gm.named_buffers():  # the running stats (train mode: updated) and counts it reads
            assert_close(a.double(), twin.get_buffer(name).double(), torch.float32, msg=name)
    if train:
        assert int(gm.get_buffer("1.num_batches_tracked")) == int(twin[1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", backend_params(("torch", "reference", "cpp")))
def test_symbolic_trace_and_feature_extraction_vgg16(backend):
    """fusedcnn.models.vgg16 (FusedSequential containers): symbolic_trace and create_feature_extractor give the
    model's outputs; the traced graph checks the input resolution when it runs."""
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    model = fusedcnn.models.vgg16(in_channels=1, num_classes=3, width=1 / 32, head="avgpool", backend=backend)
    model.eval()
    x = randn(2, 1, 32, 32)
    gm = torch.fx.symbolic_trace(model)
    assert_close(gm(x), model(x))
    with pytest.raises(ValueError, match="too small"):
        gm(randn(1, 1, 16, 16))
    extractor = feature_extraction.create_feature_extractor(
        model, {"features.1": "bn1", "features.4": "pool1", "pool": "pooled", "classifier": "logits"})
    out = extractor(x)
    assert_close(out["bn1"], model.features[:2](x))
    assert_close(out["pool1"], model.features[:5](x))
    assert_close(out["pooled"], model.pool(model.features(x)))
    assert_close(out["logits"], model(x))
    # train mode: batch statistics, running-stat updates and dropout masks (same seeds) as the eager model's
    model.train()
    twin = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    torch.manual_seed(5)
    y = gm(x)
    torch.manual_seed(5)
    y_eager = twin(x)
    assert torch.equal(y != 0, y_eager != 0)
    assert_close(y, y_eager)
    assert_close(gm.get_buffer("features.1.running_var"), twin.features[1].running_var)


@pytest.mark.parametrize("backend", backend_params())
def test_feature_extraction_converted_model_train_mode(backend):
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    model = _net(backend).train()
    twin = copy.deepcopy(model)
    extractor = feature_extraction.create_feature_extractor(model, {"3": "pooled", "12": "out"})
    x = randn(2, 3, 8, 8)
    torch.manual_seed(7)
    out = extractor(x)
    torch.manual_seed(7)
    y = twin(x)
    assert torch.equal(out["out"] != 0, y != 0)  # the same dropout mask
    assert_close(out["out"], y)
    assert_close(out["pooled"], twin[:4](x))  # train mode: batch statistics, whatever the running ones


def test_traced_graph_checks_arguments_when_it_runs():
    gm = torch.fx.symbolic_trace(fnn.BatchNorm2d(3, backend="reference"))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        gm(randn(3, 4, 4))
    gm = torch.fx.symbolic_trace(fnn.Conv2d(3, 4, 3, backend="reference"))
    with pytest.raises(RuntimeError, match="expected input"):
        gm(randn(1, 2, 5, 5))


# ================================================================= torch.export with dropout
@pytest.mark.parametrize("backend", backend_params())
def test_export_train_mode_dropout(backend):
    """torch.export of a train-mode model with Dropout: no data-dependent int() of the seed (it stays a tensor);
    the exported program draws the same seeds as the eager model (torch.manual_seed reproduces both), so on the
    Philox backends it gives the eager masks, which are the reference stream's for that seed."""
    model = nn.Sequential(fnn.Conv2d(3, 4, 3, backend=backend), fnn.ReLU(backend=backend),
                          fnn.Dropout(0.5, backend=backend)).train()
    x = randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,))
    code = ep.graph_module.code
    assert "item" not in code and "_local_scalar_dense" not in code
    torch.manual_seed(3)
    y = ep.module()(x)
    torch.manual_seed(3)
    y_eager = model(x)
    if backend == "torch":
        assert torch.equal(y != 0, y_eager != 0)
    else:
        assert torch.equal(y, y_eager)
        torch.manual_seed(3)
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))  # common.draw_seed's draw
        assert torch.equal(y != 0, dropout_keep(seed, y.shape, 0.5) & (model[:2](x) != 0))
    assert_close(y, model[:2](x) * (y != 0) * 2.0)


@pytest.mark.parametrize("backend", backend_params())
def test_export_train_mode_fused_linear_relu_dropout(backend):
    """A FusedSequential Linear+ReLU+Dropout run (triton: one fused GEMM whose seed is a tensor too) exports, and the
    program's output equals the eager module's for the same torch.manual_seed."""
    model = fnn.LinearReLUDropout(6, 5, p=0.4, backend=backend).train()
    x = randn(4, 6)
    ep = torch.export.export(model, (x,))
    assert "item" not in ep.graph_module.code
    torch.manual_seed(11)
    y = ep.module()(x)
    torch.manual_seed(11)
    y_eager = model(x)
    assert torch.equal(y != 0, y_eager != 0)
    assert_close(y, y_eager)


@pytest.mark.parametrize("backend", backend_params(PHILOX))
def test_seed_tensor_ops_pass_opcheck_and_double_backward(backend):
    from fusedcnn.ops.dropout import seeded_dropout
    torch.library.opcheck(seeded_dropout, (randn(3, 4, requires_grad=True), 0.3, torch.tensor(12345), backend))
    torch.library.opcheck(seeded_dropout, (randn(2, 3, 4, 5, channels_last=True, requires_grad=True), 0.5,
                                           torch.tensor(-7), backend))
    # same seed -> the same mask on every Philox backend (the reference stream), NaN kept as torch
    x = randn(5, 7, requires_grad=True)
    y = seeded_dropout(x, 0.5, torch.tensor(-424242), backend)
    keep = dropout_keep(-424242, x.shape, 0.5)
    assert torch.equal(y.detach(), x.detach() * keep * 2.0)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    assert torch.equal(g.detach(), keep * 2.0)


# ================================================================= divisor_override < 0
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("divisor", [-1, -3])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_negative_divisor_override_divides_as_torch(backend, divisor, count_include_pad):
    """torch divides by a negative divisor_override (only 0 is an error): every backend gives torch's values and
    gradients (cpp used to reject it with 'divisor must be not zero', triton ignored it)."""
    x = randn(2, 3, 5, 6, requires_grad=True)
    args = (3, 2, 1, True, count_include_pad, divisor)
    y = F.avg_pool2d(x, *args, backend=backend)
    y_ref = TF.avg_pool2d(x, *args)
    assert_close(y, y_ref)
    g = randn(*y.shape)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    assert_close(fnn.AvgPool2d(3, 2, 1, divisor_override=divisor, backend=backend)(x),
                 nn.AvgPool2d(3, 2, 1, divisor_override=divisor)(x))
    _raises_like(lambda: TF.avg_pool2d(x, 2, divisor_override=0),
                 lambda: F.avg_pool2d(x, 2, divisor_override=0, backend=backend))


# ================================================================= BatchNorm parameter dtypes
BN_DTYPE_CASES = {  # input dtype, (weight, bias, running_mean, running_var) dtypes
    "f32-x-f64-stats": (torch.float32, (torch.float32, torch.float32, torch.float64, torch.float64)),
    "f32-x-f64-all": (torch.float32, (torch.float64,) * 4),
    "f32-x-f64-var": (torch.float32, (None, None, torch.float32, torch.float64)),
    "f32-x-f16-stats": (torch.float32, (torch.float32, torch.float32, torch.float16, torch.float16)),
    "bf16-x-f64-stats": (torch.bfloat16, (torch.float32, torch.float32, torch.float64, torch.float64)),
    "bf16-x-bf16-w-f32-stats": (torch.bfloat16, (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(BN_DTYPE_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_parameter_dtypes_rejected_as_torch(backend, case, training):
    dtype, dtypes = BN_DTYPE_CASES[case]
    x = randn(2, 3, 4, 4, dtype=dtype)
    w, b, m, v = (None if d is None else torch.rand(3).to(d) + 0.5 for d in dtypes)
    for fn, ours in ((TF.batch_norm, F.batch_norm), (TF.batch_norm, F.batch_norm_relu)):
        try:
            fn(x, m.clone(), v.clone(), w, b, training)
        except RuntimeError as e:
            theirs = str(e)
        else:
            raise AssertionError("torch accepted it")
        prefix = theirs.split(" but found")[0]  # which mismatching tensor torch names depends on its kernels
        with pytest.raises(RuntimeError, match="^" + prefix.replace("(", r"\(").replace(")", r"\)")):
            ours(x, m.clone(), v.clone(), w, b, training, backend=backend)
    if w is not None:  # the fused Conv+BN+ReLU run checks its BatchNorm the same way
        conv_w = randn(3, 3, 1, 1, dtype=dtype)
        with pytest.raises(RuntimeError, match="^" + prefix.replace("(", r"\(").replace(")", r"\)")):
            F.conv_bn_relu(x, conv_w, None, m.clone(), v.clone(), w, b, training, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_batchnorm_amp_dtypes_still_run(backend):
    """bfloat16 input with float32 parameters (torch's "mixed dtype", AMP) runs and matches torch."""
    x = randn(2, 3, 4, 4, dtype=torch.bfloat16)
    m, v, w, b = torch.zeros(3), torch.ones(3), torch.rand(3) + 0.5, torch.rand(3)
    y = F.batch_norm(x, m.clone(), v.clone(), w, b, True, backend=backend)
    assert_close(y, TF.batch_norm(x, m.clone(), v.clone(), w, b, True))


@pytest.mark.parametrize("backend", backend_params())
def test_batchnorm_running_stats_both_or_neither(backend):
    x = randn(2, 3, 4, 4)
    _raises_like(lambda: TF.batch_norm(x, torch.zeros(3), None, training=True),
                 lambda: F.batch_norm(x, torch.zeros(3), None, training=True, backend=backend))
    _raises_like(lambda: TF.batch_norm(x, None, torch.ones(3), training=True),
                 lambda: F.batch_norm(x, None, torch.ones(3), training=True, backend=backend))


# ================================================================= conv with 0 output channels
@pytest.mark.parametrize("backend", backend_params())
def test_conv_without_output_channels_as_torch(backend):
    """torch.nn.Conv2d(C, 0, k) builds and its forward raises; F.conv2d raises for fewer filters than groups."""
    ours, theirs = fnn.Conv2d(4, 0, 3, backend=backend), nn.Conv2d(4, 0, 3)
    assert repr(ours) == repr(theirs) and ours.weight.shape == theirs.weight.shape
    x = randn(2, 4, 5, 5)
    _raises_like(lambda: theirs(x), lambda: ours(x))
    _raises_like(lambda: TF.conv2d(x, randn(2, 1, 3, 3), groups=4),
                 lambda: F.conv2d(x, randn(2, 1, 3, 3), groups=4, backend=backend))
    _raises_like(lambda: TF.conv2d(x[:0], randn(0, 4, 1, 1)),
                 lambda: F.conv2d(x[:0], randn(0, 4, 1, 1), backend=backend))
    mod = fnn.ConvBNReLU2d(4, 0, 3, backend=backend)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        mod(x)


# ================================================================= global pooling of large planes
_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, fusedcnn.functional as F
    def peak_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024
    n, fn = int(sys.argv[1]), sys.argv[2]
    x = torch.randn(1, 2, 1, 1).expand(1, 2, n, n)  # an n x n plane in no memory: stride 0
    getattr(F, fn)(torch.randn(1, 2, 4, 4), 1, backend="cpp")  # load everything first
    before = peak_mb()
    y = getattr(F, fn)(x, 1, backend="cpp")
    y = y[0] if isinstance(y, tuple) else y
    assert torch.allclose(y.flatten(), x[0, :, 0, 0], rtol=1e-3), y  # float32 sums of 2**26 values
    print(peak_mb() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("backend", backend_params(("cpp",)))
@pytest.mark.parametrize("fn", ["adaptive_avg_pool2d", "adaptive_max_pool2d"])
def test_global_pooling_memory_does_not_grow_with_the_window(backend, fn):
    """Global pooling of an 8192 x 8192 plane: the cpp kernels' tiled path kept an int64 offset per window tap
    (512 MB here; 17 GB and a MemoryError for 46341 x 46341): now a few MB, as torch."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "8192", fn], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 32, f"peak memory grew by {out.stdout.split()[-1]} MB"


@pytest.mark.parametrize("backend", backend_params(("cpp",)))
@pytest.mark.parametrize("output_size", [(1, 1), (2, 3), (3, 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_window_adaptive_pooling_in_two_passes_matches_torch(monkeypatch, backend, output_size,
                                                                    channels_last):
    """The two-pass path (rows, then columns) that large windows take: torch's values, indices (first maximum in
    row-major order, the last NaN) and gradients. Small windows take it here by lowering the threshold."""
    from fusedcnn.ops import pooling
    monkeypatch.setattr(pooling.IMPLEMENTATIONS["cpp"], "_MAX_TAPS", 1)
    x = randn(2, 3, 7, 9, channels_last=channels_last)
    x = torch.where(torch.rand_like(x) < 0.3, torch.ones_like(x), x)  # ties: the first maximum wins
    x[0, 1, 5, 2] = float("nan")
    x[0, 1, 2, 7] = float("nan")  # the last NaN in row-major order wins
    x.requires_grad_(True)
    for ours, theirs in ((lambda t: F.adaptive_max_pool2d(t, output_size, True, backend=backend),
                          lambda t: TF.adaptive_max_pool2d(t, output_size, True)),
                         (lambda t: (F.adaptive_avg_pool2d(t, output_size, backend=backend),),
                          lambda t: (TF.adaptive_avg_pool2d(t, output_size),))):
        got, want = ours(x), theirs(x)
        assert_close(got[0], want[0])
        assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if len(got) == 2:
            assert torch.equal(got[1], want[1])
        g = randn(*want[0].shape)
        assert_close(torch.autograd.grad(got[0], x, g)[0], torch.autograd.grad(want[0], x, g)[0])
