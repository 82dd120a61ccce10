"""Fused Conv + BatchNorm + ReLU (+ MaxPool) and Linear + ReLU + Dropout (Triton) against the unfused torch layers.

Oracle: the same unfused torch.nn layers in float64 (state copied). Low-precision results must stay within
2x torch's own low-precision error on the same inputs (DESIGN.md, flash-attention style), plus the dtype's
absolute tolerance; fp32 within TOLERANCES scaled for the BatchNorm of tiny batches. Outputs are poisoned
(FUSEDCNN_POISON=1), so an element a kernel forgets to write is NaN and fails.
"""
import copy

import pytest
import torch
import triton
import triton.language as tl

import fusedcnn
from fusedcnn.nn import ConvBNReLU2d, FusedSequential, LinearReLUDropout, fuse_chain
from fusedcnn.ops import fused as fops
from helpers import check, randn

pytestmark = pytest.mark.skipif(fusedcnn.backends.unavailable_reason("triton", "cpu") is not None
                                and not torch.cuda.is_available(), reason="triton cannot run here")

DEV = "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _run(module, x, grad=None, input_grad=True):
    x = x.detach().clone().requires_grad_(input_grad)
    y = module(x)
    if grad is not None:
        y.backward(grad.to(y.dtype))
    return y, x.grad


def _fmt(x, channels_last):
    return x.to(memory_format=torch.channels_last) if channels_last else x


# ---------------------------------------------------------------------------------------------- ConvBNReLU2d
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_bn_relu_train_eval(dtype, channels_last):
    """One layer: 2 training steps (batch stats, running-stat update, backward) and eval, vs torch in fp64."""
    torch.manual_seed(1)
    m = ConvBNReLU2d(5, 6, 3, padding=1, momentum=0.3)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5), m.bn.bias.uniform_(-0.5, 0.5)
    ref = m.to_modules()
    ref64, reflow = copy.deepcopy(ref).double(), copy.deepcopy(ref).to(dtype)
    m = m.to(dtype)
    x = _fmt(randn(2, 5, 6, 6, dtype=dtype) + 0.5, channels_last)
    g = torch.randn(2, 6, 6, 6)
    y, gx = _run(m, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format)
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=4, msg="grad input")
    lo = dict(reflow.named_parameters())
    for name, p64 in ref64.named_parameters():
        fused_name = name.replace("0.", "conv.", 1).replace("1.", "bn.", 1)
        check(dict(m.named_parameters())[fused_name].grad, p64.grad, lo[name].grad, dtype, scale=4, msg=name)
    # second step (no backward): running stats after two momentum updates
    x2 = _fmt(randn(2, 5, 6, 6, dtype=dtype) * 2, channels_last)
    with torch.no_grad():
        m(x2), ref64(x2.double()), reflow(x2)
    for buf in ("running_mean", "running_var"):
        check(getattr(m.bn, buf), getattr(ref64[1], buf), getattr(reflow[1], buf), dtype, msg=buf)
    assert int(m.bn.num_batches_tracked) == 2
    # eval: running statistics, no update
    m.eval(), ref64.eval(), reflow.eval()
    before = m.bn.running_mean.clone()
    ye, _ = _run(m, x2)
    check(ye, ref64(x2.double()), reflow(x2), msg="eval output")
    assert torch.equal(before, m.bn.running_mean)


def test_conv_bn_relu_options():
    """stride 2, dilation, no bias, momentum=None (cumulative), affine=False, 1x1 input channels tail."""
    torch.manual_seed(2)
    m = ConvBNReLU2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False, momentum=None, affine=False)
    ref64 = copy.deepcopy(m.to_modules()).double()
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
    check(m.conv.weight.grad, ref64[0].weight.grad, scale=4, msg="grad weight")
    check(m.bn.running_var, ref64[1].running_var, msg="running_var (cumulative)")


# ---------------------------------------------------------------------------------------------- chains
def _vgg_block(c0, c1, c2):
    return torch.nn.Sequential(
        torch.nn.Conv2d(c0, c1, 3, padding=1), torch.nn.BatchNorm2d(c1), torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.BatchNorm2d(c2), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2, 2))


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-nhwc", "bf16-nchw"])
def test_fused_chain_two_convs_and_pool(dtype, channels_last):
    """conv-BN-ReLU -> conv (normalize prologue) -BN-ReLU -> pool (fused): forward, backward, running stats."""
    torch.manual_seed(3)
    seq = _vgg_block(4, 6, 8)
    with torch.no_grad():
        for bn in (seq[1], seq[4]):
            bn.weight.uniform_(-1.5, 1.5), bn.bias.uniform_(-0.5, 0.5)  # negative scales: pool must re-normalize
    ref64, reflow = copy.deepcopy(seq).double(), copy.deepcopy(seq).to(dtype)
    lowp = copy.deepcopy(seq).to(dtype)
    fused = fuse_chain(lowp)
    ident = torch.nn.Identity  # the fused slot layout: Identity where the BatchNorm and ReLU were
    assert isinstance(fused, FusedSequential) and [type(m) for m in fused] == [ConvBNReLU2d, ident, ident,
                                                                                ConvBNReLU2d, ident, ident,
                                                                                torch.nn.MaxPool2d]
    x = _fmt(randn(2, 4, 6, 6, dtype=dtype), channels_last)
    g = torch.randn(2, 8, 3, 3)
    y, gx = _run(fused, x, g)
    y64, gx64 = _run(ref64, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=8, msg="grad input")
    lo = dict(reflow.named_parameters())
    fused_params = dict(lowp.named_parameters())  # fuse_chain shares the modules of `lowp`
    for name, p64 in ref64.named_parameters():
        check(fused_params[name].grad, p64.grad, lo[name].grad, dtype, scale=8, msg=f"grad {name}")
    for i in (1, 4):
        check(lowp[i].running_var, ref64[i].running_var, reflow[i].running_var, dtype, msg=f"{i}.running_var")
    # eval: pending normalization from running stats
    fused.eval(), ref64.eval(), reflow.eval()
    with torch.no_grad():
        check(fused(x), ref64(x.double()), reflow(x), msg="eval output")


def test_pending_api_and_state_dict(monkeypatch):
    seq = _vgg_block(3, 4, 4)
    fused = fuse_chain(seq)
    calls = []  # the pending BN+ReLU passes the Identity slots to the next conv's prologue and the fused pool
    monkeypatch.setattr(fusedcnn.nn.fused.PendingBN, "materialize", lambda self: calls.append(1))
    assert fused(randn(2, 3, 4, 4)).shape == (2, 4, 2, 2) and not calls
    monkeypatch.undo()
    assert list(fused.state_dict()) == list(seq.state_dict())  # home keys: 0.weight, 1.running_var, 3.weight...
    m = fused[0]
    assert m.conv is seq[0] and m.bn is seq[1]  # from_modules shares weights and buffers
    back = m.to_modules()
    assert back[0] is seq[0] and isinstance(back[2], torch.nn.ReLU)
    pending = m.forward_pending(randn(2, 3, 4, 4))
    assert isinstance(pending, fusedcnn.nn.fused.PendingBN) and pending.raw.shape == (2, 4, 4, 4)
    assert pending.scale.dtype == torch.float32 and pending.scale.shape == (4,)
    # a ConvBNReLU2d state_dict loads into a Sequential(Conv2d, BatchNorm2d) pair keyed conv/bn
    pair = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 4, 3, padding=1), "bn": torch.nn.BatchNorm2d(4)})
    pair.load_state_dict(m.state_dict())


# ---------------------------------------------------------------------------------------------- BN-ReLU-pool op
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_bn_relu_maxpool_odd_size_and_nan(dtype):
    """Odd H/W (the last row/col gets zero grad but must be written), ties, negative scales, NaN."""
    y = randn(2, 5, 7, 5, dtype=dtype, channels_last=True)
    y[0, 0, 0, 0] = float("nan")
    y[1, 1, :2, :2] = 0.25  # tie: the first maximum wins
    scale = torch.randn(5) * 2
    shift = torch.randn(5)
    g = torch.randn(2, 5, 3, 2)
    out, (dy, ds, dt) = _run_pool(fops.bn_relu_maxpool2d, y, scale, shift, g)
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


def test_bn_relu_apply_nchw():
    y = randn(2, 5, 3, 4)
    scale, shift, g = torch.randn(5), torch.randn(5), torch.randn(2, 5, 3, 4)
    out, grads = _run_pool(fops.bn_relu_apply, y, scale, shift, g)
    ref, grads64 = _run_pool(lambda a, s, t: torch.relu(a * s[:, None, None] + t[:, None, None]),
                             y.double(), scale.double(), shift.double(), g.double())
    check(out, ref, msg="apply")
    for a, r, n in zip(grads, grads64, ("y", "scale", "shift")):
        check(a, r, dtype=torch.float32, scale=4, msg=f"grad {n}")


# ---------------------------------------------------------------------------------------------- Linear+ReLU+dropout
@triton.jit
def _rand_kernel(O_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(O_ptr + offs, tl.rand(seed, offs.to(tl.uint32)), mask=offs < n)


def _keep_mask(seed, shape, p):
    """DESIGN.md's stream straight from tl.rand: keep element i (row-major) iff rand(seed, i) > p."""
    n = shape[0] * shape[1]
    u = torch.empty(n)
    _rand_kernel[(triton.cdiv(n, 64),)](u, seed & (2 ** 64 - 1), n, BLOCK=64)
    return (u > p).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_linear_relu_dropout(dtype, p):
    torch.manual_seed(4)
    m = LinearReLUDropout(20, 18, p=p).to(dtype)
    ref = torch.nn.Linear(20, 18).double()
    ref.load_state_dict(m.state_dict())
    x = randn(5, 20, dtype=dtype)
    g = torch.randn(5, 18)
    torch.manual_seed(7)
    seed = fops.draw_seed()
    torch.manual_seed(7)  # the module draws the same seed from the default CPU generator
    y, gx = _run(m, x, g)
    keep = _keep_mask(seed, (5, 18), p)
    x64 = x.double().requires_grad_()
    y64 = torch.where(keep, torch.relu(ref(x64)) * (1 / (1 - p) if p < 1 else 0.0), 0.0)
    y64.backward(g.double())
    reflow = torch.nn.Linear(20, 18).to(dtype)
    reflow.load_state_dict(m.state_dict())
    xlo = x.clone().requires_grad_()
    ylo = torch.where(keep, torch.relu(reflow(xlo)) * (1 / (1 - p) if p < 1 else 0.0), 0.0)
    ylo.backward(g.to(dtype))
    check(y, y64, ylo, msg="output")
    if 0 < p < 1:
        assert 0 < int((y == 0).sum()) < y.numel()
    check(gx, x64.grad, xlo.grad, msg="grad input")
    check(m.weight.grad, ref.weight.grad, reflow.weight.grad, dtype, msg="grad weight")
    check(m.bias.grad, ref.bias.grad, reflow.bias.grad, dtype, msg="grad bias")
    m.eval()
    check(m(x), torch.relu(ref(x.double())), torch.relu(reflow(x)), msg="eval (no dropout)")


# ---------------------------------------------------------------------------------------------- opcheck
def _conv_args(prologue, stats):
    x = randn(2, 3, 4, 4, channels_last=True, requires_grad=True)
    w = randn(4, 3, 2, 2, requires_grad=True)  # 2x2 taps, no padding: 3x3 outputs (opcheck runs the op many times)
    b = randn(4, requires_grad=True)
    s = (randn(3) + 1).requires_grad_() if prologue else None
    t = randn(3, requires_grad=True) if prologue else None
    return (x, w, b, s, t, [1, 1], [0, 0], [1, 1], stats)


@pytest.mark.parametrize("prologue,stats", [(True, True), (False, False)])
def test_opcheck_conv(prologue, stats):
    torch.library.opcheck(torch.ops.fusedcnn.triton_conv_bn_relu.default, _conv_args(prologue, stats))


def test_opcheck_conv_backward():
    x, w, b, s, t, st, pd, dl, _ = _conv_args(True, True)
    g = randn(2, 4, 3, 3)
    y = randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.fusedcnn.triton_conv_bn_relu_backward.default,
                          (g, y, randn(4), randn(4), randn(4), x.detach(), w.detach(), s.detach(), t.detach(),
                           st, pd, dl, True, True))
    torch.library.opcheck(torch.ops.fusedcnn.triton_conv_bn_relu_backward.default,
                          (g, None, None, None, None, x.detach(), w.detach(), None, None, st, pd, dl, False, False))


@pytest.mark.parametrize("name", ["triton_bn_relu_apply", "triton_bn_relu_maxpool2d"])
def test_opcheck_bn_relu(name):
    args = (randn(2, 3, 4, 4, channels_last=True, requires_grad=True), randn(3, requires_grad=True),
            randn(3, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fusedcnn, name).default, args)
    torch.library.opcheck(getattr(torch.ops.fusedcnn, name + "_backward").default,
                          (randn(*getattr(torch.ops.fusedcnn, name)(*args).shape),) + tuple(a.detach() for a in args))


def test_opcheck_linear():
    args = (randn(3, 5, requires_grad=True), randn(4, 5, requires_grad=True), randn(4, requires_grad=True), 0.3, 123)
    torch.library.opcheck(torch.ops.fusedcnn.triton_linear_relu_dropout.default, args)
    out = torch.ops.fusedcnn.triton_linear_relu_dropout(*(a.detach() if torch.is_tensor(a) else a for a in args))
    torch.library.opcheck(torch.ops.fusedcnn.triton_linear_relu_dropout_backward.default,
                          (randn(3, 4), out, args[0].detach(), args[1].detach(), 0.3, True))


def test_torch_compile_fullgraph_chain():
    """The custom ops trace: a fused chain compiles with fullgraph=True, forward and backward (aot_eager)."""
    fused = fuse_chain(_vgg_block(3, 4, 4))
    x = randn(2, 3, 4, 4, requires_grad=True)
    y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    xe = x.detach().clone().requires_grad_()
    ye = fused(xe)
    (gxe,) = torch.autograd.grad(ye.sum(), xe)
    check(y, ye.double(), msg="compiled output")
    check(gx, gxe.double(), msg="compiled grad input")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    m = ConvBNReLU2d(3, 4, 3)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(randn(3, 5, 5))
    with pytest.raises(RuntimeError, match=r"expected input\[2, 2, 5, 5\] to have 3 channels, but got 2"):
        m(randn(2, 2, 5, 5))
    with pytest.raises(RuntimeError, match="should be the same"):
        m(randn(2, 3, 5, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(randn(1, 3, 3, 3))
    with pytest.raises(TypeError):
        fops.conv_bn_relu_raw(torch.ones(1, 3, 5, 5, dtype=torch.int32), m.conv.weight, None, None, None,
                              (1, 1), (0, 0), (1, 1), True)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        ConvBNReLU2d(3, 4, 5)(randn(2, 3, 3, 3))
    with pytest.raises(NotImplementedError):
        ConvBNReLU2d(4, 4, 3, groups=2)
    with pytest.raises(NotImplementedError):
        ConvBNReLU2d(4, 4, 2, padding="same")
    with pytest.raises(ValueError, match="must be given together"):
        fops.conv_bn_relu_raw(randn(2, 3, 5, 5), m.conv.weight, None, torch.ones(3), None, (1, 1), (0, 0), (1, 1),
                              True)
    with pytest.raises(ValueError, match="contiguous float32 vector of 3"):
        fops.bn_relu_apply(randn(2, 3, 4, 4), torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="Output size is too small"):
        fops.bn_relu_maxpool2d(randn(2, 3, 1, 4), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="dropout probability"):
        LinearReLUDropout(4, 4, p=1.5)
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(2x5 and 4x4\)"):
        LinearReLUDropout(4, 4)(randn(2, 5))
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        LinearReLUDropout(4, 4)(randn(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="runs on the triton backend only"):  # a device Triton cannot serve
        m(torch.empty(2, 3, 5, 5, device="meta"))


# ---------------------------------------------------------------------------------------------- GPU: VGG shapes
@pytest.mark.cuda
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
    y, gx = _run(fused, x, g)
    y64, gx64 = _run(ref, x.double(), g.double())
    ylo, gxlo = _run(reflow, x, g)
    check(y, y64, ylo, msg="output")
    check(gx, gx64, gxlo, scale=8, msg="grad input")
    lo = dict(reflow.named_parameters())
    mine = dict(lowp.named_parameters())
    for name, p64 in ref.named_parameters():
        check(mine[name].grad, p64.grad, lo[name].grad, torch.bfloat16, scale=8, msg=f"grad {name}")


@pytest.mark.cuda
def test_cuda_linear_relu_dropout_vgg_classifier():
    torch.manual_seed(0)
    m = LinearReLUDropout(25088, 4096, p=0.5).cuda().to(torch.bfloat16)
    x = torch.randn(64, 25088, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    ref = torch.relu(torch.nn.functional.linear(x.float(), m.weight.float(), m.bias.float())) * 2
    kept = y != 0
    frac = kept.float().mean().item()
    assert 0.45 < frac < 0.55
    torch.testing.assert_close(y[kept].float(), ref[kept], rtol=2e-2, atol=2e-2)
