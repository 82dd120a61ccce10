"""Conv2d: every backend against torch.nn.functional.conv2d AND against the reference, forward and all grads.

Oracles run in float64 on the same (already rounded) inputs; a backend's error is measured relative to the
largest magnitude of the expected tensor, with the per-dtype tolerances of helpers.TOLERANCES.
Shapes stay tiny: the triton backend runs under the Triton interpreter here.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fusedcnn
from fusedcnn.functional import conv2d
from fusedcnn.ops._registry import op
from helpers import TOLERANCES, randn

ALL = ("torch", "reference", "triton", "cpp")
TRITON_CONV = importlib.util.find_spec("fusedcnn.triton_kernels.conv") is not None


def backends(names=ALL):
    """pytest params for `names`, skipped (with the reason) where a backend cannot run conv on CPU tensors here."""
    params = []
    for b in names:
        why = fusedcnn.backends.unavailable_reason(b, "cpu")
        if why is None and b == "triton" and not TRITON_CONV:
            why = "fusedcnn.triton_kernels.conv is not in this tree (the Triton conv kernels live on another branch)"
        params.append(pytest.param(b, id=b, marks=pytest.mark.skip(reason=why) if why else ()))
    return params


COMPILED = [p for p in backends(("triton", "cpp"))]


def close(actual, expected, dtype, what):
    """|actual - expected| <= rtol*|expected| + atol*max(1, max|expected|); NaN passes only where expected has NaN."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().abs().nan_to_num(0).max().item()) if expected.numel() else 1.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{what}\n{m}")


def run(backend, x, w, b, grad=None, **kw):
    """conv2d forward on `backend` and the grads of x, w (and b) for grad_out `grad` (default: fresh randn)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    xs, ws, bs = leaves[0], leaves[1], leaves[2] if b is not None else None
    y = conv2d(xs, ws, bs, backend=backend, **kw)
    if grad is None:
        grad = torch.randn(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, grad)
    return y, grads, grad


def check_against_oracles(backend, x, w, b, **kw):
    """Forward and grads of `backend` in x's dtype vs torch and reference in float64; returns (y, grads)."""
    dtype = x.dtype
    y, grads, g = run(backend, x, w, b, **kw)
    assert y.dtype == dtype and all(t.dtype == dtype for t in grads)
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731  (keeps x's memory format)
    for oracle in ("torch", "reference"):
        y64, grads64, _ = run(oracle, as64(x), as64(w), as64(b), grad=g.double(), **kw)
        close(y, y64, dtype, f"{backend} vs {oracle}: output")
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads64):
            close(got, want, dtype, f"{backend} vs {oracle}: {name}")
    return y, grads


# (input shape, weight shape, bias?, conv2d keywords): non-square inputs and kernels, stride 2-3, padding 0-2,
# dilation 2, kernels 1/3/5/7, groups 2 and depthwise, "same"/"valid", batch size 1.
GEOMETRIES = {
    "k3_p1": ((2, 3, 7, 9), (4, 3, 3, 3), True, dict(padding=1)),
    "k3x2_s2x3_p2x1_g2": ((2, 4, 9, 7), (6, 2, 3, 2), True, dict(stride=(2, 3), padding=(2, 1), groups=2)),
    "depthwise_d2_p2_n1": ((1, 3, 8, 8), (3, 1, 3, 3), True, dict(padding=2, dilation=2, groups=3)),
    "k5_s3_p0": ((2, 2, 11, 10), (4, 2, 5, 5), True, dict(stride=3)),
    "k7_s2_p1": ((2, 2, 9, 9), (3, 2, 7, 7), True, dict(stride=2, padding=1)),
    "k1_s2": ((2, 3, 5, 6), (5, 3, 1, 1), True, dict(stride=2)),
    "depthwise_k3x5_d2x1_nobias": ((2, 4, 6, 7), (4, 1, 3, 5), False, dict(padding=(1, 2), dilation=(2, 1), groups=4)),
    "same_k3": ((2, 3, 6, 5), (4, 3, 3, 3), True, dict(padding="same")),
    "same_even_k4x2_d1x2": ((2, 3, 6, 7), (4, 3, 4, 2), True, dict(padding="same", dilation=(1, 2))),
    "valid_k3x2": ((2, 3, 6, 5), (4, 3, 3, 2), True, dict(padding="valid")),
    "unbatched": ((3, 6, 5), (4, 3, 3, 3), True, dict(padding=1)),
}


@pytest.mark.parametrize("case", GEOMETRIES)
@pytest.mark.parametrize("backend", backends())
def test_conv_geometry(backend, case):
    xs, ws, has_bias, kw = GEOMETRIES[case]
    x, w = randn(*xs), randn(*ws)
    b = randn(ws[0]) if has_bias else None
    check_against_oracles(backend, x, w, b, **kw)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backends())
def test_conv_dtypes_and_layouts(backend, dtype, channels_last):
    x = randn(2, 4, 6, 7, dtype=dtype, channels_last=channels_last)
    w, b = randn(6, 2, 3, 2, dtype=dtype), randn(6, dtype=dtype)
    kw = dict(stride=(1, 2), padding=1, groups=2)
    y, (gx, _, _) = check_against_oracles(backend, x, w, b, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "output memory format must follow the input's (as torch)"
    assert gx.is_contiguous(memory_format=fmt), "grad_input memory format must follow the input's"


@pytest.mark.parametrize("backend", backends())
def test_a_one_channel_input_strided_nhwc_gives_nhwc_as_torch(backend):
    """A (N, 1, H, W) tensor is dense in both formats; strided NHWC (channel stride 1) torch's conv returns NHWC, and
    so does every backend (dense_format): a FusedSequential on NHWC activations starts there without converting
    its first conv's output."""
    x = torch.empty(2, 1, 6, 7, memory_format=torch.channels_last).copy_(randn(2, 1, 6, 7))
    assert x.stride(1) == 1 and x.is_contiguous()
    y, (gx, _, _) = check_against_oracles(backend, x, randn(5, 1, 3, 3), randn(5), padding=1)
    want = F.conv2d(x, randn(5, 1, 3, 3), padding=1)
    assert not want.is_contiguous() and y.stride() == want.stride(), (y.stride(), want.stride())
    assert gx.is_contiguous(memory_format=torch.channels_last)
    # and a plain contiguous one stays NCHW
    y2 = conv2d(torch.empty(x.shape).copy_(x), randn(5, 1, 3, 3), padding=1, backend=backend)
    assert y2.is_contiguous()


@pytest.mark.parametrize("backend", backends(("triton", "cpp")))
def test_conv_same_even_kernel_channels_last(backend):
    # The asymmetric "same" padding is applied in Python before the compiled op: the layout must survive it.
    x = randn(2, 3, 5, 6, channels_last=True)
    y, _ = check_against_oracles(backend, x, randn(4, 3, 2, 4), randn(4), padding="same")
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backends(("reference", "triton", "cpp")))
def test_conv_nan_propagates_like_torch(backend):
    x, w, b = randn(1, 2, 6, 6), randn(3, 2, 3, 3), randn(3)
    x[0, 1, 2, 3] = float("nan")
    y = conv2d(x, w, b, padding=1, backend=backend)
    expected = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert y.isnan().sum() == expected.isnan().sum() == 3 * 9
    close(y, expected, torch.float32, "NaN positions")


@pytest.mark.parametrize("backend", backends(("reference", "cpp")))
def test_conv_empty_batch(backend):
    x, w, b = randn(0, 2, 5, 5, requires_grad=True), randn(3, 2, 3, 3, requires_grad=True), randn(3, requires_grad=True)
    y = conv2d(x, w, b, backend=backend)
    assert y.shape == (0, 3, 3, 3)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and gw.abs().sum() == 0 and gb.abs().sum() == 0


def test_cpp_batch_chunks(monkeypatch):
    # Shrink the im2col buffer bound so the batch runs in chunks of 2 images (with a 1-image tail), then 1.
    if fusedcnn.backends.unavailable_reason("cpp", "cpu"):
        pytest.skip("cpp backend not built")
    x, w, b = randn(5, 3, 6, 5), randn(4, 3, 3, 3), randn(4)
    per_image = 3 * 3 * 3 * 6 * 5 * 4  # C*kH*kW * L * sizeof(float32), padding=1 keeps 6x5
    for images in (2, 1):
        monkeypatch.setenv("FUSEDCNN_CONV_COL_BYTES", str(images * per_image))
        check_against_oracles("cpp", x, w, b, padding=1)


@pytest.mark.parametrize("backend", backends(("cpp",)))
def test_cpp_backward_op_with_grad_mode_on(backend):
    """The backward op called while its inputs require grad (as under create_graph=True) still computes the
    gradients: its internal GEMMs write into buffers, which autograd would refuse."""
    x, w, g = randn(2, 3, 6, 5, requires_grad=True), randn(4, 3, 3, 3, requires_grad=True), randn(2, 4, 6, 5)
    gx, gw, _ = op(backend, "conv2d_backward")(g, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, False], "auto")
    ex, ew = torch.autograd.grad(F.conv2d(x, w, None, 1, 1), (x, w), g)
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, ew, rtol=1e-4, atol=1e-5)


def test_reference_gradcheck():
    for kw, ws in ((dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2), (4, 1, 3, 2)),
                   (dict(padding="same", dilation=(1, 2)), (2, 2, 2, 3))):
        x = randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
        w = randn(*ws, dtype=torch.float64, requires_grad=True)
        b = randn(ws[0], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: fusedcnn.reference.conv2d(x, w, b, **kw), (x, w, b),
                                        fast_mode=True)


@pytest.mark.parametrize("backend", backends(("cpp",)))
def test_cpp_gradcheck_float64(backend):
    x = randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: conv2d(x, w, b, stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2,  # noqa: E731
                                backend=backend)
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w: conv2d(x, w, padding="same", backend=backend),
                                    (x, randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)), fast_mode=True)


def _opcheck_samples(dtypes):
    """(conv2d args, conv2d_backward args) samples: bias/no bias, NHWC, groups + stride + dilation."""
    samples = []
    for dtype in dtypes:
        x = randn(2, 4, 5, 6, dtype=dtype, requires_grad=True)
        w, b = randn(6, 2, 3, 2, dtype=dtype, requires_grad=True), randn(6, dtype=dtype, requires_grad=True)
        geo = ([2, 1], [1, 0], [1, 2], 2)
        samples.append((x, w, b, *geo))
        samples.append((x.detach().to(memory_format=torch.channels_last).requires_grad_(), w, None, *geo))
    return samples


@pytest.mark.parametrize("backend", backends(("triton", "cpp")))
def test_conv_opcheck(backend):
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if backend == "cpp" else (torch.float32,)
    samples = _opcheck_samples(dtypes) if backend == "cpp" else _opcheck_samples(dtypes)[:1]
    fwd, bwd = op(backend, "conv2d"), op(backend, "conv2d_backward")
    for x, w, b, stride, padding, dilation, groups in samples:
        torch.library.opcheck(fwd, (x, w, b, stride, padding, dilation, groups, "auto"))
        y = fwd(x.detach(), w.detach(), None, stride, padding, dilation, groups, "auto")
        g = torch.randn(y.shape, dtype=y.dtype).contiguous(memory_format=torch.channels_last
                                                           if y.is_contiguous(memory_format=torch.channels_last)
                                                           and not y.is_contiguous() else torch.contiguous_format)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(bwd, (g, x.detach(), w.detach(), stride, padding, dilation, groups, mask, "auto"))


def test_cpp_algo_and_dtype_errors():
    if fusedcnn.backends.unavailable_reason("cpp", "cpu"):
        pytest.skip("cpp backend not built")
    x, w = randn(1, 2, 5, 5), randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="implicit_gemm.*triton"):
        conv2d(x, w, backend="cpp", algo="implicit_gemm")
    torch.testing.assert_close(conv2d(x, w, backend="cpp", algo="im2col"), F.conv2d(x, w))
    with pytest.raises(ValueError, match="algo must be one of"):
        conv2d(x, w, backend="cpp", algo="winograd")
    torch.testing.assert_close(conv2d(x.half(), w.half(), backend="cpp"), F.conv2d(x, w).half(),
                               atol=2e-3, rtol=2e-3)   # float16 on CPU: computed in float32, as torch
    # the op itself checks what it is handed (shapes, geometry), not only the Python wrapper
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        op("cpp", "conv2d")(x, w, None, [1, 1], [0, 0], [3, 3], 1, "auto")
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        op("cpp", "conv2d_backward")(randn(1, 3, 4, 4), x, w, [1, 1], [0, 0], [1, 1], 1, [True] * 3, "auto")
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op("cpp", "conv2d")(x, w, randn(2), [1, 1], [0, 0], [1, 1], 1, "auto")


# ---- bad input: the same exception type and message as torch.nn.functional.conv2d
_x, _w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
BAD_INPUTS = {
    "input_2d": lambda: (torch.randn(2, 3), _w, None, {}),
    "input_5d": lambda: (torch.randn(1, 2, 4, 8, 8), _w, None, {}),
    "weight_3d": lambda: (_x, torch.randn(6, 4, 3), None, {}),
    "channel_mismatch": lambda: (torch.randn(2, 5, 8, 8), _w, None, {}),
    "channel_mismatch_unbatched": lambda: (torch.randn(5, 8, 8), _w, None, {}),
    "groups_not_dividing_out": lambda: (_x, torch.randn(5, 2, 3, 3), None, dict(groups=2)),
    "groups_channel_mismatch": lambda: (torch.randn(2, 5, 8, 8), torch.randn(6, 2, 3, 3), None, dict(groups=2)),
    "groups_0": lambda: (_x, _w, None, dict(groups=0)),
    "input_smaller_than_kernel": lambda: (torch.randn(2, 4, 2, 8), _w, None, {}),
    "input_smaller_than_dilated_kernel": lambda: (torch.randn(2, 4, 4, 8), _w, None, dict(dilation=2)),
    "negative_padding": lambda: (_x, _w, None, dict(padding=-1)),
    "stride_0": lambda: (_x, _w, None, dict(stride=0)),
    "negative_stride": lambda: (_x, _w, None, dict(stride=(1, -1))),
    "dilation_0": lambda: (_x, _w, None, dict(dilation=0)),
    "same_with_stride": lambda: (_x, _w, None, dict(padding="same", stride=2)),
    "bad_padding_string": lambda: (_x, _w, None, dict(padding="foo")),
    "three_strides": lambda: (_x, _w, None, dict(stride=(1, 1, 1))),
    "three_paddings": lambda: (_x, _w, None, dict(padding=(1, 1, 1))),
    "bias_wrong_size": lambda: (_x, _w, torch.randn(5), {}),
    "bias_2d": lambda: (_x, _w, torch.randn(6, 1), {}),
    "weight_dtype": lambda: (_x, _w.double(), None, {}),
    "bias_dtype": lambda: (_x, _w, torch.randn(6).double(), {}),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("backend", backends(("reference", "triton", "cpp")))
def test_conv_bad_input_like_torch(backend, case):
    x, w, b, kw = BAD_INPUTS[case]()
    with pytest.raises(Exception) as torch_error:
        F.conv2d(x, w, b, **kw)
    with pytest.raises(torch_error.type) as ours:
        conv2d(x, w, b, backend=backend, **kw)
    assert str(ours.value) == str(torch_error.value)


def test_conv_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        conv2d(_x, _w, backend="cudnn")


# ---- module: a drop-in torch.nn.Conv2d
MODULE_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=2, groups=2,
         bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", groups=4),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("config", range(len(MODULE_CONFIGS)))
def test_conv_module_repr_and_state_dict(config):
    cfg = MODULE_CONFIGS[config]
    ours, theirs = fusedcnn.nn.Conv2d(**cfg), torch.nn.Conv2d(**cfg)
    assert isinstance(ours, torch.nn.Conv2d)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # torch -> fusedcnn
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    other = torch.nn.Conv2d(**cfg)
    other.load_state_dict(fusedcnn.nn.Conv2d(**cfg).state_dict())  # fusedcnn -> torch


@pytest.mark.parametrize("config", range(len(MODULE_CONFIGS)))
@pytest.mark.parametrize("backend", backends(("reference", "triton", "cpp")))
def test_conv_module_matches_torch(backend, config):
    cfg = MODULE_CONFIGS[config]
    theirs = torch.nn.Conv2d(**cfg)
    ours = fusedcnn.nn.Conv2d(**cfg, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = randn(1, 4, 6, 7)  # batch size 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    close(ya, yb, torch.float32, "module output")
    close(xa.grad, xb.grad, torch.float32, "module grad_input")
    for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters()):
        close(pa.grad, pb.grad, torch.float32, f"module grad of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends(("triton", "cpp")))
def test_conv_torch_compile_fullgraph(backend):
    x, w, b = randn(2, 4, 6, 7, requires_grad=True), randn(6, 2, 3, 3, requires_grad=True), randn(6, requires_grad=True)
    fn = torch.compile(lambda x, w, b: conv2d(x, w, b, padding=1, groups=2, backend=backend), fullgraph=True)
    y = fn(x, w, b)
    y.sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xr, wr, br, padding=1, groups=2)
    yr.sum().backward()
    for got, want, what in ((y, yr, "out"), (x.grad, xr.grad, "gx"), (w.grad, wr.grad, "gw"), (b.grad, br.grad, "gb")):
        close(got, want, torch.float32, what)


# ---- CUDA (the cpp CUDA kernels and the Triton kernels on a GPU)
CUDA_BACKENDS = ("triton", "cpp")


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_conv_cuda(backend, dtype, channels_last):
    why = fusedcnn.backends.unavailable_reason(backend, "cuda")
    if why or (backend == "triton" and not TRITON_CONV):
        pytest.skip(why or "fusedcnn.triton_kernels.conv is not in this tree")
    for xs, ws, has_bias, kw in (((4, 16, 17, 15), (32, 16, 3, 3), True, dict(padding=1)),
                                 ((3, 8, 12, 10), (8, 4, 3, 2), True, dict(stride=2, padding=(1, 2), groups=2)),
                                 ((2, 8, 9, 9), (8, 1, 5, 5), False, dict(padding="same", dilation=2, groups=8))):
        x = randn(*xs, dtype=dtype, channels_last=channels_last).cuda()
        w, b = randn(*ws, dtype=dtype).cuda(), randn(ws[0], dtype=dtype).cuda() if has_bias else None
        y, grads, g = run(backend, x, w, b, **kw)
        y64, grads64, _ = run("torch", *(t.double() if t is not None else None for t in (x, w, b)), grad=g.double(),
                              **kw)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype
        close(y, y64, dtype, f"{backend} cuda output")
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads64):
            close(got, want, dtype, f"{backend} cuda {name}")


@pytest.mark.cuda
def test_conv_cuda_opcheck():
    if fusedcnn.backends.unavailable_reason("cpp", "cuda"):
        pytest.skip("cpp built without CUDA")
    for x, w, b, stride, padding, dilation, groups in _opcheck_samples((torch.float32, torch.float16)):
        x, w = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
        b = None if b is None else b.detach().cuda().requires_grad_()
        torch.library.opcheck(op("cpp", "conv2d"), (x, w, b, stride, padding, dilation, groups, "auto"))


# ---- grouped conv: the groups run as ONE batched GEMM per chunk and direction (csrc/conv/conv.h gemm_out)
def _cpp_or_skip():
    if fusedcnn.backends.unavailable_reason("cpp", "cpu"):
        pytest.skip("cpp backend not built")


# (C, K, groups, (kH, kW), conv2d keywords): groups 2 and 4, depthwise (groups = C) with multiplier 1 and 2,
# strided and dilated, a 1x1 grouped (pointwise group) conv.
GROUPED = {
    "g2_k3_p1": (8, 6, 2, (3, 3), dict(padding=1)),
    "g4_k3x2_s2_p1": (8, 12, 4, (3, 2), dict(stride=2, padding=(1, 0))),
    "depthwise_k3_p1": (8, 8, 8, (3, 3), dict(padding=1)),
    "depthwise_x2_k3_d2_p2": (8, 16, 8, (3, 3), dict(padding=2, dilation=2)),
    "g4_k1": (8, 8, 4, (1, 1), {}),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GROUPED)
def test_cpp_grouped_conv_batched(case, dtype, channels_last):
    _cpp_or_skip()
    C, K, groups, (kh, kw_), kw = GROUPED[case]
    x = randn(3, C, 7, 6, dtype=dtype, channels_last=channels_last)
    w, b = randn(K, C // groups, kh, kw_, dtype=dtype), randn(K, dtype=dtype)
    y, _ = check_against_oracles("cpp", x, w, b, groups=groups, **kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    check_against_oracles("cpp", x, w, None, groups=groups, **kw)  # no bias: bmm instead of baddbmm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [2, 4, 8])
def test_cpp_grouped_conv_chunks(monkeypatch, groups, dtype):
    """Several batch chunks: the batched wgrad accumulates across chunks (bfloat16: in float32, gemm + add_)."""
    _cpp_or_skip()
    x, w, b = randn(5, 8, 6, 5, dtype=dtype), randn(8, 8 // groups, 3, 3, dtype=dtype), randn(8, dtype=dtype)
    per_image = 8 * 3 * 3 * 6 * 5 * x.element_size()  # C*kH*kW * L * element size, padding=1 keeps 6x5
    for images in (2, 1):
        monkeypatch.setenv("FUSEDCNN_CONV_COL_BYTES", str(images * per_image))
        check_against_oracles("cpp", x, w, b, padding=1, groups=groups)


def test_cpp_grouped_gradcheck_float64():
    _cpp_or_skip()
    x = randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = randn(8, 1, 3, 3, dtype=torch.float64, requires_grad=True)  # depthwise, multiplier 2
    b = randn(8, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: conv2d(x, w, b, padding=1, groups=4, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


def test_cpp_conv_ops_check_dtypes_and_devices_on_cpu():
    """The op itself (not only the Python wrapper) rejects mismatched dtypes with a message naming both."""
    _cpp_or_skip()
    x, w, g = randn(1, 4, 5, 5), randn(4, 2, 3, 3), randn(1, 4, 3, 3)
    fwd, bwd = op("cpp", "conv2d"), op("cpp", "conv2d_backward")
    with pytest.raises(RuntimeError, match="x and weight must have the same dtype, got x Float and weight Double"):
        fwd(x, w.double(), None, [1, 1], [0, 0], [1, 1], 2, "auto")
    with pytest.raises(RuntimeError, match="bias and x must have the same dtype"):
        fwd(x, w, randn(4).double(), [1, 1], [0, 0], [1, 1], 2, "auto")
    with pytest.raises(RuntimeError, match="grad_out and x must have the same dtype"):
        bwd(g.double(), x, w, [1, 1], [0, 0], [1, 1], 2, [True] * 3, "auto")
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        bwd(randn(1, 4, 3), x, w, [1, 1], [0, 0], [1, 1], 2, [True] * 3, "auto")


@pytest.mark.cuda
def test_cpp_conv_ops_reject_mixed_devices():
    """Every tensor on x's device, checked before the CUDA guard; the message names both devices."""
    if fusedcnn.backends.unavailable_reason("cpp", "cuda"):
        pytest.skip("cpp built without CUDA")
    x, w, b, g = randn(1, 4, 5, 5), randn(4, 2, 3, 3), randn(4), randn(1, 4, 3, 3)
    fwd, bwd = op("cpp", "conv2d"), op("cpp", "conv2d_backward")
    geo = ([1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match=r"weight and x must be on the same device, got weight on cuda:0 and x on cpu"):
        fwd(x, w.cuda(), None, *geo, "auto")
    with pytest.raises(RuntimeError, match=r"bias and x must be on the same device, got bias on cpu and x on cuda:0"):
        fwd(x.cuda(), w.cuda(), b, *geo, "auto")
    with pytest.raises(RuntimeError, match=r"grad_out and x must be on the same device"):
        bwd(g.cuda(), x, w, *geo, [True] * 3, "auto")
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match=r"weight and x must be on the same device, got weight on cuda:1 and x on cuda:0"):
            fwd(x.cuda(0), w.cuda(1), None, *geo, "auto")
        with pytest.raises(RuntimeError, match=r"grad_out and x must be on the same device"):
            bwd(g.cuda(1), x.cuda(0), w.cuda(0), *geo, [True] * 3, "auto")


@pytest.mark.cuda
@pytest.mark.parametrize("groups", [2, 4, 16])
def test_conv_cuda_grouped_batched(groups):
    if fusedcnn.backends.unavailable_reason("cpp", "cuda"):
        pytest.skip("cpp built without CUDA")
    for dtype in (torch.float32, torch.float64):
        x = randn(4, 16, 13, 11, dtype=dtype).cuda()
        w, b = randn(32, 16 // groups, 3, 3, dtype=dtype).cuda(), randn(32, dtype=dtype).cuda()
        y, grads, g = run("cpp", x, w, b, padding=1, groups=groups)
        y64, grads64, _ = run("torch", x.double(), w.double(), b.double(), grad=g.double(), padding=1, groups=groups)
        close(y, y64, dtype, "cpp cuda grouped output")
        for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads64):
            close(got, want, dtype, f"cpp cuda grouped {name}")
