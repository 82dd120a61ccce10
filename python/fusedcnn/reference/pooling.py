"""Pooling from first principles: x (N, C, H, W) any floating dtype, NCHW or NHWC -> same format out.

Windows along one spatial dimension of size `n` (the same rule in every backend):
  regular (max/avg):  window i taps  i*stride - pad + j*dilation,  j < kernel
  adaptive:           window i spans [floor(i*n/out), ceil((i+1)*n/out))
Taps outside [0, n) are padding: -inf for max, 0 for average.

Max pooling picks the first maximum in scan order (row-major over the window);
a NaN anywhere in the window wins (the last NaN's index), exactly as PyTorch's
kernels (`val > max || isnan(val)`). Indices are flat `h * W + w` per plane, int64.
Autograd runs through plain tensor ops (unfold views, gather, sums).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedcnn.common import accumulation_dtype, dense_format, pooled_size

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"]


# ---------------------------------------------------------------- geometry (shared by every backend's Python side)


def adaptive_bounds(n: int, out: int) -> tuple[Tensor, Tensor]:
    """(start, end) of each adaptive window along a dimension: int64 tensors of length out."""
    i = torch.arange(out, dtype=torch.int64)
    return (i * n) // out, ((i + 1) * n + out - 1) // out


# ---------------------------------------------------------------- argument checks (PyTorch's order and messages)


# ---------------------------------------------------------------- windows
def _windows(x: Tensor, kernel, stride, pad, dilation, out_hw, fill: float) -> Tensor:
    """(N, C, OH, OW, kH*kW) view of every window, padding filled with `fill` (unfold of a padded copy)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = kernel, stride, pad, dilation, out_hw
    H, W = x.shape[-2:]
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    # right/bottom padding: enough for the last (ceil_mode) window, never negative
    pr_h = max(0, (oh - 1) * sh + span_h - H - ph)
    pr_w = max(0, (ow - 1) * sw + span_w - W - pw)
    xp = F.pad(x, (pw, pr_w, ph, pr_h), value=fill)
    win = xp.unfold(2, span_h, sh).unfold(3, span_w, sw)[:, :, :oh, :ow, ::dh, ::dw]
    return win.reshape(*win.shape[:4], kh * kw)


def _tap_positions(oh: int, ow: int, kernel, stride, pad, dilation, H: int, W: int):
    """Flat index h*W+w of every tap (N-, C-free: (OH, OW, kH*kW)) and whether it lies inside the input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    hh = (torch.arange(oh) * sh - ph)[:, None] + torch.arange(kh)[None, :] * dh  # (OH, kH)
    ww = (torch.arange(ow) * sw - pw)[:, None] + torch.arange(kw)[None, :] * dw  # (OW, kW)
    flat = hh[:, None, :, None] * W + ww[None, :, None, :]                      # (OH, OW, kH, kW)
    inside = ((hh >= 0) & (hh < H))[:, None, :, None] & ((ww >= 0) & (ww < W))[None, :, None, :]
    return flat.reshape(oh, ow, kh * kw), inside.reshape(oh, ow, kh * kw)


def _window_max(vals: Tensor, inside: Tensor, flat: Tensor) -> tuple[Tensor, Tensor]:
    """Max over the last dim with PyTorch's tie and NaN rules; returns (values, flat input indices).

    vals (..., K); inside/flat broadcastable to vals. First maximum among inside taps;
    if the window holds a NaN, the last NaN.
    """
    inside = inside.expand_as(vals)
    masked = vals.masked_fill(~inside, float("-inf"))
    m = masked.detach().amax(-1, keepdim=True)  # NaN if any NaN
    K = vals.shape[-1]
    hit = (masked.detach() == m) & inside
    first_hit = hit.to(torch.uint8).argmax(-1, keepdim=True)  # argmax returns the first maximal position
    isnan = masked.detach().isnan()
    last_nan = (K - 1) - isnan.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
    local = torch.where(isnan.any(-1, keepdim=True), last_nan, first_hit)
    out = vals.gather(-1, local).squeeze(-1)
    idx = flat.expand_as(vals).gather(-1, local).squeeze(-1)
    return out, idx


# ---------------------------------------------------------------- the four layers (arguments already validated)
def max_pool2d(x: Tensor, kernel, stride, pad, dilation, ceil_mode: bool = False, return_indices: bool = False):
    """x: (N, C, H, W). kernel/stride/pad/dilation: (h, w) int pairs."""
    H, W = x.shape[-2:]
    oh = pooled_size(H, kernel[0], stride[0], pad[0], dilation[0], ceil_mode)
    ow = pooled_size(W, kernel[1], stride[1], pad[1], dilation[1], ceil_mode)
    vals = _windows(x, kernel, stride, pad, dilation, (oh, ow), float("-inf"))
    flat, inside = _tap_positions(oh, ow, kernel, stride, pad, dilation, H, W)
    out, idx = _window_max(vals, inside.to(x.device), flat.to(x.device))
    fmt = dense_format(x)
    out = out.contiguous(memory_format=fmt)
    return (out, idx.contiguous(memory_format=fmt)) if return_indices else out


def avg_pool2d(x: Tensor, kernel, stride, pad, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """x: (N, C, H, W). Sum over the window (zero padding) divided by the window's divisor."""
    H, W = x.shape[-2:]
    oh = pooled_size(H, kernel[0], stride[0], pad[0], 1, ceil_mode)
    ow = pooled_size(W, kernel[1], stride[1], pad[1], 1, ceil_mode)
    acc = accumulation_dtype(x.dtype)
    total = _windows(x.to(acc), kernel, stride, pad, (1, 1), (oh, ow), 0.0).sum(-1)
    if divisor_override is not None:
        div = torch.full((oh, ow), float(divisor_override), dtype=acc)
    else:
        def counts(n, k, s, p, o):
            start = torch.arange(o) * s - p
            if count_include_pad:  # padding counts, but not the ceil_mode overhang past it
                return torch.minimum(start + k, torch.tensor(n + p)) - start
            return torch.minimum(start + k, torch.tensor(n)) - start.clamp(min=0)
        div = (counts(H, kernel[0], stride[0], pad[0], oh)[:, None]
               * counts(W, kernel[1], stride[1], pad[1], ow)[None, :]).to(acc)
    return (total / div.to(x.device)).to(x.dtype).contiguous(memory_format=dense_format(x))


def _adaptive_taps(n: int, out: int):
    """Tap positions (out, K) of every adaptive window, clipped into range, and which taps are real."""
    start, end = adaptive_bounds(n, out)
    K = int((end - start).max()) if out > 0 else 1
    pos = start[:, None] + torch.arange(K)[None, :]
    return pos.clamp(max=n - 1), pos < end[:, None]


def _adaptive_windows(x: Tensor, out_hw):
    """(N, C, OH, OW, KH*KW) gathered windows, the flat tap indices and the real-tap mask."""
    H, W = x.shape[-2:]
    hpos, hreal = _adaptive_taps(H, out_hw[0])  # (OH, KH)
    wpos, wreal = _adaptive_taps(W, out_hw[1])  # (OW, KW)
    oh, kh, ow, kw = *hpos.shape, *wpos.shape
    dev = x.device
    vals = x[:, :, hpos.to(dev)[:, None, :, None], wpos.to(dev)[None, :, None, :]]  # (N, C, OH, OW, KH, KW)
    flat = (hpos[:, None, :, None] * W + wpos[None, :, None, :]).reshape(oh, ow, kh * kw)
    real = (hreal[:, None, :, None] & wreal[None, :, None, :]).reshape(oh, ow, kh * kw)
    return vals.reshape(*vals.shape[:4], kh * kw), flat.to(dev), real.to(dev)


def adaptive_avg_pool2d(x: Tensor, output_size) -> Tensor:
    """x: (N, C, H, W); output_size (OH, OW) ints."""
    acc = accumulation_dtype(x.dtype)
    vals, _, real = _adaptive_windows(x.to(acc), output_size)
    total = torch.where(real, vals, 0.0).sum(-1)
    out = total / real.sum(-1).to(acc)
    return out.to(x.dtype).contiguous(memory_format=dense_format(x))


def adaptive_max_pool2d(x: Tensor, output_size, return_indices: bool = False):
    vals, flat, real = _adaptive_windows(x, output_size)
    out, idx = _window_max(vals, real, flat)
    fmt = dense_format(x)
    out = out.contiguous(memory_format=fmt)
    return (out, idx.contiguous(memory_format=fmt)) if return_indices else out
