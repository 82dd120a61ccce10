"""Helpers shared by the Triton modules: argument checks, output allocation, and the @triton.jit pieces
every GEMM-shaped kernel uses (tile order, the dot, pixel offsets, BatchNorm+ReLU on a tile)."""
import os

import torch
import triton
import triton.language as tl

from fusedcnn.common import dense_format, is_channels_last, triton_interpreted  # noqa: F401  (re-exported)

# FUSEDCNN_POISON=1 (set by the tests): fresh outputs are filled with NaN so an
# element a kernel forgets to write fails the comparison.
_POISON = os.environ.get("FUSEDCNN_POISON", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Triton kernels run on CPU tensors (the interpreter) exactly when TRITON_INTERPRET=1 was set before triton was
# imported; decided once here for every launcher.
INTERPRET = triton_interpreted()
# The interpreter's tl.dot mis-reads bfloat16 operands (Triton 3.8): there, operands are widened to fp32 first
# (exact: a product of two 16-bit floats fits fp32, which is also what the tensor cores accumulate in).
_WIDEN_DOT = tl.constexpr(INTERPRET)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate a tensor of `dtype` in, and the dtype of their per-channel vectors (scale, shift,
    bias, statistics) and partial sums: float64 for float64, else float32 (fusedcnn.common.accumulation_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_output(shape, like: torch.Tensor, dtype=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def check_tensor(t: torch.Tensor, name: str, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    """Raise a clear error (never an out-of-bounds access) for a tensor a kernel cannot take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {', '.join(str(d) for d in dtypes)}, got {t.dtype}")


def check_vector(v: torch.Tensor, name: str, n: int, dtype: torch.dtype = torch.float32) -> None:
    """v must be a contiguous (n,) tensor of `dtype` (per-channel scale, shift, bias or statistics gradient: float32,
    float64 for float64 input, see acc_dtype)."""
    check_tensor(v, name, ndim=1, dtypes=(dtype,))
    if v.numel() != n or not v.is_contiguous():
        what = str(dtype).split(".")[-1]
        raise ValueError(f"{name} must be a contiguous {what} vector of {n} elements, got shape {tuple(v.shape)}")


# Set only by fusedcnn.compile_check, which calls the launchers on meta tensors and records their launches
# (the kernels never run): the device checks then accept the meta device.
TRACE_META = False
INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535     # CUDA's limit on grid axes 1 and 2 (axis 0: 2**31 - 1)


def check_device(*tensors) -> None:
    """All tensors (None entries skipped) on one device, and one the kernels can run on: CUDA, or the CPU
    under the interpreter."""
    tensors = [t for t in tensors if t is not None]
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {dev} and {t.device}")
    if dev.type == "meta" and TRACE_META:
        return
    if dev.type != "cuda" and not (INTERPRET and dev.type == "cpu"):
        raise RuntimeError(f"the triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                           f"got a tensor on {dev}")


class NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def device_guard(*tensors):
    """The one launch guard of every Triton launcher: checks that the tensors (None skipped) share one usable
    device (check_device) and returns a context that makes the first tensor's GPU current, so the kernels run on
    that GPU and its current stream even when another GPU is current (a no-op context for CPU tensors)."""
    check_device(*tensors)
    t = next(t for t in tensors if t is not None)
    return torch.cuda.device(t.device) if t.is_cuda else NullContext()


def check_grid(grid, what: str) -> None:
    """Raise a clear error for a launch grid CUDA cannot run: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up
    to 65535."""
    if grid[0] > INT32_MAX or any(g > GRID_YZ_MAX for g in grid[1:]):
        raise RuntimeError(f"{what}: launch grid {tuple(grid)} exceeds CUDA's limits (axis 0 < 2**31, axes 1 and 2 "
                           f"<= {GRID_YZ_MAX})")


def check_int32_index(count: int, what: str) -> None:
    """Kernels whose index math is int32 need count (pixels, rows, elements) below 2**31."""
    if count > INT32_MAX:
        raise RuntimeError(f"{what}: {count} exceeds the kernels' int32 index range (must be below 2**31)")


def autotune_bucket(n: int) -> int:
    """The autotuners' key for a GEMM's pixel count M (N*P*Q): the next power of two, at least 16 and at most
    2**30, so a new batch size or resolution in the same bucket reuses the tuned configuration instead of
    benchmarking every configuration again (always a multiple of 16 below 2**31: one specialisation)."""
    return min(max(16, triton.next_power_of_2(max(int(n), 1))), 2**30)


# ----------------------------------------------------------------------------------------------------
# @triton.jit helpers (inlined into the kernels that call them)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order of an (M, N) output: GROUP_M row tiles walk the column tiles together, so the B tiles
    (and the overlapping input rows) they share are still in L2 when the neighbours need them."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def to_acc(v):
    """v in the dtype the kernels compute in: float64 stays float64, every other float becomes float32."""
    if v.dtype == tl.float64:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def acc_zeros(shape, PTR):
    """Zeros of `shape` in the accumulation dtype of the tensor PTR points to (float64 for float64, else float32)."""
    return to_acc(tl.zeros(shape, dtype=PTR.dtype.element_ty))


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype: float32, or float64 for float64 operands (the FP64 MMA of sm_80+,
    where PREC does not apply); fp32 operands go through TF32 or IEEE products per PREC. (if/else, not an early
    return: Triton 3.6 also compiles the statements after a taken compile-time `if ...: return`.)"""
    if a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def split_pixels(m, HW, W):
    """Flat pixel index m -> (image, row, column) for an (N, H, W) grid."""
    img = m // HW
    hw = m - img * HW
    h = hw // W
    return img, h, hw - h * W


@triton.jit
def pixel_offsets(img, h, w, s_n, s_h, s_w):
    """int64 element offset of pixel (img, h, w) in a tensor with strides (s_n, ., s_h, s_w)."""
    return img.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


@triton.jit
def relu_passes(pre):
    """Where ReLU's backward lets the gradient through: not (pre <= 0), so NaN passes, as torch's threshold_backward."""
    return (pre > 0.0) | (pre != pre)


@triton.jit
def bn_relu(v, s, t):
    """relu(v * s + t) in fp32 (float64 for float64 v, s, t); NaN propagates as in torch.relu."""
    pre = to_acc(v) * s + t
    return tl.where(pre <= 0.0, 0.0, pre)
