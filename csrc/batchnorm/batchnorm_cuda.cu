// BatchNorm2d (+ReLU) on CUDA tensors. The math and the pass structure: python/fusedcnn/ops/batchnorm.py.
//
// x, grad_out: (N, C, H, W) float32|float16|bfloat16, NCHW or NHWC; all arithmetic in float32.
// mean, var, invstd, sum_dy, sum_dy_xmu: (C,) float32. An empty batch has mean = var = 0 (batchnorm_cpu.cpp).
//
// Every kernel walks x as P planes of R rows of C channels, element (p, r, c) at p*PS + r*RS + c*CS
// (the same walk as triton_kernels/batchnorm.py):
//   NCHW: P = N, R = H*W, PS = C*H*W, RS = 1, CS = H*W; block (1 x 256 threads): one channel, 256
//         consecutive values per step (coalesced)
//   NHWC: P = 1, R = N*H*W, PS = 0, RS = C, CS = 1;    block (32 x 8 threads): 32 consecutive channels x 8 rows
// Block (q, cb) covers its channels over a group of PG planes x a chunk of CHUNK rows; the grid is sized
// for ~8 blocks per SM, so the statistics of a wide layer (64 channels x 128*224*224) are split across
// thousands of blocks. Reductions: per-thread Welford (stats) or float sums (backward), merged with
// warp shuffles (NCHW) and shared memory across the block, into per-block partials (Q, C) that a tiny
// ATen combine (Chan's formula, float64) finishes.
//
// Bytes per pass (E = N*C*H*W elements of s bytes): stats E*s; apply 2E*s; backward_reduce 2E*s;
// backward_elemt 3E*s.
#include "batchnorm/batchnorm.h"
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <tuple>

namespace fusedcnn {
namespace {

struct Walk {
  int64_t P, R, C, PS, RS, CS, PG, CHUNK, n_rchunks, Q;
  bool nhwc;
};

constexpr int kRowsPerStep = 4;  // each thread handles >= 4 rows per plane chunk before the grid grows

template <int TC, int TR>
Walk make_walk(const at::Tensor& x, bool nhwc) {
  Walk w{};
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  w.C = C;
  w.nhwc = nhwc;
  if (nhwc) { w.P = 1; w.R = N * HW; w.PS = 0; w.RS = C; w.CS = 1; }
  else { w.P = N; w.R = HW; w.PS = C * HW; w.RS = 1; w.CS = HW; }
  const int64_t target = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int64_t tile = TR * kRowsPerStep;
  const int64_t c_blocks = (C + TC - 1) / TC;
  const int64_t tiles_per_plane = std::max<int64_t>(1, (w.R + tile - 1) / tile);
  const int64_t per_block = std::max<int64_t>(1, w.P * tiles_per_plane * c_blocks / target);
  if (per_block >= tiles_per_plane) {
    w.CHUNK = tiles_per_plane * tile;
    w.PG = std::max<int64_t>(1, per_block / tiles_per_plane);
  } else {
    w.CHUNK = per_block * tile;
    w.PG = 1;
  }
  w.n_rchunks = std::max<int64_t>(1, (w.R + w.CHUNK - 1) / w.CHUNK);
  w.Q = ((w.P + w.PG - 1) / w.PG) * w.n_rchunks;
  TORCH_CHECK(c_blocks <= 65535, "batch norm (cuda): too many channels for the grid: ", C);
  TORCH_CHECK(w.Q <= INT32_MAX, "batch norm (cuda): tensor too large for the grid");
  return w;
}

// The channel, plane range and row range of this thread's block; false when the channel is out of range.
struct Span {
  int64_t c, p0, p1, r0, r1;
};

template <int TC>
__device__ inline bool span_of(const Walk& w, Span& s) {
  s.c = int64_t(blockIdx.y) * TC + threadIdx.x;
  const int64_t q = blockIdx.x;
  s.p0 = (q / w.n_rchunks) * w.PG;
  s.p1 = (s.p0 + w.PG < w.P) ? s.p0 + w.PG : w.P;
  s.r0 = (q % w.n_rchunks) * w.CHUNK;
  s.r1 = (s.r0 + w.CHUNK < w.R) ? s.r0 + w.CHUNK : w.R;
  return s.c < w.C;
}

// Calls f(offset) for every element of this thread in its block's span.
template <int TC, int TR, typename F>
__device__ inline void for_each_element(const Walk& w, const Span& s, F f) {
  for (int64_t p = s.p0; p < s.p1; ++p) {
    const int64_t base = p * w.PS + s.c * w.CS;
    for (int64_t r = s.r0 + threadIdx.y; r < s.r1; r += TR) f(base + r * w.RS);
  }
}

struct Welford {
  float n, mean, m2;
};

__device__ inline Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

struct Sum2 {
  float a, b;
};

__device__ inline Sum2 merge(const Sum2& x, const Sum2& y) { return {x.a + y.a, x.b + y.b}; }

__device__ inline Welford shfl_down(const Welford& v, int d) {
  return {__shfl_down_sync(0xffffffffu, v.n, d), __shfl_down_sync(0xffffffffu, v.mean, d),
          __shfl_down_sync(0xffffffffu, v.m2, d)};
}
__device__ inline Sum2 shfl_down(const Sum2& v, int d) {
  return {__shfl_down_sync(0xffffffffu, v.a, d), __shfl_down_sync(0xffffffffu, v.b, d)};
}

// Reduce v over threadIdx.y (the rows) of a (TC x TR) block; the result lands in threads with threadIdx.y == 0.
// TC == 1: warp shuffles, then one value per warp through shared memory; TC > 1: a shared-memory tree.
template <int TC, int TR, typename T>
__device__ inline T block_reduce(T v) {
  __shared__ T smem[TC * TR];
  if constexpr (TC == 1) {
    static_assert(TR % 32 == 0, "TC == 1 needs whole warps");
    for (int d = 16; d > 0; d >>= 1) v = merge(v, shfl_down(v, d));
    const int warp = threadIdx.y / 32, lane = threadIdx.y % 32;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
      constexpr int kWarps = TR / 32;
      v = lane < kWarps ? smem[lane] : T{};
      for (int d = 16; d > 0; d >>= 1) v = merge(v, shfl_down(v, d));
    }
  } else {
    const int i = threadIdx.y * TC + threadIdx.x;
    smem[i] = v;
    __syncthreads();
    for (int s = TR / 2; s > 0; s >>= 1) {
      if (threadIdx.y < s) smem[i] = merge(smem[i], smem[i + s * TC]);
      __syncthreads();
    }
    v = smem[threadIdx.x];
  }
  return v;
}

// ------------------------------------------------------------------ kernels
template <typename scalar_t, int TC, int TR>
__global__ void stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ pcount, float* __restrict__ pmean,
                             float* __restrict__ pm2, Walk w) {
  Span s;
  const bool valid = span_of<TC>(w, s);
  Welford acc{0.f, 0.f, 0.f};
  if (valid) {
    for_each_element<TC, TR>(w, s, [&](int64_t off) {  // Welford: one value at a time
      const float v = static_cast<float>(x[off]);
      acc.n += 1.f;
      const float d = v - acc.mean;
      acc.mean += d / acc.n;
      acc.m2 += d * (v - acc.mean);
    });
  }
  acc = block_reduce<TC, TR>(acc);
  if (valid && threadIdx.y == 0) {
    const int64_t o = int64_t(blockIdx.x) * w.C + s.c;
    pcount[o] = acc.n;
    pmean[o] = acc.mean;
    pm2[o] = acc.m2;
  }
}

template <typename scalar_t, int TC, int TR, bool RELU>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* __restrict__ MEAN,
                             const float* __restrict__ A, const float* __restrict__ B, Walk w) {
  Span s;
  if (!span_of<TC>(w, s)) return;
  const float mean = MEAN[s.c], a = A[s.c], b = B[s.c];
  for_each_element<TC, TR>(w, s, [&](int64_t off) {
    float v = (static_cast<float>(x[off]) - mean) * a + b;
    if (RELU) v = v <= 0.f ? 0.f : v;  // NaN <= 0 is false: NaN propagates
    y[off] = static_cast<scalar_t>(v);
  });
}

template <typename scalar_t, int TC, int TR, bool RELU>
__global__ void backward_reduce_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                       const float* __restrict__ MEAN, const float* __restrict__ A,
                                       const float* __restrict__ B, float* __restrict__ psdy,
                                       float* __restrict__ psdyx, Walk w) {
  Span s;
  const bool valid = span_of<TC>(w, s);
  Sum2 acc{0.f, 0.f};
  if (valid) {
    const float mean = MEAN[s.c], a = A[s.c], b = B[s.c];
    for_each_element<TC, TR>(w, s, [&](int64_t off) {
      const float xm = static_cast<float>(x[off]) - mean;
      float gv = static_cast<float>(g[off]);
      if (RELU) gv = (xm * a + b > 0.f) ? gv : 0.f;
      acc.a += gv;
      acc.b += gv * xm;
    });
  }
  acc = block_reduce<TC, TR>(acc);
  if (valid && threadIdx.y == 0) {
    const int64_t o = int64_t(blockIdx.x) * w.C + s.c;
    psdy[o] = acc.a;
    psdyx[o] = acc.b;
  }
}

template <typename scalar_t, int TC, int TR, bool RELU>
__global__ void backward_elemt_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, const float* __restrict__ MEAN,
                                      const float* __restrict__ A,
                                      const float* __restrict__ B, const float* __restrict__ K1,
                                      const float* __restrict__ K2, const float* __restrict__ K3, Walk w) {
  Span s;
  if (!span_of<TC>(w, s)) return;
  const float mean = MEAN[s.c], a = A[s.c], b = B[s.c], k1 = K1[s.c], k2 = K2[s.c], k3 = K3[s.c];
  for_each_element<TC, TR>(w, s, [&](int64_t off) {
    const float xm = static_cast<float>(x[off]) - mean;
    float gv = static_cast<float>(g[off]);
    if (RELU) gv = (xm * a + b > 0.f) ? gv : 0.f;
    dx[off] = static_cast<scalar_t>(k1 * gv + k2 * xm + k3);
  });
}

// ------------------------------------------------------------------ launch helpers
// Runs launch.template operator()<TC, TR>(walk, grid, block) with the layout's block shape.
template <typename L>
void with_layout(const at::Tensor& x, L launch) {
  if (bn::layout_of(x) == at::MemoryFormat::ChannelsLast) {
    const Walk w = make_walk<32, 8>(x, true);
    launch.template operator()<32, 8>(w, dim3(unsigned(w.Q), unsigned((w.C + 31) / 32)), dim3(32, 8));
  } else {
    const Walk w = make_walk<1, 256>(x, false);
    launch.template operator()<1, 256>(w, dim3(unsigned(w.Q), unsigned(w.C)), dim3(1, 256));
  }
}

// Every op checks x (a CUDA tensor, its dtype and rank; grad_out on x's device) BEFORE it builds its
// CUDAGuard: the guard needs a CUDA device, and a CPU x would otherwise fail inside c10 with a message
// that names neither the op nor the tensor. Then x in its dense layout.
void check_x(const char* op, const at::Tensor& x, const at::Tensor* grad_out = nullptr) {
  if (grad_out) check_same_device(op, *grad_out, "grad_out", x, "x");
  bn::check_input(x, "x", at::kCUDA);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "x: float64 is not supported on CUDA (float32, float16, bfloat16)");
}

at::Tensor dense_x(const at::Tensor& x) { return x.contiguous(bn::layout_of(x)); }

at::Tensor grad_like(const at::Tensor& grad_out, const at::Tensor& x) {
  check_same_device("fusedcnn batch norm backward", grad_out, "grad_out", x, "x");
  FUSEDCNN_CHECK_SAME_SHAPE(grad_out, x);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out must have x's dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  return grad_out.contiguous(bn::layout_of(x));
}

// a = weight * invstd, b = bias: (C,) float32 (the forward's y = (x - mean) * a + b; not x * a + (b - mean * a),
// which cancels catastrophically when |mean| >> std).
std::pair<at::Tensor, at::Tensor> affine_coefs(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                               const c10::optional<at::Tensor>& weight,
                                               const c10::optional<at::Tensor>& bias) {
  bn::check_channel_vec(mean, x, "mean", at::kFloat);
  bn::check_channel_vec(invstd, x, "invstd", at::kFloat);
  const at::Tensor a = (bn::affine_or(weight, x, "weight", 1.0) * invstd).contiguous();
  const at::Tensor b = bn::affine_or(bias, x, "bias", 0.0);
  return {a, b};
}

// ------------------------------------------------------------------ ops
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x_) {
  check_x("fusedcnn::batch_norm_stats", x_);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense_x(x_);
  const int64_t C = x.size(1);
  if (x.numel() == 0) {  // an empty batch: mean = var = 0 (a count of 0 weighs nothing in a merge)
    at::Tensor z = at::zeros({C}, x.options().dtype(at::kFloat));
    return {z, z.clone()};
  }
  at::Tensor pcount, pmean, pm2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    with_layout(x, [&]<int TC, int TR>(const Walk& w, dim3 grid, dim3 block) {
      const auto opts = x.options().dtype(at::kFloat);
      pcount = at::empty({w.Q, C}, opts);
      pmean = at::empty({w.Q, C}, opts);
      pm2 = at::empty({w.Q, C}, opts);
      stats_kernel<scalar_t, TC, TR><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), pcount.mutable_data_ptr<float>(), pmean.mutable_data_ptr<float>(),
          pm2.mutable_data_ptr<float>(), w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Combine the (Q, C) partials (Chan, float64): n = sum n_q, mean = sum n_q mean_q / n,
  // M2 = sum M2_q + sum n_q (mean_q - mean)^2.
  const at::Tensor n_q = pcount.to(at::kDouble), mean_q = pmean.to(at::kDouble);
  const at::Tensor n = n_q.sum(0);
  const at::Tensor mean = (n_q * mean_q).sum(0) / n;
  const at::Tensor m2 = pm2.to(at::kDouble).sum(0) + (n_q * (mean_q - mean).square()).sum(0);
  return {mean.to(at::kFloat), (m2 / n).to(at::kFloat)};
}

at::Tensor batch_norm_apply_cuda(const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& invstd,
                                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                 bool relu) {
  check_x("fusedcnn::batch_norm_apply", x_);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense_x(x_);
  const auto [a, b] = affine_coefs(x, mean, invstd, weight, bias);
  const at::Tensor mean_c = mean.contiguous();
  at::Tensor y = new_output(x.sizes(), x.options(), bn::layout_of(x));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_apply_cuda", [&] {
    with_layout(x, [&]<int TC, int TR>(const Walk& w, dim3 grid, dim3 block) {
      auto* k = relu ? apply_kernel<scalar_t, TC, TR, true> : apply_kernel<scalar_t, TC, TR, false>;
      k<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
          a.const_data_ptr<float>(), b.const_data_ptr<float>(), w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool relu) {
  check_x("fusedcnn::batch_norm_backward_reduce", x_, &grad_out);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense_x(x_);
  const at::Tensor gy = grad_like(grad_out, x);
  const auto [a, b] = affine_coefs(x, mean, invstd, weight, bias);
  const int64_t C = x.size(1);
  if (x.numel() == 0) {
    at::Tensor z = at::zeros({C}, x.options().dtype(at::kFloat));
    return {z, z.clone()};
  }
  const at::Tensor mean_c = mean.contiguous();
  at::Tensor psdy, psdyx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_reduce_cuda", [&] {
    with_layout(x, [&]<int TC, int TR>(const Walk& w, dim3 grid, dim3 block) {
      psdy = at::empty({w.Q, C}, x.options().dtype(at::kFloat));
      psdyx = at::empty({w.Q, C}, x.options().dtype(at::kFloat));
      auto* k = relu ? backward_reduce_kernel<scalar_t, TC, TR, true> : backward_reduce_kernel<scalar_t, TC, TR, false>;
      k<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
          a.const_data_ptr<float>(), b.const_data_ptr<float>(), psdy.mutable_data_ptr<float>(),
          psdyx.mutable_data_ptr<float>(), w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {psdy.sum(0), psdyx.sum(0)};
}

at::Tensor batch_norm_backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean,
                                          const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& sum_dy,
                                          const c10::optional<at::Tensor>& sum_dy_xmu, double count, bool relu) {
  check_x("fusedcnn::batch_norm_backward_elemt", x_, &grad_out);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = dense_x(x_);
  const at::Tensor gy = grad_like(grad_out, x);
  const auto [a, b] = affine_coefs(x, mean, invstd, weight, bias);
  const bool training = sum_dy.has_value() && sum_dy->defined();
  TORCH_CHECK(training == (sum_dy_xmu.has_value() && sum_dy_xmu->defined()),
              "sum_dy and sum_dy_xmu must be given together (training) or both None (eval)");
  // dx = k1 * g' + k2 * (x - mean) + k3 (see batchnorm_cpu.cpp for the expansion)
  const at::Tensor k1 = a;
  at::Tensor k2 = at::zeros_like(k1), k3 = at::zeros_like(k1);
  if (training) {
    bn::check_channel_vec(*sum_dy, x, "sum_dy", at::kFloat);
    bn::check_channel_vec(*sum_dy_xmu, x, "sum_dy_xmu", at::kFloat);
    TORCH_CHECK(count > 0 || x.numel() == 0, "count must be positive, got ", count);
    if (count > 0) {  // (an empty x has no dx to compute)
      k2 = (-k1 * invstd * invstd * (*sum_dy_xmu) / count).contiguous();
      k3 = (-k1 * (*sum_dy) / count).contiguous();
    }
  }
  const at::Tensor mean_c = mean.contiguous();
  at::Tensor dx = new_output(x.sizes(), x.options(), bn::layout_of(x));
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt_cuda", [&] {
    with_layout(x, [&]<int TC, int TR>(const Walk& w, dim3 grid, dim3 block) {
      auto* k = relu ? backward_elemt_kernel<scalar_t, TC, TR, true> : backward_elemt_kernel<scalar_t, TC, TR, false>;
      k<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          mean_c.const_data_ptr<float>(), a.const_data_ptr<float>(), b.const_data_ptr<float>(), k1.const_data_ptr<float>(),
          k2.const_data_ptr<float>(), k3.const_data_ptr<float>(), w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_forward_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  bn::check_input(x, "x", at::kCUDA);
  bn::check_running_stats(running_mean, running_var, x);
  auto result = bn::train_forward_two_pass(x, weight, bias, eps, relu, batch_norm_stats_cuda, batch_norm_apply_cuda);
  bn::update_running_stats(running_mean, running_var, std::get<1>(result), std::get<2>(result),
                           x.numel() / std::max<int64_t>(x.size(1), 1), momentum);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool relu) {
  return bn::train_backward_two_pass(grad_out, x, mean, invstd, weight, bias, relu, batch_norm_backward_reduce_cuda,
                                     batch_norm_backward_elemt_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CUDA, m) {
  m.impl("batch_norm_train_forward", &batch_norm_train_forward_cuda);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_apply", &batch_norm_apply_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
}

}  // namespace fusedcnn
