// The fusedcnn dropout stream (docs/ARCHITECTURE.md, "The dropout stream"): Philox4x32-10
// exactly as Triton's tl.rand(seed, offset), usable from host and device code.
//
//   key     (k0, k1)         = low, high 32 bits of the 64-bit seed
//   counter (c0, c1, c2, c3) = (offset low 32 bits, offset >> 32, 0, 0)
//   u = float(x < 0 ? ~x : x) * 0x1.fffffep-32f   (x = output word 0 as int32; float32 throughout)
//
// One Philox call per element and only word 0 is used: the stream is defined
// per element as tl.rand(seed, i); words 1-3 of counter i are no element's
// value, so using them would change the stream (see triton_kernels/dropout.py).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDCNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDCNN_HOST_DEVICE inline
#endif

namespace fusedcnn {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
// 4.6566127342e-10 rounded to float32, as tl.rand's scale: (2**31 - 1) * it < 1.
constexpr float kUniformScale = 0x1.fffffep-32f;

FUSEDCNN_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Output word 0 of Philox4x32-10 with key `seed` at counter (offset lo, offset hi, 0, 0).
FUSEDCNN_HOST_DEVICE uint32_t word0(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mulhi(kRoundB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi(kRoundA, c0) ^ c3 ^ k1;
    c1 = kRoundB * c2;
    c3 = kRoundA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand's int -> float map: a float32 in [0, 1).
FUSEDCNN_HOST_DEVICE float uniform(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  const int32_t magnitude = x < 0 ? ~x : x;  // in [0, 2**31): converts exactly-rounded like Triton's sitofp
  return static_cast<float>(magnitude) * kUniformScale;
}

// The dropout factor of logical element `index`: scale if u(seed, index) > p, else 0.
// p is the dropout probability rounded to float32 (as the Triton kernel receives it).
template <typename acc_t>
FUSEDCNN_HOST_DEVICE acc_t keep_factor(uint64_t seed, int64_t index, float p, acc_t scale) {
  return uniform(word0(seed, static_cast<uint64_t>(index))) > p ? scale : acc_t(0);
}

}  // namespace philox
}  // namespace fusedcnn
