// Conv2d on CPU tensors: im2col / col2im kernels (at::parallel_for) + the shared GEMM driver in conv.h.
//   x: (n, C, H, W) float32|float64|float16|bfloat16, contiguous (the driver hands over an NCHW chunk)
//   col: (C*kH*kW, n*L), L = H_out*W_out; row r = (c*kH + ki)*kW + kj, column = (image, h_out, w_out)
#include "conv/conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

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

bool cpu_dtype_ok(at::ScalarType t) { return is_kernel_float(t); }

// One (row r, image) pair per task: a row of L outputs, contiguous in col.
void im2col_cpu(const at::Tensor& x, const at::Tensor& col, const Geom& g) {
  const int64_t n = x.size(0), L = g.Ho * g.Wo, rows = g.C * g.kh * g.kw;
  TORCH_CHECK(x.is_contiguous() && col.is_contiguous() && col.numel() == rows * n * L, "im2col: bad buffers");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fusedcnn_im2col_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* cp = col.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows * n, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t r = p / n, img = p % n;
        const int64_t kj = r % g.kw, ki = (r / g.kw) % g.kh, c = r / (g.kh * g.kw);
        const scalar_t* plane = xp + (img * g.C + c) * g.H * g.W;
        scalar_t* dst = cp + (r * n + img) * L;
        const int64_t w_off = kj * g.dw - g.pw;
        int64_t lo, hi;
        valid_range(w_off, g.sw, g.W, g.Wo, lo, hi);
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

at::Tensor conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      c10::string_view algo) {
  return forward(x, weight, bias, stride, padding, dilation, groups, algo, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    c10::string_view algo) {
  return backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask, algo, kCpuKernels);
}

}  // namespace
}  // namespace conv

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("conv2d", &conv::conv2d_cpu);
  m.impl("conv2d_backward", &conv::conv2d_backward_cpu);
}

}  // namespace fusedcnn
