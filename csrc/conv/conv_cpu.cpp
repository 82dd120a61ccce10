// Conv2d on CPU tensors, float32|float64|float16|bfloat16, two explicit im2col + GEMM layouts (use_nhwc picks):
// - NCHW columns: im2col / col2im kernels (at::parallel_for) + the shared GEMM driver in conv.h
//     x: (n, C, H, W) contiguous (the driver hands over an NCHW chunk)
//     col: (C*kH*kW, n*L), L = H_out*W_out; row r = (c*kH + ki)*kW + kj, column = (image, h_out, w_out)
// - channels-last columns (one group): forward_nhwc / backward_nhwc below, col (n*L, kH*kW*C).
#include "conv/conv.h"
#include "cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace fusedcnn {
namespace conv {
namespace {

// The w_out range [lo, hi) whose input column w_out*sw + off lies inside [0, W); the rest read padding.
inline void valid_range(int64_t off, int64_t stride, int64_t W, int64_t Wo, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  hi = (W - 1 - off) < 0 ? 0 : std::min<int64_t>(Wo, (W - 1 - off) / stride + 1);
  lo = std::min(lo, hi);
}

// An NCHW x takes the channels-last GEMM too when its runs are short and its channels many: W_out <= 16 and
// C >= 16 (measured, benchmarks/NOTES.md: W_out-long NCHW runs of 2..16 values cost more per value than
// C-long ones; at 32x32 the NCHW path, whose one-image GEMM writes straight into out, is faster).
constexpr int64_t kNhwcMinChannels = 16;
constexpr int64_t kNhwcMaxWidth = 16;

bool cpu_dtype_ok(at::ScalarType t) { return is_kernel_float(t); }

// One row r = (c, ki, kj) per task, its n images inside: n runs of L outputs, contiguous in col.
void im2col_cpu(const at::Tensor& x, const at::Tensor& col, const Geom& g) {
  const int64_t n = x.size(0), L = g.Ho * g.Wo, rows = g.C * g.kh * g.kw;
  TORCH_CHECK(x.is_contiguous() && col.is_contiguous() && col.numel() == rows * n * L, "im2col: bad buffers");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedcnn_im2col_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* cp = col.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(n * L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t kj = r % g.kw, ki = (r / g.kw) % g.kh, c = r / (g.kh * g.kw);
        const int64_t w_off = kj * g.dw - g.pw;
        int64_t lo, hi;
        valid_range(w_off, g.sw, g.W, g.Wo, lo, hi);
        for (int64_t img = 0; img < n; ++img) {
          const scalar_t* plane = xp + (img * g.C + c) * g.H * g.W;
          scalar_t* dst = cp + (r * n + img) * L;
          for (int64_t ho = 0; ho < g.Ho; ++ho) {
            scalar_t* row = dst + ho * g.Wo;
            const int64_t h = ho * g.sh - g.ph + ki * g.dh;
            if (h < 0 || h >= g.H) {
              std::fill(row, row + g.Wo, scalar_t(0));
              continue;
            }
            const scalar_t* src = plane + h * g.W;
            std::fill(row, row + lo, scalar_t(0));
            if (g.sw == 1) std::copy(src + lo + w_off, src + hi + w_off, row + lo);  // a contiguous copy
            else for (int64_t wo = lo; wo < hi; ++wo) row[wo] = src[wo * g.sw + w_off];
            std::fill(row + hi, row + g.Wo, scalar_t(0));
          }
        }
      }
    });
  });
}

// One (image, channel) plane per task, so no two tasks write the same element; the kH*kW overlapping
// contributions are summed in a float32 (float64) plane and rounded once.
void col2im_cpu(const at::Tensor& col, const at::Tensor& x, const Geom& g) {
  const int64_t n = x.size(0), L = g.Ho * g.Wo, HW = g.H * g.W;
  TORCH_CHECK(x.is_contiguous() && col.is_contiguous() && col.numel() == g.C * g.kh * g.kw * n * L,
              "col2im: bad buffers");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedcnn_col2im_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = col.const_data_ptr<scalar_t>();
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(HW);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / g.C, c = p % g.C;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t ki = 0; ki < g.kh; ++ki) {
          for (int64_t kj = 0; kj < g.kw; ++kj) {
            const int64_t r = (c * g.kh + ki) * g.kw + kj;
            const scalar_t* src = cp + (r * n + img) * L;
            const int64_t w_off = kj * g.dw - g.pw;
            int64_t lo, hi;
            valid_range(w_off, g.sw, g.W, g.Wo, lo, hi);
            for (int64_t ho = 0; ho < g.Ho; ++ho) {
              const int64_t h = ho * g.sh - g.ph + ki * g.dh;
              if (h < 0 || h >= g.H) continue;
              acc_t* dst = acc.data() + h * g.W;
              const scalar_t* s = src + ho * g.Wo;
              if (g.sw == 1) {  // contiguous: vectorizes
                acc_t* d = dst + w_off;
                for (int64_t wo = lo; wo < hi; ++wo) d[wo] += static_cast<acc_t>(s[wo]);
              } else {
                for (int64_t wo = lo; wo < hi; ++wo) dst[wo * g.sw + w_off] += static_cast<acc_t>(s[wo]);
              }
            }
          }
        }
        scalar_t* out = xp + p * HW;
        for (int64_t i = 0; i < HW; ++i) out[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
}

const Kernels kCpuKernels{at::kCPU, "CPU", &cpu_dtype_ok, "float32, float64, float16 and bfloat16",
                          &im2col_cpu, &col2im_cpu, kCpuColBytes};

// ---------------------------------------------------------------- channels-last GEMM (groups == 1)
// x as (N, H, W, C) -- NHWC-dense (an NCHW x is copied once, 1/(kH*kW) of the columns) -- and
//   col: (n*L, kH*kW*C), row = (image, h_out, w_out), column = (ki, kj, c): C contiguous values per tap
//   Wl:  (K, kH*kW*C), the weight permuted to (K, kH, kW, C) (free for a channels_last weight)
//   forward  Y (n*L, K) = col · Wlᵀ (+ b)    rows of an NHWC output: the GEMM writes a channels_last out
//   dgrad    col = dY · Wl, then col2im_nhwc  dY (n*L, K): a channels_last grad_out as it is
//   wgrad    dWl += dYᵀ · col                 accumulated in fp32/fp64, permuted back to weight's layout
// Every row of col is whole (kH*kW runs of C), so im2col/col2im loop without divisions, and a stride-1
// row of kW taps inside the input is one copy of kW*C values.

// The (n*L, K) rows of an NHWC-dense (n, K, H_out, W_out) tensor, as a view (undefined if t is not NHWC-dense).
at::Tensor nhwc_rows(const at::Tensor& t) {
  const at::Tensor p = t.permute({0, 2, 3, 1});
  return p.is_contiguous() ? p.view({-1, t.size(1)}) : at::Tensor();
}

// The weight as Wl (K, kH*kW*C).
at::Tensor weight_nhwc(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).contiguous().view({weight.size(0), -1});
}

// dst[0, len) = src[0, len) / = 0: memcpy / memset, faster than an inline loop on these runs of C or kW*C
// values (measured: conv1_2's NHWC im2col 224 -> 183 us).
template <typename scalar_t>
inline void copy_run(scalar_t* dst, const scalar_t* src, int64_t len) {
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), len * sizeof(scalar_t));
}
template <typename scalar_t>
inline void zero_run(scalar_t* dst, int64_t len) {  // all-zero bits are +0 in every float type
  std::memset(static_cast<void*>(dst), 0, len * sizeof(scalar_t));
}

// The W_out rows of col for output row ho of one image: xi = &x[img] (NHWC), dst = &col[(img, ho, 0), 0].
template <typename scalar_t>
void im2col_nhwc_row(const scalar_t* xi, scalar_t* dst, int64_t ho, const Geom& g) {
  const int64_t C = g.C, KC = g.kw * C;
  for (int64_t wo = 0; wo < g.Wo; ++wo) {
    const int64_t w0 = wo * g.sw - g.pw;
    const bool row_inside = g.dw == 1 && w0 >= 0 && w0 + g.kw <= g.W;  // kW taps = kW*C contiguous values
    for (int64_t ki = 0; ki < g.kh; ++ki, dst += KC) {
      const int64_t h = ho * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) {
        zero_run(dst, KC);
        continue;
      }
      const scalar_t* src = xi + h * g.W * C;
      if (row_inside) {
        copy_run(dst, src + w0 * C, KC);
        continue;
      }
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t w = w0 + kj * g.dw;
        if (w < 0 || w >= g.W) zero_run(dst + kj * C, C);
        else copy_run(dst + kj * C, src + w * C, C);
      }
    }
  }
}

// x: &x[first image], NHWC; col: (n*L, kH*kW*C). One task per (image, h_out) row of outputs.
template <typename scalar_t>
void im2col_nhwc_kernel(const scalar_t* x, scalar_t* col, int64_t n, const Geom& g) {
  at::parallel_for(0, n * g.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q)
      im2col_nhwc_row(x + (q / g.Ho) * g.H * g.W * g.C, col + q * g.Wo * g.kh * g.kw * g.C, q % g.Ho, g);
  });
}

// Adds the W_out rows of col for output row ho (src = &col[(img, ho, 0), 0]) into acc (one image, H x W x C).
// Cloned per ISA (cpu_vec.h).
template <typename scalar_t, typename acc_t>
FUSEDCNN_CPU_CLONES void col2im_nhwc_row(const scalar_t* src, acc_t* acc, int64_t ho, const Geom& g) {
  const int64_t C = g.C;
  for (int64_t wo = 0; wo < g.Wo; ++wo)
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      const int64_t h = ho * g.sh - g.ph + ki * g.dh;
      for (int64_t kj = 0; kj < g.kw; ++kj, src += C) {
        const int64_t w = wo * g.sw - g.pw + kj * g.dw;
        if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
        acc_t* __restrict__ a = acc + (h * g.W + w) * C;
        const scalar_t* __restrict__ s = src;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += static_cast<acc_t>(s[c]);
      }
    }
}

// col (n*L, kH*kW*C) -> x (n images, NHWC, overwritten): each image sums the kH*kW overlapping taps of its
// outputs in an acc_t copy (float32 for float16/bfloat16: rounded once; float32/float64: x itself).
// One task per image, so no two tasks write the same element.
template <typename scalar_t>
void col2im_nhwc_kernel(const scalar_t* col, scalar_t* x, int64_t n, const Geom& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HWC = g.H * g.W * g.C, row = g.Wo * g.kh * g.kw * g.C;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::is_same_v<acc_t, scalar_t> ? 0 : HWC);
    for (int64_t img = begin; img < end; ++img) {
      acc_t* acc = std::is_same_v<acc_t, scalar_t> ? reinterpret_cast<acc_t*>(x + img * HWC) : buf.data();
      std::fill(acc, acc + HWC, acc_t(0));
      for (int64_t ho = 0; ho < g.Ho; ++ho) col2im_nhwc_row(col + (img * g.Ho + ho) * row, acc, ho, g);
      if constexpr (!std::is_same_v<acc_t, scalar_t>) {
        scalar_t* out = x + img * HWC;
        for (int64_t i = 0; i < HWC; ++i) out[i] = narrow<scalar_t>(acc[i]);
      }
    }
  });
}

// x: (n, C, H, W), NHWC-dense; col: (n*L, kH*kW*C) contiguous.
void im2col_nhwc(const at::Tensor& x, const at::Tensor& col, const Geom& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedcnn_im2col_nhwc_cpu", [&] {
    im2col_nhwc_kernel(x.const_data_ptr<scalar_t>(), col.mutable_data_ptr<scalar_t>(), x.size(0), g);
  });
}

void col2im_nhwc(const at::Tensor& col, const at::Tensor& x, const Geom& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedcnn_col2im_nhwc_cpu", [&] {
    col2im_nhwc_kernel(col.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), x.size(0), g);
  });
}

// Whether the channels-last GEMM runs (else the NCHW im2col of conv.h): one group, and an NHWC x (no layout
// copies) or an NCHW x with short rows and many channels (kNhwcMinChannels, kNhwcMaxWidth).
bool use_nhwc(const at::Tensor& x, const Geom& g) {
  return g.groups == 1 && (output_format(x) == at::MemoryFormat::ChannelsLast ||
                           (g.C >= kNhwcMinChannels && g.Wo <= kNhwcMaxWidth));
}

at::Tensor forward_nhwc(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const Geom& g) {
  const bool has_bias = check_bias(x, bias, g);
  const int64_t N = x.size(0), L = g.Ho * g.Wo, KKC = g.kh * g.kw * g.C;
  at::Tensor out = new_output({N, g.K, g.Ho, g.Wo}, x.options(), output_format(x));
  if (out.numel() == 0) return out;
  const at::Tensor xl = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wl = weight_nhwc(weight);
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t nb = images_per_chunk(g, N, x.element_size(), kCpuKernels);
  at::Tensor col_buf = at::empty({nb * L * KKC}, x.options());
  const bool out_nhwc = nhwc_rows(out).defined();
  at::Tensor y_buf = out_nhwc ? at::Tensor() : at::empty({nb * L * g.K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n = std::min(nb, N - n0);
    at::Tensor col = col_buf.narrow(0, 0, n * L * KKC).view({n * L, KKC});
    at::Tensor y = out_nhwc ? nhwc_rows(out.narrow(0, n0, n)) : y_buf.narrow(0, 0, n * L * g.K).view({n * L, g.K});
    im2col_nhwc(xl.narrow(0, n0, n), col, g);
    if (has_bias) at::addmm_out(y, b, col, wl.t());
    else at::mm_out(y, col, wl.t());
    if (!out_nhwc) out.narrow(0, n0, n).copy_(y.view({n, g.Ho, g.Wo, g.K}).permute({0, 3, 1, 2}));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_nhwc(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& weight, const Geom& g,
                                                             std::array<bool, 3> output_mask) {
  const at::ScalarType acc_type = check_grad_out(grad_out, x, g);
  const int64_t N = x.size(0), L = g.Ho * g.Wo, KKC = g.kh * g.kw * g.C;
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one each: outputs must not alias

  at::Tensor grad_x = need_x ? new_output(x.sizes(), x.options(), output_format(x)) : none();
  at::Tensor grad_w_acc = need_w ? at::zeros({g.K, KKC}, x.options().dtype(acc_type)) : at::Tensor();
  if ((need_x || need_w) && grad_out.numel() > 0) {
    // col2im writes NHWC: straight into grad_x when it is NHWC, else into a working copy.
    at::Tensor gx_work = !need_x ? at::Tensor()
                         : grad_x.is_contiguous(at::MemoryFormat::ChannelsLast)
                             ? grad_x
                             : at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const at::Tensor xl = need_w ? x.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    const at::Tensor wl = need_x ? weight_nhwc(weight) : at::Tensor();
    const at::Tensor gl = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t nb = images_per_chunk(g, N, x.element_size(), kCpuKernels);
    at::Tensor col_buf = at::empty({nb * L * KKC}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t n = std::min(nb, N - n0);
      at::Tensor col = col_buf.narrow(0, 0, n * L * KKC).view({n * L, KKC});
      const at::Tensor dy = gl.narrow(0, n0, n).permute({0, 2, 3, 1}).reshape({n * L, g.K});
      if (need_w) {  // dWl += dYᵀ · col
        im2col_nhwc(xl.narrow(0, n0, n), col, g);
        if (acc_type == x.scalar_type()) grad_w_acc.addmm_(dy.t(), col);
        else grad_w_acc.add_(at::mm(dy.t(), col));  // low precision: each chunk's GEMM rounded once, summed in fp32
      }
      if (need_x) {  // col = dY · Wl, then col2im (reuses the column buffer after wgrad)
        at::mm_out(col, dy, wl);
        col2im_nhwc(col, gx_work.narrow(0, n0, n), g);
      }
    }
    if (need_x && !gx_work.is_same(grad_x)) grad_x.copy_(gx_work);
  } else if (need_x) {
    grad_x.zero_();
  }
  at::Tensor grad_w = need_w ? new_output(weight.sizes(), weight.options())
                                   .copy_(grad_w_acc.view({g.K, g.kh, g.kw, g.C}).permute({0, 3, 1, 2}))
                             : none();
  at::Tensor grad_b = need_b ? grad_bias(grad_out, x, g.K, acc_type) : none();
  return {grad_x, grad_w, grad_b};
}

at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      c10::string_view algo) {
  check_devices("fusedcnn::conv2d", x, weight, bias, nullptr);
  const Geom g = check_args("fusedcnn::conv2d", x, weight, stride, padding, dilation, groups, algo, kCpuKernels);
  if (!use_nhwc(x, g)) return forward(x, weight, bias, stride, padding, dilation, groups, algo, kCpuKernels);
  const at::NoGradGuard no_grad;  // internals only
  return forward_nhwc(x, weight, bias, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    c10::string_view algo) {
  check_devices("fusedcnn::conv2d_backward", x, weight, std::nullopt, &grad_out);
  const Geom g =
      check_args("fusedcnn::conv2d_backward", x, weight, stride, padding, dilation, groups, algo, kCpuKernels);
  if (!use_nhwc(x, g))
    return backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask, algo, kCpuKernels);
  const at::NoGradGuard no_grad;  // internals only (autograd of the conv is the Python formula)
  return backward_nhwc(grad_out, x, weight, g, output_mask);
}

}  // namespace
}  // namespace conv

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("conv2d", &conv::conv2d_cpu);
  m.impl("conv2d_backward", &conv::conv2d_backward_cpu);
}

}  // namespace fusedcnn
