// Pooling on CUDA tensors: x (N, C, H, W) float32|float16|bfloat16, any strides (NCHW and NHWC
// without copies); float32 accumulation; int64 index math; grid-stride loops.
// Geometry, argument checks and op wrappers: pooling.h. The same design as triton_kernels/pooling.py:
//
// Forward: one thread per output item. NCHW: an item is one output, consecutive threads take
//   consecutive ow (coalesced). NHWC: an item is VEC consecutive channels of one output position,
//   loaded and stored as one 16-byte vector (VEC = 8 for 16-bit types, 4 for float32) when C and
//   every stride allow it, so a warp moves 512 contiguous bytes per tap.
//   Global (1x1) pooling of dense NCHW planes: one warp per plane, shuffle reduction.
// Backward: a gather, one thread per input item: it sums the gradients of the (at most ncand^2)
//   windows that hold it — no atomics, deterministic, every grad_in element written exactly once
//   (no zero-fill pass). Max pooling recomputes each window's argmax from x rather than saving
//   indices: for the VGG 2x2/s2 bf16 pool that is 10 B per output in the forward instead of 18 B
//   (indices would add 8 B of int64 per output) and 18 B in the backward either way (x's 8 B
//   replace the indices' 8 B); see triton_kernels/pooling.py for the full count. Adaptive max
//   reads its saved indices (big windows, few indices).
#include "pooling/pooling.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fusedcnn {
namespace pooling {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

struct Strides {
  int64_t n, c, h, w;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_vec(const scalar_t* p, int64_t step, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc_t>(p[0]);
  } else {  // VEC contiguous, 16-byte aligned elements (checked by the launcher)
    const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<scalar_t>(in[0]);
  } else {
    Pack<scalar_t, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(in[i]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
  }
}

// Max over window (oh, ow) for VEC channels starting at xb (= &x[n, c, 0, 0]); PyTorch's rule:
// first maximum in scan order, any NaN wins (the last NaN). best: flat index h*W+w.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void window_max(const scalar_t* xb, const Strides& xs, const Args& a, int64_t oh,
                                           int64_t ow, acc_t (&m)[VEC], int64_t (&best)[VEC]) {
  const int64_t hs = a.h.start(oh), he = imin(a.h.end(oh), a.h.in);
  const int64_t ws = a.w.start(ow), we = imin(a.w.end(ow), a.w.in);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    m[i] = -INFINITY;
    best[i] = -1;
  }
  for (int64_t j = 0; j < a.h.taps; ++j) {
    const int64_t ih = hs + j * a.h.dil;
    if (ih >= he) break;
    if (ih < 0) continue;
    for (int64_t k = 0; k < a.w.taps; ++k) {
      const int64_t iw = ws + k * a.w.dil;
      if (iw >= we) break;
      if (iw < 0) continue;
      acc_t v[VEC];
      load_vec<scalar_t, acc_t, VEC>(xb + ih * xs.h + iw * xs.w, xs.c, v);
      const int64_t flat = ih * a.w.in + iw;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (best[i] < 0 || v[i] > m[i] || v[i] != v[i]) {
          m[i] = v[i];
          best[i] = flat;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void window_sum(const scalar_t* xb, const Strides& xs, const Args& a, int64_t oh,
                                           int64_t ow, acc_t (&s)[VEC]) {
  const int64_t hs = imax(a.h.start(oh), 0), he = imin(a.h.end(oh), a.h.in);
  const int64_t ws = imax(a.w.start(ow), 0), we = imin(a.w.end(ow), a.w.in);
#pragma unroll
  for (int i = 0; i < VEC; ++i) s[i] = 0;
  for (int64_t ih = hs; ih < he; ++ih)
    for (int64_t iw = ws; iw < we; ++iw) {
      acc_t v[VEC];
      load_vec<scalar_t, acc_t, VEC>(xb + ih * xs.h + iw * xs.w, xs.c, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] += v[i];
    }
}

// Item t -> (n, c, oh, ow) over a (N, C, OH, OW) grid; NHWC items are VEC channels wide.
template <bool NHWC, int VEC>
__device__ __forceinline__ void item_coords(int64_t t, int64_t C, int64_t OH, int64_t OW, int64_t& n, int64_t& c,
                                            int64_t& oh, int64_t& ow) {
  if constexpr (NHWC) {
    const int64_t cv = C / VEC;
    c = (t % cv) * VEC;
    t /= cv;
    ow = t % OW;
    t /= OW;
    oh = t % OH;
    n = t / OH;
  } else {
    ow = t % OW;
    t /= OW;
    oh = t % OH;
    t /= OH;
    c = t % C;
    n = t / C;
  }
}

// x (N, C, H, W) -> y (N, C, OH, OW) [+ indices with y's strides]
template <typename scalar_t, int VEC, bool NHWC>
__global__ void pool_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t* __restrict__ idx,
                                const Args a, const int64_t C, const Strides xs, const Strides ys, const int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < items; t += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, oh, ow;
    item_coords<NHWC, VEC>(t, C, a.h.out, a.w.out, n, c, oh, ow);
    const scalar_t* xb = x + n * xs.n + c * xs.c;
    const int64_t yoff = n * ys.n + c * ys.c + oh * ys.h + ow * ys.w;
    acc_t v[VEC];
    if (a.kind == Kind::Max) {
      int64_t best[VEC];
      window_max<scalar_t, acc_t, VEC>(xb, xs, a, oh, ow, v, best);
      if (idx != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) idx[yoff + i * ys.c] = best[i];
      }
    } else {
      window_sum<scalar_t, acc_t, VEC>(xb, xs, a, oh, ow, v);
      const acc_t div = static_cast<acc_t>(divisor_of(a, oh, ow));
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] /= div;
    }
    store_vec<scalar_t, acc_t, VEC>(y + yoff, v);
  }
}

// Global pooling of dense NCHW planes (H*W contiguous): one warp per plane.
template <typename scalar_t>
__global__ void global_pool_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t* __restrict__ idx,
                                   const int64_t planes, const int64_t C, const int64_t HW, const Strides xs,
                                   const Strides ys, const bool is_max) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t p = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; p < planes; p += warps) {
    const scalar_t* xp = x + (p / C) * xs.n + (p % C) * xs.c;
    acc_t m = is_max ? -INFINITY : acc_t(0);
    int64_t best = -1;
    for (int64_t i = lane; i < HW; i += 32) {
      const acc_t v = static_cast<acc_t>(xp[i]);
      if (!is_max) {
        m += v;
      } else if (best < 0 || v > m || v != v) {
        m = v;
        best = i;
      }
    }
    // Merge lanes: each lane holds its first maximum / last NaN; keep any NaN (largest index),
    // else the larger value, ties to the smaller index.
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t om = __shfl_down_sync(0xffffffffu, m, off);
      const int64_t ob = __shfl_down_sync(0xffffffffu, best, off);
      if (!is_max) {
        m += om;
      } else if (ob >= 0) {
        const bool a_nan = m != m, b_nan = om != om;
        bool take;
        if (best < 0) take = true;
        else if (a_nan || b_nan) take = b_nan && (!a_nan || ob > best);
        else take = om > m || (om == m && ob < best);
        if (take) {
          m = om;
          best = ob;
        }
      }
    }
    if (lane == 0) {
      const int64_t yoff = (p / C) * ys.n + (p % C) * ys.c;
      y[yoff] = static_cast<scalar_t>(is_max ? m : m / static_cast<acc_t>(HW));
      if (idx != nullptr) idx[yoff] = best;
    }
  }
}

// grad_out (N, C, OH, OW) -> grad_in (N, C, H, W), one thread per input item.
// Max: x given -> argmax recomputed; ind given -> saved indices. Average: neither.
template <typename scalar_t, int VEC, bool NHWC>
__global__ void pool_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                const int64_t* __restrict__ ind, scalar_t* __restrict__ dx, const Args a,
                                const int64_t C, const Strides gs, const Strides xs, const Strides is,
                                const Strides ds, const int64_t items) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < items; t += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, ih, iw;
    item_coords<NHWC, VEC>(t, C, a.h.in, a.w.in, n, c, ih, iw);
    const int64_t flat = ih * a.w.in + iw;
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0;
    const int64_t oh0 = a.h.first(ih), ow0 = a.w.first(iw);
    for (int64_t da = 0; da < a.h.ncand; ++da) {
      const int64_t oh = oh0 + da;
      if (!a.h.contains(oh, ih)) continue;
      for (int64_t db = 0; db < a.w.ncand; ++db) {
        const int64_t ow = ow0 + db;
        if (!a.w.contains(ow, iw)) continue;
        acc_t gv[VEC];
        load_vec<scalar_t, acc_t, VEC>(g + n * gs.n + c * gs.c + oh * gs.h + ow * gs.w, gs.c, gv);
        if (a.kind == Kind::Avg) {
          const acc_t div = static_cast<acc_t>(divisor_of(a, oh, ow));
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += gv[i] / div;
        } else if (ind != nullptr) {
          const int64_t* ip = ind + n * is.n + c * is.c + oh * is.h + ow * is.w;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += ip[i * is.c] == flat ? gv[i] : acc_t(0);
        } else {
          acc_t m[VEC];
          int64_t best[VEC];
          window_max<scalar_t, acc_t, VEC>(x + n * xs.n + c * xs.c, xs, a, oh, ow, m, best);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += best[i] == flat ? gv[i] : acc_t(0);
        }
      }
    }
    store_vec<scalar_t, acc_t, VEC>(dx + n * ds.n + c * ds.c + ih * ds.h + iw * ds.w, acc);
  }
}

inline int blocks_for(int64_t items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return (int)std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, sms * 32));
}

// NHWC: the channels are the innermost dense dimension of every tensor involved.
inline bool channels_inner(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->defined() && (t->size(1) <= 1 || t->stride(1) != 1)) return false;
  return true;
}

// 16-byte vectors of channels: C, every stride and every base pointer must allow them.
template <typename scalar_t>
inline int vec_width(int64_t C, std::initializer_list<const at::Tensor*> ts) {
  const int vec = 16 / (int)sizeof(scalar_t);
  if (vec <= 1 || C % vec != 0) return 1;
  for (const at::Tensor* t : ts) {
    if (!t->defined()) continue;
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return 1;
    if (t->stride(0) % vec || t->stride(2) % vec || t->stride(3) % vec) return 1;
  }
  return vec;
}

// Calls f(std::integral_constant<int, vec>) so the vector width becomes a template argument.
template <typename F>
inline void with_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

struct CudaImpl {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;

  static void check_dtype(const at::Tensor& t) {
    const auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16,
                "fusedcnn pooling (cpp, CUDA) supports float32, float16 and bfloat16, got ", d);
  }

  static void forward(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
    c10::cuda::CUDAGuard guard(x.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    int64_t* ip = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
    const bool whole_plane = a.h.out == 1 && a.w.out == 1 && a.h.B == 1 && a.w.B == 1 && a.h.A == H && a.w.A == W &&
                             a.h.pad == 0 && a.w.pad == 0 && a.h.extra == 0 && a.w.extra == 0 && a.h.dil == 1 &&
                             a.w.dil == 1;
    const bool nhwc = channels_inner({&x, &out});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool2d_forward_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      if (whole_plane && !nhwc && x.stride(3) == 1 && x.stride(2) == W) {
        const int64_t planes = N * C;
        const int blocks = (int)std::min<int64_t>((planes + 7) / 8, 65535);
        global_pool_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(xp, yp, ip, planes, C, H * W, strides_of(x),
                                                                       strides_of(out), a.kind == Kind::Max);
      } else if (nhwc) {
        const int vec = vec_width<scalar_t>(C, {&x, &out});
        const int64_t items = N * a.h.out * a.w.out * (C / vec);
        with_vec(vec, [&](auto V) {
          pool_fwd_kernel<scalar_t, decltype(V)::value, true><<<blocks_for(items), kThreads, 0, stream>>>(
              xp, yp, ip, a, C, strides_of(x), strides_of(out), items);
        });
      } else {
        const int64_t items = out.numel();
        pool_fwd_kernel<scalar_t, 1, false><<<blocks_for(items), kThreads, 0, stream>>>(
            xp, yp, ip, a, C, strides_of(x), strides_of(out), items);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& ind, const Args& a,
                       at::Tensor& grad_in) {
    c10::cuda::CUDAGuard guard(g.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    if (x.defined()) FUSEDCNN_CHECK_DEVICE(x, at::kCUDA);
    const int64_t C = g.size(1);
    const bool nhwc = channels_inner({&g, &x, &ind, &grad_in});
    const Strides none{0, 0, 0, 0};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pool2d_backward_cuda", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
      const int64_t* ip = ind.defined() ? ind.const_data_ptr<int64_t>() : nullptr;
      scalar_t* dp = grad_in.mutable_data_ptr<scalar_t>();
      const Strides xs = x.defined() ? strides_of(x) : none, is = ind.defined() ? strides_of(ind) : none;
      if (nhwc) {
        const int vec = vec_width<scalar_t>(C, {&g, &x, &grad_in});
        const int64_t items = grad_in.numel() / vec;
        with_vec(vec, [&](auto V) {
          pool_bwd_kernel<scalar_t, decltype(V)::value, true><<<blocks_for(items), kThreads, 0, stream>>>(
              gp, xp, ip, dp, a, C, strides_of(g), xs, is, strides_of(grad_in), items);
        });
      } else {
        const int64_t items = grad_in.numel();
        pool_bwd_kernel<scalar_t, 1, false><<<blocks_for(items), kThreads, 0, stream>>>(
            gp, xp, ip, dp, a, C, strides_of(g), xs, is, strides_of(grad_in), items);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace pooling

TORCH_LIBRARY_IMPL(fusedcnn, CUDA, m) {
  FUSEDCNN_REGISTER_POOLING(m, pooling::CudaImpl);
}

}  // namespace fusedcnn
