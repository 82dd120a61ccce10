"""Fused BatchNorm + ReLU (+ MaxPool2d 2x2) and Linear + ReLU + Dropout kernels.

The conv half of the fused Conv2d + BatchNorm2d + ReLU lives in conv.py (conv_bn_relu, conv_bn_relu_backward):
the implicit-GEMM conv kernels with their fusion hooks on. A conv layer writes only its RAW output
y = conv(x) + bias and, while each output tile is still in registers, reduces the per-channel batch statistics of
y. The BatchNorm + ReLU of that layer, a = relu(y * scale + shift) with scale = gamma / sqrt(var + eps),
shift = beta - mean * scale, is never written: the NEXT conv applies it to its input while loading it (normalize
prologue), or the fused BN-ReLU-MaxPool kernel here applies it while pooling, or (last layer) one elementwise pass.

Kernels (all: fp32 arithmetic, float32|float16|bfloat16 tensors; fp64 arithmetic and float64 per-channel vectors
for float64 tensors; any strides — NHWC / channels_last is the fast layout; NCHW works through the same stride
arguments):

  _bn_relu_apply_*       a = relu(y * scale + shift) and its backward (the one pass that stays when
                         no fused consumer follows)
  _bn_relu_pool_*        max_pool2d(relu(y * scale + shift), 2, 2) and its backward
  _linear_kernel         out = dropout(relu(x @ W^T + b)) (Philox mask never stored); also the
                         plain GEMMs of its backward with a "where(out > 0, g / (1-p), 0)" A-prologue

Per-channel gradients (dscale, dshift) are per-tile partials (tiles, C) reduced by one torch sum, not atomics:
the same inputs give the same bits on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import conv
from ._common import (INTERPRET, acc_dtype, acc_zeros, bn_relu, check_device, check_grid, check_int32_index,
                      check_tensor, check_vector, dense_format, device_guard, mma, new_output, pixel_offsets,
                      relu_passes, split_pixels, tile_ids, to_acc)


# ---------------------------------------------------------------------------- BN apply + ReLU (+ pool)
@triton.jit
def _bn_relu_apply_fwd_kernel(Y_ptr, S_ptr, T_ptr, O_ptr, N, C, H, W,
                              syn, syc, syh, syw, son, soc, soh, sow,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y, O: (N, C, H, W) float16|bfloat16|float32, any strides; S, T: (C,) float32. Grid (pixel tiles, C tiles).
    O = relu(Y * S[c] + T[c]). FLOPs 3/elem; bytes |Y| + |O| (the pass that remains when no fused consumer follows)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < N * H * W)[:, None] & c_ok[None, :]
    c64 = offs_c[None, :].to(tl.int64)
    img, h, w = split_pixels(offs_p, H * W, W)
    y = tl.load(Y_ptr + pixel_offsets(img, h, w, syn, syh, syw)[:, None] + c64 * syc, mask=mask, other=0.0)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)
    out = bn_relu(y, s[None, :], t[None, :])
    tl.store(O_ptr + pixel_offsets(img, h, w, son, soh, sow)[:, None] + c64 * soc,
             out.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_apply_bwd_kernel(G_ptr, Y_ptr, S_ptr, T_ptr, DY_ptr, PDS_ptr, PDT_ptr, N, C, H, W,
                              sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """G, Y, DY: (N, C, H, W) float16|bfloat16|float32, any strides; S, T: (C,) float32; PDS, PDT: (p_tiles, C)
    float32. dY = G * [Y*S+T > 0] * S; PDS/PDT partials of dL/dS = sum(G'*Y), dL/dT = sum(G')."""
    pid_p = tl.program_id(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < N * H * W)[:, None] & c_ok[None, :]
    c64 = offs_c[None, :].to(tl.int64)
    img, h, w = split_pixels(offs_p, H * W, W)
    g = tl.load(G_ptr + pixel_offsets(img, h, w, sgn, sgh, sgw)[:, None] + c64 * sgc, mask=mask, other=0.0)
    y = tl.load(Y_ptr + pixel_offsets(img, h, w, syn, syh, syw)[:, None] + c64 * syc, mask=mask, other=0.0)
    y = to_acc(y)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)
    dpre = tl.where(mask & relu_passes(y * s[None, :] + t[None, :]), to_acc(g), 0.0)
    tl.store(DY_ptr + pixel_offsets(img, h, w, sdn, sdh, sdw)[:, None] + c64 * sdc,
             (dpre * s[None, :]).to(DY_ptr.dtype.element_ty), mask=mask)
    part = pid_p.to(tl.int64) * C + offs_c
    tl.store(PDS_ptr + part, tl.sum(dpre * y, axis=0), mask=c_ok)
    tl.store(PDT_ptr + part, tl.sum(dpre, axis=0), mask=c_ok)


@triton.jit
def _bn_relu_pool_fwd_kernel(Y_ptr, S_ptr, T_ptr, O_ptr, N, C, H, W, OH, OW,
                             syn, syc, syh, syw, son, soc, soh, sow,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y: (N, C, H, W) float16|bfloat16|float32, O: (N, C, H//2, W//2) Y's dtype, any strides; S, T: (C,) float32.
    O = max_pool2d(relu(Y*S+T), 2, 2) (floor mode).
    Torch's max rule: a later value wins if greater or NaN. FLOPs ~4*4/out; bytes |Y| + |Y|/4 — versus
    eager's BN pass (|Y| + |A|), ReLU (in place, |A| + |A|) and pool (|A| + |A|/4)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < N * OH * OW)[:, None] & c_ok[None, :]
    ow = offs_p % OW
    oh = (offs_p // OW) % OH
    nb = (offs_p // (OW * OH)).to(tl.int64)
    c64 = offs_c[None, :].to(tl.int64)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    best = acc_zeros((BLOCK_P, BLOCK_C), Y_ptr) - float("inf")
    for k in tl.static_range(4):
        row = nb * syn + (2 * oh + k // 2).to(tl.int64) * syh + (2 * ow + k % 2).to(tl.int64) * syw
        v = bn_relu(tl.load(Y_ptr + row[:, None] + c64 * syc, mask=mask, other=0.0), s, t)
        best = tl.where((v > best) | (v != v), v, best)
    o_row = nb * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(O_ptr + o_row[:, None] + c64 * soc, best.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_pool_bwd_kernel(G_ptr, Y_ptr, S_ptr, T_ptr, DY_ptr, PDS_ptr, PDT_ptr,
                             N, C, H, W, OH, OW, OHC, OWC,
                             sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """G: (N, C, H//2, W//2), Y, DY: (N, C, H, W) float16|bfloat16|float32, any strides; S, T: (C,) float32;
    PDS, PDT: (p_tiles, C) float32. Backward of _bn_relu_pool_fwd_kernel: one program per (ceil-mode windows, channels) tile writes every
    input element exactly once (windows past the floor-mode output, for odd H/W, write zeros).
    The argmax is recomputed from Y (no index tensor stored). dY = G[win] * [argmax] * [pre > 0] * S;
    PDS/PDT (p_tiles, C) partials of dL/dS, dL/dT. Bytes |G| + |Y| + |dY|."""
    pid_p = tl.program_id(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    p_ok = offs_p < N * OHC * OWC
    ow = offs_p % OWC
    oh = (offs_p // OWC) % OHC
    nb = (offs_p // (OWC * OHC)).to(tl.int64)
    c64 = offs_c[None, :].to(tl.int64)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    in_out = p_ok & (oh < OH) & (ow < OW)
    g_row = nb * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
    g = to_acc(tl.load(G_ptr + g_row[:, None] + c64 * sgc, mask=in_out[:, None] & c_ok[None, :], other=0.0))
    best = acc_zeros((BLOCK_P, BLOCK_C), Y_ptr) - float("inf")
    arg = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
    for k in tl.static_range(4):
        row = nb * syn + (2 * oh + k // 2).to(tl.int64) * syh + (2 * ow + k % 2).to(tl.int64) * syw
        m = (in_out[:, None] & c_ok[None, :])
        v = bn_relu(tl.load(Y_ptr + row[:, None] + c64 * syc, mask=m, other=0.0), s, t)
        take = (v > best) | (v != v)
        best = tl.where(take, v, best)
        arg = tl.where(take, k, arg)
    ds = acc_zeros((BLOCK_P, BLOCK_C), Y_ptr)
    dt = acc_zeros((BLOCK_P, BLOCK_C), Y_ptr)
    for k in tl.static_range(4):
        ih = 2 * oh + k // 2
        iw = 2 * ow + k % 2
        m = (p_ok & (ih < H) & (iw < W))[:, None] & c_ok[None, :]
        row = nb * syn + ih.to(tl.int64) * syh + iw.to(tl.int64) * syw
        y = to_acc(tl.load(Y_ptr + row[:, None] + c64 * syc, mask=m, other=0.0))
        dpre = tl.where(m & (arg == k) & relu_passes(y * s + t), g, 0.0)
        d_row = nb * sdn + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
        tl.store(DY_ptr + d_row[:, None] + c64 * sdc, (dpre * s).to(DY_ptr.dtype.element_ty), mask=m)
        ds += dpre * y
        dt += dpre
    part = pid_p.to(tl.int64) * C + offs_c
    tl.store(PDS_ptr + part, tl.sum(ds, axis=0), mask=c_ok)
    tl.store(PDT_ptr + part, tl.sum(dt, axis=0), mask=c_ok)


# ---------------------------------------------------------------------------- Linear + ReLU + dropout
@triton.jit(do_not_specialize=["seed"])
def _linear_kernel(A_ptr, O_ptr, B_ptr, Bias_ptr, C_ptr, M, N, K, seed: tl.uint64, p, a_scale: tl.float64,
                   out_scale: tl.float64,
                   sam, sak, som, sok, sbk, sbn,
                   HAS_BIAS: tl.constexpr, RELU_DROPOUT: tl.constexpr, A_GRAD: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """A: (M, K), O: like A, B: (K, N) float16|bfloat16|float32|float64, any strides; Bias: (N,); C: (M, N)
    contiguous. C = epilogue(prologue(A) @ B); fp32 operands through TF32 or IEEE products per PREC; accumulated in
    fp32 (fp64 for fp64), a_scale and out_scale (float64) rounded once to that dtype.

    Forward (RELU_DROPOUT): C = where(rand(seed, m*N + n) > p, relu(A @ B + bias) * out_scale, 0) with
    out_scale = 1/(1-p); rand is tl.rand's Philox4x32-10 stream at the row-major element index, mask never stored.
    Backward GEMMs (A_GRAD): the A operand is the gradient wrt the pre-activation,
    where(O > 0, A * a_scale, 0), O the forward output with A's strides (O > 0 <=> kept and relu
    active, so the mask need not be regenerated). FLOPs 2*M*N*K; bytes |A| (+|O|) + |B| + |C|.
    """
    pid = tl.program_id(0)
    pid_m, pid_n = tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    acc = acc_zeros((BLOCK_M, BLOCK_N), A_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(A_ptr + m64[:, None] * sam + offs_k[None, :] * sak, mask=a_mask, other=0.0)
        if A_GRAD:
            o = tl.load(O_ptr + m64[:, None] * som + offs_k[None, :] * sok, mask=a_mask, other=0.0)
            a = tl.where(relu_passes(o), to_acc(a) * tl.full((), a_scale, acc.dtype), 0.0).to(A_ptr.dtype.element_ty)
        b = tl.load(B_ptr + offs_k[:, None] * sbk + n64[None, :] * sbn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PREC)
    if HAS_BIAS:
        acc += to_acc(tl.load(Bias_ptr + offs_n, mask=n_ok, other=0.0))[None, :]
    if RELU_DROPOUT:
        acc = tl.where(acc <= 0.0, 0.0, acc)
        keep = tl.rand(seed, (m64[:, None] * N + n64[None, :]).to(tl.uint32)) > p   # index < 2**32: checked
        acc = tl.where(keep, acc * tl.full((), out_scale, acc.dtype), 0.0)
    tl.store(C_ptr + m64[:, None] * N + n64[None, :], acc.to(C_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check_bn_relu_args(y, scale, shift):
    check_tensor(y, "input", ndim=4)
    check_vector(scale, "scale", y.shape[1], acc_dtype(y.dtype))
    check_vector(shift, "shift", y.shape[1], acc_dtype(y.dtype))
    check_device(y, scale, shift)


def _elementwise_tiles(y):
    """(BLOCK_P, BLOCK_C) of the BN-ReLU(-pool) kernels: 64 x 64 (32 values per thread at 4 warps); 32 x 64 for
    float64 (twice the registers per value: the pool forward reached 255 registers at 64 x 64)."""
    if INTERPRET:
        return (64, 16)
    return (32, 64) if y.dtype == torch.float64 else (64, 64)


def _pool_bwd_tiles(y):
    """The pool backward keeps the window's argmax, gradient and both partial sums per value: 32 x 64 tiles (16
    values per thread) fit its registers where 64 x 64 spilled (fp32, NCHW); 16 x 64 for float64 (32 x 64 spilled
    176-424 B)."""
    if INTERPRET:
        return (64, 16)
    return (16, 64) if y.dtype == torch.float64 else (32, 64)


def _check_pixels(count: int, C: int, block_p: int, block_c: int, what: str):
    """The BN-ReLU(-pool) kernels index pixels in int32 and launch (pixel tiles, channel tiles)."""
    check_int32_index(count + block_p, f"{what}: N*H*W pixels")
    grid = (triton.cdiv(count, block_p), triton.cdiv(C, block_c))
    check_grid(grid, what)
    return grid


def bn_relu_apply(y, scale, shift):
    """y: (N, C, H, W) float16|bfloat16|float32|float64, NCHW or NHWC; scale, shift: (C,) float32 (float64 for
    float64 y).
    Returns relu(y * scale[c] + shift[c]) in y's dtype and memory format."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    BP, BC = _elementwise_tiles(y)
    grid = _check_pixels(N * H * W, C, BP, BC, "bn_relu_apply")
    out = new_output(y.shape, y, memory_format=dense_format(y))
    if y.numel():
        with device_guard(y, scale, shift):
            _bn_relu_apply_fwd_kernel[grid](y, scale, shift, out, N, C, H, W, *y.stride(), *out.stride(),
                                            BLOCK_P=BP, BLOCK_C=BC)
    return out


def bn_relu_apply_backward(grad, y, scale, shift):
    """grad, y: (N, C, H, W) float16|bfloat16|float32|float64, NCHW or NHWC; scale, shift: (C,) float32 (float64 for
    float64 y).
    Returns (dy, dscale, dshift) of bn_relu_apply: dy like y, dscale, dshift (C,) float32."""
    _check_bn_relu_args(y, scale, shift)
    check_tensor(grad, "grad_output", ndim=4)
    if grad.shape != y.shape:
        raise ValueError(f"grad_output must have shape {tuple(y.shape)}, got {tuple(grad.shape)}")
    N, C, H, W = y.shape
    BP, BC = _elementwise_tiles(y)
    grid = _check_pixels(N * H * W, C, BP, BC, "bn_relu_apply_backward")
    dy = new_output(y.shape, y, memory_format=dense_format(y))
    pds = new_output((grid[0], C), y, dtype=scale.dtype)
    pdt = new_output((grid[0], C), y, dtype=scale.dtype)
    if y.numel():
        with device_guard(y, grad, scale, shift):
            _bn_relu_apply_bwd_kernel[grid](
                grad, y, scale, shift, dy, pds, pdt, N, C, H, W,
                *grad.stride(), *y.stride(), *dy.stride(), BLOCK_P=BP, BLOCK_C=BC)
    else:
        pds.zero_(), pdt.zero_()
    return dy, pds.sum(0), pdt.sum(0)


def bn_relu_maxpool2d(y, scale, shift):
    """y: (N, C, H, W) float16|bfloat16|float32|float64, NCHW or NHWC, H, W >= 2; scale, shift: (C,) float32
    (float64 for float64 y).
    Returns max_pool2d(relu(y*scale + shift), kernel_size=2, stride=2): (N, C, H//2, W//2), y's dtype and format."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    OH, OW = H // 2, W // 2
    if OH == 0 or OW == 0:
        raise RuntimeError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{OH}x{OW}). "
                           "Output size is too small")
    BP, BC = _elementwise_tiles(y)
    check_int32_index(N * H * W, "bn_relu_maxpool2d: N*H*W pixels")
    grid = _check_pixels(N * OH * OW, C, BP, BC, "bn_relu_maxpool2d")
    out = new_output((N, C, OH, OW), y, memory_format=dense_format(y))
    if out.numel():
        with device_guard(y, scale, shift):
            _bn_relu_pool_fwd_kernel[grid](y, scale, shift, out, N, C, H, W, OH, OW, *y.stride(), *out.stride(),
                                           BLOCK_P=BP, BLOCK_C=BC)
    return out


def bn_relu_maxpool2d_backward(grad, y, scale, shift):
    """grad: (N, C, H//2, W//2), y: (N, C, H, W) float16|bfloat16|float32|float64, NCHW or NHWC; scale, shift:
    (C,) float32 (float64 for float64 y).
    Returns (dy, dscale, dshift) of bn_relu_maxpool2d: dy like y, dscale, dshift (C,) float32."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    OH, OW = H // 2, W // 2
    check_tensor(grad, "grad_output", ndim=4)
    if tuple(grad.shape) != (N, C, OH, OW):
        raise ValueError(f"grad_output must have shape {(N, C, OH, OW)}, got {tuple(grad.shape)}")
    OHC, OWC = (H + 1) // 2, (W + 1) // 2
    BP, BC = _pool_bwd_tiles(y)
    check_int32_index(N * H * W, "bn_relu_maxpool2d_backward: N*H*W pixels")
    grid = _check_pixels(N * OHC * OWC, C, BP, BC, "bn_relu_maxpool2d_backward")
    dy = new_output(y.shape, y, memory_format=dense_format(y))
    pds = new_output((grid[0], C), y, dtype=scale.dtype)
    pdt = new_output((grid[0], C), y, dtype=scale.dtype)
    if y.numel():
        with device_guard(y, grad, scale, shift):
            _bn_relu_pool_bwd_kernel[grid](
                grad, y, scale, shift, dy, pds, pdt, N, C, H, W, OH, OW, OHC, OWC,
                *grad.stride(), *y.stride(), *dy.stride(), BLOCK_P=BP, BLOCK_C=BC)
    else:
        pds.zero_(), pdt.zero_()
    return dy, pds.sum(0), pdt.sum(0)


def _linear_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the Linear GEMMs: TF32 for float32 exactly when torch's matmul would use it
    (torch.backends.cuda.matmul.allow_tf32, as nn.Linear follows; the convs follow cuDNN's flag)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _linear_tiles(n: int, elem_size: int, a_grad: bool, device: torch.device, m: int = 128,
                  prec: str = "tf32") -> triton.Config:
    """The Linear GEMMs' tile: (128 | 64 for M <= 64, a batch) x (128 | 64 for N < 128), BLOCK_K 64 for 16-bit
    operands, 32 for float32 (so an fp32 tile's bytes match a 16-bit one's) and 16 for IEEE float32 (FMA, no
    tensor cores), and the deepest pipeline (4, 3 or 2 stages) whose shared memory fits the device by
    conv.smem_bytes' model (the A_GRAD backward also pipelines the output tile O next to A, and stages the
    transformed A tile). Chosen with `fusedcnn compile-check`: 128-row tiles spilled registers in the
    forward's dropout epilogue at batch 32, and IEEE fp32 at BLOCK_K 32. float64: conv's float64 tile, 64x64x32 at
    8 warps and 3 stages (no spills on sm_80 and sm_90, Triton 3.6 and 3.8, where 64x128x16 spilled 8-32 B)."""
    if INTERPRET:
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)
    if elem_size >= 8:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3)
    limit, cc_major = conv._smem_limit(device)
    bn, warps = (128, 8) if n >= 128 else (64, 4)
    bm = 64 if m <= 64 else 128
    bk = 64 if elem_size <= 2 else (32 if prec == "tf32" else 16)
    for stages in (4, 3, 2):
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        if conv.smem_bytes(cfg, elem_size, cc_major, y_tile=a_grad, staged_a=a_grad, scratch=True) <= limit:
            return cfg
    return triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)


def _gemm(a, b, out, *, o=None, a_scale=1.0, bias=None, seed=0, p=0.0, relu_dropout=False):
    """out (M, N) contiguous = epilogue(prologue(a) @ b); a (M, K), b (K, N), o like a (A_GRAD prologue)."""
    M, K = a.shape
    N = b.shape[1]
    prec = _linear_precision(a.dtype)
    cfg = _linear_tiles(N, a.element_size(), o is not None, a.device, M, prec)
    BM, BN = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    check_grid(grid, "linear_relu_dropout")
    if M and N:
        bias = bias.contiguous() if bias is not None else None   # the epilogue reads bias[n] densely
        with device_guard(a, b, out, o, bias):
            _linear_kernel[grid](
                a, o if o is not None else a, b, bias if bias is not None else b, out, M, N, K,
                seed & (2 ** 64 - 1), p, a_scale, (1.0 / (1.0 - p)) if p < 1 else 0.0,
                a.stride(0), a.stride(1), *(o.stride() if o is not None else a.stride()), b.stride(0), b.stride(1),
                HAS_BIAS=bias is not None, RELU_DROPOUT=relu_dropout, A_GRAD=o is not None,
                PREC=prec, GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **cfg.kwargs)
    return out


def _check_linear_args(x, weight, bias, p):
    check_tensor(x, "input", ndim=2)
    check_tensor(weight, "weight", ndim=2)
    if weight.dtype != x.dtype:  # torch's linear messages and exception types
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {x.dtype} and {weight.dtype}")
    if x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({x.shape[0]}x{x.shape[1]} and "
                         f"{weight.shape[1]}x{weight.shape[0]})")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.numel() != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements, got {bias.numel()}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if x.shape[0] * weight.shape[0] >= 2 ** 32:
        raise ValueError("linear_relu_dropout: the dropout stream is defined for fewer than 2**32 output elements")
    for n, what in ((x.shape[0], "rows"), (weight.shape[0], "output features"), (x.shape[1], "input features")):
        check_int32_index(n, f"linear_relu_dropout: {what}")
    check_device(x, weight, bias)


def linear_relu_dropout(x, weight, bias, p, seed):
    """x: (M, K) float16|bfloat16|float32|float64, any strides; weight: (N, K) x's dtype; bias: (N,) or None;
    p in [0, 1]; seed: 64-bit int. Returns dropout(relu(x @ weight.T + bias), p): (M, N) x's dtype, contiguous,
    with the Philox stream of tl.rand (element index m*N + n)."""
    _check_linear_args(x, weight, bias, p)
    out = new_output((x.shape[0], weight.shape[0]), x)
    return _gemm(x, weight.t(), out, bias=bias, seed=seed, p=p, relu_dropout=True)


def linear_relu_dropout_backward(grad, out, x, weight, p, has_bias):
    """grad, out: (M, N) x's dtype; x: (M, K); weight: (N, K). Returns (dx, dweight, dbias) of
    linear_relu_dropout from its output, dz = where(out > 0, grad/(1-p), 0); dbias empty without has_bias."""
    _check_linear_args(x, weight, None, p)
    check_tensor(grad, "grad_output", ndim=2)
    if grad.shape != out.shape or tuple(out.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_output and output must have shape {(x.shape[0], weight.shape[0])}")
    grad = grad.to(x.dtype)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    dx = _gemm(grad, weight, new_output(x.shape, x), o=out, a_scale=scale)
    dw = _gemm(grad.t(), x, new_output(weight.shape, weight), o=out.t(), a_scale=scale)
    db = (torch.where(out > 0, grad.to(acc_dtype(grad.dtype)), 0.0).sum(0) * scale).to(weight.dtype) if has_bias \
        else x.new_empty((0,))
    return dx, dw, db
