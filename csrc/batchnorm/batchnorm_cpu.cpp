// BatchNorm2d (+ReLU) on CPU tensors. The math and the pass structure: python/fusedcnn/ops/batchnorm.py.
//
// x, grad_out: (N, C, H, W) float32|float64|bfloat16|float16, NCHW or NHWC (see batchnorm.h);
// mean, var, invstd, sum_dy, sum_dy_xmu: (C,) float32 (float64 for float64 x).
// Inner loops run over contiguous memory with per-channel scalars (NCHW: a run of HW values of one
// channel) or per-channel arrays (NHWC: a row of C channels), so the compiler vectorizes them
// (-O3 -fopenmp-simd, `omp simd` reductions); work is split over at::parallel_for.
// Arithmetic is in opmath (float for float/bf16/half, double for double); the merges across blocks,
// planes and chunks in double.
//
// Bytes per pass (E = N*C*H*W elements of `s` bytes):
//   stats:            read x                  E*s   (each 2,048-element block is read twice, the second time from L1)
//   apply:            read x, write y        2E*s
//   backward_reduce:  read g, x              2E*s
//   backward_elemt:   read g, x, write dx    3E*s
#include "batchnorm/batchnorm.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedcnn {
namespace {

constexpr int64_t kBlock = 2048;      // elements per cache-resident block of a reduction
constexpr int64_t kMaxChunks = 64;    // NHWC reductions: row chunks (fixed, so results do not depend on threads)
constexpr int64_t kGrain = 32768;     // elements per parallel task, at least

struct Geometry {
  int64_t N, C, HW;
  bool nhwc;
  int64_t rows() const { return N * HW; }  // values per channel
};

Geometry geometry_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) * x.size(3), bn::layout_of(x) == at::MemoryFormat::ChannelsLast};
}

// Chan et al.: merge a block (nb values, mean mb, sum of squared deviations m2b) into (n, mean, m2).
inline void chan_merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  const double tot = n + nb;
  const double delta = mb - mean;
  mean += delta * (nb / tot);
  m2 += m2b + delta * delta * (n * nb / tot);
  n = tot;
}

// bfloat16/half blocks are widened into a float buffer first (a loop with no dependency chain): the
// reductions then run on float and vectorize, instead of a serial chain of scalar conversions and adds.
template <typename scalar_t, typename opmath_t>
inline const opmath_t* widen(const scalar_t* src, opmath_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<opmath_t>(src[i]);
    return buf;
  }
}

// opmath -> scalar_t for stores. bfloat16: round-to-nearest-even on the bits, branch-free so the loop
// vectorizes (c10's conversion is a scalar call per element, ~5x slower here).
template <typename scalar_t, typename opmath_t>
inline scalar_t narrow(opmath_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);  // NaN stays a quiet NaN
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Row ranges of the NHWC reductions: chunk k of K covers rows [k*M/K, (k+1)*M/K).
inline int64_t nhwc_chunks(const Geometry& g) {
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(g.C, 1));
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (g.rows() + rows_per_block - 1) / rows_per_block));
}

// ------------------------------------------------------------------ loop kernels
// The innermost loops, as free functions so FUSEDCNN_CPU_CLONES (common.h) compiles each for AVX-512,
// AVX2 and baseline x86-64. ROW = NHWC: per-element coefficient arrays (A[i], B[i], MU[i], i = channel);
// else NCHW: one channel's run, coefficients A[0], B[0], MU[0].

// One NCHW block of len <= kBlock values: its mean and sum of squared deviations (exact two-pass, the
// block sits in L1 for the second pass). buf: kBlock opmath values for the bfloat16/half widening.
template <typename scalar_t, typename opmath_t>
FUSEDCNN_CPU_CLONES void stats_block(const scalar_t* x, int64_t len, opmath_t* buf, opmath_t* mean, opmath_t* sq) {
  const opmath_t* blk = widen(x, buf, len);
  opmath_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += blk[i];
  const opmath_t bm = sum / static_cast<opmath_t>(len);
  opmath_t s2 = 0;
#pragma omp simd reduction(+ : s2)
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t d = blk[i] - bm;
    s2 += d * d;
  }
  *mean = bm;
  *sq = s2;
}

// nb NHWC rows of C channels: bm[c] = their mean, bs[c] = their sum of squared deviations.
template <typename scalar_t, typename opmath_t>
FUSEDCNN_CPU_CLONES void stats_rows(const scalar_t* x, int64_t nb, int64_t C, opmath_t* bm, opmath_t* bs) {
  std::fill(bm, bm + C, opmath_t(0));
  std::fill(bs, bs + C, opmath_t(0));
  for (int64_t r = 0; r < nb; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) bm[c] += static_cast<opmath_t>(row[c]);
  }
  const opmath_t inv_nb = opmath_t(1) / static_cast<opmath_t>(nb);
  for (int64_t c = 0; c < C; ++c) bm[c] *= inv_nb;
  for (int64_t r = 0; r < nb; ++r) {
    const scalar_t* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t d = static_cast<opmath_t>(row[c]) - bm[c];
      bs[c] += d * d;
    }
  }
}

// y = relu?((x - mu) * a + b) over len elements.
template <typename scalar_t, typename opmath_t, bool RELU, bool ROW>
FUSEDCNN_CPU_CLONES void apply_elems(const scalar_t* x, scalar_t* y, int64_t len, const opmath_t* A,
                                     const opmath_t* B, const opmath_t* MU) {
  const opmath_t a0 = A[0], b0 = B[0], mu0 = MU[0];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    opmath_t v = (static_cast<opmath_t>(x[i]) - (ROW ? MU[i] : mu0)) * (ROW ? A[i] : a0) + (ROW ? B[i] : b0);
    if (RELU) v = v <= opmath_t(0) ? opmath_t(0) : v;  // NaN <= 0 is false: NaN propagates
    y[i] = narrow<scalar_t>(v);
  }
}

// One NCHW block (len <= kBlock) of the backward reduction: s1 = sum(g'), s2 = sum(g' * (x - mu)),
// g' = g * (relu mask recomputed from x). gbuf, xbuf: kBlock opmath values for the widening.
template <typename scalar_t, typename opmath_t, bool RELU>
FUSEDCNN_CPU_CLONES void reduce_block(const scalar_t* g, const scalar_t* x, int64_t len, opmath_t a, opmath_t b,
                                      opmath_t mu, opmath_t* gbuf, opmath_t* xbuf, opmath_t* s1_out,
                                      opmath_t* s2_out) {
  const opmath_t* gi = widen(g, gbuf, len);
  const opmath_t* xi = widen(x, xbuf, len);
  opmath_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t xm = xi[i] - mu;
    opmath_t gv = gi[i];
    if (RELU) gv = (xm * a + b > opmath_t(0)) ? gv : opmath_t(0);
    s1 += gv;
    s2 += gv * xm;
  }
  *s1_out = s1;
  *s2_out = s2;
}

// nb NHWC rows of the backward reduction, accumulated into s1[c], s2[c].
template <typename scalar_t, typename opmath_t, bool RELU>
FUSEDCNN_CPU_CLONES void reduce_rows(const scalar_t* g, const scalar_t* x, int64_t nb, int64_t C, const opmath_t* A,
                                     const opmath_t* B, const opmath_t* MU, opmath_t* s1, opmath_t* s2) {
  for (int64_t r = 0; r < nb; ++r) {
    const scalar_t* gi = g + r * C;
    const scalar_t* xi = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t xm = static_cast<opmath_t>(xi[c]) - MU[c];
      opmath_t gv = static_cast<opmath_t>(gi[c]);
      if (RELU) gv = (xm * A[c] + B[c] > opmath_t(0)) ? gv : opmath_t(0);
      s1[c] += gv;
      s2[c] += gv * xm;
    }
  }
}

// dx = k1 * g' + k2 * (x - mu) + k3 over len elements (coefficients: backward_elemt_impl).
template <typename scalar_t, typename opmath_t, bool RELU, bool ROW>
FUSEDCNN_CPU_CLONES void elemt_elems(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t len,
                                     const opmath_t* A, const opmath_t* B, const opmath_t* MU, const opmath_t* K1,
                                     const opmath_t* K2, const opmath_t* K3) {
  const opmath_t a0 = A[0], b0 = B[0], mu0 = MU[0], k10 = K1[0], k20 = K2[0], k30 = K3[0];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const opmath_t xm = static_cast<opmath_t>(x[i]) - (ROW ? MU[i] : mu0);
    opmath_t gv = static_cast<opmath_t>(g[i]);
    if (RELU) gv = (xm * (ROW ? A[i] : a0) + (ROW ? B[i] : b0) > opmath_t(0)) ? gv : opmath_t(0);
    dx[i] = narrow<scalar_t>((ROW ? K1[i] : k10) * gv + (ROW ? K2[i] : k20) * xm + (ROW ? K3[i] : k30));
  }
}

// ------------------------------------------------------------------ statistics
// Partials: K per channel (NCHW: one per plane (n, c), count HW; NHWC: one per row chunk), then a
// Chan merge per channel. Each block: exact two-pass mean / squared deviations while it sits in L1.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> stats_impl(const at::Tensor& x, const Geometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = g.C;
  const int64_t K = g.nhwc ? nhwc_chunks(g) : g.N;
  std::vector<double> pcount(K), pmean(K * C), pm2(K * C);  // partial (k, c) at k*C + c

  if (!g.nhwc) {
    std::fill(pcount.begin(), pcount.end(), double(g.HW));
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {  // plane p = n*C + c: HW contiguous values
        const scalar_t* run = xp + p * g.HW;
        double n = 0, mean = 0, m2 = 0;
        opmath_t buf[kBlock];
        for (int64_t s0 = 0; s0 < g.HW; s0 += kBlock) {
          const int64_t len = std::min(kBlock, g.HW - s0);
          opmath_t bm, sq;
          stats_block(run + s0, len, buf, &bm, &sq);
          chan_merge(n, mean, m2, double(len), double(bm), double(sq));
        }
        pmean[p] = mean;  // p = n*C + c is already the (k = n, c) index
        pm2[p] = m2;
      }
    });
  } else {
    const int64_t M = g.rows();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<opmath_t> bmean(C), bsq(C);
      for (int64_t k = kb; k < ke; ++k) {
        double* mean = &pmean[k * C];
        double* m2 = &pm2[k * C];
        std::fill(mean, mean + C, 0.0);
        std::fill(m2, m2 + C, 0.0);
        double n = 0;
        const int64_t r1 = (k + 1) * M / K;
        for (int64_t r0 = k * M / K; r0 < r1; r0 += rows_per_block) {
          const int64_t nb = std::min(rows_per_block, r1 - r0);
          opmath_t* bm = bmean.data();
          opmath_t* bs = bsq.data();
          stats_rows(xp + r0 * C, nb, C, bm, bs);
          const double tot = n + nb, f_mean = nb / tot, f_m2 = n * nb / tot;
          for (int64_t c = 0; c < C; ++c) {
            const double delta = double(bm[c]) - mean[c];
            mean[c] += delta * f_mean;
            m2[c] += double(bs[c]) + delta * delta * f_m2;
          }
          n = tot;
        }
        pcount[k] = n;
      }
    });
  }

  // Merge per channel in double, then round once to the statistics dtype.
  at::Tensor mean_d = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor var_d = at::empty({C}, x.options().dtype(at::kDouble));
  double* mo = mean_d.mutable_data_ptr<double>();
  double* vo = var_d.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < K; ++k)
      if (pcount[k] > 0) chan_merge(n, mean, m2, pcount[k], pmean[k * C + c], pm2[k * C + c]);
    mo[c] = n > 0 ? mean : NAN;
    vo[c] = n > 0 ? m2 / n : NAN;
  }
  const auto st = bn::stats_type(x.scalar_type());
  at::Tensor mean_out = mean_d.to(st), var_out = var_d.to(st);
  return {mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x_) {
  bn::check_input(x_, "x", at::kCPU);
  const at::Tensor x = x_.contiguous(bn::layout_of(x_));
  const Geometry g = geometry_of(x);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    out = stats_impl<scalar_t>(x, g);
  });
  return out;
}

// ------------------------------------------------------------------ per-channel coefficients
// y = (x - mean) * a + b with a = weight * invstd, b = bias: the forward's formula, recomputed bit for bit
// in the backward for the ReLU mask. (Not x * a' + b' with b' = bias - mean * a: that cancels
// catastrophically when |mean| >> std.)
struct Coefs {
  at::Tensor mean, a, b;
};

Coefs affine_coefs(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  const auto st = bn::stats_type(x.scalar_type());
  bn::check_channel_vec(mean, x, "mean", st);
  bn::check_channel_vec(invstd, x, "invstd", st);
  at::Tensor w = bn::affine_or(weight, x, "weight", 1.0);
  at::Tensor bias_ = bn::affine_or(bias, x, "bias", 0.0);
  return {mean.contiguous(), (w * invstd).contiguous(), bias_};
}

// Calls body(offset, len, c_or_-1) over the dense layout in parallel: NCHW runs are one channel's
// HW values (c given), NHWC runs are rows of all C channels (c = -1).
template <typename F>
void for_each_run(const Geometry& g, const F& body) {
  if (!g.nhwc) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) body(p * g.HW, g.HW, p % g.C);
    });
  } else {
    at::parallel_for(0, g.rows(), std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) body(r * g.C, g.C, int64_t(-1));
    });
  }
}

// ------------------------------------------------------------------ apply (forward)
template <typename scalar_t, bool RELU>
void apply_impl(const at::Tensor& x, at::Tensor& y, const Geometry& g, const Coefs& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  constexpr auto om = c10::CppTypeToScalarType<opmath_t>::value;
  const at::Tensor a_t = k.a.to(om), b_t = k.b.to(om), m_t = k.mean.to(om);
  const opmath_t* A = a_t.const_data_ptr<opmath_t>();
  const opmath_t* B = b_t.const_data_ptr<opmath_t>();
  const opmath_t* MU = m_t.const_data_ptr<opmath_t>();
  for_each_run(g, [&](int64_t off, int64_t len, int64_t c) {
    if (c >= 0) apply_elems<scalar_t, opmath_t, RELU, false>(xp + off, yp + off, len, A + c, B + c, MU + c);
    else apply_elems<scalar_t, opmath_t, RELU, true>(xp + off, yp + off, len, A, B, MU);
  });
}

at::Tensor batch_norm_apply_cpu(const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& invstd,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                bool relu) {
  bn::check_input(x_, "x", at::kCPU);
  const auto fmt = bn::layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const Coefs k = affine_coefs(x, mean, invstd, weight, bias);
  at::Tensor y = new_output(x.sizes(), x.options(), fmt);
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_apply_cpu", [&] {
    if (relu) apply_impl<scalar_t, true>(x, y, g, k);
    else apply_impl<scalar_t, false>(x, y, g, k);
  });
  return y;
}

// ------------------------------------------------------------------ backward
// One reduction pass: sum_dy = sum(g'), sum_dy_xmu = sum(g' * (x - mean)), g' = g * (x*a + b > 0 if relu).
template <typename scalar_t, bool RELU>
std::tuple<at::Tensor, at::Tensor> backward_reduce_impl(const at::Tensor& gy, const at::Tensor& x, const Geometry& g,
                                                       const Coefs& k) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr auto om = c10::CppTypeToScalarType<opmath_t>::value;
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const at::Tensor a_t = k.a.to(om), b_t = k.b.to(om), m_t = k.mean.to(om);
  const opmath_t* A = a_t.const_data_ptr<opmath_t>();
  const opmath_t* B = b_t.const_data_ptr<opmath_t>();
  const opmath_t* MU = m_t.const_data_ptr<opmath_t>();
  const int64_t C = g.C;
  const int64_t K = g.nhwc ? nhwc_chunks(g) : g.N;
  std::vector<double> pdy(K * C, 0.0), pdyx(K * C, 0.0);  // partial (k, c) at k*C + c

  if (!g.nhwc) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t c = p % C;
        const opmath_t a = A[c], bb = B[c], mu = MU[c];
        double sdy = 0, sdyx = 0;
        opmath_t gbuf[kBlock], xbuf[kBlock];
        for (int64_t s0 = 0; s0 < g.HW; s0 += kBlock) {
          const int64_t len = std::min(kBlock, g.HW - s0);
          opmath_t s1, s2;
          reduce_block<scalar_t, opmath_t, RELU>(gp + p * g.HW + s0, xp + p * g.HW + s0, len, a, bb, mu, gbuf, xbuf,
                                                 &s1, &s2);
          sdy += s1;
          sdyx += s2;
        }
        pdy[p] = sdy;
        pdyx[p] = sdyx;
      }
    });
  } else {
    const int64_t M = g.rows();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<opmath_t> b1(C), b2(C);
      for (int64_t k = kb; k < ke; ++k) {
        const int64_t r1 = (k + 1) * M / K;
        for (int64_t r0 = k * M / K; r0 < r1; r0 += rows_per_block) {
          const int64_t nb = std::min(rows_per_block, r1 - r0);
          std::fill(b1.begin(), b1.end(), opmath_t(0));
          std::fill(b2.begin(), b2.end(), opmath_t(0));
          opmath_t* s1 = b1.data();
          opmath_t* s2 = b2.data();
          reduce_rows<scalar_t, opmath_t, RELU>(gp + r0 * C, xp + r0 * C, nb, C, A, B, MU, s1, s2);
          for (int64_t c = 0; c < C; ++c) {
            pdy[k * C + c] += s1[c];
            pdyx[k * C + c] += s2[c];
          }
        }
      }
    });
  }
  at::Tensor sdy_d = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor sdyx_d = at::empty({C}, x.options().dtype(at::kDouble));
  double* o1 = sdy_d.mutable_data_ptr<double>();
  double* o2 = sdyx_d.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < K; ++k) {
      t1 += pdy[k * C + c];
      t2 += pdyx[k * C + c];
    }
    o1[c] = t1;
    o2[c] = t2;
  }
  const auto st = bn::stats_type(x.scalar_type());
  at::Tensor sum_dy = sdy_d.to(st), sum_dy_xmu = sdyx_d.to(st);
  return {sum_dy, sum_dy_xmu};
}

// grad_out in x's layout (autograd may hand it over in another one).
at::Tensor grad_like(const at::Tensor& grad_out, const at::Tensor& x) {
  FUSEDCNN_CHECK_DEVICE(grad_out, at::kCPU);
  FUSEDCNN_CHECK_SAME_SHAPE(grad_out, x);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out must have x's dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  return grad_out.contiguous(bn::layout_of(x));
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool relu) {
  bn::check_input(x_, "x", at::kCPU);
  const at::Tensor x = x_.contiguous(bn::layout_of(x_));
  const at::Tensor gy = grad_like(grad_out, x);
  const Coefs k = affine_coefs(x, mean, invstd, weight, bias);
  const Geometry g = geometry_of(x);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    out = relu ? backward_reduce_impl<scalar_t, true>(gy, x, g, k)
               : backward_reduce_impl<scalar_t, false>(gy, x, g, k);
  });
  return out;
}

// One elementwise pass: dx = k1 * g' + k2 * (x - mean) + k3 with per-channel
//   k1 = weight * invstd,  k2 = -k1 * invstd^2 * sum_dy_xmu / M,  k3 = -k1 * sum_dy / M
// (training; eval: k2 = k3 = 0), i.e. weight*invstd*(g' - sum_dy/M - (x-mean)*invstd^2*sum_dy_xmu/M).
template <typename scalar_t, bool RELU>
void backward_elemt_impl(const at::Tensor& gy, const at::Tensor& x, at::Tensor& dx, const Geometry& g,
                         const Coefs& k, const at::Tensor& k1_t, const at::Tensor& k2_t, const at::Tensor& k3_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr auto om = c10::CppTypeToScalarType<opmath_t>::value;
  const at::Tensor a_t = k.a.to(om), b_t = k.b.to(om), m_t = k.mean.to(om);
  const opmath_t* MU = m_t.const_data_ptr<opmath_t>();
  const at::Tensor k1c = k1_t.to(om).contiguous(), k2c = k2_t.to(om).contiguous(), k3c = k3_t.to(om).contiguous();
  const opmath_t *A = a_t.const_data_ptr<opmath_t>(), *B = b_t.const_data_ptr<opmath_t>();
  const opmath_t *K1 = k1c.const_data_ptr<opmath_t>(), *K2 = k2c.const_data_ptr<opmath_t>(),
                 *K3 = k3c.const_data_ptr<opmath_t>();
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  for_each_run(g, [&](int64_t off, int64_t len, int64_t c) {
    if (c >= 0)
      elemt_elems<scalar_t, opmath_t, RELU, false>(gp + off, xp + off, dp + off, len, A + c, B + c, MU + c, K1 + c,
                                                  K2 + c, K3 + c);
    else elemt_elems<scalar_t, opmath_t, RELU, true>(gp + off, xp + off, dp + off, len, A, B, MU, K1, K2, K3);
  });
}

at::Tensor batch_norm_backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean,
                                         const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& sum_dy,
                                         const c10::optional<at::Tensor>& sum_dy_xmu, double count, bool relu) {
  bn::check_input(x_, "x", at::kCPU);
  const auto fmt = bn::layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const at::Tensor gy = grad_like(grad_out, x);
  const Coefs k = affine_coefs(x, mean, invstd, weight, bias);
  const at::Tensor w = bn::affine_or(weight, x, "weight", 1.0);
  const bool training = sum_dy.has_value() && sum_dy->defined();
  TORCH_CHECK(training == (sum_dy_xmu.has_value() && sum_dy_xmu->defined()),
              "sum_dy and sum_dy_xmu must be given together (training) or both None (eval)");
  const at::Tensor k1 = w * invstd;
  at::Tensor k2 = at::zeros_like(k1), k3 = at::zeros_like(k1);
  if (training) {
    const auto st = bn::stats_type(x.scalar_type());
    bn::check_channel_vec(*sum_dy, x, "sum_dy", st);
    bn::check_channel_vec(*sum_dy_xmu, x, "sum_dy_xmu", st);
    TORCH_CHECK(count > 0, "count must be positive, got ", count);
    k2 = -k1 * invstd * invstd * (*sum_dy_xmu) / count;
    k3 = -k1 * (*sum_dy) / count;
  }
  at::Tensor dx = new_output(x.sizes(), x.options(), fmt);
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    if (relu) backward_elemt_impl<scalar_t, true>(gy, x, dx, g, k, k1, k2, k3);
    else backward_elemt_impl<scalar_t, false>(gy, x, dx, g, k, k1, k2, k3);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace fusedcnn
