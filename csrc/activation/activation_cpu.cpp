// ReLU on CPU tensors: out = x > 0 ? x : 0 (NaN propagates); grad = grad_out * (out > 0).
#include "common.h"
#include "cpu_vec.h"
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace fusedcnn {
namespace {

// The loops, compiled per ISA (FUSEDCNN_CPU_CLONES: AVX-512 / AVX2 / baseline, picked at load time): the baseline
// build vectorizes them with SSE only, ~0.7x torch's AVX-512 relu on a 256 KB tensor.
template <typename scalar_t>
FUSEDCNN_CPU_CLONES void relu_loop(const scalar_t* in, scalar_t* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = in[i];
    o[i] = (v <= scalar_t(0)) ? scalar_t(0) : v;  // NaN <= 0 is false: NaN kept
  }
}

// Both loads unconditional: `yp[i] > 0 ? gp[i] : 0` loads gp[i] only on one branch, which the compiler may not
// hoist, so it emitted a branch per element (mispredicted half the time on random signs: 7 ns an element);
// loaded first, the select vectorizes.
template <typename scalar_t>
FUSEDCNN_CPU_CLONES void relu_backward_loop(const scalar_t* gp, const scalar_t* yp, scalar_t* dp, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t gv = gp[i], yv = yp[i];
    dp[i] = yv > scalar_t(0) ? gv : scalar_t(0);
  }
}

at::Tensor relu_cpu(const at::Tensor& x) {
  FUSEDCNN_CHECK_DEVICE(x, at::kCPU);
  FUSEDCNN_CHECK_FLOATING(x);
  // Elementwise: any memory format works as long as input and output share strides.
  at::Tensor xc = x.contiguous(x.suggest_memory_format());
  at::Tensor out = new_output_like(xc);
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "relu_cpu", [&] {
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) { relu_loop(in + begin, o + begin, end - begin); });
  });
  return out;
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out) {
  // grad_out and out on one device first: a CPU/CUDA or cuda:0/cuda:1 mix would otherwise read one
  // tensor's memory through the other's device (or fail later with a less clear message).
  check_same_device("fusedcnn::relu_backward", grad_out, "grad_out", out, "out");
  FUSEDCNN_CHECK_DEVICE(out, at::kCPU);
  FUSEDCNN_CHECK_FLOATING(out);
  check_same_dtype("fusedcnn::relu_backward", grad_out, "grad_out", out, "out");
  FUSEDCNN_CHECK_SAME_SHAPE(grad_out, out);
  const auto fmt = out.suggest_memory_format();
  at::Tensor g = grad_out.contiguous(fmt), y = out.contiguous(fmt);
  at::Tensor grad_in = new_output_like(y);
  const int64_t n = y.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "relu_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      relu_backward_loop(gp + begin, yp + begin, dp + begin, end - begin);
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("relu", &relu_cpu);
  m.impl("relu_backward", &relu_backward_cpu);
}

}  // namespace fusedcnn
