// What the panel GEMM kernels (int8_linear.cpp, panel_gemm.cpp) share: output panels of 64 columns, tiles of
// up to 6 rows held in 24 zmm accumulators, the epilogue's loads and stores (fp32 or bf16, masked at the
// last panel's edge), and the task loop (one task = a panel x a block of rows, panel-major so that a
// thread's range reuses each weight panel from its cache; or each thread's own rows, panel after panel).  The
// kernels carry their instruction set in a target attribute and run after a cpuid check: these helpers are for
// such functions only.
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
// int8_kernel); tests/test_build.py reads the namespace to allow its instructions.
namespace fastenc::cpu::AVX512::panel {

constexpr int64_t kNR = 64;              // output columns per panel: 4 zmm of 16 lanes
constexpr int kMR = 6;                   // rows per tile: 6 x 4 accumulators + 4 weight vectors + 1 broadcast
constexpr int64_t kRowsPerTask = 96;     // 16 tiles of rows per task
constexpr int64_t kRowSplitMin = 512;    // rows from which for_each_tile may split the rows across threads
constexpr int64_t kPrefetchMinRows = 24; // rows from which a tile prefetches its share of the next panel

inline int64_t panels(int64_t n) { return (n + kNR - 1) / kNR; }

#if defined(FASTENC_PANEL_X86)

// 16 values of the output dtype (fp32, or bf16 when bf16) at p, as fp32; lanes outside mask are 0.
FASTENC_AVX512 inline __m512 load16(const void* p, bool bf16, __mmask16 mask) {
  if (!bf16) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The lanes of y in mask stored at p as fp32, or as bf16 rounded to nearest even (a NaN stays NaN), on CPUs with
// AVX512-BF16 only (the bf16 panel GEMM; the int8 VNNI GEMM from avx512_bf16, store16_bf16_int below that): the
// rounding is one vcvtneps2bf16 (it reads an fp32 denormal as zero), written as assembly: the functions inlining
// store16 are compiled for AVX-512 alone.  Against the integer rounding it replaced (six instructions per 16
// outputs): the int8 GEMM with its quantization, 600 rows, one thread, K = 384-768: -1 to -2.5%; bf16 level.
FASTENC_AVX512 inline void store16(void* p, __m512 y, bool bf16, __mmask16 mask) {
  if (!bf16) {
    _mm512_mask_storeu_ps(p, mask, y);
    return;
  }
  __m256i h;
  asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(y));
  if (mask == 0xffff) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, mask, h);
  }
}

// The lines of panel p + 1 that the tile of rows [r0, r0 + rows) prefetches into L2, one per k step, while it runs:
// its rows' share of the next panel, whose weights then stream in while this panel's later tiles read theirs from
// L2 (at batch 1 the weights come from memory, and a panel's first tile waited for them).  From kPrefetchMinRows
// (fewer rows are bound by the weight stream itself) to one task's rows (kRowsPerTask: a thread's next task is then
// the next panel).  A k step of a panel is 256 bytes (64 columns of fp32, bf16 pairs or int8 quads): 4 lines.
// Weights from memory, 32 rows: fp32 -4 to -11% on the 8 encoder shapes, bf16 -3 to -7%; at 16 rows +1 to +12%;
// weights in cache: fp32 level, bf16 +1 to +4%; the int8 stack at batch 1 (weights in L3) level to -3%.
struct NextPanel {
  const char* lines = nullptr;
  int64_t count = 0;
};
inline NextPanel next_panel(const void* packed, int64_t n, int64_t k_steps, int64_t p, int64_t m, int64_t r0,
                            int rows) {
  if (m < kPrefetchMinRows || m > kRowsPerTask || p + 1 >= panels(n)) return {};
  const int64_t lines = k_steps * 4, l0 = r0 * lines / m, l1 = (r0 + rows) * lines / m;
  return {static_cast<const char*>(packed) + ((p + 1) * lines + l0) * 64, std::min(l1 - l0, k_steps)};
}

// store16's bf16 rounding in integer operations, for CPUs without AVX512-BF16 (the int8 VNNI GEMM at avx512_vnni):
// round to nearest even on the bits (b + 0x7fff + lsb) >> 16; a NaN stays a quiet NaN of its sign.  It keeps fp32
// denormals, which vcvtneps2bf16 reads as zero.
FASTENC_AVX512 inline void store16_bf16_int(void* p, __m512 y, __mmask16 mask) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(r));
}

inline __mmask16 edge_mask(int64_t n, int64_t c) {
  return n - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - c)) - 1u);
}

// Runs tile(p, r0, rows) over every (panel, rows) of an m x n output, rows <= kMR, in parallel: split across the
// threads by panels (each reads half the weight and every row), or by_rows from kRowSplitMin rows (each reads the
// whole weight, a panel at a time, and only its rows).  By rows, a thread's GEMM reads and writes the rows that
// the row passes on the same thread (the int8 quantization, LayerNorm: at::parallel_for's static halves) wrote
// and will read, so no cache line changes cores; by panels, the next quantization writes lines that the other
// core's GEMM left in its cache, each store waiting for that copy to be given up (a quantization pass ran at 34
// cycles per 16 values against 8: the int8 stack at 4096 rows, MiniLM -7%, BERT-base -3%; fp32 and bf16 level).
template <typename Tile>
void for_each_tile(int64_t m, int64_t n, bool by_rows, const Tile& tile) {
  const int64_t np = panels(n);
  if (by_rows && m >= kRowSplitMin) {
    at::parallel_for(0, (m + kMR - 1) / kMR, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t p = 0; p < np; ++p) {
        for (int64_t i = i0; i < i1; ++i) tile(p, i * kMR, static_cast<int>(std::min<int64_t>(kMR, m - i * kMR)));
      }
    });
    return;
  }
  // A task's rows in the fewest tiles, of balanced heights (32 rows: 6, 6, 5, 5, 5, 5, not 6 x 5 + 2: a 2-row tile
  // loads the panel's weights for a third of the multiply-adds, and ran at half the 6-row tile's rate).
  const int64_t blocks = (m + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, np * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, r_begin = (t % blocks) * kRowsPerTask;
      const int64_t rows = std::min(m, r_begin + kRowsPerTask) - r_begin, tiles = (rows + kMR - 1) / kMR;
      for (int64_t i = 0, r = r_begin; i < tiles; ++i) {
        const int h = static_cast<int>(rows / tiles + (i < rows % tiles));
        tile(p, r, h);
        r += h;
      }
    }
  });
}

#endif  // FASTENC_PANEL_X86

}  // namespace fastenc::cpu::AVX512::panel
