"""Conv2d kernels: implicit GEMM (forward, dgrad, wgrad), explicit im2col + GEMM, bias and bias gradient.

Tensors (any strides: x and grad_out, NCHW or channels_last, are read in place, never copied; the small
weight is handed to the kernels channels_last, a no-op when it already is, see _kernel_weight):
    x:        (N, C_in, H, W)                float32|float16|bfloat16
    weight:   (C_out, C_in/groups, KH, KW)   same dtype
    bias:     (C_out,) or None               same dtype
    y, grad_out: (N, C_out, P, Q)            P = (H + 2*ph - dh*(KH-1) - 1) // sh + 1, Q likewise
Accumulation is always float32; float32 inputs go through TF32 tensor cores exactly when
torch.backends.cudnn.allow_tf32 is True (as cuDNN does), else through IEEE fp32 dot products.

Per group g (Cg = C_in/groups, Cout_g = C_out/groups, Kg = Cg*KH*KW), the three products are GEMMs:
    forward  y     [N*P*Q, Cout_g] = im2col(x) [N*P*Q, Kg]      @ W [Kg, Cout_g]
             FLOPs = 2 * N*P*Q * C_out * Cg*KH*KW
    dgrad    dx    [N*H*W, Cg]     = im2col'(dy)[N*H*W, Cout_g*KH*KW] @ W' [Cout_g*KH*KW, Cg]
             FLOPs = 2 * N*P*Q * C_out * Cg*KH*KW  (the same count: each product of the forward is
             replayed once; with stride > 1 the masked-out taps are computed as zeros on top of this)
    wgrad    dW    [Cout_g, Kg]    = dy^T [Cout_g, N*P*Q]       @ im2col(x) [N*P*Q, Kg]
             FLOPs = 2 * N*P*Q * C_out * Cg*KH*KW
    bias grad db[co] = sum over (n, p, q) of dy[n, co, p, q]   (N*P*Q*C_out adds, memory bound)
The reduction index of im2col(x) is ordered (kh, kw, c) with c fastest, so with channels_last input a
K-tile is BLOCK_K consecutive channels of one input pixel: contiguous, vectorised loads.

algo="implicit_gemm" (and "auto") gathers im2col(x) tiles inside the GEMM's loads (no buffer);
algo="im2col" materialises the buffer [N*P*Q, groups*Kg] with _im2col_kernel and runs the GEMM on it
(backward: dgrad writes a float32 [N*P*Q, groups*Kg] column gradient and folds it back with _col2im_kernel;
wgrad re-builds im2col(x)), so the benchmark can show what the buffer costs.

Implicit-GEMM K loops come in two modes (constexpr MODE):
    MODE 0 "tiled": one K-tile = (kh, kw, BLOCK_K channels). Tap position and padding mask are per row
                    ([BLOCK_M] vectors), channel offsets per column: the fast path for Cg >= 16.
    MODE 1 "flat":  K-tile = BLOCK_K consecutive (kh, kw, c) indices, decoded per element: for tiny Cg
                    (VGG's first layer, Cg = 3, Kg = 27) where a tiled K-tile would be mostly padding.
    MODE 2 "col":   the operand is read from the explicit im2col buffer (algo="im2col").
Pixel counts (N*P*Q, N*H*W) must stay below 2**31; every memory offset is int64.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import check_tensor, is_channels_last, new_output

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ALGOS = ("auto", "implicit_gemm", "im2col")
MODE_TILED, MODE_FLAT, MODE_COL = 0, 1, 2
_FLAT_BELOW = 16  # Cg below this: a (kh, kw, channel-block) K-tile would be mostly padding -> MODE_FLAT
_INT32_MAX = 2**31 - 1
# The interpreter's tl.dot mis-reads bfloat16 operands (Triton 3.8): there, operands are widened to fp32
# first (exact: a 16-bit float product fits fp32, which is also what the tensor cores compute).
_WIDEN_DOT = tl.constexpr(_INTERPRET)


# ----------------------------------------------------------------------------------------------------
# Autotune configurations. GEMM tiles: BLOCK_M x BLOCK_N output, BLOCK_K reduction step.
# Hopper (H100/H200, 228 KB smem, wgmma): big 128x128 / 128x256 / 256x128 tiles, BLOCK_K 64, 3 stages,
# 8 warps. Ampere (A100, 164 KB smem): 128x128 / 128x64 tiles, BLOCK_K 32, 4 stages, 4 warps.
# BLOCK_N 64 variants serve C_out = 64 (VGG's first block). Under TRITON_INTERPRET=1 one small config
# (the interpreter is slow and ignores warps and stages).
# ----------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


if _INTERPRET:
    _GEMM_CONFIGS = [_cfg(32, 32, 32, 4, 1, group_m=2)]
else:
    _GEMM_CONFIGS = [
        # Hopper
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(256, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(256, 64, 64, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        # Ampere
        _cfg(128, 128, 32, 4, 4),
        _cfg(128, 64, 32, 4, 4),
        _cfg(64, 64, 32, 4, 4),
    ]


def _prune_by(m_arg: str | None, n_arg: str):
    """Drop tiles far wider than the problem (e.g. BLOCK_N 256 for C_out = 64); keep at least one."""
    def prune(configs, named_args, **kwargs):
        n = max(16, triton.next_power_of_2(int(named_args[n_arg])))
        m = max(16, triton.next_power_of_2(int(named_args[m_arg]))) if m_arg else None
        kept = [c for c in configs
                if c.kwargs["BLOCK_N"] <= n and (m is None or c.kwargs["BLOCK_M"] <= m)]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _prune_wgrad(configs, named_args, **kwargs):
    """wgrad columns: (kh, kw, channel block) tiles in MODE 0, so the channel count bounds BLOCK_N there."""
    n_arg = "Cg" if kwargs.get("MODE", MODE_TILED) == MODE_TILED else "Kg"
    return _prune_by("Cout_g", n_arg)(configs, named_args, **kwargs)


def _even(dim: str, block: str):
    return lambda a: a[dim] % a[block] == 0


# ----------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles walk the column tiles together, so the weight tiles (and
    the overlapping input rows) they share are still in L2 when the neighbours need them."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc += a @ b with fp32 accumulation (TF32 or IEEE for fp32 operands, per PREC)."""
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _split_pixels(m, HW, W):
    """Flat pixel index m -> (image, row, column) for an (N, H, W) grid."""
    img = m // HW
    hw = m - img * HW
    h = hw // W
    return img, h, hw - h * W


@triton.jit
def _pixel_offsets(img, h, w, s_n, s_h, s_w):
    """int64 element offset of pixel (img, h, w) in a tensor with strides (s_n, ., s_h, s_w)."""
    return img.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


# ----------------------------------------------------------------------------------------------------
# Forward:  Y[n, g*Cout_g + co, p, q] = bias[co] + sum_(kh, kw, c) X[n, g*Cg + c, ih, iw] * W[co, c, kh, kw]
#           ih = p*sh - ph + kh*dh, iw = q*sw - pw + kw*dw (zero outside the image).
# GEMM rows = output pixels (n, p, q), columns = output channels of group g (grid axis 1), K = (kh, kw, c).
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "Cout_g", "Cg", "KH", "KW", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_by(None, "Cout_g")})
@triton.heuristics({"EVEN_C": _even("Cg", "BLOCK_K")})
@triton.jit
def _conv_fwd_kernel(
    X_ptr, W_ptr, B_ptr, COL_ptr, Y_ptr,
    M, H, W, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot,
    s_xn, s_xc, s_xh, s_xw,
    s_wo, s_wc, s_wh, s_ww,
    s_yn, s_yc, s_yh, s_yw,
    sh, sw, ph, pw, dh, dw,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, Cout_g, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped row/column indices keep every load in bounds without masks; wrapped lanes are never stored.
    m_ld = rm % M
    n_ld = rn % Cout_g
    img, p, q = _split_pixels(m_ld, P * Q, Q)
    ih0 = p * sh - ph
    iw0 = q * sw - pw
    x_row = img.to(tl.int64) * s_xn + (g * Cg).to(tl.int64) * s_xc        # [BLOCK_M]
    w_col = (g * Cout_g + n_ld).to(tl.int64) * s_wo                        # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 0:
        c_tiles = tl.cdiv(Cg, BLOCK_K)
        for kk in range(0, KH * KW * c_tiles):
            r = kk // c_tiles
            c = (kk - r * c_tiles) * BLOCK_K + rk
            kh = r // KW
            kw = r - kh * KW
            ih = ih0 + kh * dh
            iw = iw0 + kw * dw
            row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)            # padding, per row
            a_ptrs = (X_ptr + (x_row + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw)[:, None]
                      + (c.to(tl.int64) * s_xc)[None, :])
            b_ptrs = W_ptr + w_col[None, :] + (kh * s_wh + kw * s_ww + c * s_wc)[:, None]
            if EVEN_C:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs)
            else:
                c_ok = c < Cg
                a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None], other=0.0)
            acc = _mma(a, b, acc, PREC)
    else:
        col_row = m_ld.to(tl.int64) * Ktot                                  # MODE 2: buffer rows
        for kk in range(0, tl.cdiv(Kg, BLOCK_K)):
            k = kk * BLOCK_K + rk
            k_ok = k < Kg
            r = k // Cg
            c = k - r * Cg
            kh = r // KW
            kw = r - kh * KW
            b = tl.load(W_ptr + w_col[None, :] + (kh * s_wh + kw * s_ww + c * s_wc)[:, None],
                        mask=k_ok[:, None], other=0.0)
            if MODE == 1:
                ih = ih0[:, None] + (kh * dh)[None, :]
                iw = iw0[:, None] + (kw * dw)[None, :]
                ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & k_ok[None, :]
                a_ptrs = (X_ptr + x_row[:, None] + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
                          + (c.to(tl.int64) * s_xc)[None, :])
                a = tl.load(a_ptrs, mask=ok, other=0.0)
            else:
                a = tl.load(COL_ptr + col_row[:, None] + (g * Kg + k)[None, :], mask=k_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PREC)

    # Epilogue: bias, cast, store through Y's strides (NCHW or NHWC).
    if HAS_BIAS:
        acc += tl.load(B_ptr + g * Cout_g + n_ld).to(tl.float32)[None, :]
    y_ptrs = (Y_ptr + _pixel_offsets(img, p, q, s_yn, s_yh, s_yw)[:, None]
              + ((g * Cout_g + n_ld).to(tl.int64) * s_yc)[None, :])
    mask = (rm < M)[:, None] & (rn < Cout_g)[None, :]
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# dgrad: DX[n, g*Cg + c, h, w] = sum_(kh, kw, co) DY[n, g*Cout_g + co, p, q] * W[g*Cout_g + co, c, kh, kw]
#        over the taps with h = p*sh - ph + kh*dh (i.e. p = (h + ph - kh*dh) / sh exact, 0 <= p < P).
# GEMM rows = input pixels (n, h, w), columns = input channels of group g, K = (kh, kw, co).
# With stride 1 every tap is live; with stride s only ~1/s^2 of them are (the rest load as zeros).
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "Cout_g", "Cg", "KH", "KW"],
                 prune_configs_by={"early_config_prune": _prune_by(None, "Cg")})
@triton.heuristics({"EVEN_CO": _even("Cout_g", "BLOCK_K")})
@triton.jit
def _conv_dgrad_kernel(
    G_ptr, W_ptr, DX_ptr,
    M, H, W, P, Q, Cg, Cout_g, KH, KW,
    s_gn, s_gc, s_gh, s_gw,
    s_wo, s_wc, s_wh, s_ww,
    s_dn, s_dc, s_dh, s_dw,
    sh, sw, ph, pw, dh, dw,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_CO: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, Cg, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ld = rm % M
    c_ld = rn % Cg
    img, h, w = _split_pixels(m_ld, H * W, W)
    th0 = h + ph
    tw0 = w + pw
    g_row = img.to(tl.int64) * s_gn                                         # [BLOCK_M]
    w_col = c_ld.to(tl.int64) * s_wc                                        # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    co_tiles = tl.cdiv(Cout_g, BLOCK_K)
    for kk in range(0, KH * KW * co_tiles):
        r = kk // co_tiles
        co = g * Cout_g + (kk - r * co_tiles) * BLOCK_K + rk                # global output channel
        kh = r // KW
        kw = r - kh * KW
        th = th0 - kh * dh
        tw = tw0 - kw * dw
        p = tl.maximum(th, 0) // sh
        q = tl.maximum(tw, 0) // sw
        row_ok = (p * sh == th) & (q * sw == tw) & (p < P) & (q < Q)       # p*sh == th implies th >= 0
        a_ptrs = (G_ptr + (g_row + p.to(tl.int64) * s_gh + q.to(tl.int64) * s_gw)[:, None]
                  + (co.to(tl.int64) * s_gc)[None, :])
        b_ptrs = W_ptr + (co.to(tl.int64) * s_wo + kh * s_wh + kw * s_ww)[:, None] + w_col[None, :]
        if EVEN_CO:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            co_ok = co < (g + 1) * Cout_g
            a = tl.load(a_ptrs, mask=row_ok[:, None] & co_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=co_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, PREC)

    dx_ptrs = (DX_ptr + _pixel_offsets(img, h, w, s_dn, s_dh, s_dw)[:, None]
               + ((g * Cg + c_ld).to(tl.int64) * s_dc)[None, :])
    mask = (rm < M)[:, None] & (rn < Cg)[None, :]
    tl.store(dx_ptrs, acc.to(DX_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# wgrad: WS[s, g*Cout_g + co, c, kh, kw] = sum over pixels (n, p, q) of split s of
#        DY[n, g*Cout_g + co, p, q] * X[n, g*Cg + c, p*sh - ph + kh*dh, q*sw - pw + kw*dw]
# GEMM rows = output channels (Cout_g), columns = (kh, kw, c), K = N*P*Q pixels. The output is small and
# K huge, so K is split over grid axis 1 (split-K); each split writes its fp32 partial to a workspace
# (S, C_out, Cg, KH, KW) that _sum_splits_kernel reduces in a fixed order (deterministic, no atomics).
# MODE 0: a column tile is (kh, kw, BLOCK_N channels); MODE 1: BLOCK_N flat (kh, kw, c); MODE 2: im2col buffer.
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["Cout_g", "Cg", "KH", "KW", "k_chunk", "MODE"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.heuristics({"EVEN_C": _even("Cg", "BLOCK_N"), "EVEN_CO": _even("Cout_g", "BLOCK_M")})
@triton.jit
def _conv_wgrad_kernel(
    G_ptr, X_ptr, COL_ptr, WS_ptr,
    M, H, W, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot, k_chunk,
    s_gn, s_gc, s_gh, s_gw,
    s_xn, s_xc, s_xh, s_xw,
    sh, sw, ph, pw, dh, dw,
    MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr,
):
    if MODE == 0:
        c_tiles = tl.cdiv(Cg, BLOCK_N)
        pid_m, pid_n = _tile_ids(tl.program_id(0), Cout_g, KH * KW * c_tiles * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
    else:
        pid_m, pid_n = _tile_ids(tl.program_id(0), Cout_g, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if EVEN_CO:
        co_ld = rm
    else:
        co_ld = rm % Cout_g
    if MODE == 0:
        r = pid_n // c_tiles
        c = (pid_n - r * c_tiles) * BLOCK_N + rn                           # [BLOCK_N] channels
        kh = r // KW                                                        # scalar tap
        kw = r - kh * KW
        col_ok = c < Cg
        if EVEN_C:
            c_ld = c
        else:
            c_ld = c % Cg
    else:
        j = pid_n * BLOCK_N + rn                                            # [BLOCK_N] flat (kh, kw, c)
        col_ok = j < Kg
        j_ld = j % Kg
        r = j_ld // Cg
        c = j_ld - r * Cg
        c_ld = c
        kh = r // KW
        kw = r - kh * KW
    g_col = (g * Cout_g + co_ld).to(tl.int64) * s_gc                        # [BLOCK_M]
    x_chan = (g * Cg + c_ld).to(tl.int64) * s_xc                            # [BLOCK_N]

    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        pix = k0 + rk
        pix_ok = pix < k_hi
        img, p, q = _split_pixels(pix, P * Q, Q)
        a = tl.load(G_ptr + g_col[:, None] + _pixel_offsets(img, p, q, s_gn, s_gh, s_gw)[None, :],
                    mask=pix_ok[None, :], other=0.0)
        if MODE == 0:
            ih = p * sh - ph + kh * dh
            iw = q * sw - pw + kw * dw
            ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b = tl.load(X_ptr + _pixel_offsets(img, ih, iw, s_xn, s_xh, s_xw)[:, None] + x_chan[None, :],
                        mask=ok[:, None], other=0.0)
        elif MODE == 1:
            ih = (p * sh - ph)[:, None] + (kh * dh)[None, :]
            iw = (q * sw - pw)[:, None] + (kw * dw)[None, :]
            ok = pix_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b = tl.load(X_ptr + (img.to(tl.int64) * s_xn)[:, None] + ih.to(tl.int64) * s_xh
                        + iw.to(tl.int64) * s_xw + x_chan[None, :], mask=ok, other=0.0)
        else:
            b = tl.load(COL_ptr + (pix.to(tl.int64) * Ktot)[:, None] + (g * Kg + j_ld)[None, :],
                        mask=pix_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, PREC)

    # WS is contiguous (S, C_out, Cg, KH, KW).
    row = (split.to(tl.int64) * Cout_g * tl.num_programs(2) + g * Cout_g + rm) * Kg    # [BLOCK_M]
    ws_ptrs = WS_ptr + row[:, None] + (c * (KH * KW) + kh * KW + kw)[None, :]
    mask = (rm < Cout_g)[:, None] & col_ok[None, :]
    tl.store(ws_ptrs, acc.to(WS_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Bias gradient: WS[s, co] = sum over the pixels of split s of DY[n, co, p, q] (fp32); then _sum_splits.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bias_grad_kernel(G_ptr, WS_ptr, M, C, PQ, Q, k_chunk, s_gn, s_gc, s_gh, s_gw,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    split = tl.program_id(1)
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    chan = rc.to(tl.int64) * s_gc
    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, M)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)   # reduced once at the end, not per step
    for k0 in range(k_lo, k_hi, BLOCK_P):
        pix = k0 + tl.arange(0, BLOCK_P)
        img, p, q = _split_pixels(pix, PQ, Q)
        ptrs = G_ptr + _pixel_offsets(img, p, q, s_gn, s_gh, s_gw)[:, None] + chan[None, :]
        acc += tl.load(ptrs, mask=(pix < k_hi)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(WS_ptr + split.to(tl.int64) * C + rc, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _sum_splits_kernel(WS_ptr, OUT_ptr, L, S, BLOCK: tl.constexpr):
    """OUT[i] = sum_s WS[s, i] (fp32, fixed order), cast to OUT's dtype. WS: (S, L), OUT: (L,) contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(WS_ptr + s * L + offs, mask=mask, other=0.0)
    tl.store(OUT_ptr + offs, acc.to(OUT_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Explicit im2col (algo="im2col"): COL[(n, p, q), g*Kg + (kh*KW + kw)*Cg + c] = X[n, g*Cg + c, ih, iw]
# (zero in the padding). COL: (N*P*Q, groups*Kg) contiguous, same dtype as X.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _im2col_kernel(X_ptr, COL_ptr, M, H, W, P, Q, Cg, KH, KW, Kg, Ktot,
                   s_xn, s_xc, s_xh, s_xw, sh, sw, ph, pw, dh, dw,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    j_ok = rj < Ktot
    img, p, q = _split_pixels(rm % M, P * Q, Q)
    g = rj // Kg
    jj = rj - g * Kg
    r = jj // Cg
    c = jj - r * Cg
    kh = r // KW
    kw = r - kh * KW
    ih = (p * sh - ph)[:, None] + (kh * dh)[None, :]
    iw = (q * sw - pw)[:, None] + (kw * dw)[None, :]
    ok = m_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    v = tl.load(X_ptr + (img.to(tl.int64) * s_xn)[:, None] + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
                + ((g * Cg + c).to(tl.int64) * s_xc)[None, :], mask=ok, other=0.0)
    tl.store(COL_ptr + (rm.to(tl.int64) * Ktot)[:, None] + rj[None, :], v, mask=m_ok[:, None] & j_ok[None, :])


# dgrad, im2col flavour, step 1: DCOL[(n, p, q), g*Kg + j] = sum_co DY[n, g*Cout_g + co, p, q] * W[g*Cout_g + co, j]
# with j = (kh, kw, c) decoded per column. GEMM rows = output pixels, columns = Kg, K = Cout_g.
@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "Cout_g", "Kg"],
                 prune_configs_by={"early_config_prune": _prune_by(None, "Kg")})
@triton.heuristics({"EVEN_CO": _even("Cout_g", "BLOCK_K")})
@triton.jit
def _dgrad_col_gemm_kernel(
    G_ptr, W_ptr, COL_ptr,
    M, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot,
    s_gn, s_gc, s_gh, s_gw,
    s_wo, s_wc, s_wh, s_ww,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_CO: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    img, p, q = _split_pixels(rm % M, P * Q, Q)
    g_row = _pixel_offsets(img, p, q, s_gn, s_gh, s_gw)                   # [BLOCK_M]
    j_ld = rj % Kg
    r = j_ld // Cg
    c = j_ld - r * Cg
    kh = r // KW
    kw = r - kh * KW
    w_col = c * s_wc + kh * s_wh + kw * s_ww                               # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for co0 in range(0, Cout_g, BLOCK_K):
        co = g * Cout_g + co0 + rk
        a_ptrs = G_ptr + g_row[:, None] + (co.to(tl.int64) * s_gc)[None, :]
        b_ptrs = W_ptr + (co.to(tl.int64) * s_wo)[:, None] + w_col[None, :]
        if EVEN_CO:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            co_ok = co0 + rk < Cout_g
            a = tl.load(a_ptrs, mask=co_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=co_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, PREC)
    col_ptrs = COL_ptr + (rm.to(tl.int64) * Ktot)[:, None] + (g * Kg + rj)[None, :]
    tl.store(col_ptrs, acc.to(COL_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rj < Kg)[None, :])


# dgrad, im2col flavour, step 2 (col2im as a gather, deterministic): DX[n, ci, h, w] = sum over the live taps
# (kh, kw) of DCOL[(n, p, q), g*Kg + (kh*KW + kw)*Cg + c] with ci = g*Cg + c, p = (h + ph - kh*dh) / sh exact.
@triton.jit
def _col2im_kernel(COL_ptr, DX_ptr, M, H, W, P, Q, C, Cg, KH, KW, Kg, Ktot,
                   s_dn, s_dc, s_dh, s_dw, sh, sw, ph, pw, dh, dw,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = rm < M
    c_ok = rc < C
    img, h, w = _split_pixels(rm % M, H * W, W)
    g = rc // Cg
    col_c = g * Kg + (rc - g * Cg)                                          # [BLOCK_C], tap (0, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in range(0, KH):
        th = h + ph - kh * dh
        p = tl.maximum(th, 0) // sh
        p_ok = (p * sh == th) & (p < P)
        for kw in range(0, KW):
            tw = w + pw - kw * dw
            q = tl.maximum(tw, 0) // sw
            ok = m_ok & p_ok & (q * sw == tw) & (q < Q)
            row = ((img.to(tl.int64) * P + p) * Q + q) * Ktot
            ptrs = COL_ptr + row[:, None] + (col_c + (kh * KW + kw) * Cg)[None, :]
            acc += tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    dx_ptrs = DX_ptr + _pixel_offsets(img, h, w, s_dn, s_dh, s_dw)[:, None] + (rc.to(tl.int64) * s_dc)[None, :]
    tl.store(dx_ptrs, acc.to(DX_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
class _Geometry:
    """Checked convolution geometry (all plain ints)."""

    def __init__(self, x, weight, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = x.shape
        self.Cout, self.Cg, self.KH, self.KW = weight.shape
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        self.dh, self.dw = dilation
        self.groups = groups
        self.Cout_g = self.Cout // groups
        self.Kg = self.Cg * self.KH * self.KW
        self.P = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.Q = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        self.M_out = self.N * self.P * self.Q    # output pixels
        self.M_in = self.N * self.H * self.W     # input pixels

    @property
    def conv_args(self):
        return (self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)


def _int_pair(v, name):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be a list of 2 ints, got {v!r}")
    return [int(i) for i in v]


def _check_device(*tensors):
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {dev} and {t.device}")
    if dev.type != "cuda" and not (_INTERPRET and dev.type == "cpu"):
        raise RuntimeError(f"the triton conv2d kernels need CUDA tensors (CPU tensors only under "
                           f"TRITON_INTERPRET=1), got a tensor on {dev}")


def _check_conv(x, weight, bias, stride, padding, dilation, groups, algo) -> _Geometry:
    """Validate every argument with PyTorch's messages where it has one; return the geometry."""
    check_tensor(x, "input")
    check_tensor(weight, "weight")
    if x.dim() != 4:
        raise RuntimeError(f"Expected 4D (batched) input to conv2d, but got input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"weight should have 4 dimensions (C_out, C_in/groups, KH, KW), got size {list(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
    _check_device(x, weight, *([bias] if bias is not None else []))
    if weight.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
    stride = _int_pair(stride, "stride")
    padding = _int_pair(padding, "padding")
    dilation = _int_pair(dilation, "dilation")
    if min(stride) <= 0:
        raise RuntimeError("non-positive stride is not supported")
    if min(padding) < 0:
        raise RuntimeError("negative padding is not supported")
    if min(dilation) <= 0:
        raise RuntimeError("non-positive dilation is not supported")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if groups > 65535:
        raise RuntimeError(f"the triton conv2d kernels support at most 65535 groups, got {groups}")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if weight.shape[0] % groups != 0:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
                           f"but got weight of size [{list(weight.shape)}] instead")
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(x.shape)} to have {weight.shape[1] * groups} channels, but got {x.shape[1]} "
                           f"channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{weight.shape[0]} elements, but got bias of size {list(bias.shape)} instead")
    geo = _Geometry(x, weight, stride, padding, dilation, groups)
    ph_in, pw_in = geo.H + 2 * geo.ph, geo.W + 2 * geo.pw
    kh_eff, kw_eff = geo.dh * (geo.KH - 1) + 1, geo.dw * (geo.KW - 1) + 1
    if ph_in < kh_eff or pw_in < kw_eff:
        raise RuntimeError(f"Calculated padded input size per channel: ({ph_in} x {pw_in}). Kernel size: "
                           f"({kh_eff} x {kw_eff}). Kernel size can't be greater than actual input size")
    if max(geo.M_out, geo.M_in) > _INT32_MAX or weight.numel() > _INT32_MAX:
        raise RuntimeError("the triton conv2d kernels need N*H*W pixels and weight elements below 2**31")
    return geo


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 exactly when cuDNN would use it."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(total: int, out_tiles: int, device: torch.device) -> tuple[int, int]:
    """Split a reduction of length `total` so that out_tiles * splits ~ 2 waves of programs.
    Returns (splits, chunk) with every split non-empty."""
    if device.type == "cuda":
        target, min_chunk, align = 2 * _num_sms(device.index or 0), 2048, 128
    else:  # interpreter: a few splits, so the tests exercise the reduction
        target, min_chunk, align = 2, 32, 16
    splits = max(1, min(target // max(out_tiles, 1), triton.cdiv(total, min_chunk), 65535))  # grid axis 1
    chunk = triton.cdiv(triton.cdiv(total, splits), align) * align
    return triton.cdiv(total, chunk), chunk


def _sum_splits(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out (contiguous, any float dtype) = ws.sum(0) in fp32, ws: (S, *out.shape) fp32 contiguous."""
    L = out.numel()
    block = 1024 if not _INTERPRET else 256
    _sum_splits_kernel[(triton.cdiv(L, block),)](ws, out, L, ws.shape[0], BLOCK=block)


def _kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the GEMM kernels like it: channels_last (C_out, KH, KW, Cg), so a K-tile of channels
    (forward) or a tile of input channels (dgrad) is contiguous. A no-op when the weight already is (as after
    model.to(memory_format=torch.channels_last)); otherwise one copy of the weight, which is tiny next to
    the activations (VGG16's largest: 2.4M elements vs 6.4M pixels x 64 channels)."""
    return weight.contiguous(memory_format=torch.channels_last)


def _mode(geo: _Geometry, algo: str) -> int:
    if algo == "im2col":
        return MODE_COL
    return MODE_FLAT if geo.Cg < _FLAT_BELOW else MODE_TILED


def _im2col(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """The explicit im2col buffer (N*P*Q, groups*Kg), x's dtype, contiguous."""
    ktot = geo.groups * geo.Kg
    col = new_output((geo.M_out, ktot), x)
    bm, bk = (32, 32) if _INTERPRET else (64, 64)
    if col.numel():
        grid = (triton.cdiv(geo.M_out, bm), triton.cdiv(ktot, bk))
        if grid[1] > 65535:
            raise RuntimeError("im2col: groups*C_in/groups*KH*KW too large for the grid")
        _im2col_kernel[grid](x, col, geo.M_out, geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.KH, geo.KW, geo.Kg, ktot,
                             *x.stride(), *geo.conv_args, BLOCK_M=bm, BLOCK_K=bk)
    return col


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                   dilation, groups: int, algo: str = "auto") -> torch.Tensor:
    """y = conv2d(x, weight, bias). Output (N, C_out, P, Q) in x's dtype, channels_last iff x is."""
    geo = _check_conv(x, weight, bias, stride, padding, dilation, groups, algo)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    y = new_output((geo.N, geo.Cout, geo.P, geo.Q), x, memory_format=fmt)
    if y.numel() == 0:
        return y
    mode = _mode(geo, algo)
    weight = _kernel_weight(weight)
    with _device_guard(x):
        col = _im2col(x, geo) if mode == MODE_COL else x
        grid = lambda meta: (triton.cdiv(geo.M_out, meta["BLOCK_M"]) * triton.cdiv(geo.Cout_g, meta["BLOCK_N"]),
                             geo.groups)
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, col, y,
            geo.M_out, geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW, geo.Kg,
            geo.groups * geo.Kg,
            *x.stride(), *weight.stride(), *y.stride(), *geo.conv_args,
            HAS_BIAS=bias is not None, MODE=mode, PREC=_precision(x.dtype))
    return y


def _check_mask(output_mask):
    if (not isinstance(output_mask, (list, tuple)) or len(output_mask) != 3
            or not all(isinstance(b, bool) for b in output_mask)):
        raise TypeError(f"output_mask must be a list of 3 bools, got {output_mask!r}")


def _dgrad(grad_out, x, weight, geo: _Geometry, algo: str, prec: str) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    dx = new_output(x.shape, x, memory_format=fmt)
    if dx.numel() == 0:
        return dx
    if geo.Cout_g * geo.KH * geo.KW == 0:
        return dx.zero_()
    weight = _kernel_weight(weight)
    if algo == "im2col":
        ktot = geo.groups * geo.Kg
        # fp32 column gradient: col2im's sum over taps is still part of the fp32 accumulation
        dcol = new_output((geo.M_out, ktot), x, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(geo.M_out, meta["BLOCK_M"]) * triton.cdiv(geo.Kg, meta["BLOCK_N"]),
                             geo.groups)
        _dgrad_col_gemm_kernel[grid](
            grad_out, weight, dcol, geo.M_out, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW, geo.Kg, ktot,
            *grad_out.stride(), *weight.stride(), PREC=prec)
        bm, bc = (32, 16) if _INTERPRET else (64, 64)
        grid2 = (triton.cdiv(geo.M_in, bm), triton.cdiv(geo.C, bc))
        _col2im_kernel[grid2](dcol, dx, geo.M_in, geo.H, geo.W, geo.P, geo.Q, geo.C, geo.Cg, geo.KH, geo.KW,
                              geo.Kg, ktot, *dx.stride(), *geo.conv_args, BLOCK_M=bm, BLOCK_C=bc)
        return dx
    grid = lambda meta: (triton.cdiv(geo.M_in, meta["BLOCK_M"]) * triton.cdiv(geo.Cg, meta["BLOCK_N"]), geo.groups)
    _conv_dgrad_kernel[grid](
        grad_out, weight, dx, geo.M_in, geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW,
        *grad_out.stride(), *weight.stride(), *dx.stride(), *geo.conv_args, PREC=prec)
    return dx


def _wgrad(grad_out, x, weight, geo: _Geometry, algo: str, prec: str) -> torch.Tensor:
    dw = new_output(weight.shape, weight)   # contiguous (C_out, Cg, KH, KW)
    if dw.numel() == 0:
        return dw
    if geo.M_out == 0:
        return dw.zero_()
    mode = _mode(geo, algo)
    col = _im2col(x, geo) if mode == MODE_COL else x
    tile = 32 if _INTERPRET else 128   # a typical tile edge, to size the split
    n_tiles = geo.KH * geo.KW * triton.cdiv(geo.Cg, tile) if mode == MODE_TILED else triton.cdiv(geo.Kg, tile)
    out_tiles = triton.cdiv(geo.Cout_g, tile) * n_tiles * geo.groups
    splits, chunk = _split_k(geo.M_out, out_tiles, x.device)
    direct = splits == 1 and dw.dtype == torch.float32
    ws = dw if direct else new_output((splits, *weight.shape), weight, dtype=torch.float32)

    def grid(meta):
        if mode == MODE_TILED:
            n_tiles = geo.KH * geo.KW * triton.cdiv(geo.Cg, meta["BLOCK_N"])
        else:
            n_tiles = triton.cdiv(geo.Kg, meta["BLOCK_N"])
        return (triton.cdiv(geo.Cout_g, meta["BLOCK_M"]) * n_tiles, splits, geo.groups)

    _conv_wgrad_kernel[grid](
        grad_out, x, col, ws, geo.M_out, geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW,
        geo.Kg, geo.groups * geo.Kg, chunk, *grad_out.stride(), *x.stride(), *geo.conv_args,
        MODE=mode, PREC=prec)
    if not direct:
        _sum_splits(ws, dw)
    return dw


def _bias_grad(grad_out, geo: _Geometry) -> torch.Tensor:
    db = new_output((geo.Cout,), grad_out)
    if db.numel() == 0:
        return db
    if geo.M_out == 0:
        return db.zero_()
    bp, bc = (16, 16) if _INTERPRET else (64, 64)
    c_tiles = triton.cdiv(geo.Cout, bc)
    splits, chunk = _split_k(geo.M_out, c_tiles, grad_out.device)
    ws = new_output((splits, geo.Cout), grad_out, dtype=torch.float32)
    _bias_grad_kernel[(c_tiles, splits)](grad_out, ws, geo.M_out, geo.Cout, geo.P * geo.Q, geo.Q, chunk,
                                         *grad_out.stride(), BLOCK_P=bp, BLOCK_C=bc)
    _sum_splits(ws, db)
    return db


def conv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                    groups: int, output_mask, algo: str = "auto"):
    """(grad_x, grad_w, grad_b) of conv2d; an entry whose output_mask is False is x.new_empty(0).
    grad_x: x's shape/dtype, channels_last iff x is; grad_w: weight's shape/dtype, contiguous; grad_b: (C_out,)."""
    geo = _check_conv(x, weight, None, stride, padding, dilation, groups, algo)
    _check_mask(output_mask)
    check_tensor(grad_out, "grad_out")
    _check_device(x, grad_out)
    if grad_out.dtype != x.dtype:
        raise RuntimeError(f"grad_out type ({grad_out.dtype}) and input type ({x.dtype}) should be the same")
    expected = (geo.N, geo.Cout, geo.P, geo.Q)
    if tuple(grad_out.shape) != expected:
        raise RuntimeError(f"grad_out must have shape {list(expected)}, got {list(grad_out.shape)}")
    prec = _precision(x.dtype)
    with _device_guard(x):
        grad_x = _dgrad(grad_out, x, weight, geo, algo, prec) if output_mask[0] else x.new_empty(0)
        grad_w = _wgrad(grad_out, x, weight, geo, algo, prec) if output_mask[1] else x.new_empty(0)
        grad_b = _bias_grad(grad_out, geo) if output_mask[2] else x.new_empty(0)
    return grad_x, grad_w, grad_b
