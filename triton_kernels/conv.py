"""Conv2d kernels: implicit GEMM (forward, dgrad, wgrad), explicit im2col + GEMM, bias and bias gradient, and the
fused Conv2d + BatchNorm statistics / BatchNorm+ReLU prologue that the same implicit-GEMM kernels run when their
constexpr hooks are on.

Tensors (NCHW or channels_last, any strides). The kernels compute in NHWC: an operand that is not channels_last
(x, grad_out, conv_bn_relu's y) is converted once by the launcher (_nhwc) and the result converted back to x's
format, rather than gathered through NCHW strides in every tile (those gathers spilled registers); the small
weight is handed to the kernels channels_last, a no-op when it already is, see _kernel_weight:
    x:        (N, C_in, H, W)                float32|float64|float16|bfloat16
    weight:   (C_out, C_in/groups, KH, KW)   same dtype
    bias:     (C_out,) or None               same dtype (conv2d) | float32, float64 for float64 x (conv_bn_relu)
    y, grad_out: (N, C_out, P, Q)            P = (H + 2*ph - dh*(KH-1) - 1) // sh + 1, Q likewise
Accumulation is float32 (float64 for float64 inputs, on the FP64 MMA; every per-channel vector, statistic and
workspace named float32 below is then float64 too); float32 inputs go through TF32 tensor cores exactly when
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

Fusion hooks (constexpr, like a GEMM's fused activation epilogue; all False for conv2d, whose kernels then
compile to the instructions, registers and shared memory they had without hooks — checked when the hooks were
merged, benchmarks/NOTES.md). They serve conv_bn_relu, where a conv writes only its raw output
y = conv(a) + bias and the BatchNorm + ReLU of the layer, relu(y*scale + shift), is applied by the NEXT conv
while it loads y (cuDNN's runtime fusion "scale-bias-ReLU prologue, statistics epilogue"):
    PROLOGUE     forward, wgrad: the x operand is a = relu(x*S[c] + T[c]) (S, T float32 per input channel);
                 padding taps stay 0 (zero padding applies to a, as in conv(relu(bn(y))));
                 dgrad: its backward in the epilogue, dL/dx = dL/da * [x*S+T > 0] * S, plus per-tile partial
                 sums of dL/dS = sum(dL/dpre * x) and dL/dT = sum(dL/dpre) (pre = x*S + T).
    STATS        forward: each output tile writes its per-channel sum and CENTRED sum of squares
                 M2 = sum((y - tile_mean)^2) of the stored (rounded) y to (tiles, C_out) float32 partials;
                 a tiny deterministic combine (Chan et al.'s parallel variance, _combine_stats) gives the batch
                 mean and biased variance. No atomics: their sum order would change from run to run, and an
                 uncentred sum of squares in fp32 cancels catastrophically when |mean| >> std.
    GRAD_AFFINE  dgrad, wgrad: the gradient operand is g' = g + GA[co]*y + GB[co], the gradient that reaches y
                 through the batch mean and variance (GA = 2*dL/dvar / M, GB = dL/dmean / M - GA*mean).
    DBIAS        wgrad: also reduce the gradient operand's row sums (dL/dbias of the fused conv) per split.
The statistics partials are indexed by the tile row pid_m, so their count depends on the autotuned BLOCK_M:
the launchers allocate for the smallest BLOCK_M of the configurations and read the chosen one back from the
autotuner (best_config) after the launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, acc_dtype, acc_zeros, autotune_bucket, bn_relu, check_device, check_tensor,
                      check_vector, dense_format, device_guard, mma, new_output, pixel_offsets, relu_passes,
                      split_pixels, tile_ids, to_acc)

ALGOS = ("auto", "implicit_gemm", "im2col")
MODE_TILED, MODE_FLAT, MODE_COL = 0, 1, 2
_FLAT_BELOW = 16  # Cg below this: a (kh, kw, channel-block) K-tile would be mostly padding -> MODE_FLAT
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------------
# Autotune configurations. GEMM tiles: BLOCK_M x BLOCK_N output, BLOCK_K reduction step.
# Hopper (H100/H200, 228 KB smem, wgmma): big 128x128 / 128x256 / 256x128 tiles, BLOCK_K 64, 3 stages,
# 8 warps. Ampere (A100, 164 KB smem): 128x128 / 128x64 tiles, BLOCK_K 32, 4 stages, 4 warps.
# BLOCK_N 64 variants serve C_out = 64 (VGG's first block). Under TRITON_INTERPRET=1 one small config
# (the interpreter is slow and ignores warps and stages). Every kernel (hooks on or off) prunes them the
# same way: tiles far wider than the problem, and tiles whose pipeline cannot fit the device's shared memory.
# ----------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


_GPU_CONFIGS = [
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
    # float32 with TF32 off under the fused hooks only (_registers_fit)
    _cfg(64, 64, 16, 4, 4),
    # float64 only (_registers_fit): the FP64 MMA's 64x64 accumulator over 8 warps
    _cfg(64, 64, 32, 8, 3),
]
_FP64_TILE = (64, 64, 32, 8)   # (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the float64 config
_GEMM_CONFIGS = [_cfg(32, 32, 32, 4, 1, group_m=2)] if INTERPRET else _GPU_CONFIGS
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _GEMM_CONFIGS)   # sizes the per-tile statistics partials


def smem_bytes(config: triton.Config, elem_size: int, cc_major: int, *, y_tile: bool = False,
               staged_a: bool = False, staged_b: bool = False, scratch: bool = False) -> int:
    """Shared memory a config needs (an upper estimate): the software pipeline's copies of the dot's A
    (BLOCK_M x BLOCK_K) and B (BLOCK_K x BLOCK_N) tiles — num_stages of them on Hopper (cc 9), num_stages - 1
    before — plus, with the fusion hooks, num_stages copies of the y tile GRAD_AFFINE loads next to A (y_tile),
    one buffer for an operand tile transformed in registers before the dot (staged_a / staged_b: the PROLOGUE),
    and 2 KB for the epilogue's cross-warp reductions (scratch). Fitted to, and never below, what Triton 3.8
    allocates for every config of the three kernels, hooks off and on, fp32 and bf16, sm_80 and sm_90
    (`fusedcnn compile-check` reports the real figure per compile)."""
    kw = config.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    dot_stages = config.num_stages if cc_major >= 9 else config.num_stages - 1
    total = dot_stages * (bm + bn) * bk
    total += config.num_stages * bm * bk if y_tile else 0
    total += bm * bk if staged_a else 0
    total += bk * bn if staged_b else 0
    return total * elem_size + (2048 if scratch else 0)


def hook_smem_flags(kernel: str, hooks: dict) -> dict:
    """smem_bytes' flags for a kernel ("fwd", "dgrad", "wgrad", other: none) launched with these constexprs."""
    pro, affine = bool(hooks.get("PROLOGUE")), bool(hooks.get("GRAD_AFFINE"))
    if kernel == "fwd":
        return dict(staged_a=pro, scratch=pro or bool(hooks.get("STATS")))
    if kernel == "dgrad":
        return dict(y_tile=affine, scratch=pro or affine)
    if kernel == "wgrad":
        return dict(y_tile=affine, staged_b=pro, scratch=pro or affine or bool(hooks.get("DBIAS")))
    return {}


@functools.lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> tuple[int, int]:
    """(shared memory one block may use, compute capability major) of device (opt-in maximum: H100 232,448 B,
    A100 166,912 B)."""
    if device.type != "cuda":
        return 1 << 62, 9   # the interpreter has no such limit
    props = torch.cuda.get_device_properties(device)
    return props.shared_memory_per_block_optin, props.major


def _prune(kernel: str, m_arg: str | None, n_arg: str | None, ptr_arg: str):
    """Drop tiles far wider than the problem (e.g. BLOCK_N 256 for C_out = 64) and tiles whose shared memory
    (smem_bytes, with the launch's hooks) exceeds the device's; keep at least one."""
    def prune(configs, named_args, **kwargs):
        if n_arg is None:   # wgrad: (kh, kw, channel block) columns in MODE 0, so the channel count bounds BLOCK_N
            n_name = "Cg" if kwargs.get("MODE", MODE_TILED) == MODE_TILED else "Kg"
        else:
            n_name = n_arg
        n = max(16, triton.next_power_of_2(int(named_args[n_name])))
        m = max(16, triton.next_power_of_2(int(named_args[m_arg]))) if m_arg else None
        t = named_args[ptr_arg]
        limit, cc_major = _smem_limit(t.device)
        flags = hook_smem_flags(kernel, kwargs)
        mode = kwargs.get("MODE", MODE_TILED)
        fits = [c for c in configs if smem_bytes(c, t.element_size(), cc_major, **flags) <= limit
                and _registers_fit(kernel, c, t.element_size(), mode, named_args, kwargs)] or configs
        kept = [c for c in fits if c.kwargs["BLOCK_N"] <= n and (m is None or c.kwargs["BLOCK_M"] <= m)]
        return kept or [min(fits, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _registers_fit(kernel: str, config: triton.Config, elem_size: int, mode: int, named_args, hooks: dict) -> bool:
    """Configs that `fusedcnn compile-check` (the full matrix, sm_80 and sm_90) found spilling registers are not
    launched. What spills is the [BLOCK_M, BLOCK_K] operand tile each thread holds in registers, in bytes per
    thread a_bytes = BLOCK_M * BLOCK_K * elem_size / (32 * num_warps):
    - float32 tiles of BLOCK_K 64 (twice a 16-bit tile's registers: the Hopper configs spill at 255, TF32 or not);
    - the forward's "flat" K loop (MODE 1: (kh, kw, c) decoded per element of the tile): BLOCK_K beyond the
      reduction it has (Kg = 27 for VGG's first layer: one 32-wide step), BLOCK_M over 64;
    - the fused hooks of the forward and dgrad (PROLOGUE / STATS / GRAD_AFFINE: the tile, and the y tile beside
      it, normalised in float32 registers before the dot): a_bytes over 64 (128x64x64 and 256x64x64 16-bit,
      128x64x32 float32 spilled 8-144 B); float32 with TF32 off (the FMA dot) under any hook, the weight
      gradient's included: a_bytes over 32 (64x64x32 spilled 12-480 B on sm_80), which only the 64x64x16 tile
      meets -- that tile is for this case alone;
    - BLOCK_N 64 tiles of the forward and dgrad (the warps tile M, each thread holds more of A): a_bytes over 64
      (128x64x64 16-bit, 128x64x32 float32 spilled 4-144 B without hooks).
    float64 runs the one 64x64x32 8-warp tile, and nothing else does: of ten tiles compiled for every kernel, hook
    and mode (fp64, VGG's conv1/2/5, sm_80 and sm_90), it is the largest that never spilled (64x64x32 and 64x64x16
    at 4 warps spilled 4-136 B in the fused forward and dgrad; without this rule fp64 fell back to every config,
    256x64x64 included, which spilled 1180 B)."""
    kw = config.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    if (elem_size >= 8) != ((bm, bn, bk, config.num_warps) == _FP64_TILE):
        return False
    if elem_size >= 8:
        return True
    a_bytes = bm * bk * elem_size // (32 * config.num_warps)
    gemm = kernel in ("fwd", "dgrad")
    any_hook = any(hooks.get(h) for h in ("PROLOGUE", "STATS", "GRAD_AFFINE"))
    hooked = gemm and any_hook
    fma = elem_size >= 4 and hooks.get("PREC") == "ieee" and any_hook
    if bk < 32:
        return fma
    if elem_size >= 4 and bk > 32:
        return False
    if kernel == "fwd" and mode == MODE_FLAT:
        return bk <= max(16, triton.next_power_of_2(int(named_args["Kg"]))) and bm <= 64
    if fma:
        return a_bytes <= 32
    if hooked:
        return a_bytes <= 64
    if gemm and bn <= 64:
        return a_bytes <= 64
    return True


def _even(dim: str, block: str):
    return lambda a: a[dim] % a[block] == 0


# ----------------------------------------------------------------------------------------------------
# Hook pieces (inlined; each runs only under its constexpr)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_pair(S_ptr, T_ptr, ch, ok):
    """(S[ch], T[ch]) in S's dtype, 0 where not ok: a per-channel (scale, shift) or (alpha, beta) pair."""
    return tl.load(S_ptr + ch, mask=ok, other=0.0), tl.load(T_ptr + ch, mask=ok, other=0.0)


@triton.jit
def _normalize(v, s, t, mask):
    """PROLOGUE on an operand tile: relu(v*s + t) where mask (a live tap), 0 elsewhere (zero padding applies to
    the normalized value), rounded back to v's dtype for the tensor cores. s, t broadcast against v."""
    return tl.where(mask, bn_relu(v, s, t), 0.0).to(v.dtype)


@triton.jit
def _grad_affine(g, yv, ga, gb, mask):
    """GRAD_AFFINE on a gradient tile: g + ga*y + gb where mask, 0 elsewhere, in g's dtype."""
    return tl.where(mask, to_acc(g) + ga * to_acc(yv) + gb, 0.0).to(g.dtype)


@triton.jit
def _stats_partials(y, row_ok, pid_m, count, cols, col_ok, C, PSUM_ptr, PM2_ptr):
    """STATS epilogue: the tile's per-channel sum and centred M2 of y (rows where row_ok; count of them) into
    row pid_m of the (tiles, C) float32 partials, at columns cols."""
    v = tl.where(row_ok[:, None], to_acc(y), 0.0)
    tile_sum = tl.sum(v, axis=0)
    d = tl.where(row_ok[:, None], v - (tile_sum / count)[None, :], 0.0)
    part = pid_m.to(tl.int64) * C + cols
    tl.store(PSUM_ptr + part, tile_sum, mask=col_ok)
    tl.store(PM2_ptr + part, tl.sum(d * d, axis=0), mask=col_ok)


@triton.jit
def _normalize_backward(acc, X_ptr, x_offs, S_ptr, T_ptr, PDS_ptr, PDT_ptr, ch, ch_ok, row_ok, pid_m, C):
    """PROLOGUE's backward in the dgrad epilogue: acc holds dL/da for the tile's input pixels (rows) and
    channels ch (columns). Recomputes pre = x*S + T, returns dL/dx = dL/da * [ReLU passes] * S and writes the
    tile's partial sums of dL/dS = sum(dL/dpre * x), dL/dT = sum(dL/dpre) to row pid_m of (tiles, C) partials."""
    mask = row_ok[:, None] & ch_ok[None, :]
    x = to_acc(tl.load(X_ptr + x_offs, mask=mask, other=0.0))
    s, t = _load_pair(S_ptr, T_ptr, ch, ch_ok)
    dpre = tl.where(mask & relu_passes(x * s[None, :] + t[None, :]), acc, 0.0)
    part = pid_m.to(tl.int64) * C + ch
    tl.store(PDS_ptr + part, tl.sum(dpre * x, axis=0), mask=ch_ok)
    tl.store(PDT_ptr + part, tl.sum(dpre, axis=0), mask=ch_ok)
    return dpre * s[None, :]


# ----------------------------------------------------------------------------------------------------
# Forward:  Y[n, g*Cout_g + co, p, q] = bias[co] + sum_(kh, kw, c) A[n, g*Cg + c, ih, iw] * W[co, c, kh, kw]
#           ih = p*sh - ph + kh*dh, iw = q*sw - pw + kw*dw (zero outside the image); A = X, or relu(X*S + T).
# GEMM rows = output pixels (n, p, q), columns = output channels of group g (grid axis 1), K = (kh, kw, c).
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "Cout_g", "Cg", "KH", "KW", "MODE", "PROLOGUE", "STATS"],
                 prune_configs_by={"early_config_prune": _prune("fwd", None, "Cout_g", "X_ptr")})
@triton.heuristics({"EVEN_C": _even("Cg", "BLOCK_K")})
@triton.jit
def _conv_fwd_kernel(
    X_ptr, W_ptr, B_ptr, COL_ptr, Y_ptr, S_ptr, T_ptr, PSUM_ptr, PM2_ptr,
    M, M_BUCKET, H, W, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot,
    s_xn, s_xc, s_xh, s_xw,
    s_wo, s_wc, s_wh, s_ww,
    s_yn, s_yc, s_yh, s_yw,
    sh, sw, ph, pw, dh, dw,
    HAS_BIAS: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, PROLOGUE: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    """X: (N, groups*Cg, H, W) float16|bfloat16|float32|float64, any strides; W: (groups*Cout_g, Cg, KH, KW) X's dtype;
    B: (groups*Cout_g,) X's dtype or float32; COL: (M, Ktot) im2col buffer (MODE 2); Y: (N, groups*Cout_g, P, Q)
    X's dtype, any strides; S, T: (groups*Cg,) float32 (PROLOGUE); PSUM, PM2: (>= cdiv(M, BLOCK_M),
    groups*Cout_g) float32 (STATS). Grid (tiles of (M, Cout_g), groups)."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, Cout_g, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrapped row/column indices keep every load in bounds without masks; wrapped lanes are never stored.
    m_ld = rm % M
    n_ld = rn % Cout_g
    img, p, q = split_pixels(m_ld, P * Q, Q)
    ih0 = p * sh - ph
    iw0 = q * sw - pw
    x_row = img.to(tl.int64) * s_xn + (g * Cg).to(tl.int64) * s_xc        # [BLOCK_M]
    w_col = (g * Cout_g + n_ld).to(tl.int64) * s_wo                        # [BLOCK_N]

    acc = acc_zeros((BLOCK_M, BLOCK_N), X_ptr)
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
            if PROLOGUE:   # channels past Cg load S = T = 0 and stay 0
                s, t = _load_pair(S_ptr, T_ptr, g * Cg + c, c < Cg)
                a = _normalize(a, s[None, :], t[None, :], row_ok[:, None])
            acc = mma(a, b, acc, PREC)
    else:
        acc = _fwd_gather_loop(acc, X_ptr, W_ptr, COL_ptr, S_ptr, T_ptr, x_row, w_col, ih0, iw0, m_ld, g,
                               H, W, Cg, KW, Kg, Ktot, s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, dh, dw,
                               MODE, PROLOGUE, PREC, BLOCK_K)

    # Epilogue: bias, cast, store through Y's strides (NCHW or NHWC); statistics of the stored values.
    if HAS_BIAS:
        acc += to_acc(tl.load(B_ptr + g * Cout_g + n_ld))[None, :]
    y_ptrs = (Y_ptr + pixel_offsets(img, p, q, s_yn, s_yh, s_yw)[:, None]
              + ((g * Cout_g + n_ld).to(tl.int64) * s_yc)[None, :])
    mask = (rm < M)[:, None] & (rn < Cout_g)[None, :]
    y = acc.to(Y_ptr.dtype.element_ty)
    tl.store(y_ptrs, y, mask=mask)
    if STATS:
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(acc.dtype)
        _stats_partials(y, rm < M, pid_m, count, g * Cout_g + n_ld, rn < Cout_g, Cout_g * tl.num_programs(1),
                        PSUM_ptr, PM2_ptr)


@triton.jit
def _fwd_gather_loop(acc, X_ptr, W_ptr, COL_ptr, S_ptr, T_ptr, x_row, w_col, ih0, iw0, m_ld, g,
                     H, W, Cg, KW, Kg, Ktot, s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, dh, dw,
                     MODE: tl.constexpr, PROLOGUE: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """The forward's K loop over BLOCK_K flat (kh, kw, c) indices: gathered from X per element (MODE 1) or read
    from the im2col buffer COL (MODE 2, no PROLOGUE). Returns acc + the tile's products."""
    rk = tl.arange(0, BLOCK_K)
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
            if PROLOGUE:
                s, t = _load_pair(S_ptr, T_ptr, g * Cg + c, k_ok)
                a = _normalize(a, s[None, :], t[None, :], ok)
        else:
            a = tl.load(COL_ptr + col_row[:, None] + (g * Kg + k)[None, :], mask=k_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PREC)
    return acc


# ----------------------------------------------------------------------------------------------------
# dgrad: DX[n, g*Cg + c, h, w] = sum_(kh, kw, co) DY[n, g*Cout_g + co, p, q] * W[g*Cout_g + co, c, kh, kw]
#        over the taps with h = p*sh - ph + kh*dh (i.e. p = (h + ph - kh*dh) / sh exact, 0 <= p < P).
# GEMM rows = input pixels (n, h, w), columns = input channels of group g, K = (kh, kw, co).
# With stride 1 every tap is live; with stride s only ~1/s^2 of them are (the rest load as zeros).
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "Cout_g", "Cg", "KH", "KW", "GRAD_AFFINE", "PROLOGUE"],
                 prune_configs_by={"early_config_prune": _prune("dgrad", None, "Cg", "G_ptr")})
@triton.heuristics({"EVEN_CO": _even("Cout_g", "BLOCK_K")})
@triton.jit
def _conv_dgrad_kernel(
    G_ptr, W_ptr, DX_ptr, Y_ptr, GA_ptr, GB_ptr, X_ptr, S_ptr, T_ptr, PDS_ptr, PDT_ptr,
    M, M_BUCKET, H, W, P, Q, Cg, Cout_g, KH, KW,
    s_gn, s_gc, s_gh, s_gw,
    s_wo, s_wc, s_wh, s_ww,
    s_dn, s_dc, s_dh, s_dw,
    s_yn, s_yc, s_yh, s_yw,
    s_xn, s_xc, s_xh, s_xw,
    sh, sw, ph, pw, dh, dw,
    PREC: tl.constexpr, GRAD_AFFINE: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_CO: tl.constexpr,
):
    """G: (N, groups*Cout_g, P, Q) float16|bfloat16|float32|float64, any strides; W: (groups*Cout_g, Cg, KH, KW) G's
    dtype; DX: (N, groups*Cg, H, W) G's dtype, any strides; Y: like G (GRAD_AFFINE); GA, GB: (groups*Cout_g,)
    float32 (GRAD_AFFINE); X: like DX, S, T: (groups*Cg,) float32, PDS, PDT: (>= cdiv(M, BLOCK_M), groups*Cg)
    float32 (PROLOGUE). Grid (tiles of (M, Cg), groups)."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, Cg, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ld = rm % M
    c_ld = rn % Cg
    img, h, w = split_pixels(m_ld, H * W, W)
    th0 = h + ph
    tw0 = w + pw
    g_row = img.to(tl.int64) * s_gn                                         # [BLOCK_M]
    w_col = c_ld.to(tl.int64) * s_wc                                        # [BLOCK_N]

    acc = acc_zeros((BLOCK_M, BLOCK_N), G_ptr)
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
        if GRAD_AFFINE:
            mask = row_ok[:, None] & (co < (g + 1) * Cout_g)[None, :]
            yv = tl.load(Y_ptr + pixel_offsets(img, p, q, s_yn, s_yh, s_yw)[:, None]
                         + (co.to(tl.int64) * s_yc)[None, :], mask=mask, other=0.0)
            ga, gb = _load_pair(GA_ptr, GB_ptr, co, co < (g + 1) * Cout_g)
            a = _grad_affine(a, yv, ga[None, :], gb[None, :], mask)
        acc = mma(a, b, acc, PREC)

    if PROLOGUE:
        x_offs = pixel_offsets(img, h, w, s_xn, s_xh, s_xw)[:, None] + ((g * Cg + c_ld).to(tl.int64) * s_xc)[None, :]
        acc = _normalize_backward(acc, X_ptr, x_offs, S_ptr, T_ptr, PDS_ptr, PDT_ptr, g * Cg + c_ld, rn < Cg,
                                  rm < M, pid_m, Cg * tl.num_programs(1))
    dx_ptrs = (DX_ptr + pixel_offsets(img, h, w, s_dn, s_dh, s_dw)[:, None]
               + ((g * Cg + c_ld).to(tl.int64) * s_dc)[None, :])
    mask = (rm < M)[:, None] & (rn < Cg)[None, :]
    tl.store(dx_ptrs, acc.to(DX_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# wgrad: WS[s, g*Cout_g + co, c, kh, kw] = sum over pixels (n, p, q) of split s of
#        DY[n, g*Cout_g + co, p, q] * A[n, g*Cg + c, p*sh - ph + kh*dh, q*sw - pw + kw*dw]   (A = X or relu(X*S+T))
# GEMM rows = output channels (Cout_g), columns = (kh, kw, c), K = N*P*Q pixels. The output is small and
# K huge, so K is split over grid axis 1 (split-K); each split writes its fp32 partial to a workspace
# (S, C_out, Cg, KH, KW) that _sum_splits_kernel reduces in a fixed order (deterministic, no atomics).
# MODE 0: a column tile is (kh, kw, BLOCK_N channels); MODE 1: BLOCK_N flat (kh, kw, c); MODE 2: im2col buffer.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _wgrad_columns(pid_n, rn, Cg, KW, Kg, c_tiles, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN_C: tl.constexpr):
    """wgrad's column tile pid_n -> (kh, kw, c, c_ld, j_ld, col_ok): taps (scalars in MODE 0, [BLOCK_N] else),
    channels c, in-bounds channels c_ld for loads, flat column j_ld (MODE 1, 2) and the columns to store."""
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
        j_ld = c_ld
    else:
        j = pid_n * BLOCK_N + rn                                            # [BLOCK_N] flat (kh, kw, c)
        col_ok = j < Kg
        j_ld = j % Kg
        r = j_ld // Cg
        c = j_ld - r * Cg
        c_ld = c
        kh = r // KW
        kw = r - kh * KW
    return kh, kw, c, c_ld, j_ld, col_ok


@triton.autotune(configs=_GEMM_CONFIGS, key=["Cout_g", "Cg", "KH", "KW", "M_BUCKET", "MODE", "GRAD_AFFINE",
                                             "PROLOGUE", "DBIAS"],
                 prune_configs_by={"early_config_prune": _prune("wgrad", "Cout_g", None, "G_ptr")})
@triton.heuristics({"EVEN_C": _even("Cg", "BLOCK_N"), "EVEN_CO": _even("Cout_g", "BLOCK_M")})
@triton.jit
def _conv_wgrad_kernel(
    G_ptr, X_ptr, COL_ptr, WS_ptr, Y_ptr, GA_ptr, GB_ptr, S_ptr, T_ptr, DB_ptr,
    M, M_BUCKET, H, W, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot, k_chunk,
    s_gn, s_gc, s_gh, s_gw,
    s_xn, s_xc, s_xh, s_xw,
    s_yn, s_yc, s_yh, s_yw,
    sh, sw, ph, pw, dh, dw,
    MODE: tl.constexpr, PREC: tl.constexpr, GRAD_AFFINE: tl.constexpr, PROLOGUE: tl.constexpr,
    DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr, EVEN_CO: tl.constexpr,
):
    """G: (N, groups*Cout_g, P, Q) float16|bfloat16|float32|float64, any strides; X: (N, groups*Cg, H, W) G's dtype, any
    strides; COL: (M, Ktot) (MODE 2); WS: (splits, groups*Cout_g, Cg, KH, KW) contiguous, float32 or G's dtype;
    Y: like G, GA, GB: (groups*Cout_g,) float32 (GRAD_AFFINE); S, T: (groups*Cg,) float32 (PROLOGUE);
    DB: (splits, groups*Cout_g) float32 (DBIAS). Grid (tiles of (Cout_g, columns), splits, groups)."""
    c_tiles = tl.cdiv(Cg, BLOCK_N)
    if MODE == 0:
        pid_m, pid_n = tile_ids(tl.program_id(0), Cout_g, KH * KW * c_tiles * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
    else:
        pid_m, pid_n = tile_ids(tl.program_id(0), Cout_g, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    g = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    if EVEN_CO:
        co_ld = rm
    else:
        co_ld = rm % Cout_g
    kh, kw, c, c_ld, j_ld, col_ok = _wgrad_columns(pid_n, tl.arange(0, BLOCK_N), Cg, KW, Kg, c_tiles,
                                                   MODE, BLOCK_N, EVEN_C)
    g_col = (g * Cout_g + co_ld).to(tl.int64) * s_gc                        # [BLOCK_M]
    x_chan = (g * Cg + c_ld).to(tl.int64) * s_xc                            # [BLOCK_N]
    if GRAD_AFFINE:
        ga, gb = _load_pair(GA_ptr, GB_ptr, g * Cout_g + co_ld, co_ld < Cout_g)
    if PROLOGUE:
        s, t = _load_pair(S_ptr, T_ptr, g * Cg + c_ld, col_ok)
    else:
        s, t = 0.0, 0.0                                                      # unused
    if DBIAS:
        db = acc_zeros((BLOCK_M,), G_ptr)

    k_lo = split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, M)
    acc = acc_zeros((BLOCK_M, BLOCK_N), G_ptr)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        pix = k0 + rk
        pix_ok = pix < k_hi
        img, p, q = split_pixels(pix, P * Q, Q)
        a = tl.load(G_ptr + g_col[:, None] + pixel_offsets(img, p, q, s_gn, s_gh, s_gw)[None, :],
                    mask=pix_ok[None, :], other=0.0)
        if GRAD_AFFINE:
            yv = tl.load(Y_ptr + ((g * Cout_g + co_ld).to(tl.int64) * s_yc)[:, None]
                         + pixel_offsets(img, p, q, s_yn, s_yh, s_yw)[None, :], mask=pix_ok[None, :], other=0.0)
            a = _grad_affine(a, yv, ga[:, None], gb[:, None], pix_ok[None, :])
        if DBIAS:
            db += tl.sum(to_acc(a), axis=1)
        b = _wgrad_x_tile(X_ptr, COL_ptr, img, p, q, pix, pix_ok, kh, kw, x_chan, g * Kg + j_ld, s, t, H, W, Ktot,
                          s_xn, s_xh, s_xw, sh, sw, ph, pw, dh, dw, MODE, PROLOGUE)
        acc = mma(a, b, acc, PREC)

    # WS is contiguous (S, C_out, Cg, KH, KW).
    row = (split.to(tl.int64) * Cout_g * tl.num_programs(2) + g * Cout_g + rm) * Kg    # [BLOCK_M]
    ws_ptrs = WS_ptr + row[:, None] + (c * (KH * KW) + kh * KW + kw)[None, :]
    mask = (rm < Cout_g)[:, None] & col_ok[None, :]
    tl.store(ws_ptrs, acc.to(WS_ptr.dtype.element_ty), mask=mask)
    if DBIAS:   # one column tile per (row tile, split) writes the row sums
        db_ptrs = DB_ptr + split.to(tl.int64) * Cout_g * tl.num_programs(2) + g * Cout_g + rm
        tl.store(db_ptrs, db, mask=(rm < Cout_g) & (pid_n == 0))


@triton.jit
def _wgrad_x_tile(X_ptr, COL_ptr, img, p, q, pix, pix_ok, kh, kw, x_chan, col_j, s, t, H, W, Ktot,
                  s_xn, s_xh, s_xw, sh, sw, ph, pw, dh, dw, MODE: tl.constexpr, PROLOGUE: tl.constexpr):
    """wgrad's B tile [BLOCK_K pixels, BLOCK_N columns]: X at each column's tap (kh, kw) and channel offset x_chan
    (MODE 0: one tap per tile; MODE 1: per column), through the PROLOGUE (s, t per column) when on; MODE 2: the
    im2col buffer's columns col_j. Zero outside the image and past the split's pixels."""
    if MODE == 0:
        ih = p * sh - ph + kh * dh
        iw = q * sw - pw + kw * dw
        ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(X_ptr + pixel_offsets(img, ih, iw, s_xn, s_xh, s_xw)[:, None] + x_chan[None, :],
                    mask=ok[:, None], other=0.0)
        if PROLOGUE:
            b = _normalize(b, s[None, :], t[None, :], ok[:, None])
    elif MODE == 1:
        ih = (p * sh - ph)[:, None] + (kh * dh)[None, :]
        iw = (q * sw - pw)[:, None] + (kw * dw)[None, :]
        ok = pix_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(X_ptr + (img.to(tl.int64) * s_xn)[:, None] + ih.to(tl.int64) * s_xh
                    + iw.to(tl.int64) * s_xw + x_chan[None, :], mask=ok, other=0.0)
        if PROLOGUE:
            b = _normalize(b, s[None, :], t[None, :], ok)
    else:
        b = tl.load(COL_ptr + (pix.to(tl.int64) * Ktot)[:, None] + col_j[None, :], mask=pix_ok[:, None], other=0.0)
    return b


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
    acc = acc_zeros((BLOCK_P, BLOCK_C), G_ptr)   # reduced once at the end, not per step
    for k0 in range(k_lo, k_hi, BLOCK_P):
        pix = k0 + tl.arange(0, BLOCK_P)
        img, p, q = split_pixels(pix, PQ, Q)
        ptrs = G_ptr + pixel_offsets(img, p, q, s_gn, s_gh, s_gw)[:, None] + chan[None, :]
        acc += to_acc(tl.load(ptrs, mask=(pix < k_hi)[:, None] & c_ok[None, :], other=0.0))
    tl.store(WS_ptr + split.to(tl.int64) * C + rc, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _sum_splits_kernel(WS_ptr, OUT_ptr, L, S, BLOCK: tl.constexpr):
    """OUT[i] = sum_s WS[s, i] (WS's dtype: fp32 or fp64, fixed order), cast to OUT's dtype. WS: (S, L), OUT: (L,)
    contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = acc_zeros((BLOCK,), WS_ptr)
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
    img, p, q = split_pixels(rm % M, P * Q, Q)
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
@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "Cout_g", "Kg"],
                 prune_configs_by={"early_config_prune": _prune("dgrad_col", None, "Kg", "G_ptr")})
@triton.heuristics({"EVEN_CO": _even("Cout_g", "BLOCK_K")})
@triton.jit
def _dgrad_col_gemm_kernel(
    G_ptr, W_ptr, COL_ptr,
    M, M_BUCKET, P, Q, Cg, Cout_g, KH, KW, Kg, Ktot,
    s_gn, s_gc, s_gh, s_gw,
    s_wo, s_wc, s_wh, s_ww,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_CO: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    img, p, q = split_pixels(rm % M, P * Q, Q)
    g_row = pixel_offsets(img, p, q, s_gn, s_gh, s_gw)                   # [BLOCK_M]
    j_ld = rj % Kg
    r = j_ld // Cg
    c = j_ld - r * Cg
    kh = r // KW
    kw = r - kh * KW
    w_col = c * s_wc + kh * s_wh + kw * s_ww                               # [BLOCK_N]
    acc = acc_zeros((BLOCK_M, BLOCK_N), G_ptr)
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
        acc = mma(a, b, acc, PREC)
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
    img, h, w = split_pixels(rm % M, H * W, W)
    g = rc // Cg
    col_c = g * Kg + (rc - g * Cg)                                          # [BLOCK_C], tap (0, 0)
    acc = acc_zeros((BLOCK_M, BLOCK_C), COL_ptr)
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
            acc += to_acc(tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0))
    dx_ptrs = DX_ptr + pixel_offsets(img, h, w, s_dn, s_dh, s_dw)[:, None] + (rc.to(tl.int64) * s_dc)[None, :]
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

    @property
    def kernel_fits(self) -> bool:
        """The (dilated) kernel fits the padded input, i.e. the output has at least one pixel per axis."""
        return self.P > 0 and self.Q > 0


class _Hooks:
    """Tensors of conv_bn_relu's fusion hooks; a hook whose tensors are None is off (constexpr False).
    in_scale, in_shift: (C_in,) float32 (PROLOGUE); y: the forward's output, g_alpha, g_beta: (C_out,) float32
    (GRAD_AFFINE); float64 instead of float32 for float64 x."""

    def __init__(self, in_scale=None, in_shift=None, y=None, g_alpha=None, g_beta=None):
        self.in_scale, self.in_shift, self.y, self.g_alpha, self.g_beta = in_scale, in_shift, y, g_alpha, g_beta
        self.prologue = in_scale is not None
        self.affine = y is not None

    def args(self, dummy: torch.Tensor):
        """(S, T, Y, GA, GB) kernel pointers, dummy (never read) for a hook that is off."""
        s, t = (self.in_scale, self.in_shift) if self.prologue else (dummy, dummy)
        y, ga, gb = (self.y, self.g_alpha, self.g_beta) if self.affine else (dummy, dummy, dummy)
        return s, t, y, ga, gb


_NO_HOOKS = _Hooks()


def _int_pair(v, name):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"{name} must be a list of 2 ints, got {v!r}")
    return [int(i) for i in v]


def _check_tensors(x, weight, bias) -> None:
    """input and weight (and bias of x's dtype, if given): 4-D float tensors of one dtype, on one usable device."""
    check_tensor(x, "input")
    check_tensor(weight, "weight")
    if x.dim() != 4:
        raise RuntimeError(f"Expected 4D (batched) input to conv2d, but got input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"weight should have 4 dimensions (C_out, C_in/groups, KH, KW), got size {list(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
    check_device(x, weight, bias)
    if weight.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    if bias is not None and bias.dtype != x.dtype:
        raise RuntimeError(f"Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")


def _check_geometry(x, weight, stride, padding, dilation, groups, algo) -> _Geometry:
    """stride, padding, dilation, groups and algo, with PyTorch's messages where it has one."""
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
    geo = _Geometry(x, weight, stride, padding, dilation, groups)
    if max(geo.M_out, geo.M_in) > _INT32_MAX or weight.numel() > _INT32_MAX:
        raise RuntimeError("the triton conv2d kernels need N*H*W pixels and weight elements below 2**31")
    return geo


def _check_conv(x, weight, bias, stride, padding, dilation, groups, algo) -> _Geometry:
    """Validate every argument of conv2d with PyTorch's messages where it has one; return the geometry."""
    _check_tensors(x, weight, bias)
    geo = _check_geometry(x, weight, stride, padding, dilation, groups, algo)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{weight.shape[0]} elements, but got bias of size {list(bias.shape)} instead")
    if not geo.kernel_fits:
        kh_eff, kw_eff = geo.dh * (geo.KH - 1) + 1, geo.dw * (geo.KW - 1) + 1
        raise RuntimeError(f"Calculated padded input size per channel: ({geo.H + 2 * geo.ph} x {geo.W + 2 * geo.pw})."
                           f" Kernel size: ({kh_eff} x {kw_eff}). Kernel size can't be greater than actual input size")
    return geo


def _check_conv_bn_relu(x, weight, bias, in_scale, in_shift, stride, padding, dilation, groups) -> _Geometry:
    """Validate conv_bn_relu's arguments (bias, in_scale, in_shift: contiguous float32 vectors, float64 for float64
    x, or None)."""
    _check_tensors(x, weight, None)
    acc = acc_dtype(x.dtype)
    if bias is not None:
        check_vector(bias, "bias", weight.shape[0], acc)
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    if in_scale is not None:
        check_vector(in_scale, "in_scale", x.shape[1], acc)
        check_vector(in_shift, "in_shift", x.shape[1], acc)
    check_device(x, weight, bias, in_scale, in_shift)
    geo = _check_geometry(x, weight, stride, padding, dilation, groups, "implicit_gemm")
    if not geo.kernel_fits:
        raise RuntimeError(f"Calculated output size: ({geo.Cout}x{geo.P}x{geo.Q}). Output size is too small")
    return geo


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 exactly when cuDNN would use it."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


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
    """out (contiguous, any float dtype) = ws.sum(0) in ws's dtype, ws: (S, *out.shape) fp32 (fp64) contiguous."""
    L = out.numel()
    block = 1024 if not INTERPRET else 256
    _sum_splits_kernel[(triton.cdiv(L, block),)](ws, out, L, ws.shape[0], BLOCK=block)


def _kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the GEMM kernels like it: channels_last (C_out, KH, KW, Cg), so a K-tile of channels
    (forward) or a tile of input channels (dgrad) is contiguous. A no-op when the weight already is (as after
    model.to(memory_format=torch.channels_last)); otherwise one copy of the weight, which is tiny next to
    the activations (VGG16's largest: 2.4M elements vs 6.4M pixels x 64 channels)."""
    return weight.contiguous(memory_format=torch.channels_last)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """t (4-D) channels_last: NHWC is the layout the GPU kernels compute in. An NCHW operand is converted once
    here (one pass over it) instead of being gathered with strided, scalar loads in every tile (the NCHW
    gathers spilled registers: benchmarks/NOTES.md, compile check); a no-op when t already is NHWC."""
    return t.contiguous(memory_format=torch.channels_last)


def _mode(geo: _Geometry, algo: str) -> int:
    if algo == "im2col":
        return MODE_COL
    return MODE_FLAT if geo.Cg < _FLAT_BELOW else MODE_TILED


def _im2col(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """The explicit im2col buffer (N*P*Q, groups*Kg), x's dtype, contiguous."""
    ktot = geo.groups * geo.Kg
    col = new_output((geo.M_out, ktot), x)
    bm, bk = (32, 32) if INTERPRET else (64, 64)
    if col.numel():
        grid = (triton.cdiv(geo.M_out, bm), triton.cdiv(ktot, bk))
        if grid[1] > 65535:
            raise RuntimeError("im2col: groups*C_in/groups*KH*KW too large for the grid")
        _im2col_kernel[grid](x, col, geo.M_out, geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.KH, geo.KW, geo.Kg, ktot,
                             *x.stride(), *geo.conv_args, BLOCK_M=bm, BLOCK_K=bk)
    return col


def _partials(rows_of: int, cols: int, like: torch.Tensor):
    """Two (tiles, cols) per-tile partial buffers (float32, float64 for float64 `like`), tiles counted for the
    smallest autotuned BLOCK_M."""
    rows = triton.cdiv(rows_of, _MIN_BLOCK_M)
    return (new_output((rows, cols), like, dtype=acc_dtype(like.dtype)),
            new_output((rows, cols), like, dtype=acc_dtype(like.dtype)))


def _tiles_used(kernel, rows_of: int) -> int:
    """Partial rows the last launch of an autotuned kernel wrote: one per BLOCK_M rows of its GEMM."""
    return triton.cdiv(rows_of, kernel.best_config.kwargs["BLOCK_M"])


def _forward(x, weight, bias, y, geo: _Geometry, mode: int, hooks: _Hooks = _NO_HOOKS, partials=None) -> None:
    """Launch _conv_fwd_kernel into y (non-empty); partials = (psum, pm2) turns the STATS epilogue on."""
    weight = _kernel_weight(weight)
    bias = bias.contiguous() if bias is not None else None   # the kernel reads bias[g*Cout_g + n] densely
    col = _im2col(x, geo) if mode == MODE_COL else x
    s, t, _, _, _ = hooks.args(weight)
    psum, pm2 = partials if partials is not None else (weight, weight)
    grid = lambda meta: (triton.cdiv(geo.M_out, meta["BLOCK_M"]) * triton.cdiv(geo.Cout_g, meta["BLOCK_N"]),
                         geo.groups)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, col, y, s, t, psum, pm2,
        geo.M_out, autotune_bucket(geo.M_out), geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW,
        geo.Kg, geo.groups * geo.Kg,
        *x.stride(), *weight.stride(), *y.stride(), *geo.conv_args,
        HAS_BIAS=bias is not None, MODE=mode, PREC=_precision(x.dtype), PROLOGUE=hooks.prologue,
        STATS=partials is not None)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
           dilation, groups: int, algo: str = "auto") -> torch.Tensor:
    """y = conv2d(x, weight, bias).

    x: (N, C_in, H, W) float16|bfloat16|float32|float64, NCHW or NHWC (any strides); weight: (C_out, C_in/groups,
    KH, KW) x's dtype; bias: (C_out,) x's dtype or None; stride, padding, dilation: [int, int]; algo in ALGOS.
    Returns y: (N, C_out, P, Q) x's dtype, channels_last iff x is."""
    geo = _check_conv(x, weight, bias, stride, padding, dilation, groups, algo)
    fmt = dense_format(x)
    y = new_output((geo.N, geo.Cout, geo.P, geo.Q), x, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y.contiguous(memory_format=fmt)
    with device_guard(x, weight, bias):
        _forward(_nhwc(x), weight, bias, y, geo, _mode(geo, algo))
        return y.contiguous(memory_format=fmt)


def _combine_stats(psum: torch.Tensor, pm2: torch.Tensor, M: int, block_m: int):
    """Chan's parallel combine of per-tile (sum, centred M2) partials (tiles, C) -> mean, biased var (C,).
    A fixed order of tensor ops in the partials' dtype: the same inputs give the same bits on every run."""
    tiles = psum.shape[0]
    counts = torch.full((tiles, 1), float(block_m), dtype=psum.dtype, device=psum.device)
    counts[-1] = M - block_m * (tiles - 1)
    mean = psum.sum(0) / M
    m2 = pm2.sum(0) + (counts * (psum / counts - mean) ** 2).sum(0)
    return mean, m2 / M


def conv_bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_scale: torch.Tensor | None,
                 in_shift: torch.Tensor | None, stride, padding, dilation, groups: int, compute_stats: bool):
    """y = conv2d(a, weight, bias, groups=groups), a = relu(x*in_scale[c] + in_shift[c]) if in_scale is given
    (the previous layer's pending BatchNorm + ReLU, applied while loading x; zero padding applies to a) else x.

    x: (N, C_in, H, W) float16|bfloat16|float32|float64, NCHW or NHWC (any strides); weight: (C_out, C_in/groups,
    KH, KW) x's dtype; bias, in_scale, in_shift: contiguous float32 (float64 for float64 x) (C_out,), (C_in,), (C_in,)
    or None (in_scale and in_shift together); stride, padding, dilation: [int, int].
    Returns (y, mean, var): y (N, C_out, P, Q) x's dtype, channels_last iff x is; with compute_stats the batch
    mean and biased variance per channel of y as stored ((C_out,) float32, float64 for float64 x; 0 and 0 for an
    empty batch, as batch_norm_stats), else two empty tensors of that dtype."""
    geo = _check_conv_bn_relu(x, weight, bias, in_scale, in_shift, stride, padding, dilation, groups)
    fmt = dense_format(x)
    y = new_output((geo.N, geo.Cout, geo.P, geo.Q), x, memory_format=torch.channels_last)
    partials = _partials(geo.M_out, geo.Cout, x) if compute_stats else None
    if y.numel():
        with device_guard(x, weight, bias, in_scale, in_shift):
            _forward(_nhwc(x), weight, bias, y, geo, _mode(geo, "implicit_gemm"), _Hooks(in_scale, in_shift),
                     partials)
            y = y.contiguous(memory_format=fmt)
    else:
        y = y.contiguous(memory_format=fmt)
    if not compute_stats:
        empty = x.new_empty((0,), dtype=acc_dtype(x.dtype))
        return y, empty, empty.clone()
    if y.numel() == 0:
        zero = x.new_zeros((geo.Cout,), dtype=acc_dtype(x.dtype))
        return y, zero, zero.clone()
    tiles = _tiles_used(_conv_fwd_kernel, geo.M_out)
    return (y, *_combine_stats(partials[0][:tiles], partials[1][:tiles], geo.M_out,
                               _conv_fwd_kernel.best_config.kwargs["BLOCK_M"]))


def _check_mask(output_mask):
    if (not isinstance(output_mask, (list, tuple)) or len(output_mask) != 3
            or not all(isinstance(b, bool) for b in output_mask)):
        raise TypeError(f"output_mask must be a list of 3 bools, got {output_mask!r}")


def _launch_dgrad(grad_out, x, weight, dx, geo: _Geometry, prec: str, hooks: _Hooks = _NO_HOOKS,
                  partials=None) -> None:
    """Launch _conv_dgrad_kernel into dx (non-empty); partials = (pds, pdt) with the PROLOGUE hook."""
    s, t, y, ga, gb = hooks.args(grad_out)
    pds, pdt = partials if partials is not None else (dx, dx)
    grid = lambda meta: (triton.cdiv(geo.M_in, meta["BLOCK_M"]) * triton.cdiv(geo.Cg, meta["BLOCK_N"]), geo.groups)
    _conv_dgrad_kernel[grid](
        grad_out, weight, dx, y, ga, gb, x, s, t, pds, pdt,
        geo.M_in, autotune_bucket(geo.M_in), geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW,
        *grad_out.stride(), *weight.stride(), *dx.stride(), *y.stride(), *x.stride(), *geo.conv_args,
        PREC=prec, GRAD_AFFINE=hooks.affine, PROLOGUE=hooks.prologue)


def _dgrad(grad_out, x, weight, geo: _Geometry, algo: str, prec: str) -> torch.Tensor:
    dx = new_output(x.shape, x, memory_format=dense_format(x))
    if dx.numel() == 0:
        return dx
    if geo.Cout_g * geo.KH * geo.KW == 0:
        return dx.zero_()
    weight = _kernel_weight(weight)
    if algo == "im2col":
        ktot = geo.groups * geo.Kg
        # fp32 (fp64) column gradient: col2im's sum over taps is still part of the accumulation
        dcol = new_output((geo.M_out, ktot), x, dtype=acc_dtype(x.dtype))
        grid = lambda meta: (triton.cdiv(geo.M_out, meta["BLOCK_M"]) * triton.cdiv(geo.Kg, meta["BLOCK_N"]),
                             geo.groups)
        _dgrad_col_gemm_kernel[grid](
            grad_out, weight, dcol, geo.M_out, autotune_bucket(geo.M_out), geo.P, geo.Q, geo.Cg, geo.Cout_g,
            geo.KH, geo.KW, geo.Kg, ktot, *grad_out.stride(), *weight.stride(), PREC=prec)
        # float64: 16 x 64 (64 x 64 and 32 x 64 spilled 4-44 B on sm_80)
        bm, bc = (32, 16) if INTERPRET else ((16, 64) if x.dtype == torch.float64 else (64, 64))
        grid2 = (triton.cdiv(geo.M_in, bm), triton.cdiv(geo.C, bc))
        _col2im_kernel[grid2](dcol, dx, geo.M_in, geo.H, geo.W, geo.P, geo.Q, geo.C, geo.Cg, geo.KH, geo.KW,
                              geo.Kg, ktot, *dx.stride(), *geo.conv_args, BLOCK_M=bm, BLOCK_C=bc,
                              num_warps=8)   # 8 values per thread: at 4 warps (16) it spilled
        return dx
    _launch_dgrad(grad_out, x, weight, dx, geo, prec)
    return dx


def _wgrad(grad_out, x, weight, geo: _Geometry, algo: str, prec: str, hooks: _Hooks = _NO_HOOKS,
           db: torch.Tensor | None = None) -> torch.Tensor:
    """dW: weight's shape and dtype, contiguous. With db (float32 (float64) (C_out,), only for a non-empty weight and
    output) the DBIAS hook also writes the gradient operand's per-channel sums into it."""
    dw = new_output(weight.shape, weight)   # contiguous (C_out, Cg, KH, KW)
    if dw.numel() == 0:
        return dw
    if geo.M_out == 0:
        return dw.zero_()
    mode = _mode(geo, algo)
    col = _im2col(x, geo) if mode == MODE_COL else x
    tile = 32 if INTERPRET else 128   # a typical tile edge, to size the split
    n_tiles = geo.KH * geo.KW * triton.cdiv(geo.Cg, tile) if mode == MODE_TILED else triton.cdiv(geo.Kg, tile)
    out_tiles = triton.cdiv(geo.Cout_g, tile) * n_tiles * geo.groups
    splits, chunk = _split_k(geo.M_out, out_tiles, x.device)
    acc = acc_dtype(x.dtype)
    direct = splits == 1 and dw.dtype == acc
    ws = dw if direct else new_output((splits, *weight.shape), weight, dtype=acc)
    dbs = db if db is None or splits == 1 else new_output((splits, geo.Cout), x, dtype=acc)
    s, t, y, ga, gb = hooks.args(grad_out)

    def grid(meta):
        if mode == MODE_TILED:
            n_tiles = geo.KH * geo.KW * triton.cdiv(geo.Cg, meta["BLOCK_N"])
        else:
            n_tiles = triton.cdiv(geo.Kg, meta["BLOCK_N"])
        return (triton.cdiv(geo.Cout_g, meta["BLOCK_M"]) * n_tiles, splits, geo.groups)

    _conv_wgrad_kernel[grid](
        grad_out, x, col, ws, y, ga, gb, s, t, dbs if dbs is not None else ws,
        geo.M_out, autotune_bucket(geo.M_out), geo.H, geo.W, geo.P, geo.Q, geo.Cg, geo.Cout_g, geo.KH, geo.KW,
        geo.Kg, geo.groups * geo.Kg, chunk, *grad_out.stride(), *x.stride(), *y.stride(), *geo.conv_args,
        MODE=mode, PREC=prec, GRAD_AFFINE=hooks.affine, PROLOGUE=hooks.prologue, DBIAS=db is not None)
    if not direct:
        _sum_splits(ws, dw)
    if db is not None and splits > 1:
        _sum_splits(dbs, db)
    return dw


def _bias_grad(grad_out, geo: _Geometry) -> torch.Tensor:
    db = new_output((geo.Cout,), grad_out)
    if db.numel() == 0:
        return db
    if geo.M_out == 0:
        return db.zero_()
    bp, bc = (16, 16) if INTERPRET else (64, 64)
    c_tiles = triton.cdiv(geo.Cout, bc)
    splits, chunk = _split_k(geo.M_out, c_tiles, grad_out.device)
    ws = new_output((splits, geo.Cout), grad_out, dtype=acc_dtype(grad_out.dtype))
    _bias_grad_kernel[(c_tiles, splits)](grad_out, ws, geo.M_out, geo.Cout, geo.P * geo.Q, geo.Q, chunk,
                                         *grad_out.stride(), BLOCK_P=bp, BLOCK_C=bc)
    _sum_splits(ws, db)
    return db


def conv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                    groups: int, output_mask, algo: str = "auto"):
    """(grad_x, grad_w, grad_b) of conv2d; an entry whose output_mask is False is x.new_empty(0).

    grad_out: (N, C_out, P, Q) x's dtype, any strides; x, weight, stride, padding, dilation, groups, algo as
    conv2d's; output_mask: [bool, bool, bool]. grad_x: x's shape/dtype, channels_last iff x is; grad_w: weight's
    shape/dtype, contiguous; grad_b: (C_out,) x's dtype."""
    geo = _check_conv(x, weight, None, stride, padding, dilation, groups, algo)
    _check_mask(output_mask)
    check_tensor(grad_out, "grad_out")
    check_device(x, grad_out)
    if grad_out.dtype != x.dtype:
        raise RuntimeError(f"grad_out type ({grad_out.dtype}) and input type ({x.dtype}) should be the same")
    expected = (geo.N, geo.Cout, geo.P, geo.Q)
    if tuple(grad_out.shape) != expected:
        raise RuntimeError(f"grad_out must have shape {list(expected)}, got {list(grad_out.shape)}")
    prec = _precision(x.dtype)
    fmt = dense_format(x)
    with device_guard(x, grad_out, weight):
        grad_out, x = _nhwc(grad_out), _nhwc(x)
        grad_x = _dgrad(grad_out, x, weight, geo, algo, prec).contiguous(memory_format=fmt) if output_mask[0] \
            else x.new_empty(0)
        grad_w = _wgrad(grad_out, x, weight, geo, algo, prec) if output_mask[1] else x.new_empty(0)
        grad_b = _bias_grad(grad_out, geo) if output_mask[2] else x.new_empty(0)
    return grad_x, grad_w, grad_b


def _stats_grad_hooks(grad, y, grad_mean, grad_var, mean, in_scale, in_shift, geo: _Geometry) -> _Hooks:
    """The backward's hooks: PROLOGUE from in_scale/in_shift; GRAD_AFFINE when the statistics got gradients,
    g' = grad + g_alpha*y + g_beta with g_alpha = 2*dL/dvar / M, g_beta = dL/dmean / M - g_alpha*mean
    (M = N*P*Q; d var/dy = 2*(y - mean)/M, d mean/dy = 1/M)."""
    if (grad_mean is None and grad_var is None) or geo.M_out == 0:
        return _Hooks(in_scale, in_shift)
    check_tensor(y, "y", ndim=4)
    if y.shape != grad.shape:
        raise ValueError(f"y must have shape {tuple(grad.shape)}, got {tuple(y.shape)}")
    acc = acc_dtype(grad.dtype)
    check_vector(mean, "mean", geo.Cout, acc)
    for v, name in ((grad_mean, "grad_mean"), (grad_var, "grad_var")):
        if v is not None:
            check_vector(v, name, geo.Cout, acc)
    check_device(grad, y, mean, grad_mean, grad_var)
    g_alpha = grad_var * (2.0 / geo.M_out) if grad_var is not None else torch.zeros_like(mean)
    g_beta = -g_alpha * mean
    if grad_mean is not None:
        g_beta = g_beta + grad_mean / geo.M_out
    return _Hooks(in_scale, in_shift, y, g_alpha.contiguous(), g_beta.contiguous())


def _fused_dgrad(grad, x, weight, geo: _Geometry, prec: str, hooks: _Hooks):
    """(dx, d_in_scale, d_in_shift) of conv_bn_relu: dgrad with GRAD_AFFINE / PROLOGUE hooks."""
    dx = new_output(x.shape, x, memory_format=dense_format(x))
    partials = _partials(geo.M_in, geo.C, x) if hooks.prologue else None
    if dx.numel() and geo.Cout_g:
        _launch_dgrad(grad, x, _kernel_weight(weight), dx, geo, prec, hooks, partials)
        if hooks.prologue:
            tiles = _tiles_used(_conv_dgrad_kernel, geo.M_in)
            return dx, partials[0][:tiles].sum(0), partials[1][:tiles].sum(0)
    else:   # no pixel or no output channel: dL/da = 0
        dx.zero_()
    acc = acc_dtype(x.dtype)
    if not hooks.prologue:
        return dx, x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return dx, x.new_zeros((geo.C,), dtype=acc), x.new_zeros((geo.C,), dtype=acc)


def _fused_wgrad(grad, x, weight, geo: _Geometry, prec: str, hooks: _Hooks, has_bias: bool):
    """(dweight, dbias) of conv_bn_relu: wgrad with GRAD_AFFINE / PROLOGUE / DBIAS hooks; dbias float32 (float64
    for float64 x)."""
    acc = acc_dtype(x.dtype)
    if weight.numel() and geo.M_out:
        db = new_output((geo.Cout,), x, dtype=acc) if has_bias else None
        dw = _wgrad(grad, x, weight, geo, "implicit_gemm", prec, hooks, db)
    else:   # nothing to multiply (C_in = 0, or no output pixel): the bias gradient by plain tensor ops
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        g = grad.to(acc)
        if hooks.affine:
            g = g + hooks.g_alpha.view(1, -1, 1, 1) * hooks.y.float() + hooks.g_beta.view(1, -1, 1, 1)
        db = g.sum((0, 2, 3)) if has_bias else None
    return dw, db if has_bias else x.new_empty((0,), dtype=acc)


def conv_bn_relu_backward(grad, y, grad_mean, grad_var, mean, x, weight, in_scale, in_shift, stride, padding,
                          dilation, groups: int, has_bias: bool, compute_dx: bool = True):
    """Gradients (dx, dweight, dbias, d_in_scale, d_in_shift) of conv_bn_relu.

    grad: (N, C_out, P, Q) any float dtype (cast to x's), any strides: dL/dy. y: conv_bn_relu's output, mean:
    its batch mean (float32 (C_out,)), grad_mean, grad_var: dL/dmean, dL/dvar (contiguous float32 (C_out,), either
    may be None; y and mean are read only when one is given): their contribution g' = grad + g_alpha*y + g_beta
    is folded into the gradient loads of dgrad and wgrad. x, weight, in_scale, in_shift, stride, padding,
    dilation, groups as in conv_bn_relu.
    Returns dx (x's shape, dtype and memory format; computed when compute_dx or in_scale is given, else an empty
    x.dtype tensor), dweight (weight's shape and dtype, contiguous), dbias (float32 (C_out,), empty without
    has_bias), d_in_scale, d_in_shift (float32 (C_in,), empty without in_scale). Every float32 vector here is
    float64 for float64 x."""
    geo = _check_conv_bn_relu(x, weight, None, in_scale, in_shift, stride, padding, dilation, groups)
    check_tensor(grad, "grad_output", ndim=4)
    check_device(x, grad)
    if tuple(grad.shape) != (geo.N, geo.Cout, geo.P, geo.Q):
        raise ValueError(f"grad_output must have shape {(geo.N, geo.Cout, geo.P, geo.Q)}, got {tuple(grad.shape)}")
    hooks = _stats_grad_hooks(grad, y, grad_mean, grad_var, mean, in_scale, in_shift, geo)
    prec = _precision(x.dtype)
    fmt = dense_format(x)
    with device_guard(x, grad, weight, in_scale, in_shift, y if hooks.affine else None):
        grad, x = _nhwc(grad.to(x.dtype)), _nhwc(x)
        if hooks.affine:
            hooks.y = _nhwc(hooks.y)
        if compute_dx or hooks.prologue:
            dx, d_scale, d_shift = _fused_dgrad(grad, x, weight, geo, prec, hooks)
            dx = dx.contiguous(memory_format=fmt)
        else:   # e.g. the network's input image: no dgrad at all
            dx, d_scale, d_shift = x.new_empty((0,)), *(x.new_empty((0,), dtype=acc_dtype(x.dtype)) for _ in range(2))
        dw, db = _fused_wgrad(grad, x, weight, geo, prec, hooks, has_bias)
    return dx, dw, db, d_scale, d_shift
