"""ReLU kernels. x: any shape, float32|float64|float16|bfloat16, any memory format that is dense."""
import torch
import triton
import triton.language as tl

from ._common import check_grid, check_tensor, dense_format, device_guard, new_output

BLOCK = 1024


@triton.jit
def _relu_fwd_kernel(X_ptr, Y_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X_ptr + offs, mask=mask)
    y = tl.where(x <= 0, 0.0, x)  # NaN <= 0 is false: NaN propagates as in torch.relu
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_bwd_kernel(G_ptr, Y_ptr, DX_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G_ptr + offs, mask=mask)
    y = tl.load(Y_ptr + offs, mask=mask)
    tl.store(DX_ptr + offs, tl.where(y > 0, g, 0.0).to(DX_ptr.dtype.element_ty), mask=mask)


# Elementwise kernels walk memory linearly: input and output share one dense
# layout (NCHW or NHWC, see dense_format); other strides are copied first.


def relu(x: torch.Tensor) -> torch.Tensor:
    check_tensor(x, "x")
    fmt = dense_format(x)
    x = x.contiguous(memory_format=fmt)
    y = new_output(x.shape, x, memory_format=fmt)
    n = x.numel()
    if n:
        check_grid((triton.cdiv(n, BLOCK),), "relu")
        with device_guard(x):
            _relu_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    return y


def relu_backward(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    check_tensor(grad_out, "grad_out")
    check_tensor(out, "out")
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out and out must have the same shape, got {tuple(grad_out.shape)} and {tuple(out.shape)}")
    fmt = dense_format(out)
    out = out.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    dx = new_output(out.shape, out, memory_format=fmt)
    n = out.numel()
    if n:
        check_grid((triton.cdiv(n, BLOCK),), "relu_backward")
        with device_guard(out, grad_out):
            _relu_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad_out, out, dx, n, BLOCK=BLOCK)
    return dx
