// Conv2d on CUDA tensors: im2col / col2im kernels + the shared GEMM driver in conv.h (GEMMs: cuBLAS via ATen).
//   x: (n, C, H, W) float32|float16|bfloat16 (and float64), contiguous (the driver hands over an NCHW chunk)
//   col: (C*kH*kW, n*L), L = H_out*W_out; row r = (c*kH + ki)*kW + kj, column = (image, h_out, w_out)
// One thread per output element, grid-stride loops, int64 indices. col2im gathers (each dX element sums
// the columns that read it) instead of scattering with atomics: deterministic, no races.
#include "conv/conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fusedcnn {
namespace conv {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

// col[r, img, ho, wo] = x[img, c, ho*sh - ph + ki*dh, wo*sw - pw + kj*dw], 0 in the padding.
template <typename scalar_t>
__global__ void im2col_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ col, int64_t n, Geom g) {
  const int64_t total = g.C * g.kh * g.kw * n * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t wo = i % g.Wo;
    int64_t t = i / g.Wo;
    const int64_t ho = t % g.Ho;
    t /= g.Ho;
    const int64_t img = t % n;
    const int64_t r = t / n;
    const int64_t kj = r % g.kw, ki = (r / g.kw) % g.kh, c = r / (g.kh * g.kw);
    const int64_t h = ho * g.sh - g.ph + ki * g.dh, w = wo * g.sw - g.pw + kj * g.dw;
    col[i] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? x[((img * g.C + c) * g.H + h) * g.W + w] : scalar_t(0);
  }
}

// x[img, c, h, w] = sum over (ki, kj) with h = ho*sh - ph + ki*dh, w = wo*sw - pw + kj*dw of col[r, img, ho, wo],
// summed in float32 (float64) and rounded once.
template <typename scalar_t>
__global__ void col2im_kernel(const scalar_t* __restrict__ col, scalar_t* __restrict__ x, int64_t n, Geom g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = n * g.C * g.H * g.W, L = g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t w = i % g.W;
    int64_t t = i / g.W;
    const int64_t h = t % g.H;
    t /= g.H;
    const int64_t c = t % g.C;
    const int64_t img = t / g.C;
    acc_t acc = 0;
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t hs = h + g.ph - ki * g.dh;  // = ho * sh
      if (hs < 0 || hs % g.sh != 0) continue;
      const int64_t ho = hs / g.sh;
      if (ho >= g.Ho) continue;
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t ws = w + g.pw - kj * g.dw;  // = wo * sw
        if (ws < 0 || ws % g.sw != 0) continue;
        const int64_t wo = ws / g.sw;
        if (wo >= g.Wo) continue;
        const int64_t r = (c * g.kh + ki) * g.kw + kj;
        acc += static_cast<acc_t>(col[(r * n + img) * L + ho * g.Wo + wo]);
      }
    }
    x[i] = static_cast<scalar_t>(acc);
  }
}

bool cuda_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void im2col_cuda(const at::Tensor& x, const at::Tensor& col, const Geom& g) {
  const int64_t n = x.size(0), total = g.C * g.kh * g.kw * n * g.Ho * g.Wo;
  TORCH_CHECK(x.is_contiguous() && col.is_contiguous() && col.numel() == total, "im2col: bad buffers");
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedcnn_im2col_cuda", [&] {
    im2col_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), col.mutable_data_ptr<scalar_t>(), n, g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void col2im_cuda(const at::Tensor& col, const at::Tensor& x, const Geom& g) {
  const int64_t n = x.size(0), total = x.numel();
  TORCH_CHECK(x.is_contiguous() && col.is_contiguous() && col.numel() == g.C * g.kh * g.kw * n * g.Ho * g.Wo,
              "col2im: bad buffers");
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedcnn_col2im_cuda", [&] {
    col2im_kernel<scalar_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        col.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), n, g);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const Kernels kCudaKernels{at::kCUDA, "CUDA", &cuda_dtype_ok, "float32, float16, bfloat16 and float64",
                           &im2col_cuda, &col2im_cuda, kCudaColBytes};

at::Tensor conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view algo) {
  check_devices("fusedcnn::conv2d", x, weight, bias, nullptr);  // before the guard, which needs a CUDA device
  FUSEDCNN_CHECK_DEVICE(x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  return forward(x, weight, bias, stride, padding, dilation, groups, algo, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    c10::string_view algo) {
  check_devices("fusedcnn::conv2d_backward", x, weight, std::nullopt, &grad_out);  // before the guard
  FUSEDCNN_CHECK_DEVICE(x, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  return backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask, algo, kCudaKernels);
}

}  // namespace
}  // namespace conv

TORCH_LIBRARY_IMPL(fusedcnn, CUDA, m) {
  m.impl("conv2d", &conv::conv2d_cuda);
  m.impl("conv2d_backward", &conv::conv2d_backward_cuda);
}

}  // namespace fusedcnn
