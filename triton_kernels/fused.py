"""Fused Conv2d + BatchNorm2d + ReLU (+ MaxPool2d) and Linear + ReLU + Dropout kernels.

The idea (cuDNN's runtime-fusion "conv + stats epilogue, scale-bias-ReLU prologue"):
a conv layer writes only its RAW output y = conv(x) + bias, and while each output tile is still in
registers it reduces the per-channel batch statistics of y. The BatchNorm + ReLU of that layer,
a = relu(y * scale + shift) with scale = gamma / sqrt(var + eps), shift = beta - mean * scale,
is never written: the NEXT conv applies it to its input while loading it (normalize prologue),
or the fused BN-ReLU-MaxPool kernel applies it while pooling, or (last layer) one elementwise pass.

Kernels (all: fp32 accumulation, float32|float16|bfloat16 tensors, any strides — NHWC / channels_last
is the fast layout because channels are the contiguous GEMM K / N dimension; NCHW works through the
same stride arguments, slower):

  _conv_fwd_kernel       y = conv(prologue(x)) + bias; optional stats epilogue (per-tile partials)
  _conv_dgrad_kernel     dx = prologue'(conv_transpose(gradprologue(g)));   + d scale/d shift partials
  _conv_wgrad_kernel     dW = gradprologue(g)^T (x) prologue(x) (split-K partials), + dbias partials
  _bn_relu_apply_*       a = relu(y * scale + shift) and its backward (the one pass that stays when
                         no fused consumer follows)
  _bn_relu_pool_*        max_pool2d(relu(y * scale + shift), 2, 2) and its backward
  _linear_kernel         out = dropout(relu(x @ W^T + b)) (Philox mask never stored); also the
                         plain GEMMs of its backward with a "where(out > 0, g / (1-p), 0)" A-prologue

Statistics: per-tile partials + a tiny combine (not atomics). Each output tile of BLOCK_M rows writes
its channel sums and its CENTRED sum of squares M2 = sum((y - tile_mean)^2) to a (tiles, C) fp32
buffer; the combine (Chan et al.'s parallel variance) runs over that buffer (~1/(2*BLOCK_M) of the
bytes of y). Why not atomics into (C,): the result would depend on the order the tiles finish
(non-deterministic low bits from run to run), and sum/sum-of-squares in fp32 cancels catastrophically
when |mean| >> std; centred per-tile M2 is both deterministic and stable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import check_tensor, new_output

# ---------------------------------------------------------------------------- tile choices
# Interpreter (CPU tests): the smallest tiles tl.dot takes, so programs stay cheap.
# GPU: tiles sized like Triton's fast GEMMs (128x128x64 bf16, 8 warps, 3-4 stages); to be autotuned on H100.


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _gemm_tiles(t: torch.Tensor, n: int, k: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM with N columns and K-chunks of width k."""
    if _interpreted(t):
        return 64, 16, 16, 1, 1  # few, wide programs: the interpreter's cost is per program-step
    bn = 128 if n >= 128 else 64
    bk = 64 if k >= 64 else (32 if k >= 32 else 16)
    if t.element_size() == 4:  # fp32 (tf32 dot): halve the K step so 3 stages fit in shared memory
        bk = min(bk, 32)
    return 128, bn, bk, 8 if bn == 128 else 4, 3


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped (super-tile) order: GROUP_M row tiles share one column sweep, so B stays in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


# The interpreter's tl.dot mis-reads bfloat16 operands (Triton 3.8): there, operands are widened to fp32 first
# (exact: a product of two 16-bit floats fits fp32, which is also what the tensor cores accumulate in).
_WIDEN_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mma(a, b, acc):
    """acc + a @ b with fp32 accumulation."""
    if _WIDEN_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _relu_passes(pre):
    """Where ReLU's backward lets the gradient through: not (pre <= 0), so NaN passes, as torch's threshold_backward."""
    return (pre > 0.0) | (pre != pre)


@triton.jit
def _bn_relu(v, s, t):
    """relu(v * s + t) in fp32; NaN propagates as in torch.relu."""
    pre = v.to(tl.float32) * s + t
    return tl.where(pre <= 0.0, 0.0, pre)


# ---------------------------------------------------------------------------- conv forward
@triton.jit
def _conv_fwd_kernel(
    X_ptr, W_ptr, B_ptr, S_ptr, T_ptr, Y_ptr, PSUM_ptr, PM2_ptr,
    N, C_in, H, W, C_out, OH, OW,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Implicit-GEMM conv: rows m = (n, oh, ow) (M = N*OH*OW), columns = C_out, K = KH*KW*C_in.

    X: (N, C_in, H, W) any strides; W: (KH*KW*C_in, C_out) contiguous (pre-permuted); B, S, T: fp32;
    Y: (N, C_out, OH, OW) any strides. PROLOGUE: X is a RAW conv output and the operand is
    relu(X * S[c] + T[c]) (zero padding applies to that operand). STATS: PSUM/PM2 (tiles_m, C_out) fp32
    get the tile's channel sums and centred sums of squares of the stored (rounded) y.
    FLOPs 2*M*C_out*K; bytes (ideal) = |X| + |W| + |Y| + 8*tiles_m*C_out — the BN statistics pass
    (read |Y|) and the normalize pass (read |Y| + write |A|) of eager BatchNorm are gone.
    """
    pid = tl.program_id(0)
    M = N * OH * OW
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    nb = (offs_m // (OW * OH)).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat K loop over (tap r, channel block) so Triton software-pipelines every step (a nested
    # r / channel loop would leave a 1-iteration inner loop for C_in <= BLOCK_K, i.e. no pipelining).
    num_c = tl.cdiv(C_in, BLOCK_K)
    for kk in range(KH * KW * num_c):
        r = kk // num_c
        offs_k = (kk % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)
        ih = ih0 + (r // KW) * dil_h
        iw = iw0 + (r % KW) * dil_w
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = nb * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        k_ok = offs_k < C_in
        a_mask = ok[:, None] & k_ok[None, :]
        a = tl.load(X_ptr + row[:, None] + offs_k[None, :].to(tl.int64) * sxc, mask=a_mask, other=0.0)
        if PROLOGUE:
            s = tl.load(S_ptr + offs_k, mask=k_ok, other=0.0)
            t = tl.load(T_ptr + offs_k, mask=k_ok, other=0.0)
            a = tl.where(a_mask, _bn_relu(a, s[None, :], t[None, :]), 0.0).to(X_ptr.dtype.element_ty)
        w_rows = (r * C_in + offs_k).to(tl.int64) * C_out
        b = tl.load(W_ptr + w_rows[:, None] + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc)

    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = acc.to(Y_ptr.dtype.element_ty)
    y_row = nb * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(Y_ptr + y_row[:, None] + offs_n[None, :].to(tl.int64) * syc, y, mask=m_ok[:, None] & n_ok[None, :])
    if STATS:
        # statistics of the value BatchNorm will read (y as stored, i.e. rounded to Y's dtype)
        v = tl.where(m_ok[:, None], y.to(tl.float32), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_sum = tl.sum(v, axis=0)
        d = tl.where(m_ok[:, None], v - (tile_sum / count)[None, :], 0.0)
        part = pid_m.to(tl.int64) * C_out + offs_n
        tl.store(PSUM_ptr + part, tile_sum, mask=n_ok)
        tl.store(PM2_ptr + part, tl.sum(d * d, axis=0), mask=n_ok)


# ---------------------------------------------------------------------------- conv backward: dgrad
@triton.jit
def _conv_dgrad_kernel(
    G_ptr, Y_ptr, GA_ptr, GB_ptr, W_ptr, X_ptr, S_ptr, T_ptr, DX_ptr, PDS_ptr, PDT_ptr,
    N, C_in, H, W, C_out, OH, OW,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, GRAD_AFFINE: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dgrad as an implicit GEMM: rows m = (n, ih, iw) (M = N*H*W), columns = C_in, K = KH*KW*C_out.

    G, Y: (N, C_out, OH, OW) any strides (Y = this conv's raw output); W: (KH*KW*C_out, C_in) contiguous;
    X: (N, C_in, H, W) the conv's input; DX like X. GA, GB, S, T: fp32.
    GRAD_AFFINE (BatchNorm-statistics backward folded into the grad load): the operand is
      g' = g + GA[co] * y + GB[co],  GA = 2*dL/dvar / M_out, GB = dL/dmean / M_out - GA * mean,
    i.e. the gradient that flows into y through the batch mean and variance of y.
    PROLOGUE (the forward normalized its input, a = relu(x*S+T)): the epilogue turns dL/da into
    dL/dx = dL/da * [x*S+T > 0] * S and reduces PDS/PDT (tiles_m, C_in) partials of dL/dS, dL/dT.
    FLOPs 2*N*H*W*C_in*K (stride 1); bytes |G| + |Y| (GRAD_AFFINE) + |W| + |X| (PROLOGUE) + |DX|: the
    BN-backward elementwise pass (read g, y, a; write g') and the ReLU-backward pass are gone.
    """
    pid = tl.program_id(0)
    M = N * H * W
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_in, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_in
    iw = offs_m % W
    ih = (offs_m // W) % H
    nb = (offs_m // (W * H)).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_c = tl.cdiv(C_out, BLOCK_K)
    for kk in range(KH * KW * num_c):  # flat K loop over (tap r, C_out block), as in the forward
        r = kk // num_c
        offs_k = (kk % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)
        # the output pixel that reads input pixel (ih, iw) through kernel tap r, if any
        oh_num = ih + pad_h - (r // KW) * dil_h
        ow_num = iw + pad_w - (r % KW) * dil_w
        ok = m_ok & (oh_num >= 0) & (ow_num >= 0) & (oh_num % stride_h == 0) & (ow_num % stride_w == 0)
        oh = tl.where(ok, oh_num // stride_h, 0)
        ow = tl.where(ok, ow_num // stride_w, 0)
        ok = ok & (oh < OH) & (ow < OW)
        g_row = nb * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        k_ok = offs_k < C_out
        g_mask = ok[:, None] & k_ok[None, :]
        g = tl.load(G_ptr + g_row[:, None] + offs_k[None, :].to(tl.int64) * sgc, mask=g_mask, other=0.0)
        if GRAD_AFFINE:
            y_row = nb * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
            yv = tl.load(Y_ptr + y_row[:, None] + offs_k[None, :].to(tl.int64) * syc, mask=g_mask, other=0.0)
            ga = tl.load(GA_ptr + offs_k, mask=k_ok, other=0.0)
            gb = tl.load(GB_ptr + offs_k, mask=k_ok, other=0.0)
            gf = g.to(tl.float32) + ga[None, :] * yv.to(tl.float32) + gb[None, :]
            g = tl.where(g_mask, gf, 0.0).to(G_ptr.dtype.element_ty)
        w_rows = (r * C_out + offs_k).to(tl.int64) * C_in
        b = tl.load(W_ptr + w_rows[:, None] + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(g, b, acc)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if PROLOGUE:
        x_row = nb * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        x = tl.load(X_ptr + x_row[:, None] + offs_n[None, :].to(tl.int64) * sxc, mask=out_mask, other=0.0)
        x = x.to(tl.float32)
        s = tl.load(S_ptr + offs_n, mask=n_ok, other=0.0)
        t = tl.load(T_ptr + offs_n, mask=n_ok, other=0.0)
        dpre = tl.where(out_mask & _relu_passes(x * s[None, :] + t[None, :]), acc, 0.0)  # through the ReLU
        acc = dpre * s[None, :]
        part = pid_m.to(tl.int64) * C_in + offs_n
        tl.store(PDS_ptr + part, tl.sum(dpre * x, axis=0), mask=n_ok)
        tl.store(PDT_ptr + part, tl.sum(dpre, axis=0), mask=n_ok)
    d_row = nb * sdn + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
    tl.store(DX_ptr + d_row[:, None] + offs_n[None, :].to(tl.int64) * sdc, acc.to(DX_ptr.dtype.element_ty),
             mask=out_mask)


# ---------------------------------------------------------------------------- conv backward: wgrad
@triton.jit
def _conv_wgrad_kernel(
    G_ptr, Y_ptr, GA_ptr, GB_ptr, X_ptr, S_ptr, T_ptr, PDW_ptr, PDB_ptr,
    N, C_in, H, W, C_out, OH, OW, pix_per_split,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, GRAD_AFFINE: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """wgrad as a split-K GEMM: rows = C_out, columns = (tap r, C_in), K = output pixels (N*OH*OW).

    Grid (co_tiles * KH*KW * ci_tiles, SPLIT_K); split k reduces pixels [k*pix_per_split, (k+1)*...)
    (pix_per_split a multiple of BLOCK_K) into PDW (SPLIT_K, C_out, C_in, KH, KW) fp32 partials; the
    programs of tap 0 / first C_in tile also reduce the grad operand's row sums into PDB (SPLIT_K, C_out).
    The grad operand gets the same GRAD_AFFINE transform as dgrad, the input operand the same
    normalize prologue as the forward, so neither g' nor a = relu(x*S+T) is ever materialized.
    FLOPs 2*C_out*KH*KW*C_in*N*OH*OW; bytes |G| (+|Y|) + |X| per (r, ci) column sweep (L2-resident) + partials.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_ci = tl.cdiv(C_in, BLOCK_N)
    pid_n = pid % num_ci
    r = (pid // num_ci) % (KH * KW)
    pid_m = pid // (num_ci * KH * KW)
    kh = r // KW
    kw = r % KW
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < C_out
    ci_ok = offs_ci < C_in
    P = N * OH * OW
    if HAS_BIAS:
        ga_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if GRAD_AFFINE:
        ga = tl.load(GA_ptr + offs_co, mask=co_ok, other=0.0)
        gb = tl.load(GB_ptr + offs_co, mask=co_ok, other=0.0)
    if PROLOGUE:
        s = tl.load(S_ptr + offs_ci, mask=ci_ok, other=0.0)
        t = tl.load(T_ptr + offs_ci, mask=ci_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * pix_per_split
    for p0 in range(start, tl.minimum(start + pix_per_split, P), BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_ok = offs_p < P
        ow = offs_p % OW
        oh = (offs_p // OW) % OH
        nb = (offs_p // (OW * OH)).to(tl.int64)
        # grad operand, transposed: (BLOCK_M channels, BLOCK_K pixels)
        g_mask = co_ok[:, None] & p_ok[None, :]
        g_col = nb * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        g = tl.load(G_ptr + offs_co[:, None].to(tl.int64) * sgc + g_col[None, :], mask=g_mask, other=0.0)
        if GRAD_AFFINE:
            y_col = nb * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
            yv = tl.load(Y_ptr + offs_co[:, None].to(tl.int64) * syc + y_col[None, :], mask=g_mask, other=0.0)
            g = tl.where(g_mask, g.to(tl.float32) + ga[:, None] * yv.to(tl.float32) + gb[:, None], 0.0)
            g = g.to(G_ptr.dtype.element_ty)
        if HAS_BIAS:
            ga_row += tl.sum(g.to(tl.float32), axis=1)
        # input operand: (BLOCK_K pixels, BLOCK_N channels) at the tap's input positions
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_mask = ok[:, None] & ci_ok[None, :]
        x_row = nb * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(X_ptr + x_row[:, None] + offs_ci[None, :].to(tl.int64) * sxc, mask=x_mask, other=0.0)
        if PROLOGUE:
            a = tl.where(x_mask, _bn_relu(a, s[None, :], t[None, :]), 0.0).to(X_ptr.dtype.element_ty)
        acc = _mma(g, a, acc)

    n_w = C_out * C_in * KH * KW
    dw_off = (split.to(tl.int64) * n_w + offs_co[:, None].to(tl.int64) * (C_in * KH * KW)
              + offs_ci[None, :].to(tl.int64) * (KH * KW) + r)
    tl.store(PDW_ptr + dw_off, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if HAS_BIAS:
        tl.store(PDB_ptr + split.to(tl.int64) * C_out + offs_co, ga_row, mask=co_ok & (r == 0) & (pid_n == 0))


# ---------------------------------------------------------------------------- BN apply + ReLU (+ pool)
@triton.jit
def _pix_offsets(p, H, W, sn, sh, sw):
    """Memory offset (int64) of pixel p = (n, h, w) of an (N, C, H, W) tensor with strides sn, sh, sw."""
    w = p % W
    h = (p // W) % H
    n = p // (W * H)
    return n.to(tl.int64) * sn + h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def _bn_relu_apply_fwd_kernel(Y_ptr, S_ptr, T_ptr, O_ptr, N, C, H, W,
                              syn, syc, syh, syw, son, soc, soh, sow,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """O = relu(Y * S[c] + T[c]); Y, O: (N, C, H, W) any strides; tile = (pixels, channels).
    FLOPs 3/elem; bytes |Y| + |O| (the pass that remains when no fused consumer follows)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < N * H * W)[:, None] & c_ok[None, :]
    c64 = offs_c[None, :].to(tl.int64)
    y = tl.load(Y_ptr + _pix_offsets(offs_p, H, W, syn, syh, syw)[:, None] + c64 * syc, mask=mask, other=0.0)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)
    out = _bn_relu(y, s[None, :], t[None, :])
    tl.store(O_ptr + _pix_offsets(offs_p, H, W, son, soh, sow)[:, None] + c64 * soc,
             out.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_apply_bwd_kernel(G_ptr, Y_ptr, S_ptr, T_ptr, DY_ptr, PDS_ptr, PDT_ptr, N, C, H, W,
                              sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dY = G * [Y*S+T > 0] * S; PDS/PDT (p_tiles, C) partials of dL/dS = sum(G'*Y), dL/dT = sum(G')."""
    pid_p = tl.program_id(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_p < N * H * W)[:, None] & c_ok[None, :]
    c64 = offs_c[None, :].to(tl.int64)
    g = tl.load(G_ptr + _pix_offsets(offs_p, H, W, sgn, sgh, sgw)[:, None] + c64 * sgc, mask=mask, other=0.0)
    y = tl.load(Y_ptr + _pix_offsets(offs_p, H, W, syn, syh, syw)[:, None] + c64 * syc, mask=mask, other=0.0)
    y = y.to(tl.float32)
    s = tl.load(S_ptr + offs_c, mask=c_ok, other=0.0)
    t = tl.load(T_ptr + offs_c, mask=c_ok, other=0.0)
    dpre = tl.where(mask & _relu_passes(y * s[None, :] + t[None, :]), g.to(tl.float32), 0.0)
    tl.store(DY_ptr + _pix_offsets(offs_p, H, W, sdn, sdh, sdw)[:, None] + c64 * sdc,
             (dpre * s[None, :]).to(DY_ptr.dtype.element_ty), mask=mask)
    part = pid_p.to(tl.int64) * C + offs_c
    tl.store(PDS_ptr + part, tl.sum(dpre * y, axis=0), mask=c_ok)
    tl.store(PDT_ptr + part, tl.sum(dpre, axis=0), mask=c_ok)


@triton.jit
def _bn_relu_pool_fwd_kernel(Y_ptr, S_ptr, T_ptr, O_ptr, N, C, H, W, OH, OW,
                             syn, syc, syh, syw, son, soc, soh, sow,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """O = max_pool2d(relu(Y*S+T), 2, 2) (floor mode); Y: (N, C, H, W), O: (N, C, H//2, W//2), any strides.
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
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    for k in tl.static_range(4):
        row = nb * syn + (2 * oh + k // 2).to(tl.int64) * syh + (2 * ow + k % 2).to(tl.int64) * syw
        v = _bn_relu(tl.load(Y_ptr + row[:, None] + c64 * syc, mask=mask, other=0.0), s, t)
        best = tl.where((v > best) | (v != v), v, best)
    o_row = nb * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(O_ptr + o_row[:, None] + c64 * soc, best.to(O_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_pool_bwd_kernel(G_ptr, Y_ptr, S_ptr, T_ptr, DY_ptr, PDS_ptr, PDT_ptr,
                             N, C, H, W, OH, OW, OHC, OWC,
                             sgn, sgc, sgh, sgw, syn, syc, syh, syw, sdn, sdc, sdh, sdw,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of _bn_relu_pool_fwd_kernel: one program per (ceil-mode windows, channels) tile writes every
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
    g = tl.load(G_ptr + g_row[:, None] + c64 * sgc, mask=in_out[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
    for k in tl.static_range(4):
        row = nb * syn + (2 * oh + k // 2).to(tl.int64) * syh + (2 * ow + k % 2).to(tl.int64) * syw
        m = (in_out[:, None] & c_ok[None, :])
        v = _bn_relu(tl.load(Y_ptr + row[:, None] + c64 * syc, mask=m, other=0.0), s, t)
        take = (v > best) | (v != v)
        best = tl.where(take, v, best)
        arg = tl.where(take, k, arg)
    ds = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    dt = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(4):
        ih = 2 * oh + k // 2
        iw = 2 * ow + k % 2
        m = (p_ok & (ih < H) & (iw < W))[:, None] & c_ok[None, :]
        row = nb * syn + ih.to(tl.int64) * syh + iw.to(tl.int64) * syw
        y = tl.load(Y_ptr + row[:, None] + c64 * syc, mask=m, other=0.0).to(tl.float32)
        dpre = tl.where(m & (arg == k) & _relu_passes(y * s + t), g, 0.0)
        d_row = nb * sdn + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
        tl.store(DY_ptr + d_row[:, None] + c64 * sdc, (dpre * s).to(DY_ptr.dtype.element_ty), mask=m)
        ds += dpre * y
        dt += dpre
    part = pid_p.to(tl.int64) * C + offs_c
    tl.store(PDS_ptr + part, tl.sum(ds, axis=0), mask=c_ok)
    tl.store(PDT_ptr + part, tl.sum(dt, axis=0), mask=c_ok)


# ---------------------------------------------------------------------------- Linear + ReLU + dropout
@triton.jit
def _linear_kernel(A_ptr, O_ptr, B_ptr, Bias_ptr, C_ptr, M, N, K, seed, p, a_scale, out_scale,
                   sam, sak, som, sok, sbk, sbn,
                   HAS_BIAS: tl.constexpr, RELU_DROPOUT: tl.constexpr, A_GRAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) contiguous = epilogue(prologue(A) @ B); A (M, K) and B (K, N) any strides.

    Forward (RELU_DROPOUT): C = where(rand(seed, m*N + n) > p, relu(A @ B + bias) * out_scale, 0) with
    out_scale = 1/(1-p) — the Philox stream of DESIGN.md, mask never stored.
    Backward GEMMs (A_GRAD): the A operand is the gradient wrt the pre-activation,
    where(O > 0, A * a_scale, 0), O the forward output with A's strides (O > 0 <=> kept and relu
    active, so the mask need not be regenerated). FLOPs 2*M*N*K; bytes |A| (+|O|) + |B| + |C|.
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(A_ptr + m64[:, None] * sam + offs_k[None, :] * sak, mask=a_mask, other=0.0)
        if A_GRAD:
            o = tl.load(O_ptr + m64[:, None] * som + offs_k[None, :] * sok, mask=a_mask, other=0.0)
            a = tl.where(_relu_passes(o), a.to(tl.float32) * a_scale, 0.0).to(A_ptr.dtype.element_ty)
        b = tl.load(B_ptr + offs_k[:, None] * sbk + n64[None, :] * sbn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU_DROPOUT:
        acc = tl.where(acc <= 0.0, 0.0, acc)
        keep = tl.rand(seed, (offs_m[:, None] * N + offs_n[None, :]).to(tl.uint32)) > p
        acc = tl.where(keep, acc * out_scale, 0.0)
    tl.store(C_ptr + m64[:, None] * N + n64[None, :], acc.to(C_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# ============================================================================ launchers
def _strides4(t: torch.Tensor):
    """(stride_n, stride_c, stride_h, stride_w) of a 4-D tensor."""
    return tuple(t.stride())


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """Memory format of an output: channels_last when x is channels_last (torch's conv/BN/pool rule)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_vec(v, name: str, n: int) -> None:
    check_tensor(v, name, ndim=1, dtypes=(torch.float32,))
    if v.numel() != n or not v.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 vector of {n} elements, got shape {tuple(v.shape)}")


def _check_same_device(*ts) -> None:
    devs = {t.device for t in ts if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")


def _check_conv_args(x, weight, bias, in_scale, in_shift):
    check_tensor(x, "input", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    if weight.dtype != x.dtype:  # torch's conv2d messages and exception types
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    if weight.shape[1] != x.shape[1]:
        raise RuntimeError(f"Given groups=1, weight of size {list(weight.shape)}, expected input{list(x.shape)} to "
                           f"have {weight.shape[1]} channels, but got {x.shape[1]} channels instead")
    if bias is not None:
        _check_vec(bias, "bias", weight.shape[0])
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if in_scale is not None:
        _check_vec(in_scale, "in_scale", x.shape[1])
        _check_vec(in_shift, "in_shift", x.shape[1])
    _check_same_device(x, weight, bias, in_scale, in_shift)


def conv_out_hw(H, W, KH, KW, stride, padding, dilation):
    oh = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return oh, ow


def _combine_stats(psum: torch.Tensor, pm2: torch.Tensor, M: int, block_m: int):
    """Chan's parallel combine of per-tile (sum, centred M2) partials (tiles, C) -> mean, biased var (C,)."""
    tiles = psum.shape[0]
    counts = torch.full((tiles, 1), float(block_m), dtype=torch.float32, device=psum.device)
    counts[-1] = M - block_m * (tiles - 1)
    mean = psum.sum(0) / M
    m2 = pm2.sum(0) + (counts * (psum / counts - mean) ** 2).sum(0)
    return mean, m2 / M


def conv_fwd(x, weight, bias, in_scale, in_shift, stride, padding, dilation, compute_stats):
    """y = conv2d(a, weight, bias), a = relu(x*in_scale + in_shift) if in_scale is given else x.

    x: (N, C_in, H, W) float32|float16|bfloat16, NCHW or NHWC; weight (C_out, C_in, KH, KW) same dtype;
    bias, in_scale, in_shift: fp32 vectors or None. Returns y (N, C_out, OH, OW) in x's memory format,
    and (compute_stats) the batch mean and biased variance of y per channel (fp32), else two empty tensors.
    """
    _check_conv_args(x, weight, bias, in_scale, in_shift)
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = conv_out_hw(H, W, KH, KW, stride, padding, dilation)
    if OH <= 0 or OW <= 0:
        raise RuntimeError(f"Calculated output size: ({C_out}x{OH}x{OW}). Output size is too small")
    y = new_output((N, C_out, OH, OW), x, memory_format=_out_format(x))
    M = N * OH * OW
    BM, BN, BK, warps, stages = _gemm_tiles(x, C_out, C_in)
    tiles_m = triton.cdiv(M, BM)
    if compute_stats:
        psum = new_output((tiles_m, C_out), x, dtype=torch.float32)
        pm2 = new_output((tiles_m, C_out), x, dtype=torch.float32)
    else:
        psum = pm2 = y  # never touched (STATS=False)
    if M and C_out:
        w_k = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, C_in, C_out): K rows, C_out contiguous
        dummy = w_k
        _conv_fwd_kernel[(tiles_m * triton.cdiv(C_out, BN),)](
            x, w_k, bias if bias is not None else dummy, in_scale if in_scale is not None else dummy,
            in_shift if in_shift is not None else dummy, y, psum, pm2,
            N, C_in, H, W, C_out, OH, OW, *_strides4(x), *_strides4(y),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=KH, KW=KW, HAS_BIAS=bias is not None, PROLOGUE=in_scale is not None, STATS=compute_stats,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
    if not compute_stats:
        empty = x.new_empty((0,), dtype=torch.float32)
        return y, empty, empty.clone()
    mean, var = _combine_stats(psum, pm2, M, BM)
    return y, mean, var


def conv_bwd(grad, y, grad_mean, grad_var, mean, x, weight, in_scale, in_shift, stride, padding, dilation, has_bias,
             compute_dx=True):
    """Gradients of conv_fwd. grad: (N, C_out, OH, OW) dL/dy. With the statistics outputs used downstream,
    y (the forward output), grad_mean / grad_var (dL/dmean, dL/dvar; either may be None) and mean (C_out,):
    their contribution g' = grad + g_alpha*y + g_beta (g_alpha = 2*dL/dvar/M, g_beta = dL/dmean/M - g_alpha*mean,
    M = N*OH*OW) is folded into the grad loads of both GEMMs. Returns (dx, dweight, dbias, d_in_scale,
    d_in_shift) — dbias empty without bias, the last two empty without the prologue."""
    _check_conv_args(x, weight, None, in_scale, in_shift)
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = conv_out_hw(H, W, KH, KW, stride, padding, dilation)
    check_tensor(grad, "grad_output", ndim=4)
    if tuple(grad.shape) != (N, C_out, OH, OW):
        raise ValueError(f"grad_output must have shape {(N, C_out, OH, OW)}, got {tuple(grad.shape)}")
    affine = grad_mean is not None or grad_var is not None
    if affine:
        check_tensor(y, "y", ndim=4)
        if y.shape != grad.shape:
            raise ValueError(f"y must have shape {tuple(grad.shape)}, got {tuple(y.shape)}")
        _check_vec(mean, "mean", C_out)
        for v, name in ((grad_mean, "grad_mean"), (grad_var, "grad_var")):
            if v is not None:
                _check_vec(v, name, C_out)
        M_out = N * OH * OW
        g_alpha = grad_var * (2.0 / M_out) if grad_var is not None else torch.zeros_like(mean)
        g_beta = -g_alpha * mean
        if grad_mean is not None:
            g_beta = g_beta + grad_mean / M_out
    grad = grad.to(x.dtype)
    prologue = in_scale is not None
    dummy = grad
    yy = y if affine else dummy
    ga = g_alpha if affine else dummy
    gb = g_beta if affine else dummy
    sc = in_scale if prologue else dummy
    sh = in_shift if prologue else dummy
    def empty():  # a fresh 0-element result each time (op outputs must not alias)
        return x.new_empty((0,), dtype=torch.float32)
    common = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])

    # dgrad: skipped (dx empty) when the input needs no gradient and there is no prologue (e.g. the image)
    compute_dx = compute_dx or prologue
    dx = new_output(x.shape, x, memory_format=_out_format(x)) if compute_dx else x.new_empty((0,))
    M = N * H * W
    BM, BN, BK, warps, stages = _gemm_tiles(x, C_in, C_out)
    tiles_m = triton.cdiv(M, BM)
    if prologue:
        pds = new_output((tiles_m, C_in), x, dtype=torch.float32)
        pdt = new_output((tiles_m, C_in), x, dtype=torch.float32)
    else:
        pds = pdt = dx
    if M and C_in and compute_dx:
        w_t = weight.permute(2, 3, 0, 1).contiguous()  # (KH, KW, C_out, C_in)
        _conv_dgrad_kernel[(tiles_m * triton.cdiv(C_in, BN),)](
            grad, yy, ga, gb, w_t, x, sc, sh, dx, pds, pdt,
            N, C_in, H, W, C_out, OH, OW,
            *_strides4(grad), *_strides4(yy if affine else grad), *_strides4(x), *_strides4(dx), *common,
            KH=KH, KW=KW, GRAD_AFFINE=affine, PROLOGUE=prologue,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
    elif prologue:
        pds.zero_(), pdt.zero_()
    d_scale = pds.sum(0) if prologue else empty()
    d_shift = pdt.sum(0) if prologue else empty()

    # wgrad (split-K)
    P = N * OH * OW
    if _interpreted(x):
        BM, BN, BK, warps, stages = 16, 16, 64, 1, 1
    else:
        BM, BN, BK = (128 if C_out >= 128 else 64), (128 if C_in >= 128 else (64 if C_in >= 64 else 16)), 64
        warps, stages = 8 if BM * BN >= 128 * 128 else 4, 3
    tiles = triton.cdiv(C_out, BM) * KH * KW * triton.cdiv(C_in, BN)
    if _interpreted(x):  # two splits, so the tests exercise the split-K reduction
        split = max(1, min(2, triton.cdiv(P, BK)))
    else:  # enough programs to fill the GPU (~4 per SM), each still >= 16 K-steps long
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
        split = max(1, min(triton.cdiv(target, tiles), triton.cdiv(P, BK * 16)))
    pix = triton.cdiv(triton.cdiv(P, split), BK) * BK
    split = triton.cdiv(P, pix) if P else 1
    pdw = new_output((split, C_out, C_in, KH, KW), x, dtype=torch.float32)
    pdb = new_output((split, C_out), x, dtype=torch.float32) if has_bias else None
    if P:
        _conv_wgrad_kernel[(tiles, split)](
            grad, yy, ga, gb, x, sc, sh, pdw, pdb if has_bias else pdw,
            N, C_in, H, W, C_out, OH, OW, pix,
            *_strides4(grad), *_strides4(yy if affine else grad), *_strides4(x), *common,
            KH=KH, KW=KW, GRAD_AFFINE=affine, PROLOGUE=prologue, HAS_BIAS=has_bias,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    else:
        pdw.zero_()
        if has_bias:
            pdb.zero_()
    dw = pdw.sum(0).to(weight.dtype)
    db = pdb.sum(0) if has_bias else empty()
    return dx, dw, db, d_scale, d_shift


def _check_bn_relu_args(y, scale, shift):
    check_tensor(y, "input", ndim=4)
    _check_vec(scale, "scale", y.shape[1])
    _check_vec(shift, "shift", y.shape[1])
    _check_same_device(y, scale, shift)


def _elementwise_tiles(y):
    return (64, 16) if _interpreted(y) else (64, 64)


def bn_relu_apply_fwd(y, scale, shift):
    """relu(y * scale[c] + shift[c]); y: (N, C, H, W) float32|float16|bfloat16 NCHW or NHWC; scale, shift fp32 (C,)."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    out = new_output(y.shape, y, memory_format=_out_format(y))
    BP, BC = _elementwise_tiles(y)
    if y.numel():
        _bn_relu_apply_fwd_kernel[(triton.cdiv(N * H * W, BP), triton.cdiv(C, BC))](
            y, scale, shift, out, N, C, H, W, *_strides4(y), *_strides4(out), BLOCK_P=BP, BLOCK_C=BC)
    return out


def bn_relu_apply_bwd(grad, y, scale, shift):
    """(dy, dscale, dshift) of bn_relu_apply_fwd."""
    _check_bn_relu_args(y, scale, shift)
    check_tensor(grad, "grad_output", ndim=4)
    if grad.shape != y.shape:
        raise ValueError(f"grad_output must have shape {tuple(y.shape)}, got {tuple(grad.shape)}")
    N, C, H, W = y.shape
    BP, BC = _elementwise_tiles(y)
    tiles = triton.cdiv(N * H * W, BP)
    dy = new_output(y.shape, y, memory_format=_out_format(y))
    pds = new_output((tiles, C), y, dtype=torch.float32)
    pdt = new_output((tiles, C), y, dtype=torch.float32)
    if y.numel():
        _bn_relu_apply_bwd_kernel[(tiles, triton.cdiv(C, BC))](
            grad, y, scale, shift, dy, pds, pdt, N, C, H, W,
            *_strides4(grad), *_strides4(y), *_strides4(dy), BLOCK_P=BP, BLOCK_C=BC)
    else:
        pds.zero_(), pdt.zero_()
    return dy, pds.sum(0), pdt.sum(0)


def bn_relu_pool_fwd(y, scale, shift):
    """max_pool2d(relu(y*scale + shift), kernel_size=2, stride=2); y (N, C, H, W) with H, W >= 2."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    OH, OW = H // 2, W // 2
    if OH == 0 or OW == 0:
        raise RuntimeError(f"Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{OH}x{OW}). "
                           "Output size is too small")
    out = new_output((N, C, OH, OW), y, memory_format=_out_format(y))
    BP, BC = _elementwise_tiles(y)
    if out.numel():
        _bn_relu_pool_fwd_kernel[(triton.cdiv(N * OH * OW, BP), triton.cdiv(C, BC))](
            y, scale, shift, out, N, C, H, W, OH, OW, *_strides4(y), *_strides4(out), BLOCK_P=BP, BLOCK_C=BC)
    return out


def bn_relu_pool_bwd(grad, y, scale, shift):
    """(dy, dscale, dshift) of bn_relu_pool_fwd; grad (N, C, H//2, W//2)."""
    _check_bn_relu_args(y, scale, shift)
    N, C, H, W = y.shape
    OH, OW = H // 2, W // 2
    check_tensor(grad, "grad_output", ndim=4)
    if tuple(grad.shape) != (N, C, OH, OW):
        raise ValueError(f"grad_output must have shape {(N, C, OH, OW)}, got {tuple(grad.shape)}")
    OHC, OWC = (H + 1) // 2, (W + 1) // 2
    BP, BC = _elementwise_tiles(y)
    tiles = triton.cdiv(N * OHC * OWC, BP)
    dy = new_output(y.shape, y, memory_format=_out_format(y))
    pds = new_output((tiles, C), y, dtype=torch.float32)
    pdt = new_output((tiles, C), y, dtype=torch.float32)
    if y.numel():
        _bn_relu_pool_bwd_kernel[(tiles, triton.cdiv(C, BC))](
            grad, y, scale, shift, dy, pds, pdt, N, C, H, W, OH, OW, OHC, OWC,
            *_strides4(grad), *_strides4(y), *_strides4(dy), BLOCK_P=BP, BLOCK_C=BC)
    else:
        pds.zero_(), pdt.zero_()
    return dy, pds.sum(0), pdt.sum(0)


def _linear_tiles(t, n):
    if _interpreted(t):
        return 16, 16, 16, 1, 1
    return 128, (128 if n >= 128 else 64), 64, 8 if n >= 128 else 4, 4


def _gemm(a, b, out, *, o=None, a_scale=1.0, bias=None, seed=0, p=0.0, relu_dropout=False):
    """out (M, N) contiguous = epilogue(prologue(a) @ b); a (M, K), b (K, N), o like a (A_GRAD prologue)."""
    M, K = a.shape
    N = b.shape[1]
    BM, BN, BK, warps, stages = _linear_tiles(a, N)
    if M and N:
        _linear_kernel[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](
            a, o if o is not None else a, b, bias if bias is not None else b, out, M, N, K,
            seed & (2 ** 64 - 1), p, a_scale, (1.0 / (1.0 - p)) if p < 1 else 0.0,
            a.stride(0), a.stride(1), *(o.stride() if o is not None else a.stride()), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None, RELU_DROPOUT=relu_dropout, A_GRAD=o is not None,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, num_warps=warps, num_stages=stages)
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
    _check_same_device(x, weight, bias)


def linear_relu_dropout_fwd(x, weight, bias, p, seed):
    """dropout(relu(x @ weight.T + bias), p) with the Philox stream (element index m*N + n, 64-bit seed).
    x: (M, K) float32|float16|bfloat16, weight (N, K) same dtype, bias (N,) or None. Returns (M, N) contiguous."""
    _check_linear_args(x, weight, bias, p)
    out = new_output((x.shape[0], weight.shape[0]), x)
    return _gemm(x, weight.t(), out, bias=bias, seed=seed, p=p, relu_dropout=True)


def linear_relu_dropout_bwd(grad, out, x, weight, p, has_bias):
    """(dx, dweight, dbias) of linear_relu_dropout_fwd from its output: dz = where(out > 0, grad/(1-p), 0)."""
    _check_linear_args(x, weight, None, p)
    check_tensor(grad, "grad_output", ndim=2)
    if grad.shape != out.shape or tuple(out.shape) != (x.shape[0], weight.shape[0]):
        raise ValueError(f"grad_output and output must have shape {(x.shape[0], weight.shape[0])}")
    grad = grad.to(x.dtype)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    dx = _gemm(grad, weight, new_output(x.shape, x), o=out, a_scale=scale)
    dw = _gemm(grad.t(), x, new_output(weight.shape, weight), o=out.t(), a_scale=scale)
    db = (torch.where(out > 0, grad.float(), 0.0).sum(0) * scale).to(weight.dtype) if has_bias \
        else x.new_empty((0,))
    return dx, dw, db
