// The CPU flash attention's products, on fp32 buffers (flash_fwd.cpp, flash_bwd.cpp): two register-blocked
// micro-kernels with at::vec lanes (width fixed by the capability this file is compiled for),
//   abt: C[r][i] = Σ_d A[r][d] · Bt[d][i]           (scores, dP = dO Vᵀ)
//   acc: C[r][:] += Σ_c W(c, r) · R[c][:]           (P V, dV = Pᵀ dO, dK = dSᵀ Q, dQ = dS K)
// the tile and block sizes of both passes, and the exp of the softmax.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>

#define FASTENC_UNROLL_ALL _Pragma("GCC unroll 16")

namespace fastenc::cpu::CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();
constexpr int kPad = kW > 8 ? kW : 8;   // row padding of the buffers: a multiple of kW and of every tile height
constexpr int kAcc = kW >= 16 ? 16 : 8;  // accumulators per tile (AVX-512 has 32 registers, AVX2 16)
constexpr int kMaxNI = kAcc / 4;         // query vectors per abt tile
constexpr int kMaxNV = kAcc / 2;         // column vectors per acc tile
constexpr int64_t kQC = 128;             // query rows per work item (forward) / chunk (backward)
constexpr int64_t kBN = 128;             // keys per block in the forward
constexpr int64_t kBNb = 64;             // keys per block in the backward
constexpr int64_t kPrefetchRows = 128;   // keys of the next work item prefetched
constexpr float kInf = std::numeric_limits<float>::infinity();
static_assert(kQC % kPad == 0 && kBN % 8 == 0 && kBNb % 8 == 0 && kW % 4 == 0);

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows per tile for nv vectors per row: a power of two <= 8 (so 8-row padding suffices).
constexpr int tile_rows(int nv) {
  const int r = kAcc / nv;
  return r >= 8 ? 8 : r >= 4 ? 4 : r >= 2 ? 2 : 1;
}

// ------------------------------------------------------------------------------- micro-kernels

// C[r][n·kW + l] = Σ_{d<kd} A[r·lda + d] · Bt[d·ldb + n·kW + l] for r < NJ, n < NI.
template <int NJ, int NI>
inline void abt_tile(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t kd, float* c, int64_t ldc) {
  Vec acc[NJ][NI];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n] = Vec(0.f);
  }
  for (int64_t d = 0; d < kd; ++d) {
    Vec b[NI];
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) b[n] = Vec::loadu(bt + d * ldb + n * kW);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NJ; ++r) {
      const Vec ar(a[r * lda + d]);
      FASTENC_UNROLL_ALL
      for (int n = 0; n < NI; ++n) acc[r][n] = at::vec::fmadd(ar, b[n], acc[r][n]);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n].store(c + r * ldc + n * kW);
  }
}

template <int NI>
void abt_cols(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t ldb, int64_t kd, float* c,
              int64_t ldc) {
  constexpr int NJ = tile_rows(NI);
  for (int64_t r = 0; r < rows; r += NJ) abt_tile<NJ, NI>(a + r * lda, lda, bt, ldb, kd, c + r * ldc, ldc);
}

// C[rows][nv·kW] = A[rows][kd] · Bt[kd][nv·kW]; rows a multiple of 8 (A padded to it).
inline void abt(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t ldb, int64_t kd, int64_t nv,
                float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < nv; n0 += kMaxNI) {
    const float* b = bt + n0 * kW;
    float* cc = c + n0 * kW;
    switch (std::min<int64_t>(kMaxNI, nv - n0)) {
      case 1: abt_cols<1>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      case 2: abt_cols<2>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      case 3: abt_cols<3>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      default: abt_cols<4>(a, lda, rows, b, ldb, kd, cc, ldc); break;
    }
  }
}

// C[r·ldc + v·kW + l] += Σ_{c<nc} W[c·wc + r·wr] · R[c·ldr + v·kW + l] for r < NR, v < NV.
template <int NR, int NV>
inline void acc_tile(const float* w, int64_t wc, int64_t wr, const float* rm, int64_t ldr, int64_t nc, float* c,
                     int64_t ldc) {
  Vec acc[NR][NV];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::loadu(c + r * ldc + v * kW);
  }
  for (int64_t k = 0; k < nc; ++k) {
    Vec x[NV];
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) x[v] = Vec::loadu(rm + k * ldr + v * kW);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NR; ++r) {
      const Vec wv(w[k * wc + r * wr]);
      FASTENC_UNROLL_ALL
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(wv, x[v], acc[r][v]);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * kW);
  }
}

template <int NV>
void acc_cols(const float* w, int64_t wc, int64_t wr, int64_t rows, const float* rm, int64_t ldr, int64_t nc, float* c,
              int64_t ldc) {
  constexpr int NR = tile_rows(NV);
  for (int64_t r = 0; r < rows; r += NR) acc_tile<NR, NV>(w + r * wr, wc, wr, rm, ldr, nc, c + r * ldc, ldc);
}

// C[rows][nv·kW] += Wᵀ R with W(c, r) at w[c·wc + r·wr]; rows a multiple of 8.
inline void acc(const float* w, int64_t wc, int64_t wr, int64_t rows, const float* rm, int64_t ldr, int64_t nc,
                int64_t nv, float* c, int64_t ldc) {
  for (int64_t v0 = 0; v0 < nv; v0 += kMaxNV) {
    const float* r = rm + v0 * kW;
    float* cc = c + v0 * kW;
    switch (std::min<int64_t>(kMaxNV, nv - v0)) {
      case 1: acc_cols<1>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 2: acc_cols<2>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 3: acc_cols<3>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 4: acc_cols<4>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 5: acc_cols<5>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 6: acc_cols<6>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 7: acc_cols<7>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      default: acc_cols<8>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) = 2^n e^r: n = round(x / ln 2), r = x - n ln 2 in two steps (Cody-Waite) in [-ln2/2, ln2/2], e^r by a
// degree-5 minimax polynomial, 2^n applied by vscalefps (overflow to inf, gradual underflow): relative error at
// most 1.8e-7 over fp32's normal range, about 3 ulp (scripts/fit_exp.py fits the coefficients; --check measures
// this function against exp in fp64).  x is clamped to [-110, 88.8] first: exp(-inf) and anything below
// -104 are exactly 0 (a fully masked row's P), above 88.73 inf; vmaxps / vminps return their second operand
// when one is NaN, so a NaN stays NaN.  Eleven instructions where ATen's exp_u20 (20 ulp, flushing below -87.3)
// and the NaN blend took about seventeen: attention on 4,096 rows bf16 -7% / -4% at head dim 32 / 64, fp32 -4% / -2%.
inline Vec vexp(Vec xv) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-110.f), xv));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2's high bits: n · them is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417e-06f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.008312525f), r, _mm512_set1_ps(0.041890115f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16667114f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999231f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#else
// 20-ulp exp (as torch's CPU flash attention); exp(-inf) = 0, and a NaN stays NaN (exp_u20 clamps it).
inline Vec vexp(Vec x) { return Vec::blendv(x.exp_u20(), x, x != x); }
#endif

}  // namespace fastenc::cpu::CPU_CAPABILITY
