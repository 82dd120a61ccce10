// Pooling window geometry shared by the CPU and CUDA kernels (and mirrored in
// triton_kernels/pooling.py). One description covers regular and adaptive windows.
//
// Along one spatial dimension (input size `in`, output size `out`), window i is
//   start(i) = (i*A)/B - pad,   end(i) = ((i+1)*A + B-1)/B - pad + extra   (end exclusive)
// with taps start + j*dil (j < taps) that are < end and inside [0, in):
//   regular (kernel k, stride s, pad p, dilation d):  A=s, B=1, extra=span-s, taps=k,
//            span=(k-1)*d+1, so end = start + span;
//   adaptive:  A=in, B=out, pad=0, dil=1, extra=0: [floor(i*in/out), ceil((i+1)*in/out)).
// The windows that contain input position h are i in [first(h), first(h)+ncand) that
// pass `contains`, first(h) = max(0, ((h + pad - extra)*B)/A) (C division truncates
// toward zero; for a negative numerator both that and the true floor clamp to 0).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDCNN_HD __host__ __device__ __forceinline__
#else
#define FUSEDCNN_HD inline
#endif

namespace fusedcnn {
namespace pooling {

struct Dim {
  int64_t in, out, A, B, pad, dil, extra, taps, ncand;

  FUSEDCNN_HD int64_t start(int64_t i) const { return (i * A) / B - pad; }
  FUSEDCNN_HD int64_t end(int64_t i) const { return ((i + 1) * A + B - 1) / B - pad + extra; }
  FUSEDCNN_HD int64_t first(int64_t h) const {
    const int64_t f = ((h + pad - extra) * B) / A;
    return f > 0 ? f : 0;
  }
  FUSEDCNN_HD bool contains(int64_t i, int64_t h) const {
    const int64_t s = start(i);
    return i < out && h >= s && h < end(i) && (h - s) % dil == 0;
  }
  // Taps of window i that fall inside the input (average pooling without padding).
  FUSEDCNN_HD int64_t valid_count(int64_t i) const {
    const int64_t s = start(i), e = end(i);
    return (e < in ? e : in) - (s > 0 ? s : 0);
  }
  // count_include_pad: the window clipped to the padded input (not the ceil_mode overhang).
  FUSEDCNN_HD int64_t padded_count(int64_t i) const {
    const int64_t s = start(i), e = s + taps, lim = in + pad;
    return (e < lim ? e : lim) - s;
  }
};

// PyTorch's pooling_output_shape (floor division; ceil_mode's last window must start
// inside the input or the left padding).
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = d * (k - 1) + 1;
  const int64_t num = in + 2 * p - span + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

inline Dim regular_dim(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = (k - 1) * d + 1;
  return Dim{in, pooled_size(in, k, s, p, d, ceil_mode), s, 1, p, d, span - s, k, (span + s - 1) / s};
}

inline Dim adaptive_dim(int64_t in, int64_t out) {
  // windows of in/out taps at a stride of in/out when out divides in (a global pool, VGG's 2x2 -> 1x1): the same
  // windows as regular pooling's, whose tiled kernels then run
  if (out > 0 && in % out == 0) return regular_dim(in, in / out, in / out, 0, 1, false);
  const int64_t taps = out > 0 ? (in + out - 1) / out + 1 : 1;
  const int64_t ncand = in > 0 ? (out + in - 1) / in + 1 : 1;
  return Dim{in, out, in, out > 0 ? out : 1, 0, 1, 0, taps < in ? taps : in, ncand < out ? ncand : (out > 0 ? out : 1)};
}

// The kinds of pooling one kernel template serves.
enum class Kind : int { Max = 0, Avg = 1 };

}  // namespace pooling
}  // namespace fusedcnn

// ------------------------------------------------------------------ op wrappers (CPU and CUDA share them)
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include "common.h"

namespace fusedcnn {
namespace pooling {

// What one pooling launch computes: window geometry per dimension, the reduction,
// and (average) the divisor rule.
struct Args {
  Dim h, w;
  Kind kind;
  bool count_include_pad;  // average, regular windows only
  int64_t divisor;         // divisor_override, 0 = none
};

// The divisor of output (oh, ow) for average pooling (PyTorch's rule).
FUSEDCNN_HD int64_t divisor_of(const Args& a, int64_t oh, int64_t ow) {
  if (a.divisor != 0) return a.divisor;
  if (a.count_include_pad) return a.h.padded_count(oh) * a.w.padded_count(ow);
  return a.h.valid_count(oh) * a.w.valid_count(ow);
}

inline void check_pair(at::IntArrayRef v, const char* what) {
  TORCH_CHECK(v.size() == 2, what, " must have two elements (h, w), got ", v.size());
}

// Regular windows, with PyTorch's argument checks and messages (pool2d_shape_check).
inline Args regular_args(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                         at::IntArrayRef d, bool ceil_mode, Kind kind, bool cip, int64_t divisor) {
  check_pair(k, "kernel_size"); check_pair(s, "stride"); check_pair(p, "padding"); check_pair(d, "dilation");
  TORCH_CHECK(x.dim() == 4, "pooling: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(s[0] != 0 && s[1] != 0, "stride should not be zero");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(p[i] >= 0, "pad must be non-negative, but got pad: ", p[i]);
    TORCH_CHECK(p[i] <= ((k[i] - 1) * d[i] + 1) / 2, "pad should be at most half of effective kernel size, but got pad=",
                p[i], ", kernel_size=", k[i], " and dilation=", d[i]);
  }
  TORCH_CHECK(k[0] > 0 && k[1] > 0, "kernel size should be greater than zero, but got kH: ", k[0], " kW: ", k[1]);
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "stride should be greater than zero, but got dH: ", s[0], " dW: ", s[1]);
  TORCH_CHECK(d[0] > 0 && d[1] > 0, "dilation should be greater than zero, but got dilationH: ", d[0],
              " dilationW: ", d[1]);
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:", x.sizes());
  TORCH_CHECK(k[1] / 2 >= p[1] && k[0] / 2 >= p[0], "pad should be smaller than or equal to half of kernel size, but got ",
              "padW = ", p[1], ", padH = ", p[0], ", kW = ", k[1], ", kH = ", k[0]);
  TORCH_CHECK(divisor >= 0, "divisor must be not zero");
  Args a{regular_dim(x.size(2), k[0], s[0], p[0], d[0], ceil_mode),
         regular_dim(x.size(3), k[1], s[1], p[1], d[1], ceil_mode), kind, cip, divisor};
  TORCH_CHECK(a.h.out >= 1 && a.w.out >= 1, "Given input size: (", x.size(1), "x", x.size(2), "x", x.size(3),
              "). Calculated output size: (", x.size(1), "x", a.h.out, "x", a.w.out, "). Output size is too small");
  return a;
}

inline Args adaptive_args(at::IntArrayRef input_size, at::IntArrayRef out, Kind kind) {
  check_pair(out, "output_size");
  TORCH_CHECK(input_size.size() == 4, "pooling: input must be (N, C, H, W), got ", input_size);
  TORCH_CHECK(out[0] >= 0 && out[1] >= 0, "adaptive pooling: elements of output_size must be greater than or equal to 0 but received {",
              out[0], ", ", out[1], "}");
  TORCH_CHECK(input_size[1] > 0 && input_size[2] > 0 && input_size[3] > 0,
              "adaptive pooling: Expected input to have non-zero size for non-batch dimensions, but input has sizes ",
              input_size);
  return Args{adaptive_dim(input_size[2], out[0]), adaptive_dim(input_size[3], out[1]), kind, false, 0};
}

// The tensors every launch takes are dense NCHW or NHWC (any strides work in the kernels;
// outputs follow the input's memory format, as PyTorch's pooling does).
inline at::Tensor new_pooled(const at::Tensor& like, int64_t n, int64_t c, int64_t h, int64_t w,
                             at::ScalarType dtype) {
  return new_output({n, c, h, w}, like.options().dtype(dtype), like.suggest_memory_format());
}

// Impl provides, for one device:
//   static constexpr c10::DeviceType device;
//   static void check_dtype(const at::Tensor&);
//   static void forward(const at::Tensor& x, const Args&, at::Tensor& out, at::Tensor* idx /*nullable*/);
//   static void backward(const at::Tensor& grad_out, const at::Tensor& x /*max recompute, else undefined*/,
//                        const at::Tensor& idx /*adaptive max, else undefined*/, const Args&, at::Tensor& grad_in);
template <class Impl>
struct Ops {
  // The messages name the tensor checked (x or grad_out), not the parameter of this helper.
  static void check_input(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.device().type() == Impl::device, name, " must be a ", c10::DeviceTypeName(Impl::device),
                " tensor, got ", x.device());
    TORCH_CHECK(is_kernel_float(x.scalar_type()), name, " must be a floating-point tensor (float32, float64, "
                "float16 or bfloat16), got ", x.scalar_type());
    Impl::check_dtype(x);
    TORCH_CHECK(x.dim() == 4, name, " must be (N, C, H, W), got ", x.sizes());
  }

  static std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& x, const Args& a, bool want_idx) {
    at::Tensor out = new_pooled(x, x.size(0), x.size(1), a.h.out, a.w.out, x.scalar_type());
    at::Tensor idx = want_idx ? new_pooled(x, x.size(0), x.size(1), a.h.out, a.w.out, at::kLong)
                              : at::empty({0}, x.options().dtype(at::kLong));
    if (out.numel() > 0) Impl::forward(x, a, out, want_idx ? &idx : nullptr);
    return {out, idx};
  }

  static at::Tensor run_backward(const at::Tensor& g, at::IntArrayRef input_size, const at::Tensor& x,
                                 const at::Tensor& idx, const Args& a) {
    check_input(g, "grad_out");
    TORCH_CHECK(g.size(0) == input_size[0] && g.size(1) == input_size[1] && g.size(2) == a.h.out &&
                    g.size(3) == a.w.out,
                "grad_out has shape ", g.sizes(), " but the pooled input ", input_size, " gives (", input_size[0], ", ",
                input_size[1], ", ", a.h.out, ", ", a.w.out, ")");
    at::Tensor grad_in = new_output(input_size, g.options(), g.suggest_memory_format());
    if (grad_in.numel() > 0) Impl::backward(g, x, idx, a, grad_in);
    return grad_in;
  }

  // x: (N, C, H, W) -> out (N, C, OH, OW) and, if return_indices, flat h*W+w int64 indices (else an empty tensor).
  static std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s,
                                                       at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode,
                                                       bool return_indices) {
    check_input(x, "x");
    return run_forward(x, regular_args(x, k, s, p, d, ceil_mode, Kind::Max, false, 0), return_indices);
  }
  static at::Tensor max_pool2d_backward(const at::Tensor& g, const at::Tensor& x, at::IntArrayRef k,
                                        at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
    // One device (cuda:0 vs cuda:1 too) before anything reads x or grad_out or builds a device guard.
    check_same_device("fusedcnn::max_pool2d_backward", g, "grad_out", x, "x");
    check_input(x, "x");
    check_same_dtype("fusedcnn::max_pool2d_backward", g, "grad_out", x, "x");
    return run_backward(g, x.sizes(), x, at::Tensor(), regular_args(x, k, s, p, d, ceil_mode, Kind::Max, false, 0));
  }
  static at::Tensor avg_pool2d(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                               bool ceil_mode, bool cip, c10::optional<int64_t> div) {
    check_input(x, "x");
    TORCH_CHECK(!div.has_value() || *div != 0, "divisor must be not zero");
    const int64_t dil[2] = {1, 1};
    return std::get<0>(run_forward(x, regular_args(x, k, s, p, dil, ceil_mode, Kind::Avg, cip, div.value_or(0)), false));
  }
  static at::Tensor avg_pool2d_backward(const at::Tensor& g, at::IntArrayRef input_size, at::IntArrayRef k,
                                        at::IntArrayRef s, at::IntArrayRef p, bool ceil_mode, bool cip,
                                        c10::optional<int64_t> div) {
    TORCH_CHECK(input_size.size() == 4, "input_size must be (N, C, H, W), got ", input_size);
    TORCH_CHECK(!div.has_value() || *div != 0, "divisor must be not zero");
    const int64_t dil[2] = {1, 1};
    // The geometry needs only the input's shape: a meta tensor carries it.
    const at::Tensor shape = at::empty(input_size, g.options().device(at::kMeta));
    return run_backward(g, input_size, at::Tensor(), at::Tensor(),
                        regular_args(shape, k, s, p, dil, ceil_mode, Kind::Avg, cip, div.value_or(0)));
  }
  static at::Tensor adaptive_avg_pool2d(const at::Tensor& x, at::IntArrayRef out) {
    check_input(x, "x");
    return std::get<0>(run_forward(x, adaptive_args(x.sizes(), out, Kind::Avg), false));
  }
  static at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& g, at::IntArrayRef input_size) {
    TORCH_CHECK(input_size.size() == 4, "input_size must be (N, C, H, W), got ", input_size);
    TORCH_CHECK(g.dim() == 4, "grad_out must be (N, C, OH, OW), got ", g.sizes());
    const int64_t out[2] = {g.size(2), g.size(3)};
    return run_backward(g, input_size, at::Tensor(), at::Tensor(), adaptive_args(input_size, out, Kind::Avg));
  }
  // Adaptive max always returns its indices: its backward reads them (see the kernels' notes).
  static std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d(const at::Tensor& x, at::IntArrayRef out) {
    check_input(x, "x");
    return run_forward(x, adaptive_args(x.sizes(), out, Kind::Max), true);
  }
  static at::Tensor adaptive_max_pool2d_backward(const at::Tensor& g, const at::Tensor& idx,
                                                 at::IntArrayRef input_size) {
    TORCH_CHECK(input_size.size() == 4, "input_size must be (N, C, H, W), got ", input_size);
    check_same_device("fusedcnn::adaptive_max_pool2d_backward", g, "grad_out", idx, "indices");
    check_input(g, "grad_out");
    TORCH_CHECK(g.dim() == 4, "grad_out must be (N, C, OH, OW), got ", g.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.sizes() == g.sizes(),
                "indices must be int64 with grad_out's shape ", g.sizes(), ", got ", idx.scalar_type(), " ", idx.sizes());
    const int64_t out[2] = {g.size(2), g.size(3)};
    return run_backward(g, input_size, at::Tensor(), idx, adaptive_args(input_size, out, Kind::Max));
  }
};

#define FUSEDCNN_REGISTER_POOLING(m, Impl)                                           \
  m.impl("max_pool2d", &::fusedcnn::pooling::Ops<Impl>::max_pool2d);                 \
  m.impl("max_pool2d_backward", &::fusedcnn::pooling::Ops<Impl>::max_pool2d_backward); \
  m.impl("avg_pool2d", &::fusedcnn::pooling::Ops<Impl>::avg_pool2d);                 \
  m.impl("avg_pool2d_backward", &::fusedcnn::pooling::Ops<Impl>::avg_pool2d_backward); \
  m.impl("adaptive_avg_pool2d", &::fusedcnn::pooling::Ops<Impl>::adaptive_avg_pool2d); \
  m.impl("adaptive_avg_pool2d_backward", &::fusedcnn::pooling::Ops<Impl>::adaptive_avg_pool2d_backward); \
  m.impl("adaptive_max_pool2d", &::fusedcnn::pooling::Ops<Impl>::adaptive_max_pool2d); \
  m.impl("adaptive_max_pool2d_backward", &::fusedcnn::pooling::Ops<Impl>::adaptive_max_pool2d_backward)

}  // namespace pooling
}  // namespace fusedcnn
