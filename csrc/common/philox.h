// The counter-based dropout RNG of every fastenc kernel (FFN, residual + LayerNorm, attention; CPU and CUDA),
// integers only, so host and device draw the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace fastenc {

// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
// Element i of the [tokens, ffn_dim] hidden matrix (row-major) uses word i % 4 of the
// block philox(seed, i / 4) and is kept when its top 24 bits are >= threshold24 =
// round(p · 2^24): keep probability 1 - p, identical on host and device (integers only).

struct U32x4 {
  uint32_t v[4];
};

FASTENC_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox on a full 128-bit counter (attention keys its dropout by (b, h, i, j) this way).
FASTENC_HD U32x4 philox4x32(uint64_t seed, U32x4 counter) {
  uint32_t c0 = counter.v[0], c1 = counter.v[1], c2 = counter.v[2], c3 = counter.v[3];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
FASTENC_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return U32x4{{c0, c1, c2, c3}};
}

FASTENC_HD U32x4 philox4x32(uint64_t seed, uint64_t counter) {
  return philox4x32(seed, U32x4{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u}});
}

FASTENC_HD bool dropout_keep(uint32_t word, uint32_t threshold24) { return (word >> 8) >= threshold24; }

// keep-mask bits of the 4 elements 4·block .. 4·block+3 (bit j = element 4·block + j).
FASTENC_HD uint32_t dropout_keep4(uint64_t seed, uint64_t block, uint32_t threshold24) {
  const U32x4 r = philox4x32(seed, block);
  uint32_t bits = 0u;
FASTENC_UNROLL
  for (int j = 0; j < 4; ++j) bits |= static_cast<uint32_t>(dropout_keep(r.v[j], threshold24)) << j;
  return bits;
}

inline uint32_t dropout_threshold24(double p) {
  const double t = std::nearbyint(p * 16777216.0);
  return static_cast<uint32_t>(t < 0.0 ? 0.0 : (t > 16777216.0 ? 16777216.0 : t));
}

// Survivors are scaled by 1/(1-p); p = 1 keeps nothing (scale 0, not inf).
inline float dropout_scale(double p) { return p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f; }

}  // namespace fastenc
