// Conv2d by explicit im2col + GEMM: the device-independent driver shared by conv_cpu.cpp and conv_cuda.cu
// (on CPU for groups > 1 and for NCHW inputs with few channels or wide rows; conv_cpu.cpp has its own
// channels-last GEMM for the rest).
//
//   x:        (N, C, H, W)                NCHW or NHWC (an NHWC input is copied to an NCHW working
//                                         copy for im2col; the output is NHWC again, see below)
//   weight:   (K, C / groups, kH, kW)     K = C_out
//   bias:     (K,) or None
//   out:      (N, K, H_out, W_out)        channels_last when x is NHWC (and not also NCHW), else
//                                         contiguous -- as cuDNN; the Python fake functions agree
//   dtypes:   float32|float64|float16|bfloat16 (CPU and CUDA)
//
// The batch is processed in chunks of `nb` images. Per chunk, the column buffer
//   col: (C*kH*kW, nb*L), L = H_out*W_out, row r = (c, ki, kj), column = (image, h_out, w_out)
// viewed per group as (G, C/G*kH*kW, nb*L), and, for all G groups in one batched GEMM (gemm_out below:
// at::baddbmm / at::bmm over the (G, ...) views; at::addmm / at::mm when G = 1)
//   forward  Y_g  = W_g · col_g (+ b_g)          (K/G, nb*L)
//   dgrad    col_g = W_gᵀ · dY_g, then col2im     (sums overlapping patches back into dX)
//   wgrad    dW_g += dY_g · col_gᵀ               (accumulated across chunks in fp32/fp64)
//   bias     db = sum of dY over N, H_out, W_out (fp32/fp64 accumulation)
// The GEMMs go through ATen: cuBLAS on CUDA (float16/bfloat16 inputs use fp32 compute -- cuBLAS
// CUBLAS_COMPUTE_32F; fp16 may use reduced-precision reductions if
// torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is on; float32 uses TF32 only
// if torch allows it), the CPU BLAS / oneDNN on CPU (float16 and bfloat16 accumulate in fp32).
// Each GEMM's result is rounded to the input dtype once.
#pragma once
#include "common.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>

namespace fusedcnn {
namespace conv {

// Bound on the im2col column buffer: the batch is split into chunks of nb images so that
// C*kH*kW * nb*L elements stay within the device's bound, Kernels::col_bytes (a single image whose
// columns exceed it runs alone: nb >= 1). The per-chunk output / grad_out buffer (K * nb*L) is usually
// far smaller. FUSEDCNN_CONV_COL_BYTES overrides the bound (the tests shrink it to exercise the chunk loop).
constexpr int64_t kCudaColBytes = int64_t(256) << 20;  // few, large GEMMs
constexpr int64_t kCpuColBytes = int64_t(1) << 20;     // the columns are written and read back in cache:
                                                       // 9x the activation never goes to memory (3x faster);
                                                       // 1 MiB = half the 2 MiB L2 (4 MiB spilled to L3:
                                                       // conv1_2 of the cpu preset 1.6x slower, NOTES.md)

// Geometry of one convolution; every index is int64 (tensors may pass 2**31 elements).
struct Geom {
  int64_t C, H, W;          // input channels, height, width
  int64_t K;                // output channels
  int64_t kh, kw;           // kernel
  int64_t sh, sw;           // stride (> 0)
  int64_t ph, pw;           // zero padding, symmetric (>= 0; "same" with an even kernel is padded in Python)
  int64_t dh, dw;           // dilation (> 0)
  int64_t groups;
  int64_t Ho, Wo;           // output height, width
};

// The device-specific kernels. x: (n, C, H, W) contiguous; col: (C*kH*kW, n*L) contiguous.
struct Kernels {
  c10::DeviceType device;
  const char* device_name;                 // for messages: "CPU" / "CUDA"
  bool (*dtype_ok)(at::ScalarType);
  const char* dtypes;                      // for messages: the dtypes dtype_ok accepts
  void (*im2col)(const at::Tensor& x, const at::Tensor& col, const Geom& g);
  void (*col2im)(const at::Tensor& col, const at::Tensor& x, const Geom& g);  // overwrites x
  int64_t col_bytes;                       // column buffer bound (see kCpuColBytes)
};

inline int64_t col_buffer_bytes(const Kernels& k) {
  const char* v = std::getenv("FUSEDCNN_CONV_COL_BYTES");
  const long long bytes = v != nullptr ? std::atoll(v) : 0;
  return bytes > 0 ? static_cast<int64_t>(bytes) : k.col_bytes;
}

inline at::MemoryFormat output_format(const at::Tensor& x) { return dense_format(x); }

// Every tensor of the call on x's device (cuda:0 vs cuda:1 included), checked first: the CUDA entry points
// call this before they build a CUDAGuard from x's device, and the message names both devices.
inline void check_devices(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor* grad_out) {
  check_same_device(op, weight, "weight", x, "x");
  if (bias.has_value() && bias->defined()) check_same_device(op, *bias, "bias", x, "x");
  if (grad_out) check_same_device(op, *grad_out, "grad_out", x, "x");
}

// Checks every argument (so a bad call raises instead of indexing out of bounds) and returns the geometry.
inline Geom check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view algo,
                       const Kernels& k) {
  TORCH_CHECK(algo == "auto" || algo == "im2col", op, ": the cpp backend implements algo 'auto' and 'im2col' "
              "(explicit im2col + GEMM), got '", std::string(algo), "'",
              algo == "implicit_gemm" ? "; implicit GEMM is written for the triton backend" : "");
  check_same_device(op, weight, "weight", x, "x");
  FUSEDCNN_CHECK_DEVICE(x, k.device);
  TORCH_CHECK(k.dtype_ok(x.scalar_type()), op, " (cpp, ", k.device_name, ") supports ", k.dtypes, ", got ",
              x.scalar_type());
  check_same_dtype(op, x, "x", weight, "weight");
  FUSEDCNN_CHECK_DIM(x, 4);
  FUSEDCNN_CHECK_DIM(weight, 4);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": non-positive stride is not supported");
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": non-positive dilation is not supported");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": negative padding is not supported");
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported");
  Geom g;
  g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.K = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.groups = groups;
  TORCH_CHECK(g.K % groups == 0, op, ": weight.size(0)=", g.K, " must be divisible by groups=", groups);
  TORCH_CHECK(g.C % groups == 0 && weight.size(1) * groups == g.C, op, ": weight of size ", weight.sizes(),
              " with groups=", groups, " expects ", weight.size(1) * groups, " input channels, got x of size ",
              x.sizes());
  TORCH_CHECK(g.kh > 0 && g.kw > 0, op, ": empty kernel ", weight.sizes());
  const int64_t eff_h = g.dh * (g.kh - 1) + 1, eff_w = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= eff_h && g.W + 2 * g.pw >= eff_w, op, ": padded input (", g.H + 2 * g.ph, " x ",
              g.W + 2 * g.pw, ") is smaller than the dilated kernel (", eff_h, " x ", eff_w, ")");
  g.Ho = (g.H + 2 * g.ph - eff_h) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - eff_w) / g.sw + 1;
  return g;
}

// Images per chunk so that the column buffer stays within col_buffer_bytes(k) (at least one).
inline int64_t images_per_chunk(const Geom& g, int64_t N, int64_t elem_size, const Kernels& k) {
  const int64_t per_image = std::max<int64_t>(1, g.C * g.kh * g.kw * g.Ho * g.Wo * elem_size);
  return std::max<int64_t>(1, std::min<int64_t>(N, col_buffer_bytes(k) / per_image));
}

// The per-group GEMMs of one chunk as ONE batched GEMM over the leading (groups) dimension: at::bmm /
// at::baddbmm, i.e. cuBLAS strided-batched on CUDA and MKL's batched GEMM (or oneDNN) on CPU -- a depthwise
// conv is one call per chunk and direction instead of C tiny GEMMs. One group is a plain at::mm / at::addmm
// (the same BLAS call the batched one makes for a batch of one, without the batch bookkeeping).
//   out: (G, M, N) contiguous; a: (G, M, K); b: (G, K, N) (a transposed view is fine); bias: (G, M, 1) or null.
inline void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias) {
  at::Tensor o = out;  // the *_out ops take a non-const reference
  if (out.size(0) == 1) {
    at::Tensor o0 = o.select(0, 0);
    if (bias) at::addmm_out(o0, bias->select(0, 0), a.select(0, 0), b.select(0, 0));
    else at::mm_out(o0, a.select(0, 0), b.select(0, 0));
  } else if (bias) {
    at::baddbmm_out(o, bias->expand(out.sizes()), a, b);
  } else {
    at::bmm_out(o, a, b);
  }
}

// acc += a · b over the groups (acc (G, M, N) contiguous, of a and b's dtype).
inline void gemm_acc_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.size(0) == 1) acc.select(0, 0).addmm_(a.select(0, 0), b.select(0, 0));
  else acc.baddbmm_(a, b);
}

// a · b over the groups, a fresh (G, M, N) tensor of a and b's dtype.
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  return a.size(0) == 1 ? at::mm(a.select(0, 0), b.select(0, 0)).unsqueeze(0) : at::bmm(a, b);
}

// Whether conv2d has a bias; checks its shape (K,) and dtype.
inline bool check_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, const Geom& g) {
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.K, "fusedcnn::conv2d: bias must have shape (", g.K,
                ",), got ", bias->sizes());
    check_same_dtype("fusedcnn::conv2d", *bias, "bias", x, "x");
  }
  return has_bias;
}

// The checks of conv2d_backward's grad_out (after check_args); returns the accumulation dtype of the
// weight and bias gradients (float64 for float64, else float32).
inline at::ScalarType check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const Geom& g) {
  check_same_dtype("fusedcnn::conv2d_backward", grad_out, "grad_out", x, "x");
  const std::array<int64_t, 4> expect{x.size(0), g.K, g.Ho, g.Wo};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expect), "fusedcnn::conv2d_backward: grad_out must have shape ",
              at::IntArrayRef(expect), ", got ", grad_out.sizes());
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The bias gradient: grad_out summed over N, H_out, W_out in acc_type, rounded once to x's dtype.
inline at::Tensor grad_bias(const at::Tensor& grad_out, const at::Tensor& x, int64_t K, at::ScalarType acc_type) {
  return new_output({K}, x.options()).copy_(at::sum(grad_out, {0, 2, 3}, false, acc_type));
}

// conv2d(x, weight, bias, stride, padding, dilation, groups, algo) -> out (N, K, H_out, W_out)
inline at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          c10::string_view algo, const Kernels& k) {
  check_devices("fusedcnn::conv2d", x, weight, bias, nullptr);
  const Geom g = check_args("fusedcnn::conv2d", x, weight, stride, padding, dilation, groups, algo, k);
  const at::NoGradGuard no_grad;  // internals only (see backward)
  const bool has_bias = check_bias(x, bias, g);
  const int64_t N = x.size(0), G = g.groups, Kg = g.K / G, CKg = (g.C / G) * g.kh * g.kw, L = g.Ho * g.Wo;
  at::Tensor out = new_output({N, g.K, g.Ho, g.Wo}, x.options(), output_format(x));
  if (out.numel() == 0) return out;

  const at::Tensor xc = x.contiguous();  // NHWC input: an NCHW working copy (im2col reads NCHW)
  const at::Tensor w = weight.contiguous().view({G, Kg, CKg});
  const at::Tensor b = has_bias ? bias->contiguous().view({G, Kg, 1}) : at::Tensor();
  const int64_t nb = images_per_chunk(g, N, x.element_size(), k);
  at::Tensor col_buf = at::empty({G * CKg * nb * L}, x.options());
  at::Tensor y_buf = at::empty({g.K * nb * L}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n = std::min(nb, N - n0);
    const at::Tensor col = col_buf.narrow(0, 0, G * CKg * n * L).view({G, CKg, n * L});
    // One NCHW image: (K, 1, H_out, W_out) is out[n0] itself, so the GEMM writes there (no copy).
    const bool direct = n == 1 && out.is_contiguous();
    const at::Tensor y = (direct ? out.narrow(0, n0, 1).view({-1}) : y_buf.narrow(0, 0, g.K * n * L)).view({G, Kg, n * L});
    k.im2col(xc.narrow(0, n0, n), col, g);
    gemm_out(y, w, col, has_bias ? &b : nullptr);  // Y_g = W_g · col_g (+ b_g), every group in one GEMM
    // (K, n, H_out, W_out) -> the chunk of out, in out's memory format
    if (!direct) out.narrow(0, n0, n).copy_(y.view({g.K, n, g.Ho, g.Wo}).permute({1, 0, 2, 3}));
  }
  return out;
}

// conv2d_backward(...) -> (grad_x, grad_weight, grad_bias); an entry whose output_mask is false is an
// empty (0,) tensor. grad_x has x's shape and output_format(x); grad_weight is contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask,
    c10::string_view algo, const Kernels& k) {
  check_devices("fusedcnn::conv2d_backward", x, weight, std::nullopt, &grad_out);
  const Geom g = check_args("fusedcnn::conv2d_backward", x, weight, stride, padding, dilation, groups, algo, k);
  // The ATen calls below are this op's internals, not part of any graph (autograd of the conv is the Python
  // formula): without this, a call with grad mode on (create_graph=True) failed in mm_out.
  const at::NoGradGuard no_grad;
  const int64_t N = x.size(0), G = g.groups, Kg = g.K / G, CKg = (g.C / G) * g.kh * g.kw, L = g.Ho * g.Wo;
  const at::ScalarType acc_type = check_grad_out(grad_out, x, g);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one each: outputs must not alias

  at::Tensor grad_x = need_x ? new_output(x.sizes(), x.options(), output_format(x)) : none();
  at::Tensor grad_w_acc = need_w ? at::zeros({G, Kg, CKg}, x.options().dtype(acc_type)) : at::Tensor();
  if ((need_x || need_w) && grad_out.numel() > 0) {
    // col2im writes NCHW: straight into grad_x when it is NCHW, else into a working copy.
    at::Tensor gx_work = !need_x ? at::Tensor() : grad_x.is_contiguous() ? grad_x : at::empty(x.sizes(), x.options());
    const at::Tensor xc = need_w ? x.contiguous() : at::Tensor();
    const at::Tensor w = weight.contiguous().view({G, Kg, CKg});
    const int64_t nb = images_per_chunk(g, N, x.element_size(), k);
    at::Tensor col_buf = at::empty({G * CKg * nb * L}, x.options());
    at::Tensor dy_buf = at::empty({g.K * nb * L}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t n = std::min(nb, N - n0);
      const at::Tensor col = col_buf.narrow(0, 0, G * CKg * n * L).view({G, CKg, n * L});
      // One NCHW image: grad_out[n0] is already (K, 1*L).
      const bool direct = n == 1 && grad_out.is_contiguous();
      const at::Tensor dy =
          (direct ? grad_out.narrow(0, n0, 1).reshape({-1}) : dy_buf.narrow(0, 0, g.K * n * L)).view({G, Kg, n * L});
      if (!direct) dy.view({g.K, n, g.Ho, g.Wo}).copy_(grad_out.narrow(0, n0, n).permute({1, 0, 2, 3}));
      if (need_w) {  // dW_g += dY_g · col_gᵀ
        k.im2col(xc.narrow(0, n0, n), col, g);
        const at::Tensor colT = col.transpose(1, 2);  // (G, n*L, CKg): a transposed operand, no copy
        if (acc_type == x.scalar_type()) gemm_acc_(grad_w_acc, dy, colT);
        else grad_w_acc.add_(gemm(dy, colT));  // low precision: each chunk's GEMM rounded once, summed in fp32
      }
      if (need_x) {  // col_g = W_gᵀ · dY_g, then col2im (reuses the column buffer after wgrad)
        gemm_out(col, w.transpose(1, 2), dy, nullptr);
        k.col2im(col, gx_work.narrow(0, n0, n), g);
      }
    }
    if (need_x && !gx_work.is_same(grad_x)) grad_x.copy_(gx_work);
  } else if (need_x) {
    grad_x.zero_();
  }
  at::Tensor grad_w = need_w ? new_output(weight.sizes(), weight.options()).copy_(grad_w_acc.view(weight.sizes()))
                             : none();
  at::Tensor grad_b = need_b ? grad_bias(grad_out, x, g.K, acc_type) : none();
  return {grad_x, grad_w, grad_b};
}

}  // namespace conv
}  // namespace fusedcnn
