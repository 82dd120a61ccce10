// Shared by batchnorm_cpu.cpp and batchnorm_cuda.cu: argument checks and the layout both kernels walk.
//
// x: (N, C, H, W) floating, NCHW or NHWC. Kernels read x (and grad_out) as one dense layout:
//   NCHW: element (n, c, s) at (n*C + c)*HW + s      (s = h*W + w)  -- per-channel runs of HW
//   NHWC: element (m, c)    at m*C + c               (m = n*HW + s) -- rows of C channels
// Any other strides are copied into NCHW first (what torch's own kernels do).
#pragma once
#include "common.h"

namespace fusedcnn {
namespace bn {

// NHWC only when x is channels_last-dense and not also NCHW-dense (matches the Python fake functions).
inline at::MemoryFormat layout_of(const at::Tensor& x) { return dense_format(x); }

// Per-channel statistics are float64 for float64 input, else float32.
inline at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_input(const at::Tensor& x, const char* name, c10::DeviceType dev) {
  TORCH_CHECK(x.device().type() == dev, name, " must be a ", c10::DeviceTypeName(dev), " tensor, got ", x.device());
  TORCH_CHECK(is_kernel_float(x.scalar_type()), name,
              " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, name, " must have 4 dimensions (N, C, H, W), got ", x.dim());
}

// A per-channel (C,) vector: same device as x; `dtype` checked when given.
inline void check_channel_vec(const at::Tensor& t, const at::Tensor& x, const char* name,
                              c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " should contain ", x.size(1),
              " elements (one per channel), got shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating-point, got ", t.scalar_type());
  if (dtype) TORCH_CHECK(t.scalar_type() == *dtype, name, " must be ", *dtype, ", got ", t.scalar_type());
}

// weight (default 1) and bias (default 0) as contiguous (C,) vectors of the statistics dtype.
inline at::Tensor affine_or(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name, double fill) {
  const auto st = stats_type(x.scalar_type());
  if (t.has_value() && t->defined()) {
    check_channel_vec(*t, x, name);
    return t->to(st).contiguous();
  }
  return at::full({x.size(1)}, fill, x.options().dtype(st));
}

// The training forward and backward in two passes each, composed from a device's four kernels:
//   forward:  stats (read x) -> invstd = rsqrt(var + eps) -> apply (read x, write y)
//   backward: reduce (read g, x) -> elemt (read g, x, write dx)
// The CUDA ops always (their tensors never fit in cache); the CPU ops when a channel does not fit in L2.
// Returns (y, mean, var, invstd) and (dx, sum_dy, sum_dy_xmu); count = N*H*W.
template <class Stats, class Apply>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward_two_pass(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
    bool relu, Stats stats, Apply apply) {
  auto [mean, var] = stats(x);
  at::Tensor invstd = (var + eps).rsqrt();
  at::Tensor y = apply(x, mean, invstd, weight, bias, relu);
  return {y, mean, var, invstd};
}

// The running statistics given (each (C,), any floating dtype, on x's device), checked before a kernel runs.
inline void check_running_stats(const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, const at::Tensor& x) {
  if (running_mean.has_value() && running_mean->defined()) check_channel_vec(*running_mean, x, "running_mean");
  if (running_var.has_value() && running_var->defined()) check_channel_vec(*running_var, x, "running_var");
}

// running <- running + momentum * (batch - running), in place (torch's BatchNorm update; lerp_ as the Python
// reference does), the variance unbiased: var * M / (M - 1), M = N*H*W. M = 0 leaves them unchanged (as torch).
// mean, var: the batch's (C,) statistics in the statistics dtype; a running tensor of another dtype gets a cast.
// Done here, in the training forward, instead of in Python: two (C,)-vector ops cost ~1 us from C++, ~10 us
// from Python, which a tiny layer's call pays every step.
inline void update_running_stats(const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, int64_t count, double momentum) {
  if (count == 0) return;
  if (running_mean.has_value() && running_mean->defined())
    running_mean->lerp_(mean.to(running_mean->scalar_type()), momentum);
  if (running_var.has_value() && running_var->defined()) {
    const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
    running_var->lerp_((var * unbias).to(running_var->scalar_type()), momentum);
  }
}

template <class Reduce, class Elemt>
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward_two_pass(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool relu, Reduce reduce,
    Elemt elemt) {
  auto [sum_dy, sum_dy_xmu] = reduce(grad_out, x, mean, invstd, weight, bias, relu);
  const double count = static_cast<double>(x.numel() / std::max<int64_t>(x.size(1), 1));
  at::Tensor dx = elemt(grad_out, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, relu);
  return {dx, sum_dy, sum_dy_xmu};
}

}  // namespace bn
}  // namespace fusedcnn
