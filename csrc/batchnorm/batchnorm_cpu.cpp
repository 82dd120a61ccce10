// BatchNorm2d (+ReLU) on CPU tensors. The math and the pass structure: python/fusedcnn/ops/batchnorm.py.
//
// x, grad_out: (N, C, H, W) float32|float64|bfloat16|float16, NCHW or NHWC (see batchnorm.h);
// mean, var, invstd, sum_dy, sum_dy_xmu: (C,) float32 (float64 for float64 x). An empty batch (N*H*W = 0, DDP's
// uneven last batch) has mean = var = 0: a count of 0 weighs nothing in a merge across processes, and finite
// statistics give the zero affine gradients torch gives; its backward_elemt takes count = 0.
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
// The one-call training ops (batch_norm_train_forward / _backward, at the end) do stats + apply and
// reduce + elemt per channel while the channel sits in L2: 2E*s and 3E*s from memory (NCHW, small channels).
#include "batchnorm/batchnorm.h"
#include "cpu_vec.h"
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

// Row ranges of the NHWC reductions: chunk k of K covers rows [k*M/K, (k+1)*M/K).
inline int64_t nhwc_chunks(const Geometry& g) {
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(g.C, 1));
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (g.rows() + rows_per_block - 1) / rows_per_block));
}

// ------------------------------------------------------------------ loop kernels
// The innermost loops, as free functions so FUSEDCNN_CPU_CLONES (cpu_vec.h) compiles each for AVX-512,
// AVX2 and baseline x86-64. ROW = NHWC: per-element coefficient arrays (A[i], B[i], MU[i], i = channel);
// else NCHW: one channel's run, coefficients A[0], B[0], MU[0].

// Blocks of the NCHW reductions: runs of len values, run r at offset r*stride, cut into blocks of at most
// kBlock values -- a long run into several blocks, short runs (len < kBlock: the small late VGG layers, HW
// down to 4) gathered several to a block, so each block pays the horizontal sums and the double merge once.
// For each block, body(load, count) runs once; load(src, buf) returns the block of tensor src (same
// geometry) as count opmath values: in place when no copy is needed, else gathered/widened into buf.
// Always inlined, with its body, into the cloned kernels that call it: a call left out of line is compiled
// for baseline x86-64, and was 4x slower (scalar, with a branch per element).
template <typename scalar_t, typename opmath_t, typename F>
__attribute__((always_inline)) inline void for_each_block(int64_t runs, int64_t stride, int64_t len, const F& body) {
  if (len >= kBlock) {
    for (int64_t r = 0; r < runs; ++r)
      for (int64_t s0 = 0; s0 < len; s0 += kBlock) {
        const int64_t bl = std::min(kBlock, len - s0);
        body([&](const scalar_t* src, opmath_t* buf) { return widen(src + r * stride + s0, buf, bl); }, bl);
      }
    return;
  }
  const int64_t per = kBlock / std::max<int64_t>(len, 1);  // runs per block
  for (int64_t r0 = 0; r0 < runs; r0 += per) {
    const int64_t nr = std::min(per, runs - r0);
    auto gather = [&](const scalar_t* src, opmath_t* buf) {
      for (int64_t r = 0; r < nr; ++r) {
        const scalar_t* run = src + (r0 + r) * stride;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) buf[r * len + i] = static_cast<opmath_t>(run[i]);
      }
      return static_cast<const opmath_t*>(buf);
    };
    body(gather, nr * len);
  }
}

// NCHW statistics of `runs` runs of len values, run r at x + r*stride (one plane, or one channel's N planes):
// each block (for_each_block) gets an exact two-pass mean and sum of squared deviations while it sits in
// L1, merged (Chan) into (n, mean, m2) in double. buf: kBlock opmath values.
template <typename scalar_t, typename opmath_t>
FUSEDCNN_CPU_CLONES void stats_runs(const scalar_t* x, int64_t runs, int64_t stride, int64_t len, opmath_t* buf,
                                    double* n, double* mean, double* m2) {
  for_each_block<scalar_t, opmath_t>(runs, stride, len, [&](const auto& load, int64_t bl) __attribute__((always_inline)) {
    const opmath_t* blk = load(x, buf);
    opmath_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < bl; ++i) sum += blk[i];
    const opmath_t bm = sum / static_cast<opmath_t>(bl);
    opmath_t sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < bl; ++i) {
      const opmath_t d = blk[i] - bm;
      sq += d * d;
    }
    chan_merge(*n, *mean, *m2, double(bl), double(bm), double(sq));
  });
}

// NHWC rows are handled as "tiles" of T = C * reps values (reps = tile_reps(C) rows, T >= 64): per-channel
// arrays repeated reps times, so the inner loops run over 64+ contiguous values instead of C (8 in VGG's first
// layers: one vector, with a call per row: 0.5x the NCHW kernels' speed). Value j of a tile is channel j % C.
inline int64_t tile_reps(int64_t C) { return std::max<int64_t>(1, (64 + C - 1) / std::max<int64_t>(C, 1)); }

template <typename T>
std::vector<T> tiled(const T* v, int64_t C, int64_t reps) {  // v (C values) repeated reps times
  std::vector<T> out(C * reps);
  for (int64_t k = 0; k < reps; ++k) std::copy(v, v + C, out.begin() + k * C);
  return out;
}

template <typename T>
void fold_tile(const T* tile, int64_t C, int64_t reps, T* out) {  // out[c] = sum over k of tile[k*C + c]
  for (int64_t c = 0; c < C; ++c) {
    T s = 0;
    for (int64_t k = 0; k < reps; ++k) s += tile[k * C + c];
    out[c] = s;
  }
}

// The whole tiles of nb rows from x (runs of T values, stride T) and the rows left over (one shorter run):
// run(ptr_offset, runs, len).
template <typename F>
inline void for_each_tile(int64_t nb, int64_t C, int64_t reps, const F& run) {
  const int64_t T = C * reps, full = nb / reps, rest = nb % reps;
  if (full > 0) run(int64_t(0), full, T);
  if (rest > 0) run(full * T, int64_t(1), rest * C);
}

// Sum over `runs` runs of len values (run r at x + r*len) into acc[0..len).
template <typename scalar_t, typename opmath_t>
FUSEDCNN_CPU_CLONES void sum_tiles(const scalar_t* x, int64_t runs, int64_t len, opmath_t* acc) {
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* row = x + r * len;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) acc[j] += static_cast<opmath_t>(row[j]);
  }
}

// Sum of squared deviations from the tiled mean mt over `runs` runs of len values, into acc[0..len).
template <typename scalar_t, typename opmath_t>
FUSEDCNN_CPU_CLONES void sq_dev_tiles(const scalar_t* x, int64_t runs, int64_t len, const opmath_t* mt,
                                      opmath_t* acc) {
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* row = x + r * len;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const opmath_t d = static_cast<opmath_t>(row[j]) - mt[j];
      acc[j] += d * d;
    }
  }
}

// nb NHWC rows of C channels: bm[c] = their mean, bs[c] = their sum of squared deviations (exact two-pass, the
// block in L1). mt, acc: scratch of T = C * reps opmath values each.
template <typename scalar_t, typename opmath_t>
void stats_rows(const scalar_t* x, int64_t nb, int64_t C, int64_t reps, opmath_t* mt, opmath_t* acc, opmath_t* bm,
                opmath_t* bs) {
  const int64_t T = C * reps;
  std::fill(acc, acc + T, opmath_t(0));
  for_each_tile(nb, C, reps, [&](int64_t off, int64_t runs, int64_t len) { sum_tiles(x + off, runs, len, acc); });
  fold_tile(acc, C, reps, bm);
  const opmath_t inv_nb = opmath_t(1) / static_cast<opmath_t>(nb);
  for (int64_t c = 0; c < C; ++c) bm[c] *= inv_nb;
  for (int64_t k = 0; k < reps; ++k) std::copy(bm, bm + C, mt + k * C);
  std::fill(acc, acc + T, opmath_t(0));
  for_each_tile(nb, C, reps, [&](int64_t off, int64_t runs, int64_t len) { sq_dev_tiles(x + off, runs, len, mt, acc); });
  fold_tile(acc, C, reps, bs);
}

// y = relu?((x - mu) * a + b) over `runs` runs of len elements, run r at offset r*stride in x and y.
template <typename scalar_t, typename opmath_t, bool RELU, bool ROW>
FUSEDCNN_CPU_CLONES void apply_elems(const scalar_t* x, scalar_t* y, int64_t runs, int64_t stride, int64_t len,
                                     const opmath_t* A, const opmath_t* B, const opmath_t* MU) {
  const opmath_t a0 = A[0], b0 = B[0], mu0 = MU[0];
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* xr = x + r * stride;
    scalar_t* yr = y + r * stride;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      opmath_t v = (static_cast<opmath_t>(xr[i]) - (ROW ? MU[i] : mu0)) * (ROW ? A[i] : a0) + (ROW ? B[i] : b0);
      if (RELU) v = v <= opmath_t(0) ? opmath_t(0) : v;  // NaN <= 0 is false: NaN propagates
      yr[i] = narrow<scalar_t>(v);
    }
  }
}

// NCHW backward reduction over `runs` runs of len values (run r at offset r*stride in g and x), added to
// s1 += sum(g'), s2 += sum(g' * (x - mu)) in double per block, g' = g * (relu mask recomputed from x).
// Blocks as for_each_block. gbuf, xbuf: kBlock opmath values each.
template <typename scalar_t, typename opmath_t, bool RELU>
FUSEDCNN_CPU_CLONES void reduce_runs(const scalar_t* g, const scalar_t* x, int64_t runs, int64_t stride, int64_t len,
                                     opmath_t a, opmath_t b, opmath_t mu, opmath_t* gbuf, opmath_t* xbuf, double* s1,
                                     double* s2) {
  for_each_block<scalar_t, opmath_t>(runs, stride, len, [&](const auto& load, int64_t bl) __attribute__((always_inline)) {
    const opmath_t* xi = load(x, xbuf);
    const opmath_t* gi = load(g, gbuf);
    opmath_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
    for (int64_t i = 0; i < bl; ++i) {
      const opmath_t xm = xi[i] - mu;
      opmath_t gv = gi[i];
      if (RELU) gv = (xm * a + b > opmath_t(0)) ? gv : opmath_t(0);
      t1 += gv;
      t2 += gv * xm;
    }
    *s1 += t1;
    *s2 += t2;
  });
}

// NHWC backward reduction over `runs` runs of len values (run r at offset r*len; tiles: A, B, MU tiled),
// accumulated into s1[j] += g'[j], s2[j] += g'[j] * (x[j] - MU[j]) (j < len; the caller folds the tile).
template <typename scalar_t, typename opmath_t, bool RELU>
FUSEDCNN_CPU_CLONES void reduce_tiles(const scalar_t* g, const scalar_t* x, int64_t runs, int64_t len,
                                      const opmath_t* A, const opmath_t* B, const opmath_t* MU, opmath_t* s1,
                                      opmath_t* s2) {
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* gi = g + r * len;
    const scalar_t* xi = x + r * len;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const opmath_t xm = static_cast<opmath_t>(xi[j]) - MU[j];
      opmath_t gv = static_cast<opmath_t>(gi[j]);
      if (RELU) gv = (xm * A[j] + B[j] > opmath_t(0)) ? gv : opmath_t(0);
      s1[j] += gv;
      s2[j] += gv * xm;
    }
  }
}

// dx = k1 * g' + k2 * (x - mu) + k3 over `runs` runs of len elements, run r at offset r*stride in g, x and dx
// (coefficients: backward_elemt_impl).
template <typename scalar_t, typename opmath_t, bool RELU, bool ROW>
FUSEDCNN_CPU_CLONES void elemt_elems(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t runs, int64_t stride,
                                     int64_t len, const opmath_t* A, const opmath_t* B, const opmath_t* MU,
                                     const opmath_t* K1, const opmath_t* K2, const opmath_t* K3) {
  const opmath_t a0 = A[0], b0 = B[0], mu0 = MU[0], k10 = K1[0], k20 = K2[0], k30 = K3[0];
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* gr = g + r * stride;
    const scalar_t* xr = x + r * stride;
    scalar_t* dr = dx + r * stride;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const opmath_t xm = static_cast<opmath_t>(xr[i]) - (ROW ? MU[i] : mu0);
      opmath_t gv = static_cast<opmath_t>(gr[i]);
      if (RELU) gv = (xm * (ROW ? A[i] : a0) + (ROW ? B[i] : b0) > opmath_t(0)) ? gv : opmath_t(0);
      dr[i] = narrow<scalar_t>((ROW ? K1[i] : k10) * gv + (ROW ? K2[i] : k20) * xm + (ROW ? K3[i] : k30));
    }
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
        stats_runs(run, 1, 0, g.HW, buf, &n, &mean, &m2);
        pmean[p] = mean;  // p = n*C + c is already the (k = n, c) index
        pm2[p] = m2;
      }
    });
  } else {
    const int64_t M = g.rows();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
    const int64_t reps = tile_reps(C);
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<opmath_t> bmean(C), bsq(C), mt(C * reps), acc(C * reps);
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
          stats_rows(xp + r0 * C, nb, C, reps, mt.data(), acc.data(), bm, bs);
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
    mo[c] = n > 0 ? mean : 0.0;  // an empty batch: 0, 0 (file header)
    vo[c] = n > 0 ? m2 / n : 0.0;
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
// HW values (c given), NHWC runs are a range of whole rows of C channels (c = -1; len a multiple of C).
template <typename F>
void for_each_run(const Geometry& g, const F& body) {
  if (g.N * g.C * g.HW == 0) return;  // nothing to compute (and no rows of C = 0 channels to tile)
  if (!g.nhwc) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrain / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) body(p * g.HW, g.HW, p % g.C);
    });
  } else {
    at::parallel_for(0, g.rows(), std::max<int64_t>(1, kGrain / std::max<int64_t>(g.C, 1)), [&](int64_t b, int64_t e) {
      body(b * g.C, (e - b) * g.C, int64_t(-1));
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
  const int64_t reps = g.nhwc ? tile_reps(g.C) : 1;
  const std::vector<opmath_t> At = tiled(A, g.nhwc ? g.C : 0, reps), Bt = tiled(B, g.nhwc ? g.C : 0, reps),
                              MUt = tiled(MU, g.nhwc ? g.C : 0, reps);
  for_each_run(g, [&](int64_t off, int64_t len, int64_t c) {
    if (c >= 0) return apply_elems<scalar_t, opmath_t, RELU, false>(xp + off, yp + off, 1, 0, len, A + c, B + c, MU + c);
    for_each_tile(len / g.C, g.C, reps, [&](int64_t o, int64_t runs, int64_t n) {
      apply_elems<scalar_t, opmath_t, RELU, true>(xp + off + o, yp + off + o, runs, n, n, At.data(), Bt.data(),
                                                  MUt.data());
    });
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
        reduce_runs<scalar_t, opmath_t, RELU>(gp + p * g.HW, xp + p * g.HW, 1, 0, g.HW, a, bb, mu, gbuf, xbuf, &sdy,
                                              &sdyx);
        pdy[p] = sdy;
        pdyx[p] = sdyx;
      }
    });
  } else {
    const int64_t M = g.rows();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
    const int64_t reps = tile_reps(C), T = C * reps;
    const std::vector<opmath_t> At = tiled(A, C, reps), Bt = tiled(B, C, reps), MUt = tiled(MU, C, reps);
    at::parallel_for(0, K, 1, [&](int64_t kb, int64_t ke) {
      std::vector<opmath_t> b1(C), b2(C), t1(T), t2(T);
      for (int64_t k = kb; k < ke; ++k) {
        const int64_t r1 = (k + 1) * M / K;
        for (int64_t r0 = k * M / K; r0 < r1; r0 += rows_per_block) {
          const int64_t nb = std::min(rows_per_block, r1 - r0);
          std::fill(t1.begin(), t1.end(), opmath_t(0));
          std::fill(t2.begin(), t2.end(), opmath_t(0));
          for_each_tile(nb, C, reps, [&](int64_t o, int64_t runs, int64_t n) {
            reduce_tiles<scalar_t, opmath_t, RELU>(gp + r0 * C + o, xp + r0 * C + o, runs, n, At.data(), Bt.data(),
                                                   MUt.data(), t1.data(), t2.data());
          });
          opmath_t* s1 = b1.data();
          opmath_t* s2 = b2.data();
          fold_tile(t1.data(), C, reps, s1);
          fold_tile(t2.data(), C, reps, s2);
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
  check_same_device("fusedcnn batch norm backward", grad_out, "grad_out", x, "x");
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
  const int64_t reps = g.nhwc ? tile_reps(g.C) : 1, tc = g.nhwc ? g.C : 0;  // tiles: NHWC only
  const std::vector<opmath_t> At = tiled(A, tc, reps), Bt = tiled(B, tc, reps), MUt = tiled(MU, tc, reps),
                              K1t = tiled(K1, tc, reps), K2t = tiled(K2, tc, reps), K3t = tiled(K3, tc, reps);
  for_each_run(g, [&](int64_t off, int64_t len, int64_t c) {
    if (c >= 0)
      return elemt_elems<scalar_t, opmath_t, RELU, false>(gp + off, xp + off, dp + off, 1, 0, len, A + c, B + c,
                                                         MU + c, K1 + c, K2 + c, K3 + c);
    for_each_tile(len / g.C, g.C, reps, [&](int64_t o, int64_t runs, int64_t n) {
      elemt_elems<scalar_t, opmath_t, RELU, true>(gp + off + o, xp + off + o, dp + off + o, runs, n, n, At.data(),
                                                  Bt.data(), MUt.data(), K1t.data(), K2t.data(), K3t.data());
    });
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
    TORCH_CHECK(count > 0 || x.numel() == 0, "count must be positive, got ", count);
    if (count > 0) {  // (an empty x has no dx to compute)
      k2 = -k1 * invstd * invstd * (*sum_dy_xmu) / count;
      k3 = -k1 * (*sum_dy) / count;
    }
  }
  at::Tensor dx = new_output(x.sizes(), x.options(), fmt);
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    if (relu) backward_elemt_impl<scalar_t, true>(gy, x, dx, g, k, k1, k2, k3);
    else backward_elemt_impl<scalar_t, false>(gy, x, dx, g, k, k1, k2, k3);
  });
  return dx;
}

// ------------------------------------------------------------------ training forward / backward, one call each
// NCHW with a channel (its N runs of HW values) small enough to stay in L2: one task per channel reads it
// from memory for the statistics and again, from cache, to normalize (forward), or for the reduction and
// again for dx (backward): 2 and 3 passes over memory instead of 3 and 5. Otherwise (NHWC, big channels)
// the two-pass composition of the four ops (batchnorm.h).
constexpr int64_t kChannelCacheBytes = 1 << 20;  // half of a 2 MiB L2: the channel's inputs, read twice

bool channel_in_cache(const at::Tensor& x, const Geometry& g, int inputs) {
  return !g.nhwc && x.numel() > 0 && g.N * g.HW * x.element_size() * inputs <= kChannelCacheBytes;
}

// The running statistics, updated inside the channel loop (no (C,)-vector op calls: ~5 us a call saved, which a
// tiny layer feels) where a running tensor is of the statistics dtype and contiguous; nullptr for one that is
// absent, or is updated afterwards by bn::update_running_stats. The same arithmetic as that (at::lerp's formula).
template <typename T>
struct RunningUpdate {
  T *mean = nullptr, *var = nullptr;
  T momentum = 0, unbias = 1;  // unbias = M / (M - 1)

  static inline T lerp(T self, T end, T weight) {
    return std::abs(weight) < T(0.5) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
  }
  void channel(int64_t c, T batch_mean, T batch_var) const {
    if (mean) mean[c] = lerp(mean[c], batch_mean, momentum);
    if (var) var[c] = lerp(var[c], batch_var * unbias, momentum);
  }
};

bool updatable_in_kernel(const c10::optional<at::Tensor>& t, at::ScalarType stats_dtype) {
  return t.has_value() && t->defined() && t->scalar_type() == stats_dtype && t->is_contiguous();
}

template <typename scalar_t, bool RELU>
void train_forward_channels(const at::Tensor& x, at::Tensor& y, const Geometry& g, const at::Tensor& w,
                            const at::Tensor& b, double eps, at::Tensor& mean, at::Tensor& var, at::Tensor& invstd,
                            const RunningUpdate<at::opmath_type<scalar_t>>& running) {
  using opmath_t = at::opmath_type<scalar_t>;  // == the statistics dtype (float, or double for double)
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const opmath_t *W = w.const_data_ptr<opmath_t>(), *B = b.const_data_ptr<opmath_t>();
  opmath_t *MEAN = mean.mutable_data_ptr<opmath_t>(), *VAR = var.mutable_data_ptr<opmath_t>(),
           *INV = invstd.mutable_data_ptr<opmath_t>();
  const int64_t C = g.C, HW = g.HW;
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    opmath_t buf[kBlock];
    for (int64_t c = cb; c < ce; ++c) {
      double n = 0, mu = 0, m2 = 0;  // pass 1 (memory): statistics, the same blocks and merges as stats_impl
      stats_runs(xp + c * HW, g.N, C * HW, HW, buf, &n, &mu, &m2);
      MEAN[c] = static_cast<opmath_t>(mu);
      VAR[c] = static_cast<opmath_t>(m2 / n);
      INV[c] = opmath_t(1) / std::sqrt(VAR[c] + static_cast<opmath_t>(eps));  // torch.rsqrt(var + eps)
      running.channel(c, MEAN[c], VAR[c]);
      const opmath_t a = W[c] * INV[c];  // affine_coefs' a, bit for bit (the backward recomputes the mask)
      // pass 2 (cache): normalize
      apply_elems<scalar_t, opmath_t, RELU, false>(xp + c * HW, yp + c * HW, g.N, C * HW, HW, &a, B + c, MEAN + c);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_forward_cpu(
    const at::Tensor& x_, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  bn::check_input(x_, "x", at::kCPU);
  bn::check_running_stats(running_mean, running_var, x_);
  const auto fmt = bn::layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const Geometry g = geometry_of(x);
  const int64_t count = g.N * g.HW;
  if (!channel_in_cache(x, g, 1)) {
    auto result = bn::train_forward_two_pass(x, weight, bias, eps, relu, batch_norm_stats_cpu, batch_norm_apply_cpu);
    bn::update_running_stats(running_mean, running_var, std::get<1>(result), std::get<2>(result), count, momentum);
    return result;
  }
  const at::Tensor w = bn::affine_or(weight, x, "weight", 1.0), b = bn::affine_or(bias, x, "bias", 0.0);
  const auto stats_opts = x.options().dtype(bn::stats_type(x.scalar_type()));
  at::Tensor y = new_output(x.sizes(), x.options(), fmt);
  at::Tensor mean = at::empty({g.C}, stats_opts), var = at::empty({g.C}, stats_opts),
             invstd = at::empty({g.C}, stats_opts);
  const bool mean_here = updatable_in_kernel(running_mean, stats_opts.dtype().toScalarType()),
             var_here = updatable_in_kernel(running_var, stats_opts.dtype().toScalarType());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_train_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    RunningUpdate<opmath_t> running;
    if (mean_here) running.mean = running_mean->mutable_data_ptr<opmath_t>();
    if (var_here) running.var = running_var->mutable_data_ptr<opmath_t>();
    running.momentum = static_cast<opmath_t>(momentum);
    running.unbias = static_cast<opmath_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    if (relu) train_forward_channels<scalar_t, true>(x, y, g, w, b, eps, mean, var, invstd, running);
    else train_forward_channels<scalar_t, false>(x, y, g, w, b, eps, mean, var, invstd, running);
  });
  bn::update_running_stats(mean_here ? c10::nullopt : running_mean, var_here ? c10::nullopt : running_var, mean, var,
                           count, momentum);
  return {y, mean, var, invstd};
}

template <typename scalar_t, bool RELU>
void train_backward_channels(const at::Tensor& gy, const at::Tensor& x, at::Tensor& dx, const Geometry& g,
                             const Coefs& k, const at::Tensor& w, const at::Tensor& invstd, at::Tensor& sum_dy,
                             at::Tensor& sum_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  const opmath_t *A = k.a.const_data_ptr<opmath_t>(), *B = k.b.const_data_ptr<opmath_t>(),
                 *MU = k.mean.const_data_ptr<opmath_t>(), *W = w.const_data_ptr<opmath_t>(),
                 *INV = invstd.const_data_ptr<opmath_t>();
  opmath_t *SDY = sum_dy.mutable_data_ptr<opmath_t>(), *SDYX = sum_dy_xmu.mutable_data_ptr<opmath_t>();
  const int64_t C = g.C, HW = g.HW;
  const opmath_t count = static_cast<opmath_t>(g.N * HW);
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    opmath_t gbuf[kBlock], xbuf[kBlock];
    for (int64_t c = cb; c < ce; ++c) {
      double sdy = 0, sdyx = 0;  // pass 1 (memory): the reduction
      reduce_runs<scalar_t, opmath_t, RELU>(gp + c * HW, xp + c * HW, g.N, C * HW, HW, A[c], B[c], MU[c], gbuf, xbuf,
                                            &sdy, &sdyx);
      SDY[c] = static_cast<opmath_t>(sdy);
      SDYX[c] = static_cast<opmath_t>(sdyx);
      // backward_elemt_cpu's coefficients, in the same order
      const opmath_t k1 = W[c] * INV[c], k2 = -k1 * INV[c] * INV[c] * SDYX[c] / count, k3 = -k1 * SDY[c] / count;
      // pass 2 (cache): dx
      elemt_elems<scalar_t, opmath_t, RELU, false>(gp + c * HW, xp + c * HW, dp + c * HW, g.N, C * HW, HW, A + c,
                                                    B + c, MU + c, &k1, &k2, &k3);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, bool relu) {
  bn::check_input(x_, "x", at::kCPU);
  const auto fmt = bn::layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const at::Tensor gy = grad_like(grad_out, x);
  const Geometry g = geometry_of(x);
  if (!channel_in_cache(x, g, 2))
    return bn::train_backward_two_pass(gy, x, mean, invstd, weight, bias, relu, batch_norm_backward_reduce_cpu,
                                       batch_norm_backward_elemt_cpu);
  const Coefs k = affine_coefs(x, mean, invstd, weight, bias);
  const at::Tensor w = bn::affine_or(weight, x, "weight", 1.0), inv = invstd.contiguous();
  at::Tensor dx = new_output(x.sizes(), x.options(), fmt);
  at::Tensor sum_dy = at::empty({g.C}, mean.options()), sum_dy_xmu = at::empty({g.C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_train_backward_cpu", [&] {
    if (relu) train_backward_channels<scalar_t, true>(gy, x, dx, g, k, w, inv, sum_dy, sum_dy_xmu);
    else train_backward_channels<scalar_t, false>(gy, x, dx, g, k, w, inv, sum_dy, sum_dy_xmu);
  });
  return {dx, sum_dy, sum_dy_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("batch_norm_train_forward", &batch_norm_train_forward_cpu);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
}

}  // namespace fusedcnn
