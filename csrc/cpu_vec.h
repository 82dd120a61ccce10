// CPU kernels' shared helpers (batchnorm_cpu.cpp, pooling_cpu.cpp): run-time ISA selection for the hot
// loops, and loads/stores of bfloat16/half that vectorize.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedcnn {

// Hot CPU loops are compiled three times -- AVX-512F, AVX2 and baseline x86-64 -- and the dynamic loader
// picks the best one the running CPU has (GCC target_clones: an ifunc per function that tests CPU
// features; not "arch=" clones, which test the CPU model and fell back to baseline on a Xeon newer than
// the named one). The extension is built for baseline x86-64, as torch's wheels are; torch picks its own
// kernels at run time the same way. Put it on free functions holding the loops (a lambda does not inherit
// it); elsewhere (clang, other CPUs, nvcc) it is empty.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FUSEDCNN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSEDCNN_CPU_CLONES
#endif

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
    // NaN stays a quiet NaN. A mask, not a ?: -- GCC turned the select into 16-bit mask shuffles (2x slower).
    const uint32_t nan = 0u - static_cast<uint32_t>(v != v);
    const uint16_t bits = static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// v if keep, else +0, without a branch (whether a tap is the argmax is a coin flip on random data, and a
// mispredicted branch per element made the backward 5x slower); bitwise, so a NaN or inf gradient stays
// exactly where it belongs.
template <typename scalar_t>
inline scalar_t keep_or_zero(bool keep, scalar_t v) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  bits_t u;
  std::memcpy(&u, &v, sizeof(u));
  u &= static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(keep));
  std::memcpy(&v, &u, sizeof(u));
  return v;
}

// take ? yes : no, bitwise (no branch in scalar code either: a mispredicted branch per window made a scalar
// 2x2 max-pool loop ~3x slower).
template <typename scalar_t>
inline scalar_t pick(bool take, scalar_t yes, scalar_t no) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  const bits_t mask = static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(take));
  bits_t y, n;
  std::memcpy(&y, &yes, sizeof(y));
  std::memcpy(&n, &no, sizeof(n));
  const bits_t r = (y & mask) | (n & static_cast<bits_t>(~mask));
  scalar_t out;
  std::memcpy(&out, &r, sizeof(r));
  return out;
}

}  // namespace fusedcnn
