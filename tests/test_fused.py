"""The "fused" family: FusedSequential's execution plan, ConvBNReLU2d and LinearReLUDropout on every backend, and
the fused Triton kernels (Conv + BatchNorm + ReLU (+ MaxPool), Linear + ReLU + Dropout) against unfused torch layers.

Oracle: the same unfused torch.nn layers in float64 (state copied). Low-precision results must stay within
2x torch's own low-precision error on the same inputs (docs/ARCHITECTURE.md, flash-attention style), plus the
dtype's absolute tolerance; fp32 within TOLERANCES scaled for the BatchNorm of tiny batches. Outputs are poisoned
(FUSEDCNN_POISON=1), so an element a kernel forgets to write is NaN and fails.

Tests marked `needs_triton` exercise the Triton kernels and ops themselves; the backend-generic tests run for
every backend that can run here (helpers.backend_params).
"""
import copy

import pytest
import torch
from torch import nn

import fusedcnn
from fusedcnn.nn import ConvBNReLU2d, FusedSequential, LinearReLUDropout, fuse_chain
from fusedcnn.ops import fused as fops
from helpers import backend_params, check, randn

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend-generic tests still run
    triton = tl = None

TRITON_REASON = fusedcnn.backends.unavailable_reason("triton", "cpu")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None and not torch.cuda.is_available(),
                                  reason=f"triton cannot run here: {TRITON_REASON}")

DEV = "cpu"
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = backend_params(("torch", "reference", "cpp", "triton"))


def _run(module, x, grad=None, input_grad=True):
    x = x.detach().clone().requires_grad_(input_grad)
    y = module(x)
    if grad is not None:
        y.backward(grad.to(y.dtype))
    return y, x.grad


def _fmt(x, channels_last):
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _torch_conv_bn_relu(m: ConvBNReLU2d) -> nn.Sequential:
    """The unfused torch twin of a ConvBNReLU2d (same keys: 0.weight, 1.running_mean, ...), holding a copy of its
    state."""
    conv, bn = m[0], m[1]
    ref = nn.Sequential(
        nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode),
        nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats),
        nn.ReLU())
    ref.load_state_dict(m.state_dict())
    return ref.to(conv.weight.dtype).train(m.training)


def _spy_fused_backends(monkeypatch) -> list:
    """Record the backend every call of the fused family's functionals resolves to (conv_bn_relu and
    linear_relu_dropout dispatch through fusedcnn.ops.fused.dispatch)."""
    used, real = [], fops.dispatch

    def spy(family, backend, x):
        used.append(fusedcnn.backends.resolve(backend, x, family))
        return real(family, backend, x)

    monkeypatch.setattr(fops, "dispatch", spy)
    return used


# ---------------------------------------------------------------------------------------------- ConvBNReLU2d (triton)
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_bn_relu_train_eval(dtype, channels_last):
    """One layer: 2 training steps (batch stats, running-stat update, backward) and eval, vs torch in fp64."""
    torch.manual_seed(1)
    m = ConvBNReLU2d(5, 6, 3, padding=1, momentum=0.3, backend="triton")
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5), m[1].bias.uniform_(-0.5, 0.5)
    ref = _torch_conv_bn_relu(m)
    ref64, reflow = copy.deepcopy(ref).double(), copy.deepcopy(ref).to(dtype)
    m = m.to(dtype)
    x = _fmt(randn(2, 5, 6, 6, dtype=dtype) + 0.5, channels_last)
    g = torch.randn(2, 6, 6, 6)
    y, gx = _run(m, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    assert y.dtype == dtype and y.is_contiguous(memory_format=_memory_format(channels_last))
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=4, msg="grad input")
    lo, mine = dict(reflow.named_parameters()), dict(m.named_parameters())
    assert list(mine) == list(lo)  # the same parameter names as the unfused Sequential
    for name, p64 in ref64.named_parameters():
        check(mine[name].grad, p64.grad, lo[name].grad, dtype, scale=4, msg=name)
    # second step (no backward): running stats after two momentum updates
    x2 = _fmt(randn(2, 5, 6, 6, dtype=dtype) * 2, channels_last)
    with torch.no_grad():
        m(x2), ref64(x2.double()), reflow(x2)
    for buf in ("running_mean", "running_var"):
        check(getattr(m[1], buf), getattr(ref64[1], buf), getattr(reflow[1], buf), dtype, msg=buf)
    assert int(m[1].num_batches_tracked) == 2
    # eval: running statistics, no update
    m.eval(), ref64.eval(), reflow.eval()
    before = m[1].running_mean.clone()
    ye, _ = _run(m, x2)
    check(ye, ref64(x2.double()), reflow(x2), msg="eval output")
    assert torch.equal(before, m[1].running_mean)


@needs_triton
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's, in the reference
def test_conv_bn_relu_options():
    """stride 2, dilation, no bias, momentum=None (cumulative), affine=False; then groups=2 with asymmetric
    padding="same" (even kernel: the activation is zero-padded first)."""
    torch.manual_seed(2)
    m = ConvBNReLU2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False, momentum=None, affine=False,
                     backend="triton")
    ref64 = _torch_conv_bn_relu(m).double()
    x = randn(2, 3, 7, 7) * 3 + 1
    g = torch.randn(2, 5, 4, 4)
    for step in range(2):  # step 1: the input needs no gradient (a network's first layer): dgrad is skipped
        y, gx = _run(m, x * (step + 1), g, input_grad=step == 0)
        y64, gx64 = _run(ref64, (x * (step + 1)).double(), g.double(), input_grad=step == 0)
        check(y, y64, msg="output")
        if step == 0:
            check(gx, gx64, scale=4, msg="grad input")
        else:
            assert gx is None
    check(m[0].weight.grad, ref64[0].weight.grad, scale=4, msg="grad weight")
    check(m[1].running_var, ref64[1].running_var, msg="running_var (cumulative)")

    m = ConvBNReLU2d(4, 6, 2, padding="same", groups=2, backend="triton")
    ref64 = _torch_conv_bn_relu(m).double()
    x, g = randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    y, gx = _run(m, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    check(y, y64, msg="groups=2 same: output")
    check(gx, gx64, scale=4, msg="groups=2 same: grad input")
    check(m[0].weight.grad, ref64[0].weight.grad, scale=4, msg="groups=2 same: grad weight")


# ---------------------------------------------------------------------------------------------- chains (triton)
def _vgg_block(c0, c1, c2):
    return nn.Sequential(
        nn.Conv2d(c0, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2, 2))


VGG_BLOCK_RUNS = [("conv_bn_relu", ["0", "1", "2"]), ("conv_bn_relu_maxpool", ["3", "4", "5", "6"])]


def _randomize_bn(seq):
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5), m.bias.uniform_(-0.5, 0.5)  # negative scales: pool must re-normalize


@needs_triton
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-nhwc", "bf16-nchw"])
def test_fused_chain_two_convs_and_pool(dtype, channels_last):
    """conv-BN-ReLU -> conv (normalize prologue) -BN-ReLU -> pool (fused): forward, backward, running stats."""
    torch.manual_seed(3)
    seq = _vgg_block(4, 6, 8)
    _randomize_bn(seq)
    ref64, reflow = copy.deepcopy(seq).double(), copy.deepcopy(seq).to(dtype)
    lowp = copy.deepcopy(seq).to(dtype)
    fused = fuse_chain(lowp)
    # the plan: the children stay those of `lowp` (shared), two fused runs
    assert isinstance(fused, FusedSequential) and list(fused) == list(lowp)
    assert all(a is b for a, b in zip(fused, lowp)) and len(fused) == 7
    assert fused.fused_runs() == VGG_BLOCK_RUNS
    x = _fmt(randn(2, 4, 6, 6, dtype=dtype), channels_last)
    g = torch.randn(2, 8, 3, 3)
    with fusedcnn.use_backend("triton"):
        y, gx = _run(fused, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    assert y.is_contiguous(memory_format=_memory_format(channels_last))
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=8, msg="grad input")
    lo = dict(reflow.named_parameters())
    fused_params = dict(fused.named_parameters())
    assert list(fused_params) == list(lo)
    for name, p64 in ref64.named_parameters():
        check(fused_params[name].grad, p64.grad, lo[name].grad, dtype, scale=8, msg=f"grad {name}")
    for i in (1, 4):
        check(lowp[i].running_var, ref64[i].running_var, reflow[i].running_var, dtype, msg=f"{i}.running_var")
    # eval: pending normalization from running stats
    fused.eval(), ref64.eval(), reflow.eval()
    with torch.no_grad(), fusedcnn.use_backend("triton"):
        check(fused(x), ref64(x.double()), reflow(x), msg="eval output")


@needs_triton
def test_pending_plan_and_state_dict(monkeypatch):
    """The plan passes the first run's pending BatchNorm+ReLU to the second conv's prologue and the second run's to
    the fused pool (no Pending is ever materialized); state_dict keys are the plain Sequential's; the old
    "conv."/"bn." keys of a ConvBNReLU2d still load."""
    seq = _vgg_block(3, 4, 4)
    fused = fuse_chain(seq)
    assert fused.fused_runs() == VGG_BLOCK_RUNS
    calls, maxpools, conv_calls = [], [], []
    real_conv, real_maxpool = fops.conv_bn_relu, fops.Pending.maxpool

    def conv_spy(input, *args, **kwargs):
        conv_calls.append((type(input).__name__, kwargs.get("pool"), kwargs.get("defer")))
        return real_conv(input, *args, **kwargs)

    monkeypatch.setattr(fops, "conv_bn_relu", conv_spy)
    monkeypatch.setattr(fops.Pending, "materialize", lambda self: calls.append(1))
    monkeypatch.setattr(fops.Pending, "maxpool", lambda self: maxpools.append(1) or real_maxpool(self))
    with fusedcnn.use_backend("triton"):
        y = fused(randn(2, 3, 4, 4))
    assert y.shape == (2, 4, 2, 2) and not calls and maxpools == [1]
    assert conv_calls == [("Tensor", False, True), ("Pending", True, False)]
    monkeypatch.undo()
    assert not torch.isnan(y).any()

    assert list(fused.state_dict()) == list(seq.state_dict())  # 0.weight, 1.running_var, 3.weight...
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in seq.named_parameters()]

    # the functional's Pending: raw conv output and float32 per-channel scale/shift
    conv, bn = seq[0], seq[1]
    x = randn(2, 3, 4, 4)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    pending = fops.conv_bn_relu(x, conv.weight, conv.bias, rm, rv, bn.weight, bn.bias, True, 0.1, 1e-5, 1, 1,
                                backend="triton", defer=True)
    assert isinstance(pending, fops.Pending) and pending.raw.shape == (2, 4, 4, 4)
    assert pending.scale.dtype == torch.float32 and pending.scale.shape == (4,) and pending.shift.shape == (4,)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double()
    with torch.no_grad():
        y64 = ref(x.double())
        check(pending.materialize(), y64, msg="Pending.materialize")
        check(pending.maxpool(), torch.nn.functional.max_pool2d(y64, 2, 2), msg="Pending.maxpool")
        check(rm, ref[1].running_mean, msg="running_mean")

    # ConvBNReLU2d: the unfused Sequential loads its state_dict, and it loads its own earlier "conv."/"bn." keys
    m = ConvBNReLU2d(3, 4, 3, padding=1)
    with torch.no_grad():
        m(randn(2, 3, 4, 4))  # running statistics that differ from the defaults
    assert list(m.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                    "1.num_batches_tracked"]
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    plain.load_state_dict(m.state_dict())
    old = {k.replace("0.", "conv.", 1) if k.startswith("0.") else k.replace("1.", "bn.", 1): v
           for k, v in m.state_dict().items()}
    assert "conv.weight" in old and "bn.running_var" in old
    for target, sd in ((ConvBNReLU2d(3, 4, 3, padding=1), old),
                       (nn.Sequential(ConvBNReLU2d(3, 4, 3, padding=1)), {"0." + k: v for k, v in old.items()})):
        target.load_state_dict(sd)  # strict
        for (k, a), b in zip(target.state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
    lin = LinearReLUDropout(3, 2)
    LinearReLUDropout(3, 2).load_state_dict(lin.state_dict())
    old_lin = LinearReLUDropout(3, 2)
    old_lin.load_state_dict({"weight": lin[0].weight.detach(), "bias": lin[0].bias.detach()})  # earlier layout
    assert torch.equal(old_lin[0].weight, lin[0].weight) and torch.equal(old_lin[0].bias, lin[0].bias)


# ---------------------------------------------------------------------------------------------- BN-ReLU-pool op
def _maxpool_op(y, scale, shift):
    return fops.Pending(y, scale, shift).maxpool()


def _apply_op(y, scale, shift):
    return fops.Pending(y, scale, shift).materialize()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_bn_relu_maxpool_odd_size_and_nan(dtype):
    """Odd H/W (the last row/col gets zero grad but must be written), ties, negative scales, NaN."""
    y = randn(2, 5, 7, 5, dtype=dtype, channels_last=True)
    y[0, 0, 0, 0] = float("nan")
    y[1, 1, :2, :2] = 0.25  # tie: the first maximum wins
    scale = torch.randn(5) * 2
    shift = torch.randn(5)
    g = torch.randn(2, 5, 3, 2)
    out, (dy, ds, dt) = _run_pool(_maxpool_op, y, scale, shift, g)
    ref, (dy64, ds64, dt64) = _run_pool(_pool_ref, y.double(), scale.double(), shift.double(), g.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isnan(out[0, 0, 0, 0]) and torch.isnan(ref[0, 0, 0, 0])
    check(out, ref, dtype=dtype, msg="pool output")
    check(dy, dy64, dtype=dtype, msg="grad y")
    # NaN: torch's ReLU backward passes the gradient at NaN (threshold_backward: NaN <= 0 is false), so the
    # NaN's channel gets NaN scale gradients there and in ours
    check(ds, ds64, dtype=dtype, scale=4, msg="grad scale")
    check(dt, dt64, dtype=dtype, scale=4, msg="grad shift")


def _pool_ref(y, scale, shift):
    return torch.nn.functional.max_pool2d(torch.relu(y * scale[:, None, None] + shift[:, None, None]), 2, 2)


def _run_pool(fn, y, scale, shift, g):
    y, scale, shift = (t.detach().clone().requires_grad_() for t in (y, scale, shift))
    out = fn(y, scale, shift)
    out.backward(g.to(out.dtype))
    return out, (y.grad, scale.grad, shift.grad)


@needs_triton
def test_bn_relu_apply_nchw():
    y = randn(2, 5, 3, 4)
    scale, shift, g = torch.randn(5), torch.randn(5), torch.randn(2, 5, 3, 4)
    out, grads = _run_pool(_apply_op, y, scale, shift, g)
    ref, grads64 = _run_pool(lambda a, s, t: torch.relu(a * s[:, None, None] + t[:, None, None]),
                             y.double(), scale.double(), shift.double(), g.double())
    assert out.is_contiguous()
    check(out, ref, msg="apply")
    for a, r, n in zip(grads, grads64, ("y", "scale", "shift")):
        check(a, r, dtype=torch.float32, scale=4, msg=f"grad {n}")


# ---------------------------------------------------------------------------------------------- Linear+ReLU+dropout
if triton is not None:
    @triton.jit
    def _rand_kernel(O_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(O_ptr + offs, tl.rand(seed, offs.to(tl.uint32)), mask=offs < n)


def _keep_mask(seed, shape, p):
    """The dropout stream of docs/ARCHITECTURE.md straight from tl.rand: keep element i (row-major) iff
    rand(seed, i) > p."""
    n = shape[0] * shape[1]
    u = torch.empty(n)
    _rand_kernel[(triton.cdiv(n, 64),)](u, seed & (2 ** 64 - 1), n, BLOCK=64)
    return (u > p).reshape(shape)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_linear_relu_dropout(dtype, p):
    torch.manual_seed(4)
    m = LinearReLUDropout(20, 18, p=p, backend="triton").to(dtype)
    assert m.fused_runs() == [("linear_relu_dropout", ["0", "1", "2"])]
    ref = torch.nn.Linear(20, 18).double()
    ref.load_state_dict(m[0].state_dict())
    x = randn(5, 20, dtype=dtype)
    g = torch.randn(5, 18)
    torch.manual_seed(7)
    seed = int(fusedcnn.common.draw_seed())  # 0-dim int64 tensor
    torch.manual_seed(7)  # the module draws the same seed from the default CPU generator
    y, gx = _run(m, x, g)
    keep = _keep_mask(seed, (5, 18), p)
    x64 = x.double().requires_grad_()
    y64 = torch.where(keep, torch.relu(ref(x64)) * (1 / (1 - p) if p < 1 else 0.0), 0.0)
    y64.backward(g.double())
    reflow = torch.nn.Linear(20, 18).to(dtype)
    reflow.load_state_dict(m[0].state_dict())
    xlo = x.clone().requires_grad_()
    ylo = torch.where(keep, torch.relu(reflow(xlo)) * (1 / (1 - p) if p < 1 else 0.0), 0.0)
    ylo.backward(g.to(dtype))
    check(y, y64, ylo, msg="output")
    if 0 < p < 1:
        assert 0 < int((y == 0).sum()) < y.numel()
    check(gx, x64.grad, xlo.grad, msg="grad input")
    check(m[0].weight.grad, ref.weight.grad, reflow.weight.grad, dtype, msg="grad weight")
    check(m[0].bias.grad, ref.bias.grad, reflow.bias.grad, dtype, msg="grad bias")
    m.eval()
    check(m(x), torch.relu(ref(x.double())), torch.relu(reflow(x)), msg="eval (no dropout)")


# ---------------------------------------------------------------------------------------------- opcheck
def _conv_args(prologue, stats, groups=1):
    x = randn(2, 4, 4, 4, channels_last=True, requires_grad=True)
    w = randn(4, 4 // groups, 2, 2, requires_grad=True)  # 2x2 taps, no padding: 3x3 outputs (opcheck runs it often)
    b = randn(4, requires_grad=True)
    s = (randn(4) + 1).requires_grad_() if prologue else None
    t = randn(4, requires_grad=True) if prologue else None
    return (x, w, b, s, t, [1, 1], [0, 0], [1, 1], groups, stats)


@needs_triton
@pytest.mark.parametrize("prologue,stats,groups", [(True, True, 1), (False, False, 1), (True, True, 2)])
def test_opcheck_conv(prologue, stats, groups):
    torch.library.opcheck(torch.ops.fusedcnn.triton_conv_bn_relu.default, _conv_args(prologue, stats, groups))


@needs_triton
def test_opcheck_conv_backward():
    x, w, b, s, t, st, pd, dl, groups, _ = _conv_args(True, True)
    g = randn(2, 4, 3, 3)
    y = randn(2, 4, 3, 3)
    op = torch.ops.fusedcnn.triton_conv_bn_relu_backward.default
    torch.library.opcheck(op, (g, y, randn(4), randn(4), randn(4), x.detach(), w.detach(), s.detach(), t.detach(),
                               st, pd, dl, groups, True, True))
    torch.library.opcheck(op, (g, None, None, None, None, x.detach(), w.detach(), None, None, st, pd, dl, groups,
                               False, False))
    x, w, *_ = _conv_args(False, False, groups=2)
    torch.library.opcheck(op, (g, None, None, None, None, x.detach(), w.detach(), None, None, st, pd, dl, 2,
                               False, True))


@needs_triton
@pytest.mark.parametrize("name", ["triton_bn_relu_apply", "triton_bn_relu_maxpool2d"])
def test_opcheck_bn_relu(name):
    args = (randn(2, 3, 4, 4, channels_last=True, requires_grad=True), randn(3, requires_grad=True),
            randn(3, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fusedcnn, name).default, args)
    torch.library.opcheck(getattr(torch.ops.fusedcnn, name + "_backward").default,
                          (randn(*getattr(torch.ops.fusedcnn, name)(*args).shape),) + tuple(a.detach() for a in args))


@needs_triton
def test_opcheck_linear():
    args = (randn(3, 5, requires_grad=True), randn(4, 5, requires_grad=True), randn(4, requires_grad=True), 0.3, 123)
    torch.library.opcheck(torch.ops.fusedcnn.triton_linear_relu_dropout.default, args)
    out = torch.ops.fusedcnn.triton_linear_relu_dropout(*(a.detach() if torch.is_tensor(a) else a for a in args))
    torch.library.opcheck(torch.ops.fusedcnn.triton_linear_relu_dropout_backward.default,
                          (randn(3, 4), out, args[0].detach(), args[1].detach(), 0.3, True))


@needs_triton
def test_torch_compile_fullgraph_chain():
    """The custom ops trace: a fused chain compiles with fullgraph=True, forward and backward (aot_eager)."""
    fused = fuse_chain(_vgg_block(3, 4, 4))
    x = randn(2, 3, 4, 4, requires_grad=True)
    with fusedcnn.use_backend("triton"):
        y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
        xe = x.detach().clone().requires_grad_()
        ye = fused(xe)
        (gxe,) = torch.autograd.grad(ye.sum(), xe)
    check(y, ye.double(), msg="compiled output")
    check(gx, gxe.double(), msg="compiled grad input")


# ---------------------------------------------------------------------------------------------- bad input
@needs_triton
def test_bad_input():
    m = ConvBNReLU2d(3, 4, 3, backend="triton")
    with pytest.raises(ValueError, match="expected 4D input"):
        m(randn(3, 5, 5))
    with pytest.raises(ValueError, match="expected 4D input"):
        fops.conv_bn_relu(randn(3, 5, 5), m[0].weight, None, None, None, backend="triton")
    with pytest.raises(RuntimeError, match=r"expected input\[2, 2, 5, 5\] to have 3 channels, but got 2"):
        m(randn(2, 2, 5, 5))
    with pytest.raises(RuntimeError, match="should be the same"):
        m(randn(2, 3, 5, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(randn(1, 3, 3, 3))
    weight = m[0].weight.detach()
    conv_op = torch.ops.fusedcnn.triton_conv_bn_relu
    with pytest.raises(TypeError):
        conv_op(torch.ones(1, 3, 5, 5, dtype=torch.int32), weight, None, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):  # torch's words
        ConvBNReLU2d(3, 4, 5, backend="triton")(randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="in_channels must be divisible by groups"):
        ConvBNReLU2d(4, 4, 3, groups=3, backend="triton")
    with pytest.raises(ValueError, match="must be given together"):
        conv_op(randn(2, 3, 5, 5), weight, None, torch.ones(3), None, [1, 1], [0, 0], [1, 1], 1, True)
    with pytest.raises(ValueError, match="contiguous float32 vector of 3"):
        fops.Pending(randn(2, 3, 4, 4), torch.ones(4), torch.ones(4)).materialize()
    with pytest.raises(RuntimeError, match="Output size is too small"):
        fops.Pending(randn(2, 3, 1, 4), torch.ones(3), torch.ones(3)).maxpool()
    with pytest.raises(ValueError, match="dropout probability"):
        LinearReLUDropout(4, 4, p=1.5)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(2x5 and 4x4\)"):
        LinearReLUDropout(4, 4, backend="triton")(randn(2, 5))
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        LinearReLUDropout(4, 4, backend="triton")(randn(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run fused on meta tensors"):
        m(torch.empty(2, 3, 5, 5, device="meta"))  # a device Triton cannot serve: no silent fallback
    with pytest.raises(ValueError, match="unknown backend"):
        ConvBNReLU2d(3, 4, 3, backend="cudnn")


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("pool", [False, True], ids=["", "pool"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_module_every_backend(backend, channels_last, pool, monkeypatch):
    """ConvBNReLU2d(backend=b) [+ MaxPool2d(2, 2)] equals torch's Conv2d -> BatchNorm2d -> ReLU [-> MaxPool2d] with
    the same state: output, input and parameter gradients, running stats after two training steps, eval output
    (fp32 vs torch in fp64; the torch backend bit for bit equal to the unfused torch layers)."""
    torch.manual_seed(11)
    m = ConvBNReLU2d(4, 6, 3, padding=1, momentum=0.3, backend=backend)
    with torch.no_grad():
        m[1].weight.uniform_(-1.5, 1.5), m[1].bias.uniform_(-0.5, 0.5)
    ref = _torch_conv_bn_relu(m)
    if pool:
        m = FusedSequential(*m, fusedcnn.nn.MaxPool2d(2, 2, backend=backend))
        ref.append(nn.MaxPool2d(2, 2))
    assert m.fused_runs() == ([("conv_bn_relu_maxpool", ["0", "1", "2", "3"])] if pool
                              else [("conv_bn_relu", ["0", "1", "2"])])
    ref64 = copy.deepcopy(ref).double()
    used = _spy_fused_backends(monkeypatch)
    x = _fmt(randn(2, 4, 6, 6) + 0.5, channels_last)
    hw = 3 if pool else 6
    g = torch.randn(2, 6, hw, hw)
    y, gx = _run(m, x, g)
    y32, gx32 = _run(ref, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    assert used == [backend]  # one fused call, on the backend the modules name
    assert y.dtype == torch.float32 and y.shape == (2, 6, hw, hw)
    assert y.is_contiguous(memory_format=_memory_format(channels_last))
    check(y, y64, msg="output")
    check(gx, gx64, scale=4, msg="grad input")
    mine, theirs = dict(m.named_parameters()), dict(ref.named_parameters())
    assert list(mine) == list(theirs)
    for name, p64 in ref64.named_parameters():
        check(mine[name].grad, p64.grad, scale=4, msg=f"grad {name}")
    if backend == "torch":
        assert torch.equal(y, y32) and torch.equal(gx, gx32)
        for name, p in theirs.items():
            assert torch.equal(mine[name].grad, p.grad), name
    # second step (no backward): running stats after two momentum updates
    x2 = _fmt(randn(2, 4, 6, 6) * 2, channels_last)
    with torch.no_grad():
        m(x2), ref(x2), ref64(x2.double())
    for buf in ("running_mean", "running_var"):
        check(getattr(m[1], buf), getattr(ref64[1], buf), msg=buf)
    assert int(m[1].num_batches_tracked) == 2
    # eval: running statistics, no update
    m.eval(), ref.eval(), ref64.eval()
    before = m[1].running_mean.clone()
    with torch.no_grad():
        ye = m(x2)
        check(ye, ref64(x2.double()), msg="eval output")
        if backend == "torch":
            assert torch.equal(ye, ref(x2))
    assert torch.equal(before, m[1].running_mean)
    assert used == [backend] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_relu_dropout_p0_every_backend(backend, monkeypatch):
    """LinearReLUDropout(p=0, backend=b) in training mode equals Linear -> ReLU (forward and backward, 3-D input);
    eval too."""
    torch.manual_seed(12)
    m = LinearReLUDropout(12, 10, p=0.0, backend=backend)
    ref = nn.Sequential(nn.Linear(12, 10), nn.ReLU())
    ref.load_state_dict(m.state_dict())  # the same keys: 0.weight, 0.bias
    ref64 = copy.deepcopy(ref).double()
    used = _spy_fused_backends(monkeypatch)
    x, g = randn(2, 3, 12), torch.randn(2, 3, 10)
    y, gx = _run(m, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    assert used == [backend]
    assert int((y == 0).sum()) > 0  # the ReLU clipped something
    check(y, y64, msg="output")
    check(gx, gx64, msg="grad input")
    check(m[0].weight.grad, ref64[0].weight.grad, msg="grad weight")
    check(m[0].bias.grad, ref64[0].bias.grad, msg="grad bias")
    m.eval()
    with torch.no_grad():
        check(m(x), ref64(x.double()), msg="eval output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_chain_every_backend(backend, monkeypatch):
    """Two conv runs + pool through fuse_chain (use_backend(b)) equal the unfused Sequential: bit for bit on torch,
    within fp32 tolerance of torch in fp64 and of the same backend's layers run one by one on every backend."""
    torch.manual_seed(13)
    seq = _vgg_block(3, 5, 6)
    _randomize_bn(seq)
    unfused, ref64 = copy.deepcopy(seq), copy.deepcopy(seq).double()
    same_backend = fusedcnn.convert(copy.deepcopy(seq), backend=backend)  # fusedcnn layers on `backend`
    fused = fuse_chain(seq)
    assert fused.fused_runs() == VGG_BLOCK_RUNS
    used = _spy_fused_backends(monkeypatch)
    x, g = randn(2, 3, 6, 6), torch.randn(2, 6, 3, 3)
    with fusedcnn.use_backend(backend):
        y, gx = _run(fused, x, g)
        assert used == [backend, backend]
        ys, gxs = _run(lambda t: nn.Sequential.forward(same_backend, t), x, g)  # module by module
        assert used == [backend, backend]
    y32, gx32 = _run(unfused, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    check(y, y64, msg="output")
    check(gx, gx64, scale=8, msg="grad input")
    check(y, ys.double(), msg="output vs the same layers unfused")
    check(gx, gxs.double(), scale=8, msg="grad input vs the same layers unfused")
    params, params64, params32 = (dict(s.named_parameters()) for s in (fused, ref64, unfused))
    for name, p64 in params64.items():
        check(params[name].grad, p64.grad, scale=8, msg=f"grad {name}")
    for i in (1, 4):
        check(seq[i].running_mean, ref64[i].running_mean, msg=f"{i}.running_mean")
        check(seq[i].running_var, ref64[i].running_var, msg=f"{i}.running_var")
    if backend == "torch":
        assert torch.equal(y, y32) and torch.equal(gx, gx32)
        for name, p in params32.items():
            assert torch.equal(params[name].grad, p.grad), name
        for a, b in zip(fused.buffers(), unfused.buffers()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_names_equal_state_dict_keys(backend):
    """named_parameters() names = state_dict() keys minus buffers, in order: vgg16 and convert() of a torch model."""
    def check_names(model):
        buffers = {n for n, _ in model.named_buffers()}
        keys = [k for k in model.state_dict() if k not in buffers]
        assert [n for n, _ in model.named_parameters()] == keys

    model = fusedcnn.models.vgg16(1, 10, 0.0625, "avgpool", 0.0, backend=backend)
    check_names(model)
    assert isinstance(model.features, FusedSequential) and isinstance(model.classifier, FusedSequential)
    runs = model.features.fused_runs()
    assert [name for name, _ in runs] == ["conv_bn_relu", "conv_bn_relu_maxpool"] * 2 + (
        ["conv_bn_relu"] * 2 + ["conv_bn_relu_maxpool"]) * 3
    assert runs[0] == ("conv_bn_relu", ["0", "1"]) and runs[1] == ("conv_bn_relu_maxpool", ["2", "3", "4"])
    assert model.classifier.fused_runs() == [("linear_relu_dropout", ["1", "2", "3"]),
                                             ("linear_relu_dropout", ["4", "5", "6"])]

    torch.manual_seed(14)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, 2),
                        nn.Flatten(1), nn.Linear(16, 5), nn.ReLU(), nn.Dropout(0.5))
    seq(randn(2, 3, 4, 4))  # running statistics that differ from the defaults
    original = copy.deepcopy(seq).eval()
    names, keys = [n for n, _ in seq.named_parameters()], list(seq.state_dict())
    converted = fusedcnn.convert(seq, backend=backend)
    assert isinstance(converted, FusedSequential)
    check_names(converted)
    assert [n for n, _ in converted.named_parameters()] == names and list(converted.state_dict()) == keys
    assert converted.fused_runs() == [("conv_bn_relu_maxpool", ["0", "1", "2", "3"]),
                                      ("linear_relu_dropout", ["5", "6", "7"])]
    converted.eval()
    x = randn(2, 3, 4, 4)
    with torch.no_grad():
        check(converted(x), original.double()(x.double()), msg="converted model, eval")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_run_unfused(backend, monkeypatch):
    """A forward hook on a ReLU (or a conv) inside a FusedSequential fires, its run runs unfused, the other run
    stays fused, and the output is unchanged; a hook that changes its module's output takes effect."""
    torch.manual_seed(15)
    seq = _vgg_block(3, 4, 4)
    _randomize_bn(seq)
    fused = fuse_chain(seq).eval()
    ref = copy.deepcopy(seq).eval()
    x = randn(2, 3, 4, 4)
    conv_calls = []
    real_conv = fops.conv_bn_relu

    def conv_spy(input, *args, **kwargs):
        conv_calls.append(kwargs.get("pool"))
        return real_conv(input, *args, **kwargs)

    monkeypatch.setattr(fops, "conv_bn_relu", conv_spy)
    with torch.no_grad(), fusedcnn.use_backend(backend):
        expected = fused(x)
        assert conv_calls == [False, True]
        for index, shape, fused_pools in ((2, (2, 4, 4, 4), [True]), (3, (2, 4, 4, 4), [False])):
            seen = []
            handle = seq[index].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
            conv_calls.clear()
            y = fused(x)
            handle.remove()
            assert seen == [shape], f"hook on child {index}"
            assert conv_calls == fused_pools, f"hook on child {index}: only the other run fuses"
            check(y, expected.double(), msg=f"output with a hook on child {index}")
        conv_calls.clear()
        assert torch.equal(fused(x), expected) and conv_calls == [False, True]  # hooks removed: fused again

        handles = [m[2].register_forward_hook(lambda mod, args, out: out + 1.0) for m in (seq, ref)]
        y, y_ref = fused(x), ref(x)
        for h in handles:
            h.remove()
        check(y, y_ref.double(), msg="output with an output-changing hook")
        assert not torch.allclose(y, expected)


# ---------------------------------------------------------------------------------------------- GPU: VGG shapes
@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("cin,cout,hw", [(64, 128, 56), (256, 256, 28), (512, 512, 14)])
def test_cuda_vgg_shapes(cin, cout, hw):
    """VGG16 layer shapes, bf16 channels_last, chained with a fused pool, vs fp32 torch on the same GPU."""
    torch.manual_seed(0)
    seq = _vgg_block(cin, cout, cout).cuda()
    ref = copy.deepcopy(seq).double()
    reflow = copy.deepcopy(seq).to(torch.bfloat16).to(memory_format=torch.channels_last)
    lowp = copy.deepcopy(seq).to(torch.bfloat16)
    fused = fuse_chain(lowp)
    x = torch.randn(8, cin, hw, hw, device="cuda").to(torch.bfloat16).to(memory_format=torch.channels_last)
    g = torch.randn(8, cout, hw // 2, hw // 2, device="cuda")
    with fusedcnn.use_backend("triton"):
        y, gx = _run(fused, x, g)
    y64, gx64 = _run(ref, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=8, msg="grad input")
    lo = dict(reflow.named_parameters())
    mine = dict(fused.named_parameters())
    for name, p64 in ref.named_parameters():
        check(mine[name].grad, p64.grad, lo[name].grad, torch.bfloat16, scale=8, msg=f"grad {name}")


@pytest.mark.cuda
@needs_triton
def test_cuda_linear_relu_dropout_vgg_classifier():
    torch.manual_seed(0)
    m = LinearReLUDropout(25088, 4096, p=0.5, backend="triton").cuda().to(torch.bfloat16)
    x = torch.randn(64, 25088, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    ref = torch.relu(torch.nn.functional.linear(x.float(), m[0].weight.float(), m[0].bias.float())) * 2
    kept = y != 0
    frac = kept.float().mean().item()
    assert 0.45 < frac < 0.55
    torch.testing.assert_close(y[kept].float(), ref[kept], rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------- launch review
# Guards every Triton launcher has since the compile check and launch review of the kernels: one device guard,
# grid and int32 limits with clear errors, dense bias reads, one TF32 policy, tiles that fit shared memory.
@needs_triton
def test_launchers_reject_mixed_devices():
    from fusedcnn.triton_kernels import _common, fused
    y = randn(2, 3, 4, 4)
    meta = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        fused.bn_relu_apply(y, meta, meta)
    with pytest.raises(RuntimeError, match="same device"):
        _common.device_guard(y, None, meta)
    with _common.device_guard(y, None, y):   # CPU under the interpreter: a no-op context
        pass


@needs_triton
def test_bn_relu_int32_pixel_guard():
    """N*H*W >= 2**31 pixels: a clear error before any allocation (the kernels' pixel index is int32)."""
    from fusedcnn.triton_kernels import fused
    y = torch.zeros(1, 1, 1, 1).expand(2**15, 1, 2**8, 2**8)     # 2**31 pixels, no memory behind them
    s = torch.ones(1)
    for launch in (fused.bn_relu_apply, fused.bn_relu_maxpool2d):
        with pytest.raises(RuntimeError, match="int32 index range"):
            launch(y, s, s)


@needs_triton
def test_grid_guards():
    from fusedcnn.triton_kernels import _common, batchnorm
    _common.check_grid((2**31 - 1, 65535, 65535), "ok")
    for grid in ((2**31, 1), (1, 65536), (1, 1, 65536)):
        with pytest.raises(RuntimeError, match="exceeds CUDA's limits"):
            _common.check_grid(grid, "test")
    x = torch.zeros(1, 1, 1, 1).expand(1, 65536, 1, 1).contiguous()   # NCHW: one grid column per channel
    with pytest.raises(RuntimeError, match="at most 65535 channels"):
        batchnorm.batch_norm_stats(x)


@needs_triton
def test_linear_non_contiguous_bias_and_tf32_policy():
    from fusedcnn.triton_kernels import fused
    x, w = randn(5, 7), randn(6, 7)
    b = randn(12)[::2]
    out = fused.linear_relu_dropout(x, w, b, 0.0, 1)
    assert_ref = torch.relu(x.double() @ w.double().t() + b.double())
    check(out, assert_ref)
    saved = torch.backends.cuda.matmul.allow_tf32   # a property of torch's backend module: set and restored
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert fused._linear_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert fused._linear_precision(torch.float32) == "tf32"
        assert fused._linear_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@needs_triton
@pytest.mark.parametrize("limit, cc", [(166_912, 8), (232_448, 9)], ids=["sm_80", "sm_90"])
def test_linear_tiles_fit_shared_memory(monkeypatch, limit, cc):
    """The Linear GEMMs' tiles (VGG's 25088 -> 4096 classifier) fit each GPU's shared memory per dtype, forward
    and backward (before: BLOCK_K 64 x 4 stages for every dtype, 262,144 B for fp32 on sm_90)."""
    from fusedcnn.triton_kernels import conv, fused
    monkeypatch.setattr(fused, "INTERPRET", False)
    monkeypatch.setattr(conv, "_smem_limit", lambda device: (limit, cc))
    for elem in (4, 2):
        for a_grad in (False, True):
            cfg = fused._linear_tiles(4096, elem, a_grad, torch.device("cpu"))
            assert cfg.num_stages >= 3
            assert conv.smem_bytes(cfg, elem, cc, y_tile=a_grad, staged_a=a_grad, scratch=True) <= limit


@needs_triton
@pytest.mark.parametrize("limit, cc", [(166_912, 8), (232_448, 9)], ids=["sm_80", "sm_90"])
def test_conv_pruning_keeps_only_tiles_that_compiled_without_spills(monkeypatch, limit, cc):
    """The conv kernels' pruning on a GPU (the GPU config list, the device's limits) for VGG's conv2 (64 -> 64):
    the fused hooks keep tiles whose operand tile is <= 64 B per thread, float32 with TF32 off under a hook only
    the 64x64x16 tile (which nothing else launches), and every kept tile fits shared memory -- the rules
    `fusedcnn compile-check --full` confirmed (0 spills on both architectures)."""
    from fusedcnn.triton_kernels import conv
    monkeypatch.setattr(conv, "_smem_limit", lambda device: (limit, cc))

    def kept(kernel, dtype, **hooks):
        args = dict(X_ptr=torch.empty(0, dtype=dtype), G_ptr=torch.empty(0, dtype=dtype), Cout_g=64, Cg=64, Kg=576)
        return conv._prune(kernel, None, "Cout_g" if kernel == "fwd" else "Cg",
                           "X_ptr" if kernel == "fwd" else "G_ptr")(conv._GPU_CONFIGS, args, **hooks)

    def tiles(configs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in configs}

    def a_bytes(c, elem):
        return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] * elem // (32 * c.num_warps)

    plain16 = tiles(kept("fwd", torch.bfloat16, MODE=0, PREC="ieee"))
    fused16 = kept("fwd", torch.bfloat16, MODE=0, PREC="ieee", PROLOGUE=True, STATS=True)
    assert fused16 and all(a_bytes(c, 2) <= 64 for c in fused16)
    assert (128, 64, 32, 4) in tiles(fused16) and (128, 64, 64, 4) not in tiles(fused16)
    assert all(bk >= 32 for _, _, bk, _ in plain16)
    for kernel, hooks in (("fwd", dict(PROLOGUE=True, STATS=True)), ("dgrad", dict(GRAD_AFFINE=True, PROLOGUE=True))):
        assert tiles(kept(kernel, torch.float32, MODE=0, PREC="ieee", **hooks)) == {(64, 64, 16, 4)}
        tf32 = kept(kernel, torch.float32, MODE=0, PREC="tf32", **hooks)
        assert tf32 and all(a_bytes(c, 4) <= 64 and c.kwargs["BLOCK_K"] == 32 for c in tf32)
    for configs, elem in ((fused16, 2), (kept("dgrad", torch.float32, PREC="ieee", GRAD_AFFINE=True), 4)):
        assert all(conv.smem_bytes(c, elem, cc) <= limit for c in configs)
