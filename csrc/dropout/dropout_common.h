// What the CPU and CUDA dropout entry points share: argument checks and the layout rule.
#pragma once
#include "common.h"
#include <cmath>

namespace fusedcnn {

inline void check_dropout_args(const at::Tensor& x, double p, at::DeviceType dev) {
  FUSEDCNN_CHECK_DEVICE(x, dev);
  FUSEDCNN_CHECK_FLOATING(x);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout probability has to be between 0 and 1, but got ", p);
}

// The kernels walk memory linearly and map each element to its logical index:
// NHWC input (4-D, channels_last and not also contiguous) stays NHWC; anything
// else is made contiguous. The same rule as dense_format() in
// triton_kernels/_common.py, which the shared fake function uses.
inline bool dropout_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// 1/(1-p); 0 for p == 1 (every element dropped, no division by zero).
inline double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

}  // namespace fusedcnn
