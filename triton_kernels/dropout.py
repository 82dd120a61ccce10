"""Dropout kernels: out = x * (u(seed, i) > p ? scale : 0), the mask regenerated, never stored.

x: any shape, float32|float64|float16|bfloat16, contiguous or (4-D) channels_last; out: same shape, dtype, format.
The product is computed in float32 (float64 for float64 x, with scale = 1/(1-p) in float64, as torch).
u(seed, i) is the Philox stream of docs/ARCHITECTURE.md at the element's row-major index i in
the LOGICAL shape, so NCHW and NHWC give the same mask. The backward is this
same kernel applied to grad_out with the forward's seed.

One Philox call per element, and only its first output word: the stream is
defined as tl.rand(seed, i), i.e. word 0 of counter (i_lo, i_hi, 0, 0). Words
1-3 of that counter are no element's value, so using them (tl.randint4x) would
define a different stream (word i % 4 of counter i // 4) and break the
bit-for-bit agreement with the reference and cpp backends. The price: 10 rounds
of 2 wide multiplies per element (~40-60 integer instructions), which on an H100
is estimated (not measured) at ~300-400 G elements/s: near the memory bound for
float32 (8 bytes/element), about half of it for 16-bit dtypes. Reaching 85% of
bandwidth for bf16 would need the stream redefined as word i % 4 of counter i // 4.
"""
import torch
import triton
import triton.language as tl

from ._common import check_grid, check_tensor, dense_format, device_guard, new_output, to_acc

BLOCK = 1024              # elements per program, contiguous kernel
CL_BLOCK_ELEMS = 1024     # elements per program, channels_last kernel (BLOCK_S * BLOCK_C)


@triton.jit
def _keep_factor(seed, idx, p, scale):
    """scale where u(seed, idx) > p else 0.0 (scale's dtype); idx: int64 logical indices >= 0, seed: an int scalar.

    The counter is built explicitly (low word, high word = idx >> 32, 0, 0) rather
    than through tl.rand, so every Triton version gives the stream of docs/ARCHITECTURE.md;
    tl.philox reads the seed as 64 bits (an int32 seed is sign-extended, the same
    bits as the int64 the op receives).
    """
    c0 = idx.to(tl.uint32)                 # truncates: the low 32 bits
    c1 = (idx >> 32).to(tl.uint32)
    zero = c0 * 0
    word, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    x = word.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    u = x.to(tl.float32) * 4.6566127342e-10  # exactly tl.rand's uint_to_uniform_float (float32 multiply)
    return tl.where(u > p, scale, 0.0)


# The seed is typed uint64 and not specialised: one compiled kernel serves every seed (a specialised int would
# compile a variant for seeds that are 1, multiples of 16, or outside int32's range). p is float32 (the threshold of
# the stream's definition); scale is float64, rounded once to the dtype the product is computed in.
@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(X_ptr, Y_ptr, n_elements, seed: tl.uint64, p, scale: tl.float64, BLOCK: tl.constexpr):
    """X, Y: n_elements dense in logical (row-major) order; memory index == logical index."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = to_acc(tl.load(X_ptr + offs, mask=mask))
    y = x * _keep_factor(seed, offs, p, tl.full((), scale, x.dtype))  # x * 0 keeps NaN/inf -> NaN, as torch
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_cl_kernel(X_ptr, Y_ptr, C, S, num_s_blocks, seed: tl.uint64, p, scale: tl.float64,
                       BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """X, Y: logical (N, C, S) stored as (N, S, C) (NHWC with S = H*W).

    Program (pid0, pid1) covers batch n = pid0 // num_s_blocks, spatial block
    pid0 % num_s_blocks and channel block pid1: a scalar division per program, none per element.
    memory offset (n*S + s)*C + c; logical index (n*C + c)*S + s.
    """
    pid0 = tl.program_id(0).to(tl.int64)
    n = pid0 // num_s_blocks
    s = (pid0 % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (c < C)[None, :]
    mem = (n * S + s)[:, None] * C + c[None, :]
    logical = (n * C + c)[None, :] * S + s[:, None]
    x = to_acc(tl.load(X_ptr + mem, mask=mask))
    y = x * _keep_factor(seed, logical, p, tl.full((), scale, x.dtype))
    tl.store(Y_ptr + mem, y.to(Y_ptr.dtype.element_ty), mask=mask)


def _check_args(p: float, seed: int) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an int64, got {seed!r}")


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x: any shape float32|float64|float16|bfloat16 -> x * (u(seed, i) > float32(p) ? 1/(1-p) : 0), x's shape,
    dtype and format.

    Also the backward: dropout(grad_out, p, seed) with the forward's seed.
    """
    check_tensor(x, "x")
    _check_args(p, seed)
    fmt = dense_format(x)  # NHWC stays NHWC (no copy); other non-dense strides are made contiguous
    x = x.contiguous(memory_format=fmt)
    y = new_output(x.shape, x, memory_format=fmt)
    n = x.numel()
    if n == 0:
        return y
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0  # float64 (the kernels round it to float32 except for float64 x)
    seed &= 2**64 - 1   # the same 64 bits as an unsigned value (the kernels' seed is uint64)
    with device_guard(x):
        _launch(x, y, n, fmt, seed, p, scale)
    return y


def _launch(x, y, n, fmt, seed, p, scale):
    if fmt == torch.channels_last:
        N, C, H, W = x.shape
        S = H * W
        block_c = min(triton.next_power_of_2(C), 64)
        block_s = max(CL_BLOCK_ELEMS // block_c, 1)
        num_s_blocks = triton.cdiv(S, block_s)
        grid = (N * num_s_blocks, triton.cdiv(C, block_c))
        check_grid(grid, "dropout")
        _dropout_cl_kernel[grid](x, y, C, S, num_s_blocks, seed, p, scale, BLOCK_S=block_s, BLOCK_C=block_c)
    else:
        grid = (triton.cdiv(n, BLOCK),)
        check_grid(grid, "dropout")
        _dropout_kernel[grid](x, y, n, seed, p, scale, BLOCK=BLOCK)
