"""Triton conv2d launchers (triton_kernels/conv.py) called directly, against torch in float64.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (conftest), so shapes stay tiny. Every
geometry runs through all three K-loop paths: implicit GEMM "tiled" (a K-tile = one tap x a channel
block), implicit GEMM "flat" (a K-tile = consecutive (kh, kw, c)), and algo="im2col" (explicit buffer).
"""
import pytest
import torch
import torch.nn.functional as F

from fusedcnn.triton_kernels import conv as tconv
from helpers import assert_close, randn

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

    y = tconv.conv2d_forward(x, w, b, *args, algo)
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
    y = tconv.conv2d_forward(x, w, b, *args, "auto")
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
    y = tconv.conv2d_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1, "auto")
    assert y.shape == (0, 4, 5, 5)
    gx, gw, gb = tconv.conv2d_backward(y.clone(), x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True], "auto")
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(4))


def test_conv_nan_propagates():
    x, w = randn(1, 3, 5, 5), randn(2, 3, 3, 3)
    x[0, 1, 2, 2] = float("nan")
    y = tconv.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1, "auto")
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
        tconv.conv2d_forward(kw["x"], kw["weight"], kw["bias"], kw["stride"], kw["padding"], kw["dilation"],
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
    y = tconv.conv2d_forward(x, w, b, *args, algo)
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
    y = tconv.conv2d_forward(x, w, None, [1, 1], [1, 1], [1, 1], 1, "implicit_gemm")
    go = torch.randn_like(y)
    gx, gw, _ = tconv.conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, False], "implicit_gemm")
    y_ref, gx_ref, gw_ref, _ = _reference(x, w, None, go, [1, 1], [1, 1], [1, 1], 1)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert _rel_err(got, ref) < bound
