// ReLU on CUDA tensors: out = x > 0 ? x : 0 (NaN propagates); grad = grad_out * (out > 0).
// Grid-stride loop, int64 indices (tensors may pass 2**31 elements).
#include "common.h"
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fusedcnn {
namespace {

template <typename scalar_t>
__global__ void relu_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = static_cast<float>(x[i]);
    out[i] = static_cast<scalar_t>(v <= 0.f ? 0.f : v);
  }
}

template <typename scalar_t>
__global__ void relu_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                     scalar_t* __restrict__ dx, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    dx[i] = static_cast<float>(y[i]) > 0.f ? g[i] : static_cast<scalar_t>(0.f);
  }
}

inline int blocks_for(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 32));
}

at::Tensor relu_cuda(const at::Tensor& x) {
  FUSEDCNN_CHECK_DEVICE(x, at::kCUDA);
  FUSEDCNN_CHECK_FLOATING(x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(x.suggest_memory_format());
  at::Tensor out = new_output_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "relu_cuda", [&] {
    relu_kernel<scalar_t><<<blocks_for(n, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out) {
  // grad_out and out on one device first: a CPU/CUDA or cuda:0/cuda:1 mix would otherwise read one
  // tensor's memory through the other's device (or fail later with a less clear message).
  check_same_device("fusedcnn::relu_backward", grad_out, "grad_out", out, "out");
  FUSEDCNN_CHECK_DEVICE(out, at::kCUDA);
  FUSEDCNN_CHECK_FLOATING(out);
  check_same_dtype("fusedcnn::relu_backward", grad_out, "grad_out", out, "out");
  FUSEDCNN_CHECK_SAME_SHAPE(grad_out, out);
  c10::cuda::CUDAGuard guard(out.device());
  const auto fmt = out.suggest_memory_format();
  at::Tensor g = grad_out.contiguous(fmt), y = out.contiguous(fmt);
  at::Tensor grad_in = new_output_like(y);
  const int64_t n = y.numel();
  if (n == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "relu_backward_cuda", [&] {
    relu_backward_kernel<scalar_t><<<blocks_for(n, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), grad_in.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CUDA, m) {
  m.impl("relu", &relu_cuda);
  m.impl("relu_backward", &relu_backward_cuda);
}

}  // namespace fusedcnn
