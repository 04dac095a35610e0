// Counter-based Philox4x32-10 and the value maps built on it, shared by the CPU (.cpp) and CUDA
// (.cu) kernels so both produce the same streams.
//
// Stream layout (one definition for every op):
//   key     = (seed & 0xffffffff, seed >> 32)                 seed in [0, 2^63)
//   counter = (q>>2 low 32 bits, q>>2 high 32 bits, domain, 0) q = stream position in [0, 2^63)
//   element q uses 32-bit word (q & 3) of philox(counter, key).
// Domains separate uses of one seed: kDomainProbe (probe fill), kDomainDropout (LoRA dropout).
//
// Value maps (all exact integer/float arithmetic except the Gaussian's log/sqrt/sin/cos):
//   rademacher: +1 if the word's top bit is 0, else -1
//   uniform:    float32: (w >> 8) * 2^-24 in [0, 1);  float64: w * 2^-32 in [0, 1)
//   gaussian:   Box-Muller on the word pair (w0, w1) or (w2, w3) of the same counter, computed in
//               double: r = sqrt(-2 ln((w_even + 0.5) 2^-32)), angle = 2 pi w_odd 2^-32;
//               element with even q&3 gets r cos(angle), odd gets r sin(angle).
//               CPU (glibc) and CUDA double math differ by at most an ulp of double, so the
//               rounded float32/bf16/fp16 values agree except in rare rounding-boundary cases.
//   dropout:    keep iff word >= threshold(p) = ceil(p * 2^32)  (keep probability 1 - p).
// Known-answer vectors (Random123 kat_vectors) are checked in tests/ext/test_ext_probes.py.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define LORAMBO_HD __host__ __device__ __forceinline__
#else
#define LORAMBO_HD inline
#endif

namespace lorambo {
namespace philox {

constexpr uint32_t kDomainProbe = 0u;
constexpr uint32_t kDomainDropout = 0x4c6f5241u;  // "LoRA"

struct U4 {
  uint32_t x, y, z, w;
};

LORAMBO_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the variant cuRAND and torch's CUDA RNG use.
LORAMBO_HD U4 philox4x32_10(U4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(M0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo(M1, ctr.z, &hi1);
    ctr = U4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// The four words for stream group g = q >> 2 under (seed, domain).
LORAMBO_HD U4 block(uint64_t seed, uint64_t group, uint32_t domain) {
  return philox4x32_10(U4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), domain, 0u},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

LORAMBO_HD uint32_t word(const U4& b, int i) {
  return i == 0 ? b.x : (i == 1 ? b.y : (i == 2 ? b.z : b.w));
}

LORAMBO_HD float rademacher(uint32_t w) { return (w >> 31) ? -1.0f : 1.0f; }

LORAMBO_HD float uniform_f32(uint32_t w) { return static_cast<float>(w >> 8) * 5.9604644775390625e-08f; }

LORAMBO_HD double uniform_f64(uint32_t w) { return static_cast<double>(w) * 2.3283064365386963e-10; }

// Box-Muller in double for the pair (w_even, w_odd); `second` selects the sin branch.
LORAMBO_HD double gaussian(uint32_t w_even, uint32_t w_odd, bool second) {
  const double u1 = (static_cast<double>(w_even) + 0.5) * 2.3283064365386963e-10;  // (0, 1)
  const double angle = 6.283185307179586 * (static_cast<double>(w_odd) * 2.3283064365386963e-10);
  const double r = sqrt(-2.0 * log(u1));
  return second ? r * sin(angle) : r * cos(angle);
}

// Gaussian value of element i (0..3) of a block.
LORAMBO_HD double gaussian_at(const U4& b, int i) {
  return i < 2 ? gaussian(b.x, b.y, i == 1) : gaussian(b.z, b.w, i == 3);
}

// Integer dropout threshold: keep iff word >= threshold. p in [0, 1) gives threshold < 2^32.
inline uint64_t dropout_threshold(double p) {
  const double t = std::ceil(p * 4294967296.0);
  return t <= 0.0 ? 0u : static_cast<uint64_t>(t);
}

enum Distribution : int { kRademacher = 0, kGaussian = 1, kUniform = 2 };

}  // namespace philox
}  // namespace lorambo
