"""Shared test helpers: tolerances per dtype, comparison, backends to test, random inputs."""
from __future__ import annotations

import pytest
import torch

import fusedcnn

# (rtol, atol) of a fast backend against an fp32/fp64 computation, per input dtype (docs/ARCHITECTURE.md).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

# Every backend that can run on CPU tensors in this process (triton under TRITON_INTERPRET=1, cpp if built).
CPU_BACKENDS = fusedcnn.available_backends("cpu")
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b in ("triton", "cpp")]


def backend_params(backends=("torch", "reference", "triton", "cpp")):
    """pytest params for backends, marking those unavailable here as skipped (with the reason)."""
    params = []
    for b in backends:
        why = fusedcnn.backends.unavailable_reason(b, "cpu")
        params.append(pytest.param(b, id=b, marks=pytest.mark.skip(reason=why) if why else ()))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                 scale: float = 1.0, msg: str = "") -> None:
    """Compare with the tolerance of `dtype` (default: actual's). NaN never passes unless expected has NaN there."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{msg}\n{m}")


def randn(*shape, dtype=torch.float32, channels_last=False, requires_grad=False) -> torch.Tensor:
    """Fresh random data (never zeros), optionally NHWC."""
    x = torch.randn(*shape, dtype=torch.float32).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def check(actual, ref64, lowp=None, dtype=None, *, scale=1.0, msg=""):
    """|actual - ref64| <= 2 * (torch's own low-precision error `lowp - ref64`) + atol, max over elements, for
    float16/bfloat16; float32: <= (rtol + atol) * scale * max(1, max |ref64|). NaN never passes."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    a, r = actual.detach().double(), ref64.detach().double()
    assert a.shape == r.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(r.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{msg}: NaN where the reference has none (or vice versa)"
    a, r = a.nan_to_num(0.0), r.nan_to_num(0.0)
    err = (a - r).abs().max().item() if a.numel() else 0.0
    bound = (atol + rtol) * scale * max(1.0, r.abs().max().item() if r.numel() else 0.0)
    if lowp is not None and dtype != torch.float32:
        bound += 2 * (lowp.detach().double().nan_to_num(0.0) - r).abs().max().item()
    assert err <= bound, f"{msg}: max error {err:.3g} > bound {bound:.3g}"
