// Dropout on CPU tensors. x: any shape, float32|float64|bfloat16|float16, contiguous or 4-D channels_last.
// out = x * (u(seed, i) > float32(p) ? 1/(1-p) : 0) with i the element's row-major index in the
// logical shape (philox.h); computed in float32 (float64 for float64). The mask is never stored:
// the backward is this same op applied to grad_out with the forward's seed.
#include "dropout/dropout_common.h"
#include "dropout/philox.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace fusedcnn {
namespace {

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  check_dropout_args(x, p, at::kCPU);
  const bool channels_last = dropout_channels_last(x);
  at::Tensor xc = x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor out = new_output(xc.sizes(), xc.options(),
                              channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const uint64_t key = static_cast<uint64_t>(seed);  // two's complement bits, as tl.philox reads the seed
  const float p32 = static_cast<float>(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(dropout_scale(p));
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    auto apply = [&](int64_t mem, int64_t logical) {
      o[mem] = static_cast<scalar_t>(static_cast<acc_t>(in[mem]) * philox::keep_factor<acc_t>(key, logical, p32, scale));
    };
    if (!channels_last) {
      at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) apply(i, i);
      });
    } else {
      // Logical (N, C, S) stored as (N, S, C): rows t = n*S + s of C channels each.
      const int64_t C = xc.size(1), S = xc.size(2) * xc.size(3), rows = n / C;
      at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / S, s = t - b * S;
          for (int64_t c = 0; c < C; ++c) apply(t * C + c, (b * C + c) * S + s);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, CPU, m) {
  m.impl("dropout", &dropout_cpu);
}

}  // namespace fusedcnn
