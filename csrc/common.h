// Shared helpers for the fusedcnn extension: argument checks and output allocation.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>
#include <cstdlib>

namespace fusedcnn {

// Every entry point checks what it is handed, so a bad call raises a Python
// RuntimeError instead of reading or writing out of bounds.
#define FUSEDCNN_CHECK_DEVICE(t, dev) \
  TORCH_CHECK((t).device().type() == (dev), #t " must be a ", c10::DeviceTypeName(dev), " tensor, got ", (t).device())
// The floating dtypes the kernels dispatch over: float32, float64, float16, bfloat16 (not the float8 types,
// which at::isFloatingType also accepts and no kernel implements). A device may accept fewer (its own check).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
#define FUSEDCNN_CHECK_FLOATING(t)                                                                          \
  TORCH_CHECK(::fusedcnn::is_kernel_float((t).scalar_type()), #t " must be a floating-point tensor (float32, " \
              "float64, float16 or bfloat16), got ", (t).scalar_type())
#define FUSEDCNN_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have ", n, " dimensions, got ", (t).dim())
#define FUSEDCNN_CHECK_SAME_SHAPE(a, b) \
  TORCH_CHECK((a).sizes() == (b).sizes(), #a " and " #b " must have the same shape, got ", (a).sizes(), " and ", (b).sizes())

// Two tensors of one op on one device (not only one device type: cuda:0 and cuda:1 differ) and of one dtype;
// the message names the op, both tensors and both devices / dtypes. Called before any CUDAGuard is built.
inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name, " must be on the same device, got ",
              a_name, " on ", a.device(), " and ", b_name, " on ", b.device());
}
inline void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a_name, " ", a.scalar_type(), " and ", b_name, " ", b.scalar_type());
}

// The memory format an elementwise result keeps (python/fusedcnn/common.py dense_format): NHWC when x is
// NHWC-dense and not also NCHW-contiguous -- or, with one channel (both then), when its strides are NHWC's own
// (channel stride 1: torch's suggest_memory_format says channels_last for it, and its conv returns NHWC) --,
// else NCHW.
inline at::MemoryFormat dense_format(const at::Tensor& x) {
  if (x.dim() != 4 || !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::Contiguous;
  const bool nhwc_strided_channel = x.size(1) == 1 && x.stride(1) == 1 && x.size(2) * x.size(3) > 1;
  return !x.is_contiguous() || nhwc_strided_channel ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The dtype reductions and per-channel statistics accumulate in: float64 for float64, else float32.
inline at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// FUSEDCNN_POISON=1 (set by the tests) fills every fresh output with NaN, so
// an element a kernel forgets to write fails the comparison instead of
// passing by luck of an allocator that hands back the right old values.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("FUSEDCNN_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, opts.memory_format(fmt));
  if (poison_outputs() && at::isFloatingType(out.scalar_type())) out.fill_(NAN);
  return out;
}

inline at::Tensor new_output_like(const at::Tensor& t) {
  return new_output(t.sizes(), t.options(), t.suggest_memory_format());
}

}  // namespace fusedcnn
