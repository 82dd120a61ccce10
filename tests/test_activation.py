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
