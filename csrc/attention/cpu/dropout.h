// Dropout of the CPU flash attention: the keep·scale factors of a block of 4 keys × kW queries, element (b, h, i, j)
// from word j % 4 of philox4x32(seed, {i, j / 4, h, b}) (common/philox.h): the replay attention_dropout_mask
// draws, vectorised across the query lanes with AVX-512.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <cstdint>

#include "attention/attention.h"
#include "attention/cpu/micro_kernels.h"
#include "common/philox.h"

namespace fastenc::cpu::CPU_CAPABILITY {

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold24 = 0;
  float scale = 1.f;
};

inline Dropout make_dropout(const AttnParams& p) {
  Dropout d;
  d.on = p.dropout_p > 0.0;
  d.seed = p.seed;
  d.threshold24 = dropout_threshold24(p.dropout_p);
  d.scale = dropout_scale(p.dropout_p);
  return d;
}

// z[w][l] = keep·scale of element (b, h, i = ib + l, j = j0 + w) for w < 4, l < kW (j0 % 4 == 0):
// word j % 4 of philox4x32(seed, counter {i, j / 4, h, b}) (common/philox.h), so each query lane's call
// covers 4 keys; with AVX-512 the kW calls run in the lanes of four registers.
#if defined(CPU_CAPABILITY_AVX512)
// hi and lo words of the 32x32-bit products a·m, lane-wise (mul_epu32 multiplies the even lanes).
inline void mulhilo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mullo_epi32(a, m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline void dropout_block(const Dropout& dr, int64_t b, int64_t h, int64_t ib, int64_t j0, float (*z)[kW]) {
  static_assert(kW == 16);
  __m512i c[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(ib)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                  _mm512_set1_epi32(static_cast<int>(j0 >> 2)), _mm512_set1_epi32(static_cast<int>(h)),
                  _mm512_set1_epi32(static_cast<int>(b))};
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(dr.seed), k1 = static_cast<uint32_t>(dr.seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c[0], m0, hi0, lo0);
    mulhilo(c[2], m1, hi1, lo1);
    c[0] = _mm512_xor_si512(_mm512_xor_si512(hi1, c[1]), _mm512_set1_epi32(static_cast<int>(k0)));
    c[1] = lo1;
    c[2] = _mm512_xor_si512(_mm512_xor_si512(hi0, c[3]), _mm512_set1_epi32(static_cast<int>(k1)));
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(dr.threshold24));
  const __m512 scale = _mm512_set1_ps(dr.scale);
  for (int w = 0; w < 4; ++w)  // dropout_keep: (word >> 8) >= threshold24
    _mm512_storeu_ps(z[w], _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c[w], 8), thr), scale));
}
#else
inline void dropout_block(const Dropout& dr, int64_t b, int64_t h, int64_t ib, int64_t j0, float (*z)[kW]) {
  for (int l = 0; l < kW; ++l) {
    const U32x4 r = philox4x32(dr.seed, U32x4{{static_cast<uint32_t>(ib + l), static_cast<uint32_t>(j0 >> 2),
                                               static_cast<uint32_t>(h), static_cast<uint32_t>(b)}});
    for (int w = 0; w < 4; ++w) z[w][l] = dropout_keep(r.v[w], dr.threshold24) ? dr.scale : 0.f;
  }
}
#endif

}  // namespace fastenc::cpu::CPU_CAPABILITY
