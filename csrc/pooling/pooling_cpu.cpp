// Pooling on CPU tensors: x (N, C, H, W) float32|float64|float16|bfloat16, any strides (NCHW and NHWC
// without copies); accumulation in at::opmath_type (float for float16 and bfloat16).
// Geometry, argument checks and the op wrappers: pooling.h.
//
// Forward:  NCHW: one task per (n, c) plane, windows walked per output (tiled windows: a row at a time).
//           NHWC: the innermost loop over the C contiguous channels (vectorizable), so every input byte
//           is read once from memory; tiled windows one task per (n, oh) row of windows, the row in a
//           function cloned per ISA (as the tiled NHWC backward's rows: in the baseline-ISA lambda they
//           ran at 0.8x torch on the small group's pools, cloned 1.1-1.7x); other windows one task per
//           output position.
// Max 2x2/s2 on dense NCHW with even H and W (VGG's pools, torch's default layout): neither of the above, but
//           one flat loop over all N*C*OH rows of windows, forward and backward (max2x2_*_rows below).
// Backward, tiled windows (kernel == stride, no padding or dilation, every window inside the input: VGG's
//           2x2/s2): each input position belongs to at most one window, so grad_in is written once, in one
//           pass — max: the gradient at the argmax (recomputed from x), 0 at the window's other taps; average:
//           grad/divisor everywhere in the window; 0 where no window reaches (the odd last row/column).
// Backward, other windows: scatter, one task per (n, c) plane — or, NHWC, per image — (its writes are its own):
//           grad_in is zeroed, then each output adds its gradient to its window —
//           max: to the argmax, recomputed from x (regular windows) or read from the saved
//           indices (adaptive); average: grad/divisor to every tap inside the input.
//           Overlapping windows (stride < kernel) simply add up.
// Bytes (VGG 2x2/s2 max, float32, per output): forward reads 16 and writes 4 (+8 if indices
// are asked for); backward reads 16 of x and 4 of grad_out, writes 16 of grad_in
// (plus the zeroing pass over grad_in, 16, which stays in cache per plane).
#include "pooling/pooling.h"
#include "cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <limits>
#include <vector>

namespace fusedcnn {
namespace pooling {
namespace {

// Max over window (oh, ow) of one plane with PyTorch's rule: the first maximum in scan
// order, but any NaN wins (the last NaN). Returns the argmax's position ih*ph + iw*pw (ph = W,
// pw = 1: PyTorch's flat index; the backward passes grad_in's strides to scatter without a division).
template <typename scalar_t, typename acc_t>
inline int64_t window_argmax(const scalar_t* xp, int64_t sH, int64_t sW, const Args& a, int64_t oh, int64_t ow,
                             int64_t ph, int64_t pw, acc_t& m) {
  const int64_t hs = a.h.start(oh), he = std::min(a.h.end(oh), a.h.in);
  const int64_t ws = a.w.start(ow), we = std::min(a.w.end(ow), a.w.in);
  int64_t best = -1;
  m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < a.h.taps; ++j) {
    const int64_t ih = hs + j * a.h.dil;
    if (ih >= he) break;
    if (ih < 0) continue;
    for (int64_t k = 0; k < a.w.taps; ++k) {
      const int64_t iw = ws + k * a.w.dil;
      if (iw >= we) break;
      if (iw < 0) continue;
      const acc_t v = static_cast<acc_t>(xp[ih * sH + iw * sW]);
      if (best < 0 || v > m || std::isnan(v)) {
        m = v;
        best = ih * ph + iw * pw;
      }
    }
  }
  return best;
}

template <typename scalar_t, typename acc_t>
inline acc_t window_sum(const scalar_t* xp, int64_t sH, int64_t sW, const Args& a, int64_t oh, int64_t ow) {
  const int64_t hs = std::max<int64_t>(a.h.start(oh), 0), he = std::min(a.h.end(oh), a.h.in);
  const int64_t ws = std::max<int64_t>(a.w.start(ow), 0), we = std::min(a.w.end(ow), a.w.in);
  acc_t s = 0;
  for (int64_t ih = hs; ih < he; ++ih)
    for (int64_t iw = ws; iw < we; ++iw) s += static_cast<acc_t>(xp[ih * sH + iw * sW]);
  return s;
}

template <typename scalar_t>
void forward_nchw(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), planes = x.size(0) * C, OH = a.h.out, OW = a.w.out;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  scalar_t* Y = out.mutable_data_ptr<scalar_t>();
  int64_t* I = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const auto xs = x.strides(), ys = out.strides();
  const int64_t is2 = idx ? idx->stride(2) : 0, is3 = idx ? idx->stride(3) : 0;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, c = p % C;
      const scalar_t* xp = X + n * xs[0] + c * xs[1];
      scalar_t* yp = Y + n * ys[0] + c * ys[1];
      int64_t* ip = I ? I + n * idx->stride(0) + c * idx->stride(1) : nullptr;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          acc_t v;
          if (a.kind == Kind::Max) {
            const int64_t best = window_argmax(xp, xs[2], xs[3], a, oh, ow, a.w.in, 1, v);
            if (ip) ip[oh * is2 + ow * is3] = best;
          } else {
            v = window_sum<scalar_t, acc_t>(xp, xs[2], xs[3], a, oh, ow) / static_cast<acc_t>(divisor_of(a, oh, ow));
          }
          yp[oh * ys[2] + ow * ys[3]] = static_cast<scalar_t>(v);
        }
    }
  });
}

// One output position (n, oh, ow) of an NHWC image, all C channels at once (the innermost,
// vectorizable loops run over the contiguous channels). Xn = &x[n, 0, 0, 0]; xs: x's strides.
// Max: acc = the window max per channel; best (if not null) its position ih*ph + iw*pw, else the
// index bookkeeping is skipped. Average: acc = the window sum.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void window_nhwc(const scalar_t* Xn, at::IntArrayRef xs, const Args& a, int64_t oh, int64_t ow, int64_t C,
                        acc_t* acc, int64_t* best, int64_t ph = 0, int64_t pw = 0) {
  const bool is_max = a.kind == Kind::Max;
  std::fill(acc, acc + C, is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
  if (best) std::fill(best, best + C, int64_t(-1));
  const int64_t hs = a.h.start(oh), he = std::min(a.h.end(oh), a.h.in);
  const int64_t ws = a.w.start(ow), we = std::min(a.w.end(ow), a.w.in);
  for (int64_t j = 0; j < a.h.taps; ++j) {
    const int64_t ih = hs + j * a.h.dil;
    if (ih >= he) break;
    if (ih < 0) continue;
    for (int64_t k = 0; k < a.w.taps; ++k) {
      const int64_t iw = ws + k * a.w.dil;
      if (iw >= we) break;
      if (iw < 0) continue;
      const scalar_t* row = Xn + ih * xs[2] + iw * xs[3];  // C channels, stride 1
      if (!is_max) {
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(row[c]);
      } else if (best == nullptr) {  // NaN sticks: v > NaN and NaN > v are both false
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]);
          acc[c] = (v > acc[c] || v != v) ? v : acc[c];
        }
      } else {
        const int64_t flat = ih * ph + iw * pw;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]);
          const bool take = best[c] < 0 || v > acc[c] || v != v;
          acc[c] = take ? v : acc[c];
          best[c] = take ? flat : best[c];
        }
      }
    }
  }
}

// One NHWC output position, all C channels: the window's max or sum (window_nhwc), scaled and stored to yr
// (scale: 1 for max, 1/divisor for average). Cloned per ISA (cpu_vec.h).
template <typename scalar_t, typename acc_t>
FUSEDCNN_CPU_CLONES void position_nhwc(const scalar_t* Xn, at::IntArrayRef xs, const Args& a, int64_t oh, int64_t ow,
                                       int64_t C, acc_t* acc, int64_t* best, acc_t scale, scalar_t* yr) {
  window_nhwc(Xn, xs, a, oh, ow, C, acc, best, a.w.in, 1);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) yr[c] = narrow<scalar_t>(acc[c] * scale);  // yr: channels contiguous
}

template <typename scalar_t>
void forward_nhwc(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), OH = a.h.out, OW = a.w.out, positions = x.size(0) * OH * OW;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  scalar_t* Y = out.mutable_data_ptr<scalar_t>();
  int64_t* I = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const auto xs = x.strides(), ys = out.strides();
  const bool is_max = a.kind == Kind::Max;
  at::parallel_for(0, positions, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    std::vector<int64_t> best(I ? C : 0);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t ow = q % OW, oh = (q / OW) % OH, n = q / (OW * OH);
      const acc_t scale = is_max ? acc_t(1) : acc_t(1) / static_cast<acc_t>(divisor_of(a, oh, ow));
      position_nhwc(X + n * xs[0], xs, a, oh, ow, C, acc.data(), I ? best.data() : nullptr, scale,
                    Y + n * ys[0] + oh * ys[2] + ow * ys[3]);
      if (I) {
        int64_t* ir = I + n * idx->stride(0) + oh * idx->stride(2) + ow * idx->stride(3);
        for (int64_t c = 0; c < C; ++c) ir[c * idx->stride(1)] = best[c];
      }
    }
  });
}

// NHWC backward: one task per image (its writes are its own), channel vectors throughout.
// D: the acc_t gradient (zeroed), with channels innermost (ds[1] == 1).
template <typename scalar_t, typename acc_t>
void backward_nhwc(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, const Args& a, acc_t* D,
                   at::IntArrayRef ds) {
  const int64_t N = g.size(0), C = g.size(1), OH = a.h.out, OW = a.w.out, W = a.w.in;
  const scalar_t* G = g.const_data_ptr<scalar_t>();
  const auto gs = g.strides();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int64_t> best(C);
    for (int64_t n = begin; n < end; ++n) {
      acc_t* Dn = D + n * ds[0];
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const scalar_t* gr = G + n * gs[0] + oh * gs[2] + ow * gs[3];
          if (a.kind == Kind::Max) {
            if (idx.defined()) {
              const int64_t* ir = idx.const_data_ptr<int64_t>() + n * idx.stride(0) + oh * idx.stride(2) +
                                  ow * idx.stride(3);
              for (int64_t c = 0; c < C; ++c) {  // flat h*W+w -> grad_in position
                const int64_t b = ir[c * idx.stride(1)];
                TORCH_CHECK(b >= 0 && b < a.h.in * W, "pooling backward: index ", b, " out of range");
                best[c] = (b / W) * ds[2] + (b % W) * ds[3];
              }
            } else {  // positions come back in grad_in's strides: no division per element
              window_nhwc(x.const_data_ptr<scalar_t>() + n * x.stride(0), x.strides(), a, oh, ow, C, m.data(),
                          best.data(), ds[2], ds[3]);
            }
            for (int64_t c = 0; c < C; ++c) Dn[best[c] + c] += static_cast<acc_t>(gr[c * gs[1]]);
          } else {
            const acc_t inv = acc_t(1) / static_cast<acc_t>(divisor_of(a, oh, ow));
            for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(gr[c * gs[1]]) * inv;
            const int64_t hs = std::max<int64_t>(a.h.start(oh), 0), he = std::min(a.h.end(oh), a.h.in);
            const int64_t ws = std::max<int64_t>(a.w.start(ow), 0), we = std::min(a.w.end(ow), W);
            for (int64_t ih = hs; ih < he; ++ih)
              for (int64_t iw = ws; iw < we; ++iw) {
                acc_t* dr = Dn + ih * ds[2] + iw * ds[3];
                for (int64_t c = 0; c < C; ++c) dr[c] += m[c];
              }
          }
        }
    }
  });
}

// ------------------------------------------------------------------ tiled backward (one pass)
// Windows tile the input: window (oh, ow) covers [oh*kh, oh*kh + kh) x [ow*kw, ow*kw + kw), all inside.
inline bool tiled(const Args& a) {
  auto tiles = [](const Dim& d) {
    return d.B == 1 && d.pad == 0 && d.dil == 1 && d.A == d.taps && d.out * d.taps <= d.in;
  };
  return tiles(a.h) && tiles(a.w);
}

// Zero grad_in outside the windows: columns [OW*kw, W) of the covered rows, then rows [OH*kh, H).
// P: &grad_in[n, c, 0, 0] (NCHW: per plane, vec = 1) or &grad_in[n, 0, 0, 0] (NHWC: vec = C channels).
template <typename scalar_t>
inline void zero_uncovered(scalar_t* P, int64_t sH, int64_t sW, const Args& a, int64_t vec) {
  const int64_t H = a.h.in, W = a.w.in, h_cov = a.h.out * a.h.taps, w_cov = a.w.out * a.w.taps;
  for (int64_t ih = 0; ih < H; ++ih)
    for (int64_t iw = ih < h_cov ? w_cov : 0; iw < W; ++iw) std::fill(P + ih * sH + iw * sW, P + ih * sH + iw * sW + vec, scalar_t(0));
}

// Offsets of a window's kh*kw taps from its first tap, in a tensor with strides st (tap t = j*kw + k).
inline std::vector<int64_t> tap_offsets(const Args& a, at::IntArrayRef st) {
  std::vector<int64_t> off;
  for (int64_t j = 0; j < a.h.taps; ++j)
    for (int64_t k = 0; k < a.w.taps; ++k) off.push_back(j * st[2] + k * st[3]);
  return off;
}

// One row oh of tiled max windows of a plane: m[ow] = the window max, best[ow] = its tap t = j*kw + k
// (PyTorch's rule: the first maximum, but any NaN wins, the last one). Branch-free updates: on random
// data the comparison is a coin flip, and a branch on it mispredicts half the time (~4x slower).
// xp = &x[n, c, 0, 0]; xs: x's strides; xoff: tap_offsets(a, xs).
template <typename scalar_t, typename acc_t>
inline void row_argmax(const scalar_t* xp, at::IntArrayRef xs, const std::vector<int64_t>& xoff, const Args& a,
                       int64_t oh, acc_t* m, int32_t* best) {
  const int64_t OW = a.w.out, kw = a.w.taps, T = static_cast<int64_t>(xoff.size());
  const scalar_t* xr = xp + oh * a.h.taps * xs[2];
  const int64_t step = kw * xs[3];
  for (int64_t ow = 0; ow < OW; ++ow) {
    m[ow] = static_cast<acc_t>(xr[ow * step]);
    best[ow] = 0;
  }
  for (int32_t t = 1; t < T; ++t) {
    const scalar_t* xt = xr + xoff[t];
    for (int64_t ow = 0; ow < OW; ++ow) {
      const acc_t v = static_cast<acc_t>(xt[ow * step]);
      const bool take = (v > m[ow]) | (v != v);
      m[ow] = take ? v : m[ow];
      best[ow] = take ? t : best[ow];
    }
  }
}

// Tiled max/avg forward for planes that are not NHWC: one task per (n, c) plane, a row of windows at a time.
template <typename scalar_t>
void forward_tiled_nchw(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), OH = a.h.out, OW = a.w.out, kh = a.h.taps, kw = a.w.taps, W = a.w.in;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  scalar_t* Y = out.mutable_data_ptr<scalar_t>();
  int64_t* I = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const auto xs = x.strides(), ys = out.strides();
  const std::vector<int64_t> xoff = tap_offsets(a, xs);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(a.divisor != 0 ? a.divisor : kh * kw);
  at::parallel_for(0, x.size(0) * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(OW);
    std::vector<int32_t> best(OW);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, c = p % C;
      const scalar_t* xp = X + n * xs[0] + c * xs[1];
      scalar_t* yp = Y + n * ys[0] + c * ys[1];
      for (int64_t oh = 0; oh < OH; ++oh) {
        scalar_t* yr = yp + oh * ys[2];
        if (a.kind == Kind::Max) {
          row_argmax(xp, xs, xoff, a, oh, m.data(), best.data());
          for (int64_t ow = 0; ow < OW; ++ow) yr[ow * ys[3]] = narrow<scalar_t>(m[ow]);
          if (I) {  // flat index h*W + w of the argmax
            int64_t* ir = I + n * idx->stride(0) + c * idx->stride(1) + oh * idx->stride(2);
            for (int64_t ow = 0; ow < OW; ++ow)
              ir[ow * idx->stride(3)] = (oh * kh + best[ow] / kw) * W + ow * kw + best[ow] % kw;
          }
        } else {
          const scalar_t* xr = xp + oh * kh * xs[2];
          for (int64_t ow = 0; ow < OW; ++ow) {
            acc_t sum = 0;
            for (int64_t t = 0; t < kh * kw; ++t) sum += static_cast<acc_t>(xr[ow * kw * xs[3] + xoff[t]]);
            yr[ow * ys[3]] = narrow<scalar_t>(sum * inv);
          }
        }
      }
    }
  });
}

// What both tiled backward layouts read: data pointers, strides (x's only for max), the offsets of a
// window's taps in x and grad_in, and average pooling's 1/divisor.
template <typename scalar_t>
struct TiledBackward {
  using acc_t = at::opmath_type<scalar_t>;
  bool is_max;
  const scalar_t* G;
  const scalar_t* X;
  scalar_t* D;
  at::IntArrayRef gs, ds, xs;
  std::vector<int64_t> xoff, doff;
  acc_t inv;

  TiledBackward(const at::Tensor& g, const at::Tensor& x, const Args& a, at::Tensor& grad_in)
      : is_max(a.kind == Kind::Max),
        G(g.const_data_ptr<scalar_t>()),
        X(is_max ? x.const_data_ptr<scalar_t>() : nullptr),
        D(grad_in.mutable_data_ptr<scalar_t>()),
        gs(g.strides()),
        ds(grad_in.strides()),
        xs(is_max ? x.strides() : grad_in.strides()),
        xoff(tap_offsets(a, xs)),
        doff(tap_offsets(a, ds)),
        inv(acc_t(1) / static_cast<acc_t>(a.divisor != 0 ? a.divisor : a.h.taps * a.w.taps)) {}
};

// Tiled backward for planes that are not NHWC: one task per (n, c) plane, a row of windows at a time.
template <typename scalar_t>
void backward_tiled_nchw(const at::Tensor& g, const at::Tensor& x, const Args& a, at::Tensor& grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.size(1), kh = a.h.taps, kw = a.w.taps, OH = a.h.out, OW = a.w.out;
  const TiledBackward<scalar_t> tb(g, x, a, grad_in);
  const bool is_max = tb.is_max;
  const auto &gs = tb.gs, &ds = tb.ds, &xs = tb.xs;
  at::parallel_for(0, g.size(0) * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(OW), gv(OW);  // per window of the row: max, grad_out (average: / divisor)
    std::vector<int32_t> best(OW);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / C, c = p % C;
      const scalar_t* gp = tb.G + n * gs[0] + c * gs[1];
      scalar_t* dp = tb.D + n * ds[0] + c * ds[1];
      for (int64_t oh = 0; oh < OH; ++oh) {
        if (is_max) row_argmax(tb.X + n * xs[0] + c * xs[1], xs, tb.xoff, a, oh, m.data(), best.data());
        for (int64_t ow = 0; ow < OW; ++ow)
          gv[ow] = static_cast<acc_t>(gp[oh * gs[2] + ow * gs[3]]) * (is_max ? acc_t(1) : tb.inv);
        for (int64_t j = 0; j < kh; ++j) {  // input row oh*kh + j, written left to right
          scalar_t* dr = dp + (oh * kh + j) * ds[2];
          for (int64_t ow = 0; ow < OW; ++ow)
            for (int64_t k = 0; k < kw; ++k) {
              const int32_t t = static_cast<int32_t>(j * kw + k);
              dr[(ow * kw + k) * ds[3]] = keep_or_zero(!is_max || best[ow] == t, narrow<scalar_t>(gv[ow]));
            }
        }
      }
      zero_uncovered(dp, ds[2], ds[3], a, 1);
    }
  });
}

// The max of one tiled window over C contiguous channels: m[c], and best[c] = its tap t (PyTorch's rule:
// the first maximum, but any NaN wins, the last one), branch-free. xw = &x[n, 0, h0, w0] (channels
// innermost); xoff: tap_offsets(a, x's strides).
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void window_max_channels(const scalar_t* xw, const std::vector<int64_t>& xoff,
                                                               int64_t C, acc_t* m, int32_t* best) {
  const int32_t T = static_cast<int32_t>(xoff.size());
  for (int64_t c = 0; c < C; ++c) { m[c] = static_cast<acc_t>(xw[c]); best[c] = 0; }
  for (int32_t t = 1; t < T; ++t) {
    const scalar_t* __restrict__ xt = xw + xoff[t];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(xt[c]);
      const bool take = v > m[c] || v != v;
      m[c] = take ? v : m[c];
      best[c] = take ? t : best[c];
    }
  }
}

// One row oh of tiled max/avg windows of an NHWC image, all C channels: xn = &x[n], yn = &out[n], in = &idx[n]
// or null; m, best: C-long scratch. Cloned per ISA (cpu_vec.h): the channel loops are the whole work.
template <typename scalar_t, typename acc_t>
FUSEDCNN_CPU_CLONES void forward_row_nhwc(const scalar_t* xn, scalar_t* yn, int64_t* in, at::IntArrayRef xs,
                                          at::IntArrayRef ys, at::IntArrayRef is, const std::vector<int64_t>& xoff,
                                          const Args& a, int64_t C, int64_t oh, acc_t inv, acc_t* m, int32_t* best) {
  const int64_t OW = a.w.out, kh = a.h.taps, kw = a.w.taps, W = a.w.in;
  const int64_t T = static_cast<int64_t>(xoff.size());
  for (int64_t ow = 0; ow < OW; ++ow) {
    const scalar_t* xw = xn + oh * kh * xs[2] + ow * kw * xs[3];
    scalar_t* __restrict__ yr = yn + oh * ys[2] + ow * ys[3];
    if (a.kind == Kind::Max) {
      window_max_channels(xw, xoff, C, m, best);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = narrow<scalar_t>(m[c]);
      if (in) {  // flat index h*W + w of the argmax
        int64_t* ir = in + oh * is[2] + ow * is[3];
        for (int64_t c = 0; c < C; ++c) ir[c * is[1]] = (oh * kh + best[c] / kw) * W + ow * kw + best[c] % kw;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(xw[c]);
      for (int64_t t = 1; t < T; ++t) {
        const scalar_t* __restrict__ xt = xw + xoff[t];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) m[c] += static_cast<acc_t>(xt[c]);
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = narrow<scalar_t>(m[c] * inv);
    }
  }
}

// Tiled max/avg forward, NHWC (channels innermost in x and out): one task per (n, oh) row of windows.
template <typename scalar_t>
void forward_tiled_nhwc(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), OH = a.h.out;
  const scalar_t* X = x.const_data_ptr<scalar_t>();
  scalar_t* Y = out.mutable_data_ptr<scalar_t>();
  int64_t* I = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const auto xs = x.strides(), ys = out.strides();
  const auto is = idx ? idx->strides() : ys;
  const std::vector<int64_t> xoff = tap_offsets(a, xs);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(a.divisor != 0 ? a.divisor : a.h.taps * a.w.taps);
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int32_t> best(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / OH;
      forward_row_nhwc(X + n * xs[0], Y + n * ys[0], I ? I + n * is[0] : nullptr, xs, ys, is, xoff, a, C, q % OH,
                       inv, m.data(), best.data());
    }
  });
}

// One row oh of tiled windows of an NHWC image, backward: gn = &grad_out[n], xn = &x[n] (max), dn = &grad_in[n];
// m, best: C-long scratch. Cloned per ISA (cpu_vec.h): the channel loops are the whole work.
template <typename scalar_t, typename acc_t>
FUSEDCNN_CPU_CLONES void backward_row_nhwc(const TiledBackward<scalar_t>& tb, const scalar_t* gn, const scalar_t* xn,
                                           scalar_t* dn, const Args& a, int64_t C, int64_t oh, acc_t* m,
                                           int32_t* best) {
  const int64_t kh = a.h.taps, kw = a.w.taps, OW = a.w.out;
  const int32_t T = static_cast<int32_t>(kh * kw);
  const auto &gs = tb.gs, &ds = tb.ds, &xs = tb.xs;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const scalar_t* __restrict__ gr = gn + oh * gs[2] + ow * gs[3];
    scalar_t* dw = dn + oh * kh * ds[2] + ow * kw * ds[3];
    if (tb.is_max) {
      window_max_channels(xn + oh * kh * xs[2] + ow * kw * xs[3], tb.xoff, C, m, best);
      for (int32_t t = 0; t < T; ++t) {
        scalar_t* __restrict__ dr = dw + tb.doff[t];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dr[c] = keep_or_zero(best[c] == t, gr[c]);
      }
    } else {
      for (int32_t t = 0; t < T; ++t) {
        scalar_t* __restrict__ dr = dw + tb.doff[t];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dr[c] = narrow<scalar_t>(static_cast<acc_t>(gr[c]) * tb.inv);
      }
    }
  }
}

// NHWC (channels innermost in x, grad_out and grad_in): one task per (n, oh) row of windows; the
// innermost loops run over the C contiguous channels.
template <typename scalar_t>
void backward_tiled_nhwc(const at::Tensor& g, const at::Tensor& x, const Args& a, at::Tensor& grad_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.size(0), C = g.size(1), OH = a.h.out;
  const TiledBackward<scalar_t> tb(g, x, a, grad_in);
  const auto &gs = tb.gs, &ds = tb.ds, &xs = tb.xs;
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int32_t> best(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / OH;
      backward_row_nhwc(tb, tb.G + n * gs[0], tb.is_max ? tb.X + n * xs[0] : nullptr, tb.D + n * ds[0], a, C, q % OH,
                        m.data(), best.data());
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) zero_uncovered(tb.D + n * ds[0], ds[2], ds[3], a, C);
  });
}

// ------------------------------------------------------------------ 2x2/s2 max windows on dense NCHW
// VGG's max pools: kernel 2, stride 2, no padding or dilation, H = 2*OH and W = 2*OW, every tensor dense NCHW.
// The input is then N*C*OH rows of windows -- two input rows of W values over one output row of OW -- laid end
// to end, so one flat loop runs over all of them whatever the plane size (the per-plane tiled loops above spent
// ~30 ns a plane on VGG's 4x4 and 2x2 planes, and their backward's runtime-tap writes ran at 5-10x torch's).
// A window's four taps a b / c d are compared in scan order, branch-free (PyTorch's rule: the first maximum,
// any NaN wins, the last one): take_b, take_c, take_d say whether that tap replaces the running max.
inline bool max2x2_nchw(const Args& a, std::initializer_list<const at::Tensor*> ts) {
  if (a.kind != Kind::Max || !tiled(a) || a.h.taps != 2 || a.w.taps != 2 || a.h.in != 2 * a.h.out ||
      a.w.in != 2 * a.w.out)
    return false;
  for (const at::Tensor* t : ts)
    if (!t->is_contiguous()) return false;
  return true;
}

// One window a b / c d: whether b, c, d each replaced the running max (scan order), and the max. Bitwise
// (`|`, pick) so that neither the vectorized nor the scalar loop branches on the data.
template <typename acc_t>
struct Max2x2 {
  bool take_b, take_c, take_d;
  acc_t max;
  Max2x2(acc_t a, acc_t b, acc_t c, acc_t d) {
    take_b = (b > a) | (b != b);
    const acc_t m1 = pick(take_b, b, a);
    take_c = (c > m1) | (c != c);
    const acc_t m2 = pick(take_c, c, m1);
    take_d = (d > m2) | (d != d);
    max = pick(take_d, d, m2);
  }
  // Window ow of a row of windows whose top and bottom input rows start at x0 and x1.
  template <typename scalar_t>
  static Max2x2 at(const scalar_t* x0, const scalar_t* x1, int64_t ow) {
    return Max2x2(x0[2 * ow], x0[2 * ow + 1], x1[2 * ow], x1[2 * ow + 1]);
  }
};

// Rows [begin, end) of windows: y (and, if I, the flat index h*W + w of the argmax) from x. OWc: OW as a
// compile-time constant (1, 2), so that the loop over rows vectorizes (a row of 1 or 2 windows is too short
// to); 0: OW at run time, the loop over the row's windows vectorizes. Built for the baseline ISA only (4
// lanes): AVX2/AVX-512 clones left rows of 4-8 windows to their scalar epilogue, 2-6x slower.
template <typename scalar_t, int OWc>
void max2x2_forward_rows(const scalar_t* X, scalar_t* Y, int64_t* I, int64_t OH, int64_t ow_run, int64_t begin,
                         int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OW = OWc ? OWc : ow_run, W = 2 * OW;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict__ x0 = X + r * 2 * W;
    const scalar_t* __restrict__ x1 = x0 + W;
    scalar_t* __restrict__ y = Y + r * OW;
    for (int64_t ow = 0; ow < OW; ++ow)
      y[ow] = narrow<scalar_t>(Max2x2<acc_t>::at(x0, x1, ow).max);
  }
  if (!I) return;
  // the indices in a pass of their own (the rows are in cache): a test inside the loop above kept it scalar
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict__ x0 = X + r * 2 * W;
    const scalar_t* __restrict__ x1 = x0 + W;
    int64_t* __restrict__ ir = I + r * OW;
    const int64_t top = (r % OH) * 2 * W;  // flat index of the window row's first input element
    for (int64_t ow = 0; ow < OW; ++ow) {
      const auto m = Max2x2<acc_t>::at(x0, x1, ow);
      ir[ow] = top + (m.take_c | m.take_d) * W + 2 * ow + (m.take_d | (m.take_b & !m.take_c));
    }
  }
}

// Rows [begin, end) of windows: grad_in = grad_out at each window's argmax (recomputed from x), 0 elsewhere.
template <typename scalar_t, int OWc>
void max2x2_backward_rows(const scalar_t* X, const scalar_t* G, scalar_t* D, int64_t ow_run, int64_t begin,
                          int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OW = OWc ? OWc : ow_run, W = 2 * OW;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict__ x0 = X + r * 2 * W;
    const scalar_t* __restrict__ x1 = x0 + W;
    const scalar_t* __restrict__ g = G + r * OW;
    scalar_t* __restrict__ d0 = D + r * 2 * W;
    scalar_t* __restrict__ d1 = d0 + W;
    for (int64_t ow = 0; ow < OW; ++ow) {
      const auto m = Max2x2<acc_t>::at(x0, x1, ow);
      const scalar_t gv = g[ow];
      d0[2 * ow] = keep_or_zero(!(m.take_b | m.take_c | m.take_d), gv);
      d0[2 * ow + 1] = keep_or_zero(m.take_b & !(m.take_c | m.take_d), gv);
      d1[2 * ow] = keep_or_zero(m.take_c & !m.take_d, gv);
      d1[2 * ow + 1] = keep_or_zero(m.take_d, gv);
    }
  }
}

// fn.template operator()<OWc>(): the row function for this OW (1, 2: compile-time; else run time).
template <typename Fn>
void with_ow(int64_t OW, const Fn& fn) {
  if (OW == 1) fn.template operator()<1>();
  else if (OW == 2) fn.template operator()<2>();
  else fn.template operator()<0>();
}

// Rows per parallel_for task: ~16K input values (a task per row of a 2x2 plane would cost more than its work).
inline int64_t max2x2_grain(const Args& a) { return std::max<int64_t>(1, 16384 / (4 * a.w.out)); }

struct CpuImpl {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;

  static void check_dtype(const at::Tensor& t) {
    const auto d = t.scalar_type();
    TORCH_CHECK(is_kernel_float(d), "fusedcnn pooling (cpp, CPU) supports float32, float64, float16 and bfloat16, "
                "got ", d);
  }

  static void forward(const at::Tensor& x, const Args& a, at::Tensor& out, at::Tensor* idx) {
    // NHWC when the channels are the innermost dense dimension (and there is more than one).
    const bool nhwc = x.size(1) > 1 && x.stride(1) == 1 && out.stride(1) == 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pool2d_forward_cpu", [&] {
      if (!nhwc && max2x2_nchw(a, {&x, &out}) && (!idx || idx->is_contiguous())) {
        const scalar_t* X = x.const_data_ptr<scalar_t>();
        scalar_t* Y = out.mutable_data_ptr<scalar_t>();
        int64_t* I = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
        with_ow(a.w.out, [&]<int OWc>() {
          at::parallel_for(0, x.size(0) * x.size(1) * a.h.out, max2x2_grain(a), [&](int64_t begin, int64_t end) {
            max2x2_forward_rows<scalar_t, OWc>(X, Y, I, a.h.out, a.w.out, begin, end);
          });
        });
      } else if (nhwc && tiled(a)) forward_tiled_nhwc<scalar_t>(x, a, out, idx);
      else if (nhwc) forward_nhwc<scalar_t>(x, a, out, idx);
      else if (tiled(a)) forward_tiled_nchw<scalar_t>(x, a, out, idx);
      else forward_nchw<scalar_t>(x, a, out, idx);
    });
  }

  static void backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& idx, const Args& a,
                       at::Tensor& grad_in) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "pool2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (x.defined() && max2x2_nchw(a, {&g, &x, &grad_in})) {
        const scalar_t* X = x.const_data_ptr<scalar_t>();
        const scalar_t* G = g.const_data_ptr<scalar_t>();
        scalar_t* D = grad_in.mutable_data_ptr<scalar_t>();
        with_ow(a.w.out, [&]<int OWc>() {
          at::parallel_for(0, g.size(0) * g.size(1) * a.h.out, max2x2_grain(a), [&](int64_t begin, int64_t end) {
            max2x2_backward_rows<scalar_t, OWc>(X, G, D, a.w.out, begin, end);
          });
        });
        return;
      }
      if (tiled(a) && (a.kind == Kind::Avg || x.defined())) {  // one pass, no accumulation buffer (adaptive max
                                                                // reads saved indices: the general path)
        const bool nhwc = g.size(1) > 1 && g.stride(1) == 1 && grad_in.stride(1) == 1 &&
                          (!x.defined() || x.stride(1) == 1);
        if (nhwc) backward_tiled_nhwc<scalar_t>(g, x, a, grad_in);
        else backward_tiled_nchw<scalar_t>(g, x, a, grad_in);
        return;
      }
      // Overlapping windows add up: accumulate in acc_t (a float copy for float16 and bfloat16).
      at::Tensor acc = std::is_same<acc_t, scalar_t>::value ? grad_in : at::empty_like(grad_in, grad_in.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc.zero_();
      const int64_t N = g.size(0), C = g.size(1), OH = a.h.out, OW = a.w.out;
      const scalar_t* G = g.const_data_ptr<scalar_t>();
      const scalar_t* X = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
      const int64_t* I = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
      acc_t* D = acc.mutable_data_ptr<acc_t>();
      const auto gs = g.strides(), ds = acc.strides();
      const int64_t W = a.w.in;
      // NHWC with enough images to keep the threads busy: channel vectors, one task per image.
      if (C > 1 && acc.stride(1) == 1 && N >= at::get_num_threads())
        backward_nhwc<scalar_t, acc_t>(g, x, idx, a, D, acc.strides());
      else at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / C, c = p % C;
          const scalar_t* gp = G + n * gs[0] + c * gs[1];
          acc_t* dp = D + n * ds[0] + c * ds[1];
          for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
              const acc_t gv = static_cast<acc_t>(gp[oh * gs[2] + ow * gs[3]]);
              if (a.kind == Kind::Max) {
                int64_t best;
                if (I) {
                  best = I[n * idx.stride(0) + c * idx.stride(1) + oh * idx.stride(2) + ow * idx.stride(3)];
                  TORCH_CHECK(best >= 0 && best < a.h.in * W, "pooling backward: index ", best, " out of range");
                  best = (best / W) * ds[2] + (best % W) * ds[3];
                } else {
                  acc_t m;
                  best = window_argmax(X + n * x.stride(0) + c * x.stride(1), x.stride(2), x.stride(3), a, oh, ow,
                                       ds[2], ds[3], m);
                }
                dp[best] += gv;
              } else {
                const acc_t share = gv / static_cast<acc_t>(divisor_of(a, oh, ow));
                const int64_t hs = std::max<int64_t>(a.h.start(oh), 0), he = std::min(a.h.end(oh), a.h.in);
                const int64_t ws = std::max<int64_t>(a.w.start(ow), 0), we = std::min(a.w.end(ow), W);
                for (int64_t ih = hs; ih < he; ++ih)
                  for (int64_t iw = ws; iw < we; ++iw) dp[ih * ds[2] + iw * ds[3]] += share;
              }
            }
        }
      });
      if (!acc.is_same(grad_in)) grad_in.copy_(acc);
    });
  }
};

}  // namespace
}  // namespace pooling

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  FUSEDCNN_REGISTER_POOLING(m, pooling::CpuImpl);
}

}  // namespace fusedcnn
