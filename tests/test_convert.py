"""fusedcnn.convert(): layer replacement, Sequentials that fuse (FusedSequential), weights/buffers/mode kept, outputs
unchanged, torch's own module rewrites still correct."""
import copy

import pytest
import torch
from torch import nn

import fusedcnn
import fusedcnn.nn as fnn
from fusedcnn import convert
from helpers import assert_close, backend_params

TORCH_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d, nn.Dropout)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _small_net():
    """Every convertible layer once, with BN->ReLU pairs inside Sequentials."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),  # BN not followed by ReLU
        nn.AdaptiveAvgPool2d((2, 3)), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.0), nn.Linear(8, 4))


def _no_torch_layers_left(model):
    left = [name for name, m in model.named_modules() if type(m) in TORCH_LAYERS]
    assert not left, f"still torch.nn layers: {left}"


def _compare(model, x, backend, train: bool, scale=20.0):
    """convert(copy of model) against model: forward, gradients, running statistics."""
    ref = model.train(train)
    new = convert(copy.deepcopy(ref), backend=backend)
    assert new.training == train and all(m.training == train for m in new.modules())
    _no_torch_layers_left(new)
    try:
        out = new(x)
    except NotImplementedError as e:  # a layer family whose backend has not landed in this checkout
        pytest.skip(f"{backend}: {e}")
    expect = ref(x)
    if backend == "torch":
        torch.testing.assert_close(out, expect, rtol=0, atol=0)  # the same kernels, the same result
    assert_close(out, expect, scale=scale, msg="output")
    if train:
        out.square().mean().backward()
        expect.square().mean().backward()
        for (name, p), q in zip(new.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, scale=scale * 10, msg=f"grad {name}")
    for (name, b), c in zip(new.named_buffers(), ref.buffers()):
        assert_close(b.double(), c.double(), c.dtype if c.is_floating_point() else torch.float64, scale=scale, msg=f"buffer {name}")
    return new


def test_small_net_layers_fusion_and_state():
    torch.manual_seed(0)
    model = _small_net()
    keys = list(model.state_dict())
    weight = model[0].weight
    new = convert(model, backend="torch")
    assert new is model  # in place
    assert new[0].weight is weight  # the same Parameter: an optimizer built earlier still works
    assert list(new.state_dict()) == keys  # nothing renamed, nothing replaced by a fused module
    assert [n for n, _ in new.named_parameters()] == [k for k in keys if k.endswith(("weight", "bias"))]
    assert type(new) is fnn.FusedSequential  # the Sequential's class swapped: it runs its fusable runs fused
    assert new.fused_runs() == [("conv_bn_relu_maxpool", ["0", "1", "2", "3"]), ("conv_bn_relu", ["4", "5", "6"])]
    assert type(new[1]) is fnn.BatchNorm2d and type(new[2]) is fnn.ReLU  # a BatchNorm stays a BatchNorm
    assert type(new[5]) is fnn.BatchNorm2d and new[5].momentum is None
    assert type(new[9]) is fnn.BatchNorm2d
    assert type(new[0]) is fnn.Conv2d and new[4].stride == (2, 2) and new[4].bias is None
    assert type(new[7]) is fnn.AvgPool2d and new[7].ceil_mode
    assert type(new[10]) is fnn.AdaptiveAvgPool2d and new[10].output_size == (2, 3)
    assert type(new[13]) is fnn.Dropout and type(new[14]) is nn.Linear
    assert {m.backend for m in new.modules() if hasattr(m, "backend")} == {"torch"}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_small_net_outputs_every_backend(backend, train):
    torch.manual_seed(0)
    model = _small_net()
    for _ in range(2):  # non-trivial running statistics for eval mode
        model.train()(torch.randn(4, 3, 12, 12))
    _compare(model, torch.randn(4, 3, 12, 12), backend, train)


def test_keeps_dtype_and_device():
    model = _small_net().double()
    new = convert(model, backend="torch")
    assert all(p.dtype == torch.float64 for p in new.parameters())
    assert new[1].running_mean.dtype == torch.float64
    out = new.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_shared_modules_stay_shared_and_custom_forwards_are_not_fused():
    relu = nn.ReLU()
    shared = nn.Sequential(nn.BatchNorm2d(4), relu, nn.BatchNorm2d(4), relu)  # one ReLU module used twice

    class Custom(nn.Sequential):  # a Sequential subclass with its own forward: order proves nothing
        def forward(self, x):
            return self[0](x) + self[1](x)

    custom = Custom(nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(shared, custom)
    x = torch.randn(3, 4, 5, 5)
    expect = copy.deepcopy(model)(x)
    new = convert(model, backend="torch")
    assert [type(m) for m in new[0]] == [fnn.BatchNorm2d, fnn.ReLU, fnn.BatchNorm2d, fnn.ReLU]
    assert new[0][1] is new[0][3]  # still one shared module
    assert type(new[1]) is Custom and [type(m) for m in new[1]] == [fnn.BatchNorm2d, fnn.ReLU]
    torch.testing.assert_close(new(x), expect, rtol=0, atol=0)


def test_subclasses_are_left_alone():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 2, 3), nn.SiLU())
    new = convert(model, backend="torch")
    assert type(new[0]) is MyConv and type(new[1]) is nn.SiLU


def test_converting_a_single_layer_returns_it_converted():
    bn = nn.BatchNorm2d(3).eval()
    new = convert(bn, backend="reference")
    assert type(new) is fnn.BatchNorm2d and new.backend == "reference" and not new.training
    assert new.weight is bn.weight


def test_sync_bn():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2),
                          fnn.BatchNormReLU2d(2))
    new = convert(model, backend="torch", sync_bn=True)
    assert type(new[1]) is nn.SyncBatchNorm and type(new[2]) is fnn.ReLU  # fusedcnn has no synchronized BatchNorm2d
    assert type(new[3]) is nn.SyncBatchNorm
    assert type(new[4]) is fnn.BatchNormReLU2d and new[4].sync
    assert type(new) is nn.Sequential  # nothing left to fuse: synchronized statistics never join a fused run
    again = convert(new, backend="reference")  # sync survives a backend switch
    assert again[4].sync and again[4].backend == "reference" and type(again[1]) is nn.SyncBatchNorm


def _conv_net():
    """conv-BN-ReLU, conv-BN-ReLU, 2x2 pool, Linear-ReLU-Dropout(0), Linear: every run the triton backend fuses."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5), nn.ReLU(), nn.Dropout(0.0), nn.Linear(5, 3))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_backend_fuses_conv_bn_relu_and_linear(backend, train):
    """convert(): the parent Sequential becomes a FusedSequential (in place) whose runs are fused on every backend;
    same tensors, keys and mode; output, gradients and running stats as torch's unfused layers."""
    torch.manual_seed(0)
    model = _conv_net()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        model.train()(torch.randn(4, 3, 4, 4))  # running statistics off their initial values
    keys, weight = list(model.state_dict()), model[0].weight
    new = _compare(model, torch.randn(2, 3, 4, 4), backend, train)
    assert type(new) is fnn.FusedSequential and [type(m) for m in new] == [
        fnn.Conv2d, fnn.BatchNorm2d, fnn.ReLU, fnn.Conv2d, fnn.BatchNorm2d, fnn.ReLU, fnn.MaxPool2d, nn.Flatten,
        nn.Linear, fnn.ReLU, fnn.Dropout, nn.Linear]
    assert new.fused_runs() == [("conv_bn_relu", ["0", "1", "2"]), ("conv_bn_relu_maxpool", ["3", "4", "5", "6"]),
                                ("linear_relu_dropout", ["8", "9", "10"])]
    assert list(new.state_dict()) == keys
    same = convert(model, backend=backend)  # in place: the very same Parameters
    assert same is model and same[0].weight is weight


def test_backend_switch_and_sync_bn_keep_the_structure():
    """Converting again only changes each layer's backend; sync_bn=True takes the BatchNorms out of the fused runs."""
    model = _conv_net()
    keys = list(model.state_dict())
    convert(model, backend="cpp")
    back = convert(model, backend="torch")
    assert type(back) is fnn.FusedSequential and {m.backend for m in back if hasattr(m, "backend")} == {"torch"}
    assert list(back.state_dict()) == keys
    synced = convert(_conv_net(), backend="reference", sync_bn=True)
    assert type(synced[1]) is nn.SyncBatchNorm and type(synced[0]) is fnn.Conv2d
    assert synced.fused_runs() == [("linear_relu_dropout", ["8", "9", "10"])]  # no BatchNorm: stays fused
    fused_module = convert(fnn.ConvBNReLU2d(2, 2, 3, backend="cpp"), backend="torch")
    assert {m.backend for m in fused_module} == {"torch"} and fused_module.fused_runs()


# ---------------------------------------------------------------- torch's module rewrites and hooks still hold
def _trained_conv_net(backend):
    torch.manual_seed(0)
    model = _conv_net()
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 4, 4))
    return convert(model, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_convert_sync_batchnorm_keeps_the_function(backend):
    """SyncBatchNorm.convert_sync_batchnorm replaces the BatchNorms of a converted model; the ReLUs after them stay
    (a BatchNorm module computes BatchNorm and nothing more), so the function is unchanged."""
    model = _trained_conv_net(backend)
    x = torch.randn(2, 3, 4, 4)
    for train in (False, True):
        expect = copy.deepcopy(model).train(train)(x)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).train(train)
        assert sum(type(m) is nn.SyncBatchNorm for m in synced.modules()) == 2
        assert_close(synced(x), expect, scale=20, msg=f"train={train}")


@pytest.mark.parametrize("backend", backend_params())
def test_fuse_conv_bn_eval_keeps_the_function(backend):
    model = _trained_conv_net(backend).eval()
    x = torch.randn(2, 3, 4, 4)
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    assert_close(torch.relu(folded(x)), model[:3](x), scale=20)
    assert_close(model[2](folded(x)), nn.Sequential(model[0], model[1], model[2])(x), scale=20)


@pytest.mark.parametrize("backend", backend_params())
def test_forward_hooks_on_fused_layers_fire(backend):
    model = _trained_conv_net(backend).eval()
    x = torch.randn(2, 3, 4, 4)
    expect = model(x)
    seen = []
    handles = [model[2].register_forward_hook(lambda m, i, o: seen.append(("relu", o.shape))),
               model[3].register_forward_pre_hook(lambda m, i: seen.append(("conv", i[0].shape)))]
    out = model(x)
    assert seen == [("relu", (2, 4, 4, 4)), ("conv", (2, 4, 4, 4))]  # both runs ran unfused, hooks and all
    assert_close(out, expect, scale=20)
    for h in handles:
        h.remove()
    seen.clear()
    model(x)
    assert not seen


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        convert(nn.Sequential(), backend="fast")
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        convert({}, backend="torch")


# ---------------------------------------------------------------- torchvision models
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def vgg11_bn():
    """torchvision's vgg11_bn, its 25088x4096x4096 classifier narrowed to 25088x64x64 (same layer types and
    order: Linear, ReLU, Dropout, ...) so that the CPU tests stay fast; running stats moved off their init."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(0.0),
                                     nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(0.0), nn.Linear(64, 10))
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    return model


@pytest.mark.parametrize("backend", backend_params(("torch", "reference", "cpp")))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_vgg11_bn(vgg11_bn, backend, train):
    torch.manual_seed(0)
    model = copy.deepcopy(vgg11_bn)
    # Dropout p=0: masks differ between torch and the other backends by design; everything else must match
    new = _compare(model, torch.randn(2, 3, 32, 32), backend, train, scale=50)
    runs = new.features.fused_runs()
    assert [name for name, _ in runs] == ["conv_bn_relu_maxpool"] * 2 + ["conv_bn_relu", "conv_bn_relu_maxpool"] * 3
    assert sum(type(m) is fnn.BatchNorm2d for m in new.modules()) == 8
    assert [type(m) for m in new.classifier][1:3] == [fnn.ReLU, fnn.Dropout]
    assert [name for name, _ in new.classifier.fused_runs()] == ["linear_relu_dropout"] * 2


@pytest.mark.parametrize("backend", backend_params(("torch", "reference", "cpp")))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_resnet18(backend, train):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 64))
    new = _compare(model, torch.randn(2, 3, 64, 64), backend, train, scale=50)
    # ResNet calls its ReLUs from forward() (BasicBlock reuses self.relu): no Sequential holds a fusable run
    assert not any(type(m) is fnn.FusedSequential for m in new.modules())
    assert sum(type(m) is fnn.BatchNorm2d for m in new.modules()) == 20
    assert type(new.layer1[0].relu) is fnn.ReLU and type(new.maxpool) is fnn.MaxPool2d
    assert type(new.avgpool) is fnn.AdaptiveAvgPool2d


def test_optimizer_built_before_convert_keeps_training_the_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = convert(model, backend="torch")
    before = model.fc.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(model.fc.weight, before)
    assert fusedcnn.convert is convert
