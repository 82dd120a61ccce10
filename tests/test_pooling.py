"""Pooling: MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d on every backend,
against torch.nn and the reference backend: values, indices, gradients, dtypes, layouts, odd geometry,
NaN, opcheck, gradcheck, bad input (PyTorch's messages), module repr."""
import pytest
import torch
import torch.nn.functional as F

import fusedcnn
from fusedcnn.ops._registry import op
from helpers import CPU_BACKENDS, FAST_CPU_BACKENDS, assert_close, backend_params, randn

# torch is the baseline every backend is compared with: testing it against itself could not fail.
BACKENDS = backend_params(("reference", "triton", "cpp"))
LOW = [torch.bfloat16, torch.float16]

# (module kwargs, input (H, W)): non-square inputs and kernels, stride 1-3, padding 0-2, dilation 2,
# windows that do not divide the input, ceil_mode on/off.
MAX_CASES = [
    (dict(kernel_size=2), (8, 6)),                                        # VGG: 2x2 / stride 2
    (dict(kernel_size=2), (7, 5)),                                        # ... leaving a remainder
    (dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)), (7, 6)),
    (dict(kernel_size=3, stride=1, padding=1), (5, 6)),                   # overlapping windows
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (8, 7)),   # ceil_mode, last window clipped
    (dict(kernel_size=(2, 3), stride=3, padding=(1, 0), dilation=2, ceil_mode=True), (7, 9)),
    (dict(kernel_size=(3, 3), stride=(1, 2), dilation=(2, 1)), (7, 6)),
    (dict(kernel_size=5, stride=3, padding=2, ceil_mode=True), (9, 8)),
]
AVG_CASES = [
    (dict(kernel_size=2), (8, 6)),
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (8, 7)),
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (8, 7)),
    (dict(kernel_size=(3, 2), stride=(1, 3), padding=(1, 1), ceil_mode=True, count_include_pad=False), (6, 7)),
    (dict(kernel_size=(2, 4), stride=(3, 2), padding=(1, 2)), (7, 8)),
    (dict(kernel_size=3, stride=1, padding=1, divisor_override=5), (5, 6)),
    (dict(kernel_size=(2, 3), divisor_override=5), (7, 8)),              # tiled windows, remainder, override
]
# adaptive output sizes for a (5, 7) input: global, not dividing, larger than the input, None entries
ADAPTIVE_SIZES = [1, (3, 4), (7, 3), (None, 2), (2, 7)]


def _run(layer, x, grad):
    """out, indices (or None), grad_in of `layer` on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_()
    res = layer(x)
    out, idx = res if isinstance(res, tuple) else (res, None)
    (gx,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    return out, idx, gx


def _compare(make, x, backend, dtype):
    """Run fusedcnn's layer on `backend`, torch.nn's and the reference; compare all three."""
    with torch.no_grad():
        res = make(torch.nn, {})(x)
    grad = torch.randn((res[0] if isinstance(res, tuple) else res).shape, device=x.device)
    got = _run(make(fusedcnn.nn, dict(backend=backend)), x, grad)
    for expected_backend in ("torch", "reference") if backend != "reference" else ("torch",):
        if expected_backend == "torch":
            exp = _run(make(torch.nn, {}), x, grad)
        else:
            exp = _run(make(fusedcnn.nn, dict(backend="reference")), x, grad)
        out, idx, gx = got
        assert_close(out, exp[0], dtype, msg=f"forward vs {expected_backend}")
        if idx is not None:
            assert idx.dtype == torch.int64
            assert torch.equal(idx, exp[1]), f"indices vs {expected_backend}"
        assert_close(gx, exp[2], dtype, msg=f"grad vs {expected_backend}")
    out = got[0]
    assert out.dtype == x.dtype and got[2].dtype == x.dtype
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in -> channels_last out"
        if got[1] is not None:
            assert got[1].is_contiguous(memory_format=torch.channels_last)


def _max_layer(kw):
    return lambda ns, extra: ns.MaxPool2d(**kw, return_indices=True, **extra)


def _avg_layer(kw):
    return lambda ns, extra: ns.AvgPool2d(**kw, **extra)


def _dtypes_for(backend):
    return [d for d in LOW if not (backend == "cpp" and d == torch.float16)]


# ---------------------------------------------------------------- forward + backward, fp32, both layouts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", range(len(MAX_CASES)))
def test_max_pool(backend, channels_last, case):
    kw, (H, W) = MAX_CASES[case]
    _compare(_max_layer(kw), randn(2, 3, H, W, channels_last=channels_last), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", range(len(AVG_CASES)))
def test_avg_pool(backend, channels_last, case):
    kw, (H, W) = AVG_CASES[case]
    _compare(_avg_layer(kw), randn(2, 3, H, W, channels_last=channels_last), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("size", ADAPTIVE_SIZES, ids=str)
def test_adaptive_pools(backend, channels_last, size):
    x = randn(2, 3, 5, 7, channels_last=channels_last)
    _compare(lambda ns, extra: ns.AdaptiveAvgPool2d(size, **extra), x, backend, torch.float32)
    _compare(lambda ns, extra: ns.AdaptiveMaxPool2d(size, return_indices=True, **extra), x, backend, torch.float32)


# ---------------------------------------------------------------- low precision (fp32 accumulation)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision(backend, channels_last):
    for dtype in _dtypes_for(backend):
        x = randn(2, 4, 7, 6, dtype=dtype, channels_last=channels_last)
        _compare(_max_layer(MAX_CASES[2][0]), x, backend, dtype)
        _compare(_max_layer(MAX_CASES[1][0]), x, backend, dtype)  # tiled 2x2 windows, odd remainder row
        _compare(_avg_layer(AVG_CASES[1][0]), x, backend, dtype)
        _compare(_avg_layer(AVG_CASES[-1][0]), x, backend, dtype)
        _compare(lambda ns, extra: ns.AdaptiveAvgPool2d((3, 4), **extra), x, backend, dtype)
        _compare(lambda ns, extra: ns.AdaptiveMaxPool2d(1, return_indices=True, **extra), x, backend, dtype)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fusedcnn._C not built")
def test_cpp_cpu_dtypes():
    x = randn(2, 3, 6, 5, dtype=torch.float64)
    _compare(_max_layer(MAX_CASES[3][0]), x, "cpp", torch.float64)
    _compare(_avg_layer(AVG_CASES[2][0]), x, "cpp", torch.float64)
    x16 = randn(2, 3, 6, 5, dtype=torch.float16)   # float16 on CPU: computed in float32, as torch
    _compare(_max_layer(MAX_CASES[3][0]), x16, "cpp", torch.float16)
    _compare(_avg_layer(AVG_CASES[2][0]), x16, "cpp", torch.float16)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fusedcnn._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cpp_max2x2_nchw_rows_match_torch(dtype):
    """The cpp 2x2/s2 max pool on dense NCHW (one flat loop over rows of windows; 1 and 2 windows a row compiled
    apart), and adaptive max pooling to half the size (the same windows, the same kernels forward): values,
    indices and gradients equal torch's exactly, on ties (small integers, zeros as after a
    ReLU), NaN (the last NaN of a window wins) and -inf, for plane widths of 1, 2, 3, 4 and 16 windows."""
    gen = torch.Generator().manual_seed(7)
    for h, w in [(2, 2), (4, 4), (6, 6), (2, 8), (8, 4), (32, 32)]:
        x = torch.randint(-2, 3, (3, 5, h, w), generator=gen).to(dtype).clamp_min(0)
        x.view(-1)[torch.randperm(x.numel(), generator=gen)[: x.numel() // 16]] = float("nan")
        x.view(-1)[torch.randperm(x.numel(), generator=gen)[: x.numel() // 16]] = float("-inf")
        grad = torch.randn(3, 5, h // 2, w // 2, generator=gen).to(dtype)
        results = []
        half = (h // 2, w // 2)  # adaptive pooling to half the size: the same windows
        for call in (lambda t: F.max_pool2d(t, 2, return_indices=True),
                     lambda t: fusedcnn.functional.max_pool2d(t, 2, return_indices=True, backend="cpp"),
                     lambda t: fusedcnn.functional.max_pool2d(t, 2, backend="cpp"),  # no indices asked for
                     lambda t: fusedcnn.functional.adaptive_max_pool2d(t, half, return_indices=True, backend="cpp")):
            leaf = x.clone().requires_grad_()
            res = call(leaf)
            out, idx = res if isinstance(res, tuple) else (res, None)
            (gx,) = torch.autograd.grad(out, leaf, grad)
            results.append((out, idx, gx))
        (out, idx, gx), *cpp = results
        for got_out, got_idx, got_gx in cpp:
            torch.testing.assert_close(got_out, out, rtol=0, atol=0, equal_nan=True, msg=f"{h}x{w} values")
            assert got_idx is None or torch.equal(got_idx, idx), f"{h}x{w} indices"
            assert torch.equal(got_gx, gx), f"{h}x{w} gradient"


# ---------------------------------------------------------------- NaN, unbatched input, global pooling of big planes
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    x = randn(1, 2, 6, 7)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 4, 2] = x[0, 1, 4, 3] = float("nan")  # two NaNs in one window: the last one's index wins
    x[0, 1, 0, :] = float("-inf")  # a window of -inf only: the first in-bounds tap's index
    for name, kw in [("max_pool2d", dict(kernel_size=2, return_indices=True)),
                     ("max_pool2d", dict(kernel_size=3, stride=1, padding=1, return_indices=True)),
                     ("avg_pool2d", dict(kernel_size=2)),
                     ("adaptive_max_pool2d", dict(output_size=(2, 3), return_indices=True)),
                     ("adaptive_max_pool2d", dict(output_size=1, return_indices=True)),
                     ("adaptive_avg_pool2d", dict(output_size=(4, 3)))]:
        got = getattr(fusedcnn.functional, name)(x, **kw, backend=backend)
        exp = getattr(F, name)(x, **kw)
        got, exp = (got, exp) if isinstance(got, tuple) else ((got,), (exp,))
        assert_close(got[0], exp[0], msg=f"{name} {kw}")
        assert got[0].isnan().any(), f"{name}: NaN must propagate"
        if len(got) > 1:
            assert torch.equal(got[1], exp[1]), f"{name} {kw}: indices"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_global(backend):
    x = randn(3, 7, 6)
    out, idx = fusedcnn.functional.max_pool2d(x, 3, 2, 1, return_indices=True, backend=backend)
    eo, ei = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert_close(out, eo)
    assert torch.equal(idx, ei)
    assert_close(fusedcnn.functional.avg_pool2d(x, 2, backend=backend), F.avg_pool2d(x, 2))
    # global pooling of NCHW planes larger than one vector chunk (the global path loops over H*W)
    x = randn(2, 3, 40, 33)
    x[1, 2, 30, 30] = float("nan")
    _compare(lambda ns, extra: ns.AdaptiveMaxPool2d(1, return_indices=True, **extra), x, backend, torch.float32)
    _compare(lambda ns, extra: ns.AdaptiveAvgPool2d((1, 1), **extra), x, backend, torch.float32)


# ---------------------------------------------------------------- compiled ops: opcheck
def _op_samples():
    x = randn(2, 3, 7, 6, requires_grad=True)
    xc = randn(2, 3, 7, 6, channels_last=True, requires_grad=True)
    g_max = randn(2, 3, 4, 6)  # kernel 3, stride (2, 1), padding 1
    return {
        "max_pool2d": [(x, [3, 3], [2, 1], [1, 1], [1, 1], False, True),
                       (xc, [2, 3], [2, 2], [1, 0], [2, 1], True, False)],
        "max_pool2d_backward": [(g_max, x.detach(), [3, 3], [2, 1], [1, 1], [1, 1], False)],
        "avg_pool2d": [(x, [3, 2], [2, 1], [1, 1], True, False, None), (xc, [2, 2], [2, 2], [0, 0], False, True, 3)],
        "avg_pool2d_backward": [(g_max, [2, 3, 7, 6], [3, 3], [2, 1], [1, 1], False, True, None)],
        "adaptive_avg_pool2d": [(x, [3, 4]), (xc, [1, 1])],
        "adaptive_avg_pool2d_backward": [(randn(2, 3, 3, 4), [2, 3, 7, 6])],
        "adaptive_max_pool2d": [(x, [3, 4]), (xc, [1, 1])],
        "adaptive_max_pool2d_backward": [(randn(2, 3, 1, 1), torch.randint(0, 42, (2, 3, 1, 1)), [2, 3, 7, 6])],
    }


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
@pytest.mark.parametrize("name", list(_op_samples()))
def test_opcheck(backend, name):
    for args in _op_samples()[name]:
        torch.library.opcheck(op(backend, name), args)


# ---------------------------------------------------------------- reference: float64 gradcheck
def test_reference_gradcheck():
    R = fusedcnn.reference
    x = randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: R.max_pool2d(t, (3, 2), (2, 1), (1, 1), (1, 2), True), (x,))
    assert torch.autograd.gradcheck(lambda t: R.avg_pool2d(t, (3, 2), (2, 1), (1, 1), True, False, None), (x,))
    assert torch.autograd.gradcheck(lambda t: R.avg_pool2d(t, (2, 2), (1, 1), (1, 0), False, True, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: R.adaptive_avg_pool2d(t, (4, 3)), (x,))
    assert torch.autograd.gradcheck(lambda t: R.adaptive_max_pool2d(t, (4, 3)), (x,))


# ---------------------------------------------------------------- bad input: PyTorch's exception types and messages
BAD_CALLS = [
    ("max_pool2d", (5, 6), dict(kernel_size=2)),                                  # wrong ndim
    ("max_pool2d", (1, 1, 2, 5, 6), dict(kernel_size=2)),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=7)),                            # kernel larger than padded input
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=(2, 9), stride=1, padding=(1, 1))),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=2, padding=2)),                 # padding too large
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=(3, 2), stride=1, padding=(2, 0), dilation=2)),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=2, padding=-1)),                # negative padding
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=2, stride=0)),                  # zero stride
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=2, stride=-1)),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=0, stride=1)),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=2, dilation=0)),
    ("max_pool2d", (1, 2, 5, 6), dict(kernel_size=(1, 2, 3))),
    ("max_pool2d", (1, 0, 5, 6), dict(kernel_size=2)),
    ("avg_pool2d", (1, 2, 5, 6), dict(kernel_size=2, divisor_override=0)),
    ("avg_pool2d", (1, 2, 5, 6), dict(kernel_size=7)),
    ("avg_pool2d", (1, 2, 5, 6), dict(kernel_size=2, stride=0)),
    ("avg_pool2d", (1, 2, 5, 6), dict(kernel_size=3, padding=2)),
    ("avg_pool2d", (1, 2, 5, 6), dict(kernel_size=2, padding=-1)),
    ("adaptive_avg_pool2d", (5, 6), dict(output_size=2)),
    ("adaptive_avg_pool2d", (1, 2, 5, 6), dict(output_size=(2, -3))),
    ("adaptive_avg_pool2d", (1, 2, 5, 6), dict(output_size=(1, 2, 3))),
    ("adaptive_avg_pool2d", (1, 2, 0, 6), dict(output_size=2)),
    ("adaptive_max_pool2d", (5, 6), dict(output_size=2)),
    ("adaptive_max_pool2d", (1, 2, 0, 6), dict(output_size=2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", range(len(BAD_CALLS)))
def test_bad_input_matches_torch(backend, call):
    name, shape, kw = BAD_CALLS[call]
    x = randn(*shape)
    with pytest.raises(RuntimeError) as expected:
        getattr(F, name)(x, **kw)
    with pytest.raises(RuntimeError) as got:
        getattr(fusedcnn.functional, name)(x, **kw, backend=backend)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_beyond_torch_messages(backend):
    # torch raises IndexError for a 2-D avg_pool2d input and builds a tensor of negative size for a
    # negative adaptive_max output; fusedcnn raises a RuntimeError that says what is wrong.
    with pytest.raises((RuntimeError, IndexError), match="3D or 4D|Dimension out of range"):
        fusedcnn.functional.avg_pool2d(randn(5, 6), 2, backend=backend)
    with pytest.raises(RuntimeError, match="greater than or equal to 0|negative dimension"):
        fusedcnn.functional.adaptive_max_pool2d(randn(1, 2, 5, 6), -1, backend=backend)


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_compiled_ops_check_their_arguments(backend):
    x = randn(1, 2, 5, 6)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        op(backend, "max_pool2d")(x.long(), [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    with pytest.raises((RuntimeError, ValueError)):
        op(backend, "max_pool2d")(x[0], [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        op(backend, "max_pool2d")(x, [2, 2], [2, 2], [2, 2], [1, 1], False, False)
    with pytest.raises(RuntimeError, match="divisor must be not zero"):
        op(backend, "avg_pool2d")(x, [2, 2], [2, 2], [0, 0], False, True, 0)
    with pytest.raises((RuntimeError, ValueError), match="grad_out"):  # grad of the wrong shape
        op(backend, "max_pool2d_backward")(randn(1, 2, 3, 3), x, [2, 2], [2, 2], [0, 0], [1, 1], False)


# ---------------------------------------------------------------- modules: torch.nn's API
def test_modules_match_torch_api():
    pairs = [
        (fusedcnn.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (fusedcnn.nn.MaxPool2d((2, 3), dilation=2, return_indices=True),
         torch.nn.MaxPool2d((2, 3), dilation=2, return_indices=True)),
        (fusedcnn.nn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=2),
         torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=2)),
        (fusedcnn.nn.AdaptiveAvgPool2d((None, 3)), torch.nn.AdaptiveAvgPool2d((None, 3))),
        (fusedcnn.nn.AdaptiveMaxPool2d(2, return_indices=True), torch.nn.AdaptiveMaxPool2d(2, return_indices=True)),
    ]
    for ours, theirs in pairs:
        assert repr(ours) == repr(theirs)
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    with pytest.raises(ValueError, match="unknown backend"):
        fusedcnn.nn.MaxPool2d(2, backend="nope")


# ---------------------------------------------------------------- GPU: VGG shapes (run when a GPU is present)
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_vgg_shapes(backend, dtype, channels_last):
    if backend not in fusedcnn.available_backends("cuda"):
        pytest.skip(f"{backend} not available on CUDA")
    x = torch.randn(4, 64, 112, 112, device="cuda").to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _compare(_max_layer(dict(kernel_size=2)), x, backend, dtype)
    _compare(_max_layer(dict(kernel_size=3, stride=1, padding=1)), x[:, :8, :20, :20], backend, dtype)
    _compare(_avg_layer(dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)), x, backend, dtype)
    _compare(lambda ns, extra: ns.AdaptiveAvgPool2d(7, **extra), x, backend, dtype)
    _compare(lambda ns, extra: ns.AdaptiveMaxPool2d(1, return_indices=True, **extra), x, backend, dtype)


# ---- the compiled backward ops check that their tensors share a device and a dtype
CPP = pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="cpp backend not built")


@CPP
def test_cpp_pool_backward_ops_check_dtype_and_shape():
    x = randn(1, 2, 4, 6)
    with pytest.raises(RuntimeError, match="grad_out and x must have the same dtype, got grad_out Double and x Float"):
        op("cpp", "max_pool2d_backward")(randn(1, 2, 2, 3).double(), x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    out, idx = op("cpp", "adaptive_max_pool2d")(x, [2, 3])
    bwd = op("cpp", "adaptive_max_pool2d_backward")
    with pytest.raises(RuntimeError, match="indices must be int64"):
        bwd(torch.ones_like(out), idx.int(), list(x.shape))
    with pytest.raises(RuntimeError, match="indices must be int64 with grad_out's shape"):
        bwd(torch.ones_like(out), idx[:, :, :1], list(x.shape))
    with pytest.raises(RuntimeError, match="grad_out must be a floating-point tensor"):
        bwd(torch.ones_like(out).long(), idx, list(x.shape))
    torch.testing.assert_close(bwd(torch.ones_like(out), idx, list(x.shape)),
                               torch.ops.aten.adaptive_max_pool2d_backward(torch.ones_like(out), x, idx))


@pytest.mark.cuda
def test_cpp_pool_backward_ops_reject_mixed_devices():
    if "cpp" not in fusedcnn.available_backends("cuda"):
        pytest.skip("cpp built without CUDA")
    x, g = randn(1, 2, 4, 6), randn(1, 2, 2, 3)
    geo = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="grad_out and x must be on the same device, got grad_out on cpu and x on cuda:0"):
        op("cpp", "max_pool2d_backward")(g, x.cuda(), *geo)
    with pytest.raises(RuntimeError, match="grad_out and x must be on the same device, got grad_out on cuda:0 and x on cpu"):
        op("cpp", "max_pool2d_backward")(g.cuda(), x, *geo)
    _, idx = op("cpp", "adaptive_max_pool2d")(x.cuda(), [2, 3])
    with pytest.raises(RuntimeError, match="grad_out and indices must be on the same device, got grad_out on cpu and indices on cuda:0"):
        op("cpp", "adaptive_max_pool2d_backward")(g, idx, list(x.shape))
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="got grad_out on cuda:1 and x on cuda:0"):
            op("cpp", "max_pool2d_backward")(g.cuda(1), x.cuda(0), *geo)
        with pytest.raises(RuntimeError, match="got grad_out on cuda:1 and indices on cuda:0"):
            op("cpp", "adaptive_max_pool2d_backward")(g.cuda(1), idx, list(x.shape))
