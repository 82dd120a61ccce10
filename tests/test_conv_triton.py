"""Triton conv2d launchers (triton_kernels/conv.py) called directly, against torch in float64.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (conftest), so shapes stay tiny. Every
geometry runs through all three K-loop paths: implicit GEMM "tiled" (a K-tile = one tap x a channel
block), implicit GEMM "flat" (a K-tile = consecutive (kh, kw, c)), and algo="im2col" (explicit buffer).
"""
import pytest
import torch
import torch.nn.functional as F

from fusedcnn.triton_kernels import conv as tconv
from helpers import assert_close, check, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (N, C_in, H, W, C_out, (KH, KW), stride, padding, dilation, groups)
GEOMETRIES = {
    "3x3_same_cin3": (2, 3, 7, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "1x1_batch1": (1, 4, 6, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "5x5_s2_p2": (1, 3, 9, 8, 4, (5, 5), (2, 2), (2, 2), (1, 1), 1),
    "7x7_s3_p1x2": (1, 2, 11, 10, 3, (7, 7), (3, 3), (1, 2), (1, 1), 1),
    "3x3_dil2_g2": (1, 4, 9, 8, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2),
    "3x2_s2x1_mixed_g2": (2, 4, 7, 6, 4, (3, 2), (2, 1), (0, 1), (1, 2), 2),
    "3x3_s3_p0": (1, 3, 8, 7, 2, (3, 3), (3, 3), (0, 0), (1, 1), 1),
    "3x3_g3_cout6": (1, 6, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "even_tiles_c32": (1, 32, 4, 5, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # channels fill whole K tiles
}
# implicit GEMM with the tiled K loop, with the flat K loop, and the explicit-im2col algorithm
PATHS = [("implicit_gemm", "tiled"), ("implicit_gemm", "flat"), ("im2col", None)]


@pytest.fixture
def force_mode(monkeypatch):
    """Pin the implicit-GEMM K-loop mode (the launcher picks "flat" for C_in/groups < 16 otherwise)."""
    def force(mode):
        if mode is not None:
            monkeypatch.setattr(tconv, "_FLAT_BELOW", 0 if mode == "tiled" else 10**9)
    return force


def _reference(x, w, b, go, stride, padding, dilation, groups):
    """float64 torch: y, grad_x, grad_w, grad_b."""
    xd, wd, god = x.double(), w.double(), go.double()
    y = F.conv2d(xd, wd, None if b is None else b.double(), stride, padding, dilation, groups)
    gx = torch.nn.grad.conv2d_input(x.shape, wd, god, stride, padding, dilation, groups)
    gw = torch.nn.grad.conv2d_weight(xd, w.shape, god, stride, padding, dilation, groups)
    return y, gx, gw, god.sum((0, 2, 3))


def _cases():
    """Each geometry x each path; dtype, layout and bias rotate so every combination shows up."""
    cases = []
    for i, (name, geo) in enumerate(GEOMETRIES.items()):
        for j, (algo, mode) in enumerate(PATHS):
            dtype = DTYPES[(i + j) % 3]
            channels_last = (i // 3 + j) % 2 == 1
            bias = (i + 2 * j) % 4 != 3
            cid = f"{name}-{algo}{'-' + mode if mode else ''}-{str(dtype)[6:]}-{'nhwc' if channels_last else 'nchw'}" \
                  f"{'' if bias else '-nobias'}"
            cases.append(pytest.param(geo, algo, mode, dtype, channels_last, bias, id=cid))
    return cases


@pytest.mark.parametrize("geo,algo,mode,dtype,channels_last,bias", _cases())
def test_conv_forward_backward(geo, algo, mode, dtype, channels_last, bias, force_mode):
    force_mode(mode)
    N, C, H, W, Cout, (KH, KW), stride, padding, dilation, groups = geo
    x = randn(N, C, H, W, dtype=dtype, channels_last=channels_last)
    w = randn(Cout, C // groups, KH, KW, dtype=dtype)
    b = randn(Cout, dtype=dtype) if bias else None
    args = (list(stride), list(padding), list(dilation), groups)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    y = tconv.conv2d(x, w, b, *args, algo)
    go = randn(*y.shape, dtype=dtype, channels_last=channels_last)
    # dgrad has a single implicit K loop: the "flat" runs (fwd and wgrad modes) skip it to save time.
    want_gx = mode != "flat"
    gx, gw, gb = tconv.conv2d_backward(go, x, w, *args, [want_gx, True, bias], algo)
    y_ref, gx_ref, gw_ref, gb_ref = _reference(x, w, b, go, stride, padding, dilation, groups)

    assert_close(y, y_ref, dtype, msg="y")
    if want_gx:
        assert_close(gx, gx_ref, dtype, msg="grad_x")
        assert gx.dtype == dtype and gx.is_contiguous(memory_format=fmt)
    else:
        assert gx.numel() == 0
    assert_close(gw, gw_ref, dtype, msg="grad_w")
    if bias:
        assert_close(gb, gb_ref, dtype, msg="grad_b")
        assert gb.shape == (Cout,) and gb.dtype == dtype
    else:
        assert gb.numel() == 0
    assert y.dtype == gw.dtype == dtype
    assert y.is_contiguous(memory_format=fmt) and gw.is_contiguous()


def test_conv_arbitrary_strides_read_in_place():
    """A non-dense view (every other column, channels permuted to the middle) is read through its strides."""
    base = randn(2, 9, 14, 4).permute(0, 3, 1, 2)            # (2, 4, 9, 14), strides of NHWC with W padded
    x = base[:, :, :, ::2]                                   # (2, 4, 9, 7): neither NCHW nor NHWC dense
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w, b = randn(3, 4, 3, 3), randn(3)
    args = ([1, 2], [1, 0], [1, 1], 1)
    y = tconv.conv2d(x, w, b, *args, "auto")
    go = randn(*y.shape).transpose(2, 3).contiguous().transpose(2, 3)  # grad_out with its own odd strides
    gx, gw, gb = tconv.conv2d_backward(go, x, w, *args, [True, True, True], "auto")
    y_ref, gx_ref, gw_ref, gb_ref = _reference(x, w, b, go, [1, 2], [1, 0], [1, 1], 1)
    for got, ref, name in ((y, y_ref, "y"), (gx, gx_ref, "gx"), (gw, gw_ref, "gw"), (gb, gb_ref, "gb")):
        assert_close(got, ref, torch.float32, msg=name)
    assert y.is_contiguous() and gx.is_contiguous()


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, False, False]], ids=str)
def test_conv_backward_output_mask(mask):
    x, w, go = randn(1, 3, 5, 4), randn(4, 3, 3, 3), randn(1, 4, 5, 4)
    out = tconv.conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, mask, "auto")
    refs = _reference(x, w, None, go, [1, 1], [1, 1], [1, 1], 1)[1:]
    for want, got, ref in zip(mask, out, refs):
        if want:
            assert_close(got, ref, torch.float32)
        else:
            assert got.numel() == 0


def test_conv_empty_batch():
    x, w, b = randn(0, 3, 5, 5), randn(4, 3, 3, 3), randn(4)
    y = tconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, "auto")
    assert y.shape == (0, 4, 5, 5)
    gx, gw, gb = tconv.conv2d_backward(y.clone(), x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True], "auto")
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(4))


def test_conv_nan_propagates():
    x, w = randn(1, 3, 5, 5), randn(2, 3, 3, 3)
    x[0, 1, 2, 2] = float("nan")
    y = tconv.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1, "auto")
    ref = F.conv2d(x, w)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()


def test_tf32_follows_cudnn_flag(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tconv._precision(torch.float32) == "tf32"
    assert tconv._precision(torch.bfloat16) == "ieee"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert tconv._precision(torch.float32) == "ieee"


@pytest.mark.parametrize("total,tiles", [(1, 1), (100, 1), (257, 2), (10**6, 1)])
def test_split_k_covers_the_reduction(total, tiles):
    splits, chunk = tconv._split_k(total, tiles, torch.device("cpu"))
    assert splits >= 1 and (splits - 1) * chunk < total <= splits * chunk


# ---- bad input: a clear Python error, never an out-of-bounds access ----
def _good():
    return dict(x=randn(1, 4, 6, 6), weight=randn(6, 2, 3, 3), bias=randn(6), stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], groups=2, algo="auto")


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=randn(4, 6, 6)), RuntimeError, "Expected 4D"),
    (dict(weight=randn(6, 2, 3)), RuntimeError, "weight should have 4 dimensions"),
    (dict(x=torch.ones(1, 4, 6, 6, dtype=torch.int32)), TypeError, "input must be one of"),
    (dict(x=randn(1, 4, 6, 6, dtype=torch.bfloat16)), RuntimeError, "Input type .* and weight type"),
    (dict(bias=randn(6, dtype=torch.float16)), RuntimeError, "bias type"),
    (dict(bias=randn(5)), RuntimeError, "expected bias to be 1-dimensional with 6 elements"),
    (dict(stride=[0, 1]), RuntimeError, "non-positive stride"),
    (dict(padding=[-1, 0]), RuntimeError, "negative padding"),
    (dict(dilation=[1, 0]), RuntimeError, "non-positive dilation"),
    (dict(stride=[1]), TypeError, "stride must be a list of 2 ints"),
    (dict(padding="same"), TypeError, "padding must be a list of 2 ints"),
    (dict(groups=0), RuntimeError, "non-positive groups"),
    (dict(groups=4), RuntimeError, "expected weight to be divisible by 4"),
    (dict(groups=1), RuntimeError, "to have 2 channels, but got 4 channels"),
    (dict(weight=randn(6, 2, 9, 9)), RuntimeError, "Kernel size can't be greater than actual input size"),
    (dict(algo="winograd"), ValueError, "algo must be one of"),
])
def test_conv_forward_bad_input(change, exc, match):
    kw = {**_good(), **change}
    with pytest.raises(exc, match=match):
        tconv.conv2d(kw["x"], kw["weight"], kw["bias"], kw["stride"], kw["padding"], kw["dilation"],
                             kw["groups"], kw["algo"])


@pytest.mark.parametrize("grad_out,mask,exc,match", [
    (randn(1, 6, 5, 6), [True, True, True], RuntimeError, r"grad_out must have shape \[1, 6, 6, 6\]"),
    (randn(1, 6, 6, 6, dtype=torch.float16), [True, True, True], RuntimeError, "grad_out type"),
    (randn(1, 6, 6, 6), [True, True], TypeError, "output_mask must be a list of 3 bools"),
    (randn(1, 6, 6, 6), [1, 1, 1], TypeError, "output_mask must be a list of 3 bools"),
])
def test_conv_backward_bad_input(grad_out, mask, exc, match):
    g = _good()
    with pytest.raises(exc, match=match):
        tconv.conv2d_backward(grad_out, g["x"], g["weight"], g["stride"], g["padding"], g["dilation"], g["groups"],
                              mask, g["algo"])


# ---- GPU: real VGG16 layers (batch 8, bf16, channels_last) against float64 torch ----
VGG16_LAYERS = {  # C_in, C_out, H (= W); every VGG16 conv is 3x3, stride 1, padding 1
    "conv1_1": (3, 64, 224), "conv1_2": (64, 64, 224), "conv2_1": (64, 128, 112),
    "conv3_2": (256, 256, 56), "conv4_1": (256, 512, 28), "conv5_3": (512, 512, 14),
}


def _rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["implicit_gemm", "im2col"])
@pytest.mark.parametrize("layer", list(VGG16_LAYERS))
def test_conv_vgg16_layers_cuda(layer, algo):
    cin, cout, hw = VGG16_LAYERS[layer]
    dev = "cuda"
    x = torch.randn(8, cin, hw, hw, device=dev).bfloat16().to(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, device=dev) / (9 * cin) ** 0.5).bfloat16().to(memory_format=torch.channels_last)
    b = torch.randn(cout, device=dev).bfloat16()
    args = ([1, 1], [1, 1], [1, 1], 1)
    y = tconv.conv2d(x, w, b, *args, algo)
    go = torch.randn_like(y)
    gx, gw, gb = tconv.conv2d_backward(go, x, w, *args, [True, True, True], algo)
    refs = _reference(x, w, b, go, [1, 1], [1, 1], [1, 1], 1)
    # torch's own bf16 error on the same inputs sets the scale (flash-attention style): within 2x, or 1e-2.
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    yt = F.conv2d(xt, wt, b, 1, 1)
    gxt, gwt = torch.autograd.grad(yt, (xt, wt), go)
    for got, mine_ref, theirs, name in ((y, refs[0], yt, "y"), (gx, refs[1], gxt, "gx"), (gw, refs[2], gwt, "gw")):
        bound = max(2 * _rel_err(theirs, mine_ref), 1e-2)
        assert _rel_err(got, mine_ref) < bound, f"{layer} {name}: {_rel_err(got, mine_ref):.2e} >= {bound:.2e}"
    assert _rel_err(gb, refs[3]) < 1e-2
    assert y.is_contiguous(memory_format=torch.channels_last) and gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("allow_tf32,bound", [(False, 1e-5), (True, 5e-3)])
def test_conv_fp32_tf32_flag_cuda(allow_tf32, bound, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    x = torch.randn(4, 64, 56, 56, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3, device="cuda") / 24
    y = tconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "implicit_gemm")
    go = torch.randn_like(y)
    gx, gw, _ = tconv.conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, False], "implicit_gemm")
    y_ref, gx_ref, gw_ref, _ = _reference(x, w, None, go, [1, 1], [1, 1], [1, 1], 1)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert _rel_err(got, ref) < bound


# ---- conv_bn_relu / conv_bn_relu_backward: the same kernels with their fusion hooks on ----
# y = conv2d(relu(x*s + t), w, b, groups) (prologue) or conv2d(x, w, b); mean / biased var of y per channel
# (statistics epilogue); the backward folds dL/dmean, dL/dvar into its gradient loads. Oracle: float64 torch
# autograd through that composition.
def _fused_reference(x, w, b, s, t, conv, grad, grad_mean, grad_var):
    """float64: (y, mean, var) and the gradients (dx, dw, db, ds, dt) of
    L = <y, grad> + <mean, grad_mean> + <var, grad_var> (None entries for absent inputs)."""
    stride, padding, dilation, groups = conv
    leaves = [None if v is None else v.double().requires_grad_() for v in (x, w, b, s, t)]
    xd, wd, bd, sd, td = leaves
    a = xd if sd is None else torch.relu(xd * sd.view(1, -1, 1, 1) + td.view(1, -1, 1, 1))
    y = F.conv2d(a, wd, bd, stride, padding, dilation, groups)
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    loss = (y * grad.double()).sum()
    if grad_mean is not None:
        loss = loss + (mean * grad_mean.double()).sum()
    if grad_var is not None:
        loss = loss + (var * grad_var.double()).sum()
    used = [v for v in leaves if v is not None]
    grads = iter(torch.autograd.grad(loss, used))
    return (y.detach(), mean.detach(), var.detach()), [None if v is None else next(grads) for v in leaves]


def _fused_cases():
    """Every combination of prologue x statistics x groups x stride; dtype, layout, bias, K-loop mode and which
    statistics gradients arrive rotate so each shows up with each hook."""
    cases = []
    i = 0
    for prologue in (False, True):
        for stats in (False, True):
            for groups in (1, 2):
                for stride in (1, 2):
                    dtype = (torch.float32, torch.bfloat16)[i % 2]
                    channels_last = (i // 2) % 2 == 1
                    bias = i % 3 != 2
                    mode = ("tiled", "flat")[(i // 4) % 2]
                    stat_grads = ("both", "var", "mean")[i % 3] if stats else "none"
                    cid = (f"{'pro' if prologue else 'nopro'}-{'stats-' + stat_grads if stats else 'nostats'}-g{groups}"
                           f"-s{stride}-{str(dtype)[6:]}-{'nhwc' if channels_last else 'nchw'}-{mode}"
                           f"{'' if bias else '-nobias'}")
                    cases.append(pytest.param(prologue, stats, stat_grads, groups, stride, dtype, channels_last,
                                              bias, mode, id=cid))
                    i += 1
    return cases


def _check_like(got, ref, dtype, name):
    """check() from helpers (max error vs the reference's magnitude), plus: no NaN (outputs start poisoned)."""
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten element?)"
    check(got, ref, dtype=dtype, msg=name)


@pytest.mark.parametrize("prologue,stats,stat_grads,groups,stride,dtype,channels_last,bias,mode", _fused_cases())
def test_conv_bn_relu_forward_backward(prologue, stats, stat_grads, groups, stride, dtype, channels_last, bias, mode,
                                       force_mode):
    force_mode(mode)
    N, C, H, W, Cout = 2, 16, 7, 6, 12        # odd sizes: partial row tiles, partial channel tiles
    conv = ([stride, stride], [1, 1], [1, 1], groups)
    x = randn(N, C, H, W, dtype=dtype, channels_last=channels_last)
    w = randn(Cout, C // groups, 3, 3, dtype=dtype) / 4
    b = randn(Cout) if bias else None                                   # fused biases are float32
    s, t = (randn(C), randn(C) / 2) if prologue else (None, None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    y, mean, var = tconv.conv_bn_relu(x, w, b, s, t, *conv, stats)
    grad = randn(*y.shape, dtype=dtype, channels_last=channels_last)
    gm = randn(Cout) if stat_grads in ("both", "mean") else None
    gv = randn(Cout) if stat_grads in ("both", "var") else None
    dx, dw, db, ds, dt = tconv.conv_bn_relu_backward(grad, y if stats else None, gm, gv, mean if stats else None,
                                                     x, w, s, t, *conv, bias, True)
    (y_ref, mean_ref, var_ref), (dx_ref, dw_ref, db_ref, ds_ref, dt_ref) = _fused_reference(
        x, w, b, s, t, conv, grad, gm, gv)

    _check_like(y, y_ref, dtype, "y")
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    if stats:
        _check_like(mean, mean_ref, dtype, "mean")
        _check_like(var, var_ref, dtype, "var")
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (Cout,)
    else:
        assert mean.numel() == var.numel() == 0 and mean.dtype == torch.float32
    _check_like(dx, dx_ref, dtype, "dx")
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=fmt)
    _check_like(dw, dw_ref, dtype, "dw")
    assert dw.dtype == dtype and dw.is_contiguous()
    if bias:
        _check_like(db, db_ref, dtype, "db")
        assert db.dtype == torch.float32 and db.shape == (Cout,)
    else:
        assert db.numel() == 0 and db.dtype == torch.float32
    if prologue:
        _check_like(ds, ds_ref, dtype, "d_in_scale")
        _check_like(dt, dt_ref, dtype, "d_in_shift")
        assert ds.dtype == dt.dtype == torch.float32 and ds.shape == dt.shape == (C,)
    else:
        assert ds.numel() == dt.numel() == 0


def test_conv_bn_relu_outputs_start_poisoned():
    """The check above can see an unwritten element only because fresh outputs are NaN under the tests."""
    from fusedcnn.triton_kernels import _common
    assert _common._POISON and torch.isnan(_common.new_output((3,), randn(1))).all()


def test_conv_bn_relu_backward_skips_dx():
    """compute_dx=False without a prologue: no dgrad (dx empty); with a prologue dx is still computed, since
    d_in_scale / d_in_shift come from the dgrad epilogue."""
    x, w, grad = randn(2, 4, 5, 5), randn(6, 4, 3, 3), randn(2, 6, 5, 5)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    dx, dw, db, ds, dt = tconv.conv_bn_relu_backward(grad, None, None, None, None, x, w, None, None, *conv, False,
                                                     False)
    assert dx.numel() == 0 and db.numel() == 0 and ds.numel() == 0
    _, (_, dw_ref, _, _, _) = _fused_reference(x, w, None, None, None, conv, grad, None, None)
    check(dw, dw_ref, dtype=torch.float32, msg="dw")
    s, t = randn(4), randn(4)
    dx, _, _, ds, _ = tconv.conv_bn_relu_backward(grad, None, None, None, None, x, w, s, t, *conv, False, False)
    _, (dx_ref, _, _, ds_ref, _) = _fused_reference(x, w, None, s, t, conv, grad, None, None)
    check(dx, dx_ref, dtype=torch.float32, msg="dx")
    check(ds, ds_ref, dtype=torch.float32, msg="ds")


def test_conv_bn_relu_empty_batch():
    x, w, b, s, t = randn(0, 4, 5, 5), randn(6, 4, 3, 3), randn(6), randn(4), randn(4)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, mean, var = tconv.conv_bn_relu(x, w, b, s, t, *conv, True)
    assert y.shape == (0, 6, 5, 5) and mean.shape == var.shape == (6,)
    assert (mean == 0).all() and (var == 0).all()   # an empty batch's statistics: 0 (torch: zero grads)
    dx, dw, db, ds, dt = tconv.conv_bn_relu_backward(y.clone(), y, randn(6), randn(6), mean, x, w, s, t, *conv,
                                                     True, True)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(6))
    assert torch.equal(ds, torch.zeros(4)) and torch.equal(dt, torch.zeros(4))


@pytest.mark.parametrize("change,exc,match", [
    (dict(in_shift=None), ValueError, "must be given together"),
    (dict(in_scale=randn(3)), ValueError, "contiguous float32 vector of 4"),
    (dict(bias=randn(6, dtype=torch.bfloat16)), TypeError, "bias must be one of"),
    (dict(weight=randn(6, 2, 9, 9)), RuntimeError, "Output size is too small"),
    (dict(groups=4), RuntimeError, "expected weight to be divisible by 4"),
    (dict(groups=1), RuntimeError, "to have 2 channels, but got 4 channels"),
])
def test_conv_bn_relu_bad_input(change, exc, match):
    kw = {**dict(x=randn(1, 4, 6, 6), weight=randn(6, 2, 3, 3), bias=randn(6), in_scale=randn(4),
                 in_shift=randn(4), groups=2), **change}
    with pytest.raises(exc, match=match):
        tconv.conv_bn_relu(kw["x"], kw["weight"], kw["bias"], kw["in_scale"], kw["in_shift"], [1, 1], [1, 1],
                           [1, 1], kw["groups"], True)


# ---------------------------------------------------------------------------------------------- launch review
def test_conv_non_contiguous_bias():
    """The kernel reads bias[g*C_out/groups + n] densely: a strided bias view is made contiguous first."""
    x, w = randn(2, 4, 6, 6), randn(3, 4, 3, 3)
    b = randn(6)[::2]
    assert not b.is_contiguous()
    y = tconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, "auto")
    assert_close(y, F.conv2d(x.double(), w.double(), b.double(), padding=1), torch.float32)


def test_conv_nchw_computes_in_nhwc_and_returns_nchw():
    """NCHW input is converted once to NHWC (the kernels' layout); the results keep x's format."""
    x, w = randn(2, 5, 7, 6), randn(4, 5, 3, 3)
    y = tconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "implicit_gemm")
    assert y.is_contiguous()
    go = randn(*y.shape)
    gx, gw, _ = tconv.conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, False], "implicit_gemm")
    assert gx.is_contiguous()
    y_ref, gx_ref, gw_ref, _ = _reference(x, w, None, go, [1, 1], [1, 1], [1, 1], 1)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert_close(got, ref, torch.float32)


def test_autotune_keys_are_bucketed():
    """The autotuners key on a power-of-two bucket of the pixel count, not on N*P*Q itself: a new batch size or
    resolution in the same bucket reuses the tuned configuration."""
    for kernel in (tconv._conv_fwd_kernel, tconv._conv_dgrad_kernel, tconv._conv_wgrad_kernel,
                   tconv._dgrad_col_gemm_kernel):
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys and "k_chunk" not in kernel.keys
    from fusedcnn.triton_kernels._common import autotune_bucket
    assert autotune_bucket(31 * 56 * 56) == autotune_bucket(32 * 56 * 56) == 2**17
    assert autotune_bucket(8 * 56 * 56) != autotune_bucket(32 * 56 * 56)


def test_conv_device_mismatch_is_a_clear_error():
    x, w = randn(1, 2, 4, 4), torch.empty(3, 2, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        tconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, "auto")
