"""fusedcnn.models.vgg16: architecture, initialisation, heads and resolutions, backends."""
import copy
import math

import pytest
import torch
from torch import nn

import fusedcnn
import fusedcnn.nn as fnn
from fusedcnn.models import vgg16
from helpers import assert_close, backend_params, check

TINY = dict(width=1 / 16, backend="torch")  # "auto" would pick whichever backend is fastest here
FNN_TYPES = {getattr(fnn, name) for name in fnn.__all__}


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machines are shared and small: one intra-op thread is several times faster under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layers(model, cls):
    return [m for m in model.modules() if type(m) is cls]


def test_architecture_is_vgg16_bn():
    ours = vgg16(in_channels=1, num_classes=10, width=1 / 8)  # every channel count / 8 (full size: 138M weights)
    assert len(_layers(ours, fnn.Conv2d)) == 13 and len(_layers(ours, fnn.BatchNormReLU2d)) == 13
    assert len(_layers(ours, fnn.MaxPool2d)) == 5 and len(_layers(ours, fnn.Dropout)) == 2
    # torchvision's vgg16_bn ("configuration D"): conv, BN, ReLU per entry, "M" = 2x2 max pool
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    plan = [v if v == "M" else v // 8 for v in plan]
    seen = []
    for layer in ours.features:
        if type(layer) is fnn.Conv2d:
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.stride == (1, 1)
            assert layer.bias is None  # BatchNorm follows: a conv bias would be redundant
            seen.append(layer.out_channels)
        elif type(layer) is fnn.MaxPool2d:
            assert layer.kernel_size == 2 and layer.stride == 2
            seen.append("M")
        else:
            assert type(layer) is fnn.BatchNormReLU2d and layer.num_features == seen[-1]
    assert seen == plan and ours.features[0].in_channels == 1
    linears = [(m.in_features, m.out_features) for m in ours.modules() if isinstance(m, nn.Linear)]
    assert linears == [(64 * 7 * 7, 512), (512, 512), (512, 10)]
    # every layer the model runs is fusedcnn's; only Linear/Flatten (and containers) are torch.nn's
    types = {type(m) for m in ours.modules()} - {type(ours), nn.Sequential, nn.Identity}
    assert types - FNN_TYPES == {nn.Linear, nn.Flatten}


@pytest.mark.parametrize("width", [1 / 16, 0.25])
def test_width_scales_every_channel_count(width):
    m = vgg16(width=width, head="avgpool")
    assert [c.out_channels for c in _layers(m, fnn.Conv2d)][::3] == [round(c * width) for c in (64, 128, 256, 512, 512)]
    assert m.classifier[1].in_features == round(512 * width) and m.classifier[1].out_features == round(4096 * width)


def test_kaiming_initialisation_as_torchvision():
    torch.manual_seed(0)
    m = vgg16(width=0.5, head="avgpool", backend="torch")
    conv = _layers(m, fnn.Conv2d)[5]  # 128 -> 256 channels, fan_out = 256 * 9
    std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / std - 1) < 0.02
    assert abs(conv.weight.mean().item()) < 0.1 * std
    for bn in _layers(m, fnn.BatchNormReLU2d):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    lin = m.classifier[1]
    assert abs(lin.weight.std().item() / 0.01 - 1) < 0.02 and not lin.bias.any()


@pytest.mark.parametrize("head,size", [("classic", (224, 224)), ("avgpool", (32, 32)), ("avgpool", (48, 80)),
                                       ("maxpool", (64, 33))])
def test_heads_and_resolutions(head, size):
    m = vgg16(num_classes=7, head=head, **TINY).eval()
    out = m(torch.randn(2, 1, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_classic_head_accepts_what_floors_to_7x7():
    m = vgg16(**TINY).eval()
    assert m(torch.randn(1, 1, 255, 230)).shape == (1, 10)


@pytest.mark.parametrize("head,size,match", [
    ("classic", 32, r"head='classic' .* needs input height and width in 224\.\.255 .*got 32x32.*'avgpool'"),
    ("classic", 256, r"224\.\.255"),
    ("avgpool", 16, r"input 16x16 is too small.*at least 32"),
    ("maxpool", 31, r"at least 32"),
])
def test_unusable_resolution_is_a_clear_error(head, size, match):
    m = vgg16(head=head, **TINY)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(2, 1, size, size))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head="global"), "unknown head 'global'; expected one of classic, avgpool, maxpool"),
    (dict(width=0), "width must be a positive number"),
    (dict(dropout=1.5), "dropout probability has to be between 0 and 1"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vgg16(**{"width": 1 / 16, **kwargs})


def test_in_channels_and_wrong_input_channels():
    m = vgg16(in_channels=3, head="avgpool", **TINY).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels"):
        m(torch.randn(2, 1, 32, 32))


def test_backend_flows_into_every_layer():
    m = vgg16(head="maxpool", width=1 / 16, backend="reference")
    layers = [x for x in m.modules() if type(x) in FNN_TYPES and not isinstance(x, fnn.FusedSequential)]
    assert len(layers) == 13 + 13 + 5 + 1 + 2 + 2  # conv, bn+relu, pools, global pool, relu, dropout
    assert {x.backend for x in layers} == {"reference"}


def test_channels_last_and_bf16_forward():
    m = vgg16(head="avgpool", **TINY).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 32, 32).to(memory_format=torch.channels_last)
    ref = m(x.contiguous())
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("backend", backend_params(("reference", "cpp", "triton")))
def test_every_backend_matches_torch(backend):
    """Same weights, same batch: forward, every gradient and the running statistics, train and eval mode."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    ref = vgg16(head="avgpool", dropout=0.0, width=1 / 32, backend="torch")
    m = copy.deepcopy(ref)
    for layer in m.modules():
        if hasattr(layer, "backend"):
            layer.backend = backend
    x = torch.randn(4, 1, 32, 32)
    try:
        out = m(x)
    except NotImplementedError as e:  # a layer family whose backend has not landed in this checkout
        pytest.skip(f"{backend}: {e}")
    expect = ref(x)
    assert_close(out, expect, scale=20, msg="train-mode forward")
    out.square().sum().backward()
    expect.square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, scale=100, msg=f"grad of {name}")
    for (name, b), c in zip(m.named_buffers(), ref.buffers()):
        assert_close(b.float(), c.float(), scale=20, msg=f"buffer {name}")
    assert_close(m.eval()(x), ref.eval()(x), scale=20, msg="eval-mode forward")


def test_convert_switches_an_existing_model_to_another_backend():
    m = fusedcnn.convert(vgg16(head="avgpool", **TINY), backend="reference")
    assert {x.backend for x in m.modules() if hasattr(x, "backend")} == {"reference"}
    assert len(_layers(m, fnn.BatchNormReLU2d)) == 13


# ---------------------------------------------------------------- fused (FusedSequential) vs unfused (nn.Sequential)
def _fused_pair(**kwargs):
    """(unfused torch VGG16, fused triton VGG16) built from the same seed."""
    kwargs = {"width": 1 / 16, "head": "avgpool", **kwargs}
    torch.manual_seed(0)
    ref = vgg16(backend="torch", fused=False, **kwargs)
    torch.manual_seed(0)
    return ref, vgg16(backend="triton", **kwargs)


def test_fused_layout_same_slots_weights_keys_and_parameter_order():
    ref, m = _fused_pair(dropout=0.3)
    assert not ref.fused and m.fused
    assert type(m.features) is fnn.FusedSequential and type(ref.features) is nn.Sequential
    assert [type(a) for a in ref.features] == [type(b) for b in m.features]  # the same modules, unchanged
    assert [type(a) for a in ref.classifier] == [type(b) for b in m.classifier]
    assert [name for name, _ in m.features.fused_runs()] == ["conv_bn_relu", "conv_bn_relu_maxpool"] * 2 + \
        ["conv_bn_relu", "conv_bn_relu", "conv_bn_relu_maxpool"] * 3
    assert m.classifier.fused_runs() == [("linear_relu_dropout", ["1", "2", "3"]),
                                         ("linear_relu_dropout", ["4", "5", "6"])]
    assert m.classifier[3].p == 0.3
    # same seed, same initial weights, keys and order (state_dict and parameters)
    sa, sb = ref.state_dict(), m.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [p.shape for p in ref.parameters()] == [p.shape for p in m.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), m.parameters()))
    assert [n for n, _ in m.named_parameters()][:3] == ["features.0.weight", "features.1.weight", "features.1.bias"]
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]


def _perturb(model):
    """BatchNorm parameters and running statistics, Linear biases off their initial values (fresh random
    numbers); conv and Linear weights keep their random initialisation."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.fill_(3)  # num_batches_tracked
            elif t.dim() == 1:
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith(("weight", "running_var"))
                        else torch.randn_like(t) * 0.5)


@pytest.mark.parametrize("direction", ["unfused->fused", "fused->unfused"])
def test_fused_state_dict_and_optimizer_state_load_both_ways(direction):
    """A checkpoint (torch.save / torch.load(weights_only=True)) and an Adam state move between the layouts."""
    import io
    ref, m = _fused_pair()
    src, dst = (ref, m) if direction == "unfused->fused" else (m, ref)
    torch.manual_seed(1)
    _perturb(src)
    buf = io.BytesIO()
    opt = torch.optim.Adam(src.parameters(), lr=1e-3)
    for p in src.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save({"model": src.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    dst.load_state_dict(ckpt["model"])  # strict: exactly the same keys
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    opt2 = torch.optim.Adam(dst.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])  # by parameter position: the orders match
    for p, q in zip(src.parameters(), dst.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])


def test_fused_is_independent_of_the_backend():
    """(Was test_fused_needs_the_triton_backend.) Every backend implements the fused runs: fused=True builds
    FusedSequential containers for any backend, fused=False plain ones, the same modules either way."""
    for backend in ("torch", "reference", "cpp", "triton", "auto"):
        fused, plain = vgg16(width=1 / 16, backend=backend), vgg16(width=1 / 16, backend=backend, fused=False)
        assert type(fused.features) is fnn.FusedSequential and type(plain.features) is nn.Sequential
        assert list(fused.state_dict()) == list(plain.state_dict())
    assert vgg16(width=1 / 16, fused=None).fused  # None (earlier configs' default) means fused


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_fused_vgg16_matches_unfused_torch(backend):
    """Fused triton VGG16 (width 1/16, 32x32, avgpool head) loaded with an unfused model's state, against that
    model in float64: output, input and parameter gradients, running statistics (train mode), eval output.
    BatchNorm over batches of 2 at 2x2 and 1x1 maps is ill-conditioned: the error is measured against the
    largest reference value (helpers.check), as torch's own float32 run needs too."""
    ref, m = _fused_pair(dropout=0.0)
    torch.manual_seed(2)
    _perturb(ref)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(0)
            elif name.startswith("classifier") and name.endswith("weight"):
                t.mul_(10)  # outputs of order one
    m.load_state_dict(ref.state_dict())
    ref = ref.double()
    x = torch.randn(2, 1, 32, 32)
    xm, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out, expect = m(xm), ref(xr)
    check(out, expect, scale=4, msg="train-mode forward")
    g = torch.randn(expect.shape)
    out.backward(g), expect.backward(g.double())
    check(xm.grad, xr.grad, scale=4, msg="grad input")
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        check(p.grad, q.grad, scale=4, msg=f"grad of {name}")
    sm, sr = m.state_dict(), ref.state_dict()
    for k in sr:
        check(sm[k].double(), sr[k], dtype=torch.float32, scale=4, msg=k)
    with torch.no_grad():
        check(m.eval()(x), ref.eval()(x.double()), scale=4, msg="eval-mode forward")
