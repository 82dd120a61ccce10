// Dropout on CUDA tensors. x: any shape, float32|float16|bfloat16|float64, contiguous or 4-D channels_last.
// out = x * (u(seed, i) > float32(p) ? 1/(1-p) : 0) with i the element's row-major index in the
// logical shape (philox.h: the same stream as the CPU kernel, the Triton kernel and the reference);
// computed in float32 (float64 for float64). The mask is never stored: the backward is this same op
// applied to grad_out with the forward's seed. int64 indices: tensors may pass 2**31 elements.
//
// Throughput: one Philox4x32-10 call (20 wide multiplies) per element, only word 0 used (philox.h says
// why), so on an H100 this kernel is bounded by integer throughput rather than memory bandwidth.
#include "dropout/dropout_common.h"
#include "dropout/philox.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fusedcnn {
namespace {

// Contiguous: memory index == logical index. Grid-stride loop.
template <typename scalar_t, typename acc_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n,
                               uint64_t seed, float p, acc_t scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * philox::keep_factor<acc_t>(seed, i, p, scale));
  }
}

// channels_last: logical (N, C, S) stored as (N, S, C), rows t = n*S + s of C channels.
// threadIdx.x walks channels (consecutive in memory: coalesced), threadIdx.y rows; one
// 64-bit division per row, none per element.
template <typename scalar_t, typename acc_t>
__global__ void dropout_cl_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t C, int64_t S, uint64_t seed, float p, acc_t scale) {
  for (int64_t t = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; t < rows; t += (int64_t)gridDim.x * blockDim.y) {
    const int64_t b = t / S, s = t - b * S;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const int64_t mem = t * C + c;
      out[mem] = static_cast<scalar_t>(static_cast<acc_t>(x[mem]) *
                                       philox::keep_factor<acc_t>(seed, (b * C + c) * S + s, p, scale));
    }
  }
}

inline int64_t max_blocks() {
  return (int64_t)at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
}

at::Tensor dropout_cuda(const at::Tensor& x, double p, int64_t seed) {
  check_dropout_args(x, p, at::kCUDA);
  c10::cuda::CUDAGuard guard(x.device());
  const bool channels_last = dropout_channels_last(x);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = new_output(xc.sizes(), xc.options(), fmt);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const uint64_t key = static_cast<uint64_t>(seed);
  const float p32 = static_cast<float>(p);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(dropout_scale(p));
    if (!channels_last) {
      const int threads = 256;
      const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks()));
      dropout_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, key, p32, scale);
    } else {
      const int64_t C = xc.size(1), S = xc.size(2) * xc.size(3), rows = n / C;
      int bx = 1;
      while (bx < C && bx < 32) bx *= 2;  // lanes over channels: no idle warp lanes for small C
      const dim3 block(bx, 256 / bx);
      const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>((rows + block.y - 1) / block.y, max_blocks()));
      dropout_cl_kernel<scalar_t, acc_t><<<blocks, block, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, C, S, key, p32, scale);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
}

}  // namespace fusedcnn
