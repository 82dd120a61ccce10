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
#define FUSEDCNN_CHECK_FLOATING(t) \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), #t " must be a floating-point tensor, got ", (t).scalar_type())
#define FUSEDCNN_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have ", n, " dimensions, got ", (t).dim())
#define FUSEDCNN_CHECK_SAME_SHAPE(a, b) \
  TORCH_CHECK((a).sizes() == (b).sizes(), #a " and " #b " must have the same shape, got ", (a).sizes(), " and ", (b).sizes())

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
