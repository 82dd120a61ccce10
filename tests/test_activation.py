"""ReLU: every backend against torch.nn.ReLU."""
import pytest
import torch

import fusedcnn
from helpers import assert_close, backend_params, randn


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_relu_forward_backward(backend, dtype, channels_last):
    x = randn(2, 3, 5, 7, dtype=dtype, channels_last=channels_last, requires_grad=True)
    grad = torch.randn(2, 3, 5, 7).to(dtype)
    y = fusedcnn.nn.ReLU(backend=backend)(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    xr = x.detach().clone().requires_grad_()
    yr = torch.nn.ReLU()(xr)
    (gr,) = torch.autograd.grad(yr, xr, grad)
    assert_close(y, yr)
    assert_close(gx, gr)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backend_params())
def test_relu_nan_and_inplace(backend):
    x = torch.tensor([-1.0, float("nan"), 0.0, 2.0, float("-inf"), float("inf")])
    y = fusedcnn.functional.relu(x, backend=backend)
    assert_close(y, torch.relu(x))
    z = x.clone()
    out = fusedcnn.functional.relu(z, inplace=True, backend=backend)
    assert out.data_ptr() == z.data_ptr()
    assert_close(z, torch.relu(x))


@pytest.mark.parametrize("backend", [b for b in ("triton", "cpp") if b in fusedcnn.available_backends("cpu")])
def test_relu_opcheck(backend):
    op = fusedcnn.ops._registry.op(backend, "relu")
    torch.library.opcheck(op, (randn(3, 4, requires_grad=True),))
    torch.library.opcheck(op, (randn(2, 3, 4, 5, channels_last=True, requires_grad=True),))


def test_relu_module_matches_torch_api():
    assert repr(fusedcnn.nn.ReLU(inplace=True)) == repr(torch.nn.ReLU(inplace=True))
    assert isinstance(fusedcnn.nn.ReLU(), torch.nn.ReLU)


# ---- the compiled ops check what they are handed (device, dtype, shape), with messages naming both tensors
CPP = pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="cpp backend not built")


@CPP
def test_cpp_relu_ops_check_dtype_and_shape():
    relu, relu_bwd = (fusedcnn.ops._registry.op("cpp", n) for n in ("relu", "relu_backward"))
    y, g = randn(2, 3), randn(2, 3)
    with pytest.raises(RuntimeError, match="grad_out and out must have the same dtype, got grad_out Double and out Float"):
        relu_bwd(g.double(), y)
    with pytest.raises(RuntimeError, match="grad_out and out must have the same shape"):
        relu_bwd(randn(3, 2), y)
    with pytest.raises(RuntimeError, match="out must be a floating-point tensor"):
        relu_bwd(g.long(), y.long())
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor .*float32.*got Float8_e4m3fn"):
        relu(y.to(torch.float8_e4m3fn))


@pytest.mark.cuda
def test_cpp_relu_backward_rejects_mixed_devices():
    if "cpp" not in fusedcnn.available_backends("cuda"):
        pytest.skip("cpp built without CUDA")
    relu_bwd = fusedcnn.ops._registry.op("cpp", "relu_backward")
    y, g = randn(2, 3), randn(2, 3)
    with pytest.raises(RuntimeError, match="grad_out and out must be on the same device, got grad_out on cpu and out on cuda:0"):
        relu_bwd(g, y.cuda())
    with pytest.raises(RuntimeError, match="grad_out and out must be on the same device, got grad_out on cuda:0 and out on cpu"):
        relu_bwd(g.cuda(), y)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="got grad_out on cuda:1 and out on cuda:0"):
            relu_bwd(g.cuda(1), y.cuda(0))
