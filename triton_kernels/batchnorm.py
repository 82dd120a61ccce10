"""BatchNorm2d (+ReLU) kernels. The math and the pass structure: python/fusedcnn/ops/batchnorm.py.

x, grad_out: (N, C, H, W) float32|float64|float16|bfloat16, NCHW or NHWC, read in place through strides.
mean, var, invstd, sum_dy, sum_dy_xmu: (C,) float32, all arithmetic in float32 (float64 for float64 x).
An empty batch (N*H*W = 0, DDP's uneven last batch) has mean = var = 0: a count of 0 weighs nothing in a merge
across processes, and finite statistics give the zero affine gradients torch gives; backward_elemt takes count 0.

Every kernel walks x as P planes of R rows of C channels, element (p, r, c) at p*PS + r*RS + c*CS:
  NCHW: P = N, R = H*W, PS = C*H*W, RS = 1, CS = H*W   (tiles (BLOCK_R, 1): contiguous runs of one channel)
  NHWC: P = 1, R = N*H*W, PS = 0, RS = C, CS = 1       (tiles (BLOCK_R, BLOCK_C): rows of C channels)
Program (q, cb) covers channels [cb*BLOCK_C, +BLOCK_C) over a group of PG planes x a chunk of CHUNK rows
(q = plane_group * n_row_chunks + row_chunk). The grid is sized for ~TARGET programs, so the statistics are
split across many programs (VGG's first layer: 64 channels x 128*224*224 values -> 8,192 programs), never one
program per channel; the reductions write per-program partials (Q, C) that a tiny combine merges.

Bytes per pass (E = N*C*H*W elements of s bytes; partials are Q*C*8 bytes, negligible):
  stats:            read x                  E*s      (per tile: exact two-pass mean / M2 in registers,
                                                     tiles merged by Chan's formula, partials likewise)
  apply:            read x, write y        2E*s
  backward_reduce:  read g, x              2E*s
  backward_elemt:   read g, x, write dx    3E*s
"""
import torch
import triton
import triton.language as tl

from ._common import (GRID_YZ_MAX, acc_dtype, acc_zeros, check_tensor, device_guard, is_channels_last, new_output,
                      to_acc)

TARGET_PROGRAMS = 2048  # per launch on a GPU (~16 per SM on an H100): enough to saturate memory bandwidth
NCHW_BLOCK_R = 2048     # values of one channel per tile (NCHW)
NHWC_TILE = 4096        # values per tile (NHWC): BLOCK_R rows x BLOCK_C channels
COMBINE_BLOCK_Q = 32   # partials per combine step
INTERPRETER_PROGRAMS = 4  # CPU tensors (TRITON_INTERPRET=1) run programs one by one: few, long ones
# (module constants so the tests can shrink them and exercise multi-tile, multi-program splits)


@triton.jit
def _tile(base, r0, R_end, RS, cols_off, cmask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """int64 offsets and mask of rows [r0, r0 + BLOCK_R) of the plane starting at `base`.
    BLOCK_C == 1 (NCHW): a 1-D run of one channel -- 1-D so Triton vectorizes the loads along it
    (a (BLOCK_R, 1) tile compiles to 16-bit scalar loads); else a (BLOCK_R, BLOCK_C) tile."""
    rows = r0 + tl.arange(0, BLOCK_R)
    rmask = rows < R_end
    if BLOCK_C == 1:
        offs = base + rows.to(tl.int64) * RS + cols_off
        m = rmask & cmask
    else:
        offs = base + rows.to(tl.int64)[:, None] * RS + cols_off[None, :]
        m = rmask[:, None] & cmask[None, :]
    return offs, m


@triton.jit
def _per_channel(v, BLOCK_C: tl.constexpr):
    """A per-channel (BLOCK_C,) vector (or a reduced scalar) broadcast against a tile from _tile."""
    if BLOCK_C == 1:
        return v
    else:
        return v[None, :]


@triton.jit
def _tile_zeros(PTR, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Zeros of a _tile's shape in the accumulation dtype of PTR's tensor."""
    if BLOCK_C == 1:
        return acc_zeros((BLOCK_R,), PTR)
    else:
        return acc_zeros((BLOCK_R, BLOCK_C), PTR)


@triton.jit
def _program_channels(C, CS, BLOCK_C: tl.constexpr):
    """This program's channel block (grid axis 1): columns, their mask and int64 memory offsets."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    return cols, cmask, cols.to(tl.int64) * CS


@triton.jit
def _program_range(q, P, R, PG, CHUNK, n_rchunks):
    """Program q's slice of the reduction: planes [p_start, p_end) x rows [r_start, r_end)."""
    p_start = (q // n_rchunks) * PG
    r_start = (q % n_rchunks) * CHUNK
    return p_start, tl.minimum(p_start + PG, P), r_start, tl.minimum(r_start + CHUNK, R)


@triton.jit
def _load_channel_vec(PTR, cols, cmask, BLOCK_C: tl.constexpr):
    """A (C,) per-channel vector (the accumulation dtype), loaded for this program's channel block."""
    return _per_channel(tl.load(PTR + cols, mask=cmask, other=0.0), BLOCK_C)


@triton.jit
def _bn_stats_kernel(X_ptr, MEAN_ptr, M2_ptr, P, R, C, PS, RS, CS, PG, CHUNK, n_rchunks,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial (mean, M2) of program q's values per channel: MEAN/M2 (Q, C) float32 (float64 for float64 x)."""
    q = tl.program_id(0)
    cols, cmask, cols_off = _program_channels(C, CS, BLOCK_C)
    p_start, p_end, r_start, r_end = _program_range(q, P, R, PG, CHUNK, n_rchunks)
    n = acc_zeros((), X_ptr)
    mean = acc_zeros((BLOCK_C,), X_ptr)
    m2 = acc_zeros((BLOCK_C,), X_ptr)
    # Loops counted from 0 (not `range(r_start, r_end, BLOCK_R)`): Triton then knows r0 and base keep
    # the divisibility of CHUNK and PS, and vectorizes the loads.
    for j in range(0, p_end - p_start):
        base = (p_start + j).to(tl.int64) * PS
        for t in range(0, tl.cdiv(r_end - r_start, BLOCK_R)):
            r0 = r_start + t * BLOCK_R
            offs, m = _tile(base, r0, r_end, RS, cols_off, cmask, BLOCK_R, BLOCK_C)
            x = to_acc(tl.load(X_ptr + offs, mask=m, other=0.0))
            nb = tl.minimum(r_end - r0, BLOCK_R).to(n.dtype)
            bmean = tl.sum(x, axis=0) / nb
            d = tl.where(m, x - _per_channel(bmean, BLOCK_C), 0.0)
            bm2 = tl.sum(d * d, axis=0)
            tot = n + nb  # Chan et al.: merge the tile's (nb, bmean, bm2) into (n, mean, m2)
            delta = bmean - mean
            mean += delta * (nb / tot)
            m2 += bm2 + delta * delta * (n * nb / tot)
            n = tot
    out = q.to(tl.int64) * C + cols
    tl.store(MEAN_ptr + out, mean, mask=cmask)
    tl.store(M2_ptr + out, m2, mask=cmask)


@triton.jit
def _bn_combine_kernel(PMEAN_ptr, PM2_ptr, MEAN_ptr, VAR_ptr, Q, C, P, R, PG, CHUNK, n_rchunks,
                       BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tiny combine: merge the (Q, C) partials of _bn_stats_kernel into mean, biased var: (C,), the partials'
    dtype.
    Partial q covers min(PG, P - pg*PG) planes x min(CHUNK, R - rc*CHUNK) rows (pg, rc = divmod(q, n_rchunks));
    tiles of BLOCK_Q partials are merged exactly (weighted mean, M2 + n (mean_q - mean)^2), tiles by Chan."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = acc_zeros((), PMEAN_ptr)
    mean = acc_zeros((BLOCK_C,), PMEAN_ptr)
    m2 = acc_zeros((BLOCK_C,), PMEAN_ptr)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        qmask = qs < Q
        planes = tl.minimum(PG, P - (qs // n_rchunks) * PG)
        rows = tl.minimum(CHUNK, R - (qs % n_rchunks) * CHUNK)
        cnt_q = tl.where(qmask, planes.to(n.dtype) * rows.to(n.dtype), 0.0)
        nb = tl.sum(cnt_q, axis=0)  # a scalar: the same for every channel
        cnt = cnt_q[:, None]
        offs = qs.to(tl.int64)[:, None] * C + cols[None, :]
        m = qmask[:, None] & cmask[None, :]
        pmean = tl.load(PMEAN_ptr + offs, mask=m, other=0.0)
        pm2 = tl.load(PM2_ptr + offs, mask=m, other=0.0)
        bmean = tl.sum(cnt * pmean, axis=0) / nb
        dev = tl.where(m, pmean - bmean[None, :], 0.0)
        bm2 = tl.sum(pm2 + cnt * dev * dev, axis=0)
        tot = n + nb
        delta = bmean - mean
        mean += delta * (nb / tot)
        m2 += bm2 + delta * delta * (n * nb / tot)
        n = tot
    tl.store(MEAN_ptr + cols, mean, mask=cmask)
    tl.store(VAR_ptr + cols, m2 / n, mask=cmask)


@triton.jit
def _bn_apply_kernel(X_ptr, Y_ptr, MEAN_ptr, A_ptr, B_ptr, P, R, C, PS, RS, CS, PG, CHUNK, n_rchunks,
                     RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = relu?((x - mean) * a + b), mean, a, b: (C,) float32 (float64 for float64 x); y has x's strides."""
    q = tl.program_id(0)
    cols, cmask, cols_off = _program_channels(C, CS, BLOCK_C)
    mean = _load_channel_vec(MEAN_ptr, cols, cmask, BLOCK_C)
    a = _load_channel_vec(A_ptr, cols, cmask, BLOCK_C)
    b = _load_channel_vec(B_ptr, cols, cmask, BLOCK_C)
    p_start, p_end, r_start, r_end = _program_range(q, P, R, PG, CHUNK, n_rchunks)
    # Loops counted from 0 (not `range(r_start, r_end, BLOCK_R)`): Triton then knows r0 and base keep
    # the divisibility of CHUNK and PS, and vectorizes the loads.
    for j in range(0, p_end - p_start):
        base = (p_start + j).to(tl.int64) * PS
        for t in range(0, tl.cdiv(r_end - r_start, BLOCK_R)):
            r0 = r_start + t * BLOCK_R
            offs, m = _tile(base, r0, r_end, RS, cols_off, cmask, BLOCK_R, BLOCK_C)
            y = (to_acc(tl.load(X_ptr + offs, mask=m, other=0.0)) - mean) * a + b
            if RELU:
                y = tl.where(y <= 0.0, 0.0, y)  # NaN <= 0 is false: NaN propagates
            tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_backward_reduce_kernel(G_ptr, X_ptr, MEAN_ptr, A_ptr, B_ptr, SDY_ptr, SDYX_ptr,
                               P, R, C, PS, RS, CS, PG, CHUNK, n_rchunks,
                               RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sum(g') and sum(g' * (x - mean)) per channel, g' = g * ((x - mean)*a + b > 0 if RELU): (Q, C) float32
    (float64 for float64 x)."""
    q = tl.program_id(0)
    cols, cmask, cols_off = _program_channels(C, CS, BLOCK_C)
    mean = _load_channel_vec(MEAN_ptr, cols, cmask, BLOCK_C)
    a = _load_channel_vec(A_ptr, cols, cmask, BLOCK_C)
    b = _load_channel_vec(B_ptr, cols, cmask, BLOCK_C)
    p_start, p_end, r_start, r_end = _program_range(q, P, R, PG, CHUNK, n_rchunks)
    sdy = _tile_zeros(X_ptr, BLOCK_R, BLOCK_C)
    sdyx = _tile_zeros(X_ptr, BLOCK_R, BLOCK_C)
    # Loops counted from 0 (not `range(r_start, r_end, BLOCK_R)`): Triton then knows r0 and base keep
    # the divisibility of CHUNK and PS, and vectorizes the loads.
    for j in range(0, p_end - p_start):
        base = (p_start + j).to(tl.int64) * PS
        for t in range(0, tl.cdiv(r_end - r_start, BLOCK_R)):
            r0 = r_start + t * BLOCK_R
            offs, m = _tile(base, r0, r_end, RS, cols_off, cmask, BLOCK_R, BLOCK_C)
            xm = to_acc(tl.load(X_ptr + offs, mask=m, other=0.0)) - mean
            g = to_acc(tl.load(G_ptr + offs, mask=m, other=0.0))
            if RELU:
                g = tl.where(xm * a + b > 0.0, g, 0.0)
            sdy += g
            sdyx += tl.where(m, g * xm, 0.0)
    out = q.to(tl.int64) * C + cols
    tl.store(SDY_ptr + out, tl.sum(sdy, axis=0), mask=cmask)
    tl.store(SDYX_ptr + out, tl.sum(sdyx, axis=0), mask=cmask)


@triton.jit
def _bn_backward_elemt_kernel(G_ptr, X_ptr, DX_ptr, MEAN_ptr, A_ptr, B_ptr, K1_ptr, K2_ptr, K3_ptr,
                              P, R, C, PS, RS, CS, PG, CHUNK, n_rchunks,
                              RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = k1 * g' + k2 * (x - mean) + k3 (per-channel k: see batch_norm_backward_elemt); dx has x's strides."""
    q = tl.program_id(0)
    cols, cmask, cols_off = _program_channels(C, CS, BLOCK_C)
    mean = _load_channel_vec(MEAN_ptr, cols, cmask, BLOCK_C)
    a = _load_channel_vec(A_ptr, cols, cmask, BLOCK_C)
    b = _load_channel_vec(B_ptr, cols, cmask, BLOCK_C)
    k1 = _load_channel_vec(K1_ptr, cols, cmask, BLOCK_C)
    k2 = _load_channel_vec(K2_ptr, cols, cmask, BLOCK_C)
    k3 = _load_channel_vec(K3_ptr, cols, cmask, BLOCK_C)
    p_start, p_end, r_start, r_end = _program_range(q, P, R, PG, CHUNK, n_rchunks)
    # Loops counted from 0 (not `range(r_start, r_end, BLOCK_R)`): Triton then knows r0 and base keep
    # the divisibility of CHUNK and PS, and vectorizes the loads.
    for j in range(0, p_end - p_start):
        base = (p_start + j).to(tl.int64) * PS
        for t in range(0, tl.cdiv(r_end - r_start, BLOCK_R)):
            r0 = r_start + t * BLOCK_R
            offs, m = _tile(base, r0, r_end, RS, cols_off, cmask, BLOCK_R, BLOCK_C)
            xm = to_acc(tl.load(X_ptr + offs, mask=m, other=0.0)) - mean
            g = to_acc(tl.load(G_ptr + offs, mask=m, other=0.0))
            if RELU:
                g = tl.where(xm * a + b > 0.0, g, 0.0)
            tl.store(DX_ptr + offs, (k1 * g + k2 * xm + k3).to(DX_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- launchers
class _Walk:
    """How the kernels walk x: layout parameters, tile sizes and grid (see the module docstring)."""

    def __init__(self, x: torch.Tensor):
        n, c, h, w = x.shape
        hw = h * w
        self.C = c
        if is_channels_last(x):
            self.P, self.R, self.PS, self.RS, self.CS = 1, n * hw, 0, c, 1
            self.BLOCK_C = min(64, triton.next_power_of_2(max(c, 1)))
            block_r = max(1, NHWC_TILE // self.BLOCK_C)
        else:
            self.P, self.R, self.PS, self.RS, self.CS = n, hw, c * hw, 1, hw
            self.BLOCK_C = 1
            block_r = NCHW_BLOCK_R
        self.BLOCK_R = min(block_r, triton.next_power_of_2(max(self.R, 1)))
        # Tiles per program: about total / TARGET; whole planes grouped when a plane is small.
        target = INTERPRETER_PROGRAMS if x.device.type == "cpu" else TARGET_PROGRAMS
        c_blocks = triton.cdiv(c, self.BLOCK_C)
        tiles_per_plane = triton.cdiv(max(self.R, 1), self.BLOCK_R)
        per_prog = max(1, self.P * tiles_per_plane * c_blocks // target)
        if per_prog >= tiles_per_plane:
            self.CHUNK, self.PG = tiles_per_plane * self.BLOCK_R, max(1, per_prog // tiles_per_plane)
        else:
            self.CHUNK, self.PG = per_prog * self.BLOCK_R, 1
        self.n_rchunks = triton.cdiv(max(self.R, 1), self.CHUNK)
        self.Q = triton.cdiv(max(self.P, 1), self.PG) * self.n_rchunks
        if c_blocks > GRID_YZ_MAX:   # grid axis 1: one program column per channel (NCHW) or 64 channels (NHWC)
            raise RuntimeError(f"the triton batch_norm kernels support at most {GRID_YZ_MAX * self.BLOCK_C} "
                               f"channels in this layout, got {c}")
        self.grid = (self.Q, c_blocks)

    def args(self):
        return (self.P, self.R, self.C, self.PS, self.RS, self.CS, self.PG, self.CHUNK, self.n_rchunks)

    def meta(self):
        return dict(BLOCK_R=self.BLOCK_R, BLOCK_C=self.BLOCK_C)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as NCHW- or NHWC-dense (no copy when it already is)."""
    return x if (x.is_contiguous() or is_channels_last(x)) else x.contiguous()


def _check_x(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    check_tensor(x, name, ndim=4)
    return _dense(x)


def _check_vec(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape != (x.shape[1],):
        raise ValueError(f"{name} should contain {x.shape[1]} elements (one per channel), "
                         f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {t.dtype}")
    return t.to(acc_dtype(x.dtype)).contiguous()


def _grad_like(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    check_tensor(grad_out, "grad_out", ndim=4)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError(f"grad_out must match x: got {tuple(grad_out.shape)} {grad_out.dtype}, "
                         f"expected {tuple(x.shape)} {x.dtype}")
    return grad_out.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def _coefs(x, mean, invstd, weight, bias):
    """Per-channel a = weight * invstd, b = bias (float32, float64 for float64 x): y = (x - mean) * a + b. (Not
    x * a + (b - mean * a): that cancels catastrophically when |mean| >> std.)"""
    mean, invstd = _check_vec(mean, x, "mean"), _check_vec(invstd, x, "invstd")
    a = invstd if weight is None else _check_vec(weight, x, "weight") * invstd
    b = torch.zeros_like(mean) if bias is None else _check_vec(bias, x, "bias")
    return mean, invstd, a.contiguous(), b


def _like_x(x: torch.Tensor) -> torch.Tensor:
    return new_output(x.shape, x, memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def batch_norm_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) -> (mean, biased var): (C,) float32 (float64 for float64 x); 0, 0 for an empty batch."""
    x = _check_x(x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        zero = torch.zeros((c,), device=x.device, dtype=acc)
        return zero, zero.clone()
    walk = _Walk(x)
    pmean = torch.empty((walk.Q, c), device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    mean = torch.empty(c, device=x.device, dtype=acc)
    var = torch.empty_like(mean)
    block_c = min(64, triton.next_power_of_2(c))
    with device_guard(x):
        _bn_stats_kernel[walk.grid](x, pmean, pm2, *walk.args(), **walk.meta())
        _bn_combine_kernel[(triton.cdiv(c, block_c),)](pmean, pm2, mean, var, walk.Q, c, walk.P, walk.R, walk.PG,
                                                       walk.CHUNK, walk.n_rchunks, BLOCK_Q=COMBINE_BLOCK_Q,
                                                       BLOCK_C=block_c)
    return mean, var


def batch_norm_apply(x, mean, invstd, weight, bias, relu: bool) -> torch.Tensor:
    """y = relu?((x - mean) * invstd * weight + bias): x's shape, dtype and memory format."""
    x = _check_x(x)
    mean, _, a, b = _coefs(x, mean, invstd, weight, bias)
    y = _like_x(x)
    if x.numel():
        walk = _Walk(x)
        with device_guard(x, mean, a, b):
            _bn_apply_kernel[walk.grid](x, y, mean, a, b, *walk.args(), RELU=relu, **walk.meta())
    return y


def batch_norm_backward_reduce(grad_out, x, mean, invstd, weight, bias, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_dy, sum_dy_xmu): (C,) float32 (float64 for float64 x) over the ReLU-masked grad_out."""
    x = _check_x(x)
    g = _grad_like(grad_out, x)
    mean, _, a, b = _coefs(x, mean, invstd, weight, bias)
    c = x.shape[1]
    if x.numel() == 0:
        return torch.zeros(c, device=x.device, dtype=mean.dtype), torch.zeros(c, device=x.device, dtype=mean.dtype)
    walk = _Walk(x)
    psdy = torch.empty((walk.Q, c), device=x.device, dtype=mean.dtype)
    psdyx = torch.empty_like(psdy)
    with device_guard(x, g, mean, a, b):
        _bn_backward_reduce_kernel[walk.grid](g, x, mean, a, b, psdy, psdyx, *walk.args(), RELU=relu,
                                              **walk.meta())
    return psdy.sum(0), psdyx.sum(0)


def batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count: float,
                      relu: bool) -> torch.Tensor:
    """dx = k1 * g' + k2 * (x - mean) + k3 with k1 = weight * invstd and, in training (sum_dy given),
    k2 = -k1 * invstd^2 * sum_dy_xmu / count, k3 = -k1 * sum_dy / count (else, and for an empty x, k2 = k3 = 0)."""
    x = _check_x(x)
    g = _grad_like(grad_out, x)
    mean, invstd, a, b = _coefs(x, mean, invstd, weight, bias)
    k1 = a
    if (sum_dy is None) != (sum_dy_xmu is None):
        raise ValueError("sum_dy and sum_dy_xmu must be given together (training) or both None (eval)")
    if sum_dy is not None and x.numel():   # an empty x has no dx to compute (count may be 0)
        if not count > 0:
            raise ValueError(f"count must be positive, got {count}")
        sum_dy, sum_dy_xmu = _check_vec(sum_dy, x, "sum_dy"), _check_vec(sum_dy_xmu, x, "sum_dy_xmu")
        k2 = -k1 * invstd * invstd * sum_dy_xmu / count
        k3 = -k1 * sum_dy / count
    else:
        k2 = k3 = torch.zeros_like(k1)
    dx = _like_x(x)
    if x.numel():
        walk = _Walk(x)
        with device_guard(x, g, mean, a, b):
            _bn_backward_elemt_kernel[walk.grid](g, x, dx, mean, a, b, k1.contiguous(), k2.contiguous(),
                                                 k3.contiguous(), *walk.args(), RELU=relu, **walk.meta())
    return dx
