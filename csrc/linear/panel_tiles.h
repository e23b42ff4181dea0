// What the panel GEMM kernels (int8_linear.cpp, panel_gemm.cpp) share: output panels of 64 columns, tiles of
// up to 6 rows held in 24 zmm accumulators, the epilogue's loads and stores (fp32 or bf16, masked at the
// last panel's edge), and the task loop (one task = a panel x a block of rows, panel-major so that a
// thread's range reuses each weight panel from its cache).  The kernels carry their instruction set in a
// target attribute and run after a cpuid check: these helpers are for such functions only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTENC_PANEL_X86 1
#define FASTENC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#endif

// In namespace AVX512: code of that capability, called only after the capability check (panel_gemm_supported,
// int8_vnni_supported); tests/test_build.py reads the namespace to allow its instructions.
namespace fastenc::cpu::AVX512::panel {

constexpr int64_t kNR = 64;              // output columns per panel: 4 zmm of 16 lanes
constexpr int kMR = 6;                   // rows per tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast
constexpr int64_t kRowsPerTask = 96;     // 16 tiles of rows per task

inline int64_t panels(int64_t n) { return (n + kNR - 1) / kNR; }

#if defined(FASTENC_PANEL_X86)

// 16 values of the output dtype (fp32, or bf16 when bf16) at p, as fp32; lanes outside mask are 0.
FASTENC_AVX512 inline __m512 load16(const void* p, bool bf16, __mmask16 mask) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The lanes of y in mask stored at p as fp32, or as bf16 rounded to nearest even (finite values).
FASTENC_AVX512 inline void store16(void* p, __m512 y, bool bf16, __mmask16 mask) {
  if (!bf16) {
    _mm512_mask_storeu_ps(p, mask, y);
    return;
  }
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(r));
}

inline __mmask16 edge_mask(int64_t n, int64_t c) {
  return n - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - c)) - 1u);
}

// Runs tile(p, r0, rows) over every (panel, rows) of an m x n output, rows <= kMR, in parallel.
template <typename Tile>
void for_each_tile(int64_t m, int64_t n, const Tile& tile) {
  const int64_t np = panels(n), blocks = (m + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, np * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, r_end = std::min(m, (t % blocks + 1) * kRowsPerTask);
      for (int64_t r = (t % blocks) * kRowsPerTask; r < r_end; r += kMR) {
        tile(p, r, static_cast<int>(std::min<int64_t>(kMR, r_end - r)));
      }
    }
  });
}

#endif  // FASTENC_PANEL_X86

}  // namespace fastenc::cpu::AVX512::panel
