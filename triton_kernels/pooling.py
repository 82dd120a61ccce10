"""Pooling kernels. x: (N, C, H, W) float32|float64|float16|bfloat16, NCHW or NHWC (any strides, no copies);
float32 accumulation (float64 for float64); int64 offsets. Outputs follow x's memory format.

Window geometry (the same in csrc/pooling/pooling.h): along a dimension of size `in` with `out`
windows, window i spans start(i) = (i*A)//B - pad .. end(i) = ((i+1)*A + B-1)//B - pad + extra
(exclusive), taps start + j*dil for j < taps:
  regular (kernel k, stride s, pad p, dilation d): A=s, B=1, extra=(k-1)*d+1-s, taps=k
  adaptive: A=in, B=out, pad=0, dil=1, extra=0  ->  [floor(i*in/out), ceil((i+1)*in/out))
The windows holding input position h are first(h) + 0..ncand-1, first(h) = max(0, ((h+pad-extra)*B)//A),
filtered by `start <= h < end and (h-start) % dil == 0`.

Layouts: NHWC tiles are [BLOCK_P positions (n, oh, ow)] x [BLOCK_C channels], the channel axis
contiguous (vector loads over C); NCHW tiles are [BLOCK_P outputs (n, c, oh, ow)] x [1], the ow
axis contiguous.

Max-pool backward recomputes the argmax from x instead of saving indices. Bytes per output of the
VGG 2x2/stride-2 pool in bf16 (x: 4 elements = 8 B): forward reads 8, writes 2 (saving indices
would add 8 B of int64: 18 instead of 10, +80%); backward reads x 8 + grad_out 2 and writes
grad_in 8 = 18 B either way (the 8 B of indices it would read instead of x are the same count), and
the tensor kept alive for backward is x (2 B per input element) instead of the indices (same 2 B per
input element). So recompute moves 28 B per output over forward+backward against 36 B with indices
(fp32: 56 B both ways). Indices are written only when the caller asks (return_indices).
Adaptive max pooling saves its indices instead: its windows are large (global pooling: the whole
plane), so recomputing an argmax per input element would cost a window per element, while the
indices are tiny (one per window).

Backward is a gather: each program owns input elements and sums the gradients of the windows that
hold them (recomputed argmax == this element for max; grad/divisor for average). Overlapping windows
(stride < kernel) add up without atomics, deterministic, and every grad_in element is written once
(no zero-fill pass).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fusedcnn.common import adaptive_geometry, pooled_size, regular_geometry

from ._common import acc_zeros, check_grid, check_tensor, dense_format, device_guard, new_output, to_acc


class Dim(NamedTuple):
    """Window geometry along one spatial dimension (module docstring)."""
    size: int
    out: int
    A: int
    B: int
    pad: int
    dil: int
    extra: int
    taps: int
    ncand: int


def regular_dim(size, k, s, p, d, ceil_mode) -> Dim:
    span = (k - 1) * d + 1
    return Dim(size, pooled_size(size, k, s, p, d, ceil_mode), s, 1, p, d, span - s, k, -(-span // s))


def adaptive_dim(size, out) -> Dim:
    taps = min(size, -(-size // out) + 1) if out > 0 else 1
    ncand = min(out, -(-out // size) + 1) if out > 0 else 1
    return Dim(size, out, size, max(out, 1), 0, 1, 0, taps, ncand)


# ---------------------------------------------------------------- shared device helpers
@triton.jit
def _bounds(i, A, B, pad, extra, size):
    """[start, end) of window i, end clipped to the input (start may be negative: padding)."""
    start = (i * A) // B - pad
    end = ((i + 1) * A + B - 1) // B - pad + extra
    return start, tl.minimum(end, size)


@triton.jit
def _tile(P, C, OH, OW, CHANNELS_INNER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Positions of this program's tile: (n, oh, ow) per row, channel per element, and the mask."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    ow = p % OW
    t = p // OW
    oh = t % OH
    t = t // OH
    if CHANNELS_INNER:  # rows are (n, oh, ow); channels along the tile's second axis
        n = t
        c = (tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64))[None, :] + 0 * p[:, None]
    else:  # rows are (n, c, oh, ow); BLOCK_C == 1
        n = t // C
        c = (t % C)[:, None] + tl.arange(0, BLOCK_C).to(tl.int64)[None, :]
    mask = (p < P)[:, None] & (c < C)
    return n, c, oh, ow, mask


@triton.jit
def _window_max(X, base, mask, hs, he, ws, we, dil_h, dil_w, sxh, sxw, W,
                TAPS_H: tl.constexpr, TAPS_W: tl.constexpr):
    """Max over each row's window with PyTorch's rule: first maximum in scan order, any NaN wins
    (the last NaN). base/mask: [BLOCK_P, BLOCK_C]; hs..we: [BLOCK_P]. Returns (value, flat index), the value in
    float32 (float64 for float64 X)."""
    acc = acc_zeros(base.shape, X) - float("inf")
    best = tl.full(base.shape, -1, tl.int64)
    for j in range(TAPS_H):
        ih = hs + j * dil_h
        ok_h = (ih >= 0) & (ih < he)
        for k in range(TAPS_W):
            iw = ws + k * dil_w
            ok = mask & (ok_h & (iw >= 0) & (iw < we))[:, None]
            v = to_acc(tl.load(X + base + (ih * sxh + iw * sxw)[:, None], mask=ok, other=float("-inf")))
            take = ok & ((best < 0) | (v > acc) | (v != v))
            acc = tl.where(take, v, acc)
            best = tl.where(take, (ih * W + iw)[:, None], best)
    return acc, best


@triton.jit
def _divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor, like,
             TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, COUNT_PAD: tl.constexpr):
    """Average pooling's divisor per row (PyTorch's rule), in like's dtype; he/we already clipped to the input."""
    if COUNT_PAD:  # the window clipped to the padded input, not to the ceil_mode overhang
        cnt = (tl.minimum(hs + TAPS_H, H + pad_h) - hs) * (tl.minimum(ws + TAPS_W, W + pad_w) - ws)
    else:
        cnt = (he - tl.maximum(hs, 0)) * (we - tl.maximum(ws, 0))
    # (max(.., 1): lanes outside any window compute a count of 0; their gradient is 0 anyway)
    return tl.where(divisor > 0, divisor, tl.maximum(cnt, 1)).to(like.dtype)


# ---------------------------------------------------------------- forward
@triton.jit
def _pool_fwd_kernel(X_ptr, Y_ptr, I_ptr, P, C, H, W, OH, OW,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                     Ah, Bh, pad_h, dil_h, ext_h, Aw, Bw, pad_w, dil_w, ext_w, divisor,
                     TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, IS_MAX: tl.constexpr, COUNT_PAD: tl.constexpr,
                     WRITE_IDX: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """x (N, C, H, W) -> y (N, C, OH, OW) [+ int64 indices]. P = N*OH*OW (NHWC) or N*C*OH*OW (NCHW)."""
    n, c, oh, ow, mask = _tile(P, C, OH, OW, CHANNELS_INNER, BLOCK_P, BLOCK_C)
    hs, he = _bounds(oh, Ah, Bh, pad_h, ext_h, H)
    ws, we = _bounds(ow, Aw, Bw, pad_w, ext_w, W)
    xbase = (n * sxn)[:, None] + c * sxc
    if IS_MAX:
        acc, best = _window_max(X_ptr, xbase, mask, hs, he, ws, we, dil_h, dil_w, sxh, sxw, W, TAPS_H, TAPS_W)
    else:  # average: dilation is 1
        acc = acc_zeros(xbase.shape, X_ptr)
        for j in range(TAPS_H):
            ih = hs + j
            for k in range(TAPS_W):
                iw = ws + k
                ok = mask & ((ih >= 0) & (ih < he) & (iw >= 0) & (iw < we))[:, None]
                acc += to_acc(tl.load(X_ptr + xbase + (ih * sxh + iw * sxw)[:, None], mask=ok, other=0.0))
        acc = acc / _divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor, acc, TAPS_H, TAPS_W, COUNT_PAD)[:, None]
    yoff = (n * syn + oh * syh + ow * syw)[:, None] + c * syc
    tl.store(Y_ptr + yoff, acc.to(Y_ptr.dtype.element_ty), mask=mask)
    if WRITE_IDX:  # indices share y's shape and strides
        tl.store(I_ptr + yoff, best, mask=mask)


@triton.jit
def _global_pool_kernel(X_ptr, Y_ptr, I_ptr, R, C, HW, sxn, sxc, syn, syc,
                        IS_MAX: tl.constexpr, WRITE_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Global (1x1) pooling of NCHW planes, each plane dense: x (N, C, H*W) -> y (N, C, 1, 1).

    Each row keeps BLOCK_HW running lanes (lane l sees plane elements l, l+BLOCK_HW, ... in order,
    so a lane's first max / last NaN is the plane's within that lane), then the lanes are merged:
    any NaN -> the largest NaN index, else the smallest index holding the maximum.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = r < R
    base = ((r // C) * sxn + (r % C) * sxc)[:, None]
    if IS_MAX:
        acc = acc_zeros((BLOCK_R, BLOCK_HW), X_ptr) - float("inf")
        best = tl.full((BLOCK_R, BLOCK_HW), -1, tl.int64)
    else:
        acc = acc_zeros((BLOCK_R, BLOCK_HW), X_ptr)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW).to(tl.int64)
        m = rmask[:, None] & (hw < HW)[None, :]
        if IS_MAX:
            v = to_acc(tl.load(X_ptr + base + hw[None, :], mask=m, other=float("-inf")))
            take = m & ((best < 0) | (v > acc) | (v != v))
            acc = tl.where(take, v, acc)
            best = tl.where(take, hw[None, :], best)
        else:
            acc += to_acc(tl.load(X_ptr + base + hw[None, :], mask=m, other=0.0))
    yoff = (r // C) * syn + (r % C) * syc
    if IS_MAX:
        isnan = acc != acc
        has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
        nan_idx = tl.max(tl.where(isnan, best, -1), axis=1)
        top = tl.max(tl.where(isnan, float("-inf"), acc), axis=1)
        first = tl.min(tl.where((acc == top[:, None]) & (best >= 0), best, HW), axis=1)
        tl.store(Y_ptr + yoff, tl.where(has_nan, float("nan"), top).to(Y_ptr.dtype.element_ty), mask=rmask)
        if WRITE_IDX:
            tl.store(I_ptr + yoff, tl.where(has_nan, nan_idx, first), mask=rmask)
    else:
        tl.store(Y_ptr + yoff, (tl.sum(acc, axis=1) / HW).to(Y_ptr.dtype.element_ty), mask=rmask)


# ---------------------------------------------------------------- backward (gather)
@triton.jit
def _pool_bwd_kernel(G_ptr, X_ptr, I_ptr, DX_ptr, P, C, H, W, OH, OW,
                     sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sin, sic, sih, siw, sdn, sdc, sdh, sdw,
                     Ah, Bh, pad_h, dil_h, ext_h, Aw, Bw, pad_w, dil_w, ext_w, divisor,
                     TAPS_H: tl.constexpr, TAPS_W: tl.constexpr, NC_H: tl.constexpr, NC_W: tl.constexpr,
                     MODE: tl.constexpr, COUNT_PAD: tl.constexpr, CHANNELS_INNER: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_out (N, C, OH, OW) -> grad_in (N, C, H, W). MODE 0: max, argmax recomputed from x;
    1: average; 2: max from saved indices (adaptive). The tile runs over input positions."""
    n, c, ih, iw, mask = _tile(P, C, H, W, CHANNELS_INNER, BLOCK_P, BLOCK_C)
    flat = (ih * W + iw)[:, None]
    gbase = (n * sgn)[:, None] + c * sgc
    oh0 = tl.maximum(((ih + pad_h - ext_h) * Bh) // Ah, 0)
    ow0 = tl.maximum(((iw + pad_w - ext_w) * Bw) // Aw, 0)
    acc = acc_zeros(gbase.shape, G_ptr)
    for a in range(NC_H):
        oh = oh0 + a
        hs, he = _bounds(oh, Ah, Bh, pad_h, ext_h, H)
        in_h = (oh < OH) & (ih >= hs) & (ih < he) & ((ih - hs) % dil_h == 0)
        for b in range(NC_W):
            ow = ow0 + b
            ws, we = _bounds(ow, Aw, Bw, pad_w, ext_w, W)
            ok = mask & (in_h & (ow < OW) & (iw >= ws) & (iw < we) & ((iw - ws) % dil_w == 0))[:, None]
            g = to_acc(tl.load(G_ptr + gbase + (oh * sgh + ow * sgw)[:, None], mask=ok, other=0.0))
            if MODE == 1:
                acc += g / _divisor(hs, he, ws, we, H, W, pad_h, pad_w, divisor, g, TAPS_H, TAPS_W,
                                    COUNT_PAD)[:, None]
            elif MODE == 2:
                idx = tl.load(I_ptr + (n * sin + oh * sih + ow * siw)[:, None] + c * sic, mask=ok, other=-1)
                acc += tl.where(idx == flat, g, 0.0)
            else:
                xbase = (n * sxn)[:, None] + c * sxc
                _, best = _window_max(X_ptr, xbase, ok, hs, he, ws, we, dil_h, dil_w, sxh, sxw, W, TAPS_H, TAPS_W)
                acc += tl.where(best == flat, g, 0.0)
    doff = (n * sdn + ih * sdh + iw * sdw)[:, None] + c * sdc
    tl.store(DX_ptr + doff, acc.to(DX_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers
def _channels_inner(t: torch.Tensor) -> bool:
    return t.shape[1] > 1 and t.stride(1) == 1


# Elements per program (NHWC; NCHW: half) and warps of the windowed kernels; `fusedcnn compile-check`: no spills
# at VGG16's shapes with 4 warps (8 warps spilled 4 B in the NCHW max-pool backward on sm_80). float64: half as
# many (its max-pool backward spilled 84-376 B at 2048).
_ELEMS, _WARPS = 2048, 4


def _blocks(channels_inner: bool, C: int, dtype: torch.dtype):
    elems = _ELEMS // 2 if dtype == torch.float64 else _ELEMS
    if channels_inner:  # a 16-byte+ vector of channels per row
        block_c = min(64, triton.next_power_of_2(C))
        return max(1, elems // block_c), block_c
    return elems // 2, 1


def _check_x(x: torch.Tensor, name: str = "x"):
    check_tensor(x, name, ndim=4)
    if x.numel() and x.shape[1:].numel() == 0:
        raise ValueError(f"{name} must have non-empty C, H, W, got shape {tuple(x.shape)}")


def _launch_forward(x: torch.Tensor, dh: Dim, dw: Dim, *, is_max: bool, want_idx: bool = False,
                    count_pad: bool = False, divisor: int = 0):
    N, C, H, W = x.shape
    fmt = dense_format(x)
    y = new_output((N, C, dh.out, dw.out), x, memory_format=fmt)
    idx = (torch.empty((N, C, dh.out, dw.out), dtype=torch.int64, device=x.device, memory_format=fmt) if want_idx
           else torch.empty((0,), dtype=torch.int64, device=x.device))
    if y.numel() == 0:
        return y, idx
    # One window covering the whole plane (adaptive 1x1, or a regular window of the plane's size).
    whole = all(d.out == 1 and d.B == 1 and d.A == d.size and d.pad == 0 and d.extra == 0 and d.dil == 1
                for d in (dh, dw))
    if whole and x.stride(3) == 1 and x.stride(2) == W and not _channels_inner(x):
        # Global pooling of dense NCHW planes: one row per plane, H*W reduced in vector chunks.
        block_hw = min(1024, triton.next_power_of_2(H * W))
        block_r = max(1, 2048 // block_hw)
        check_grid((triton.cdiv(N * C, block_r),), "global pooling")
        with device_guard(x):
            _global_pool_kernel[(triton.cdiv(N * C, block_r),)](
                x, y, idx if want_idx else y, N * C, C, H * W, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                IS_MAX=is_max, WRITE_IDX=want_idx, BLOCK_R=block_r, BLOCK_HW=block_hw)
        return y, idx
    inner = _channels_inner(x)
    block_p, block_c = _blocks(inner, C, x.dtype)
    P = N * dh.out * dw.out * (1 if inner else C)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c) if inner else 1)
    check_grid(grid, "pooling")
    with device_guard(x):
        _pool_fwd_kernel[grid](
            x, y, idx if want_idx else y, P, C, H, W, dh.out, dw.out, *x.stride(), *y.stride(),
            dh.A, dh.B, dh.pad, dh.dil, dh.extra, dw.A, dw.B, dw.pad, dw.dil, dw.extra, divisor,
            TAPS_H=dh.taps, TAPS_W=dw.taps, IS_MAX=is_max, COUNT_PAD=count_pad, WRITE_IDX=want_idx,
            CHANNELS_INNER=inner, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_WARPS)
    return y, idx


def _launch_backward(grad_out: torch.Tensor, input_size, dh: Dim, dw: Dim, *, mode: int, x=None, idx=None,
                     count_pad: bool = False, divisor: int = 0):
    check_tensor(grad_out, "grad_out", ndim=4)
    N, C, H, W = input_size
    if tuple(grad_out.shape) != (N, C, dh.out, dw.out):
        raise ValueError(f"grad_out must have shape {(N, C, dh.out, dw.out)}, got {tuple(grad_out.shape)}")
    dx = new_output((N, C, H, W), grad_out, memory_format=dense_format(grad_out))
    if dx.numel() == 0:
        return dx
    inner = _channels_inner(dx)
    block_p, block_c = _blocks(inner, C, grad_out.dtype)
    P = N * H * W * (1 if inner else C)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c) if inner else 1)
    xs = x if x is not None else grad_out
    it = idx if idx is not None else grad_out
    check_grid(grid, "pooling backward")
    with device_guard(grad_out, x, idx):
        _pool_bwd_kernel[grid](
            grad_out, xs, it, dx, P, C, H, W, dh.out, dw.out,
            *grad_out.stride(), *xs.stride(), *it.stride(), *dx.stride(),
            dh.A, dh.B, dh.pad, dh.dil, dh.extra, dw.A, dw.B, dw.pad, dw.dil, dw.extra, divisor,
            TAPS_H=dh.taps, TAPS_W=dw.taps, NC_H=dh.ncand, NC_W=dw.ncand, MODE=mode, COUNT_PAD=count_pad,
            CHANNELS_INNER=inner, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_WARPS)
    return dx


def _regular_dims(fn, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Checks (PyTorch's messages) and per-dimension geometry of regular windows."""
    k, s, p, d, _ = regular_geometry(fn, x, kernel_size, stride, padding, dilation, ceil_mode)
    return (regular_dim(x.shape[2], k[0], s[0], p[0], d[0], ceil_mode),
            regular_dim(x.shape[3], k[1], s[1], p[1], d[1], ceil_mode))


def _shape_only(input_size, like: torch.Tensor) -> torch.Tensor:
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W), got {list(input_size)}")
    return torch.empty(input_size, device="meta", dtype=like.dtype)


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    _check_x(x)
    dh, dw = _regular_dims("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    return _launch_forward(x, dh, dw, is_max=True, want_idx=return_indices)


def max_pool2d_backward(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode):
    _check_x(x)
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError("grad_out and x must share a dtype and a device")
    dh, dw = _regular_dims("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    return _launch_backward(grad_out, x.shape, dh, dw, mode=0, x=x)


def _avg_args(divisor_override):
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError("divisor must be not zero")
    return divisor_override or 0


def avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _check_x(x)
    div = _avg_args(divisor_override)
    dh, dw = _regular_dims("avg_pool2d", x, kernel_size, stride, padding, 1, ceil_mode)
    return _launch_forward(x, dh, dw, is_max=False, count_pad=count_include_pad, divisor=div)[0]


def avg_pool2d_backward(grad_out, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
    div = _avg_args(divisor_override)
    dh, dw = _regular_dims("avg_pool2d", _shape_only(input_size, grad_out), kernel_size, stride, padding, 1,
                           ceil_mode)
    return _launch_backward(grad_out, input_size, dh, dw, mode=1, count_pad=count_include_pad, divisor=div)


def _adaptive_dims(fn, x, output_size):
    oh, ow = adaptive_geometry(fn, x, output_size)
    return adaptive_dim(x.shape[2], oh), adaptive_dim(x.shape[3], ow)


def adaptive_avg_pool2d(x, output_size):
    _check_x(x)
    dh, dw = _adaptive_dims("adaptive_avg_pool2d", x, output_size)
    return _launch_forward(x, dh, dw, is_max=False)[0]


def adaptive_avg_pool2d_backward(grad_out, input_size):
    check_tensor(grad_out, "grad_out", ndim=4)
    dh, dw = _adaptive_dims("adaptive_avg_pool2d", _shape_only(input_size, grad_out), grad_out.shape[2:])
    return _launch_backward(grad_out, input_size, dh, dw, mode=1)


def adaptive_max_pool2d(x, output_size):
    _check_x(x)
    dh, dw = _adaptive_dims("adaptive_max_pool2d", x, output_size)
    return _launch_forward(x, dh, dw, is_max=True, want_idx=True)


def adaptive_max_pool2d_backward(grad_out, indices, input_size):
    check_tensor(grad_out, "grad_out", ndim=4)
    check_tensor(indices, "indices", ndim=4, dtypes=(torch.int64,))
    if indices.shape != grad_out.shape or indices.device != grad_out.device:
        raise ValueError(f"indices must match grad_out's shape and device, got {tuple(indices.shape)}")
    dh, dw = _adaptive_dims("adaptive_max_pool2d", _shape_only(input_size, grad_out), grad_out.shape[2:])
    # A saved index outside the plane would be silently ignored (never an out-of-bounds access):
    # the comparison only matches in-plane positions.
    return _launch_backward(grad_out, input_size, dh, dw, mode=2, idx=indices)
