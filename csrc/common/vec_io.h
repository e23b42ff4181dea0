// Row I/O of the CPU kernels: fp32 / fp16 / bf16 elements loaded as, and stored from, fp32
// at::vec lanes (width fixed by the capability the kernel file is compiled for), and the dropout
// keep·scale factors of a run of elements drawn with philox.h's scheme (element i uses
// word i % 4 of philox(seed, i / 4)), 16 Philox calls at a time in AVX-512 builds; and the backward
// passes' row loop with its bias-gradient reduction.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/dropout.h"
#include "common/philox.h"

namespace fastenc::cpu::CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

#if defined(CPU_CAPABILITY_AVX512)
// v rounded to bf16, to nearest even as torch rounds (a NaN stays NaN).  In the objects compiled for
// AVX512-BF16 and up, one vcvtneps2bf16 (at::vec's integer rounding is 8 instructions); it reads an fp32 denormal
// input (|v| < 1.2e-38) as zero, where torch keeps a bf16 denormal.
inline __m256i to_bf16(__m512 v) {
#if defined(FASTENC_CPU_AVX512_BF16)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return at::vec::cvtfp32_bf16(v);
#endif
}
#endif

// n <= kW elements at p as fp32 lanes; lanes past n are zero.
template <typename T>
inline Vec load_f32(const T* p, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kW ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // 16 halves in one 256-bit load (at::vec's Vectorized<T> would load and widen 32).
    const __m256i h = n == kW ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
    __m512 f;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      at::vec::cvtbf16_fp32(h, f);
    } else {
      at::vec::cvtfp16_fp32(h, f);
    }
    return f;
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)));
#endif
  }
}

// The first n <= kW lanes of v, rounded to T (to nearest even, as torch), stored at p.
template <typename T>
inline void store_f32(const Vec& v, T* p, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i h = std::is_same_v<T, at::BFloat16> ? to_bf16(__m512(v)) : at::vec::cvtfp32_fp16(__m512(v));
    if (n == kW) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1u), h);
    }
#else
    at::vec::convert_from_float<T>(v, v).store(p, n);
#endif
  }
}

// v rounded to T and back (the value a T store then load would give).
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 f;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      at::vec::cvtbf16_fp32(to_bf16(__m512(v)), f);
    } else {
      at::vec::cvtfp16_fp32(at::vec::cvtfp32_fp16(__m512(v)), f);
    }
    return f;
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
#endif
  }
}

// Σ of the lanes, in a fixed order, accumulated in Acc (double: statistics over a long row, each lane a partial
// fp32 sum).
template <typename Acc = float>
inline Acc sum_lanes(const Vec& v) {
  float t[kW];
  v.store(t);
  Acc s = 0;
  for (int64_t j = 0; j < kW; ++j) s += t[j];
  return s;
}

#if defined(CPU_CAPABILITY_AVX512)
// hi:lo = a · m per 32-bit lane (m a broadcast): even lanes from one 32×32→64 multiply, odd from another.
inline void mulhilo16(__m512i m, __m512i a, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Bit i of x moved to bit 4i (16 bits -> 64).
inline uint64_t spread4(uint64_t x) {
  x = (x | (x << 24)) & 0x000000FF000000FFull;
  x = (x | (x << 12)) & 0x000F000F000F000Full;
  x = (x | (x << 6)) & 0x0303030303030303ull;
  x = (x | (x << 3)) & 0x1111111111111111ull;
  return x;
}

// Keep bits of elements 4·b .. 4·b + 63 (bit j = element 4·b + j): philox4x32 (philox.h) on the 16
// counters b .. b + 15 in the lanes of four AVX-512 registers.
inline uint64_t keep_bits64(const DropoutParams& dp, uint64_t b) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lo32 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b)));
  __m512i c0 = _mm512_add_epi32(lo32, lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo32);  // counter = b + lane as 64 bits
  const __m512i hi32 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b >> 32)));
  __m512i c1 = _mm512_mask_add_epi32(hi32, carry, hi32, _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(dp.seed), k1 = static_cast<uint32_t>(dp.seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(m0, c0, hi0, lo0);
    mulhilo16(m1, c2, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i t = _mm512_set1_epi32(static_cast<int>(dp.threshold24));
  const __m512i words[4] = {c0, c1, c2, c3};
  uint64_t bits = 0;
  for (int w = 0; w < 4; ++w) {  // word w of counter b + lane is element 4·(b + lane) + w
    bits |= spread4(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(words[w], 8), t)) << w;
  }
  return bits;
}
#endif

// out[j] = keep(i0 + j) ? scale : 0 for j < n: the dropout factors of elements i0 .. i0 + n - 1.
inline void dropout_keep_scale(const DropoutParams& dp, uint64_t i0, int64_t n, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const int lead = static_cast<int>(i0 & 3);  // i0's place in its Philox block
  uint64_t b = i0 >> 2;
  uint64_t cur = keep_bits64(dp, b);
  const __m512 scale = _mm512_set1_ps(dp.scale);
  for (int64_t j = 0; j < n; j += 64, b += 16) {
    // Output j .. j + 63 is elements 4b + lead ..: the tail of `cur` and the head of the next 64.
    const uint64_t next = j + 64 - lead < n ? keep_bits64(dp, b + 16) : 0;
    const uint64_t bits = lead ? (cur >> lead) | (next << (64 - lead)) : cur;
    for (int q = 0; q < 4 && j + 16 * q < n; ++q) {
      const int64_t cnt = std::min<int64_t>(16, n - j - 16 * q);
      const __mmask16 keep = static_cast<__mmask16>(bits >> (16 * q));
      _mm512_mask_storeu_ps(out + j + 16 * q, static_cast<__mmask16>((1u << cnt) - 1u),
                            _mm512_maskz_mov_ps(keep, scale));
    }
    cur = next;
  }
#else
  uint64_t block = ~uint64_t(0);
  uint32_t bits = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t i = i0 + j;
    if ((i >> 2) != block) {
      block = i >> 2;
      bits = dropout_keep4(dp.seed, block, dp.threshold24);
    }
    out[j] = ((bits >> (i & 3)) & 1u) ? dp.scale : 0.f;
  }
#endif
}

// The backward passes' row loop with the bias-gradient reduction: rows in fixed chunks of
// kRowsPerChunk (not per thread count, so db1 is bitwise the same on any number of threads), each
// row r given to fn(r, keep, part) with keep its `cols` dropout factors (null without dropout) and
// part its chunk's fp32 partial sums [width] (null when db1 is undefined); db1 = Σ_chunks part.
constexpr int64_t kRowsPerChunk = 128;

template <typename Fn>
void rows_with_bias_grad(int64_t rows, int64_t cols, int64_t width, const DropoutParams& dp, const at::Tensor& db1,
                         Fn&& fn) {
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor partial;
  float* part = nullptr;
  if (db1.defined()) {
    partial = at::zeros({chunks, width}, db1.options().dtype(at::kFloat));
    part = partial.data_ptr<float>();
  }
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> keep(dp.enabled ? cols : 0);
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = k * kRowsPerChunk; r < std::min(rows, (k + 1) * kRowsPerChunk); ++r) {
        if (dp.enabled) dropout_keep_scale(dp, static_cast<uint64_t>(r * cols), cols, keep.data());
        fn(r, dp.enabled ? keep.data() : nullptr, part ? part + k * width : nullptr);
      }
    }
  });
  if (db1.defined()) db1.copy_(partial.sum(0));
}

}  // namespace fastenc::cpu::CPU_CAPABILITY
