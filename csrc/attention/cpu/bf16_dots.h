// The AVX512-BF16 products of the CPU flash attention's forward (flash_fwd.cpp), for bf16 inputs with an even head
// dim, in the objects compiled for avx512_bf16 and up (FASTENC_CPU_AVX512_BF16, build_tools/cpu_kernels.py; chosen
// only on CPUs that have it): the Dots policy that replaces Fp32Dots there.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#if defined(FASTENC_CPU_AVX512_BF16)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attention/cpu/micro_kernels.h"
#include "attention/cpu/rotary.h"
#include "attention/cpu/staging.h"
#include "attention/cpu/work.h"

namespace fastenc::cpu::CPU_CAPABILITY {

// bf16 products with AVX512-BF16 (vdpbf16ps: C += a₀b₀ + a₁b₁ on pairs of bf16, fp32 accumulation),
// for bf16 inputs with an even head dim.  Operands are staged as 32-bit pairs along the reduction:
// Qᵀ as [D/2][ld] (pairs of head-dim entries), K as its rows, V as [keys/2][Dv] (pairs of keys),
// P as [keys/2][ld].  q·k is exact before fp32 accumulation (q unscaled, scale applied to the
// sums); P is rounded to bf16 before P V, as torch's bf16 attention does.
inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// C[r][n·16 + l] = scale · Σ_{p<np} A2[r·lda + p] ⋅ Bt2[p·ldb + n·16 + l] (bf16 pair dot products).
template <int NJ, int NI>
inline void abt_tile_bf16(const uint32_t* a, int64_t lda, const uint32_t* bt, int64_t ldb, int64_t np, float scale,
                          float* c, int64_t ldc) {
  __m512 acc[NJ][NI];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < np; ++p) {
    __m512i b[NI];
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) b[n] = _mm512_loadu_si512(bt + p * ldb + n * 16);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NJ; ++r) {
      const __m512bh ar = as_bh(_mm512_set1_epi32(static_cast<int>(a[r * lda + p])));
      FASTENC_UNROLL_ALL
      for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], as_bh(b[n]), ar);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) _mm512_storeu_ps(c + r * ldc + n * 16, _mm512_mul_ps(acc[r][n], sc));
  }
}

// C[r·ldc + v·16 + l] += Σ_{k<nc} W2[k·wc + r] ⋅ R2[k·ldr + v·16 + l] (bf16 pair dot products).
template <int NR, int NV>
inline void acc_tile_bf16(const uint32_t* w, int64_t wc, const uint32_t* rm, int64_t ldr, int64_t nc, float* c,
                          int64_t ldc) {
  __m512 acc[NR][NV];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + v * 16);
  }
  for (int64_t k = 0; k < nc; ++k) {
    __m512i x[NV];
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_si512(rm + k * ldr + v * 16);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NR; ++r) {
      const __m512bh wv = as_bh(_mm512_set1_epi32(static_cast<int>(w[k * wc + r])));
      FASTENC_UNROLL_ALL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], as_bh(x[v]), wv);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
  }
}

template <int NI>
void abt_cols_bf16(const uint32_t* a, int64_t lda, int64_t rows, const uint32_t* bt, int64_t ldb, int64_t np,
                   float scale, float* c, int64_t ldc) {
  constexpr int NJ = tile_rows(NI);
  for (int64_t r = 0; r < rows; r += NJ)
    abt_tile_bf16<NJ, NI>(a + r * lda, lda, bt, ldb, np, scale, c + r * ldc, ldc);
}

template <int NV>
void acc_cols_bf16(const uint32_t* w, int64_t wc, int64_t rows, const uint32_t* rm, int64_t ldr, int64_t nc, float* c,
                   int64_t ldc) {
  constexpr int NR = tile_rows(NV);
  for (int64_t r = 0; r < rows; r += NR) acc_tile_bf16<NR, NV>(w + r, wc, rm, ldr, nc, c + r * ldc, ldc);
}

// The pair (lo, hi) of bf16 bit patterns in one 32-bit word.
inline uint32_t bf16_pair(at::BFloat16 lo, at::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

struct Bf16Dots {
  int64_t D, D2, Dv, DVp;
  float scale = 1.f;
  Rotary rot;
  uint32_t *kb, *vb, *qt, *tmp, *pb;
  float* row;

  Bf16Dots(const Shape& sh, const AttnParams& p)
      : D(sh.D), D2(sh.D / 2), Dv(sh.Dv), DVp(round_up(sh.Dv, 16)), rot(p, sh.D) {}
  int64_t floats(int64_t kp, int64_t bn) const {
    return kp * D2 + kp / 2 * DVp + 2 * D2 * kQC + bn / 2 * kQC + D + 96;
  }
  void carve(Carver& c, int64_t kp, int64_t bn) {
    kb = reinterpret_cast<uint32_t*>(c.take(kp * D2));        // K rows as pairs [kp][D/2]
    vb = reinterpret_cast<uint32_t*>(c.take(kp / 2 * DVp));   // V key pairs [kp/2][DVp]
    qt = reinterpret_cast<uint32_t*>(c.take(D2 * kQC));       // Qᵀ pairs [D/2][ld]
    tmp = reinterpret_cast<uint32_t*>(c.take(D2 * kQC));      // Q rows as pairs [rows][D/2]
    pb = reinterpret_cast<uint32_t*>(c.take(bn / 2 * kQC));   // P key pairs [bn/2][ld]
    row = c.take(D);                                          // one row in fp32, rotated
  }
  // src rotated at pos in fp32, rounded back to bf16 (as torch rotates bf16 tensors), into dst.
  void rotated(const at::BFloat16* src, int64_t pos, at::BFloat16* dst) const {
    load_row(src, row, D, D, 1.f);
    rot.apply(row, pos);
    store_row(row, dst, D, 1.f);
  }
  void stage_kv(const View<const at::BFloat16>& k, const View<const at::BFloat16>& v, const Seq& s, int64_t h,
                int64_t ks, int64_t kall, int64_t kp) {
    for (int64_t j = 0; j < kall; ++j) {
      auto* dst = reinterpret_cast<at::BFloat16*>(kb + j * D2);
      if (rot) {
        rotated(k.row(s.k0 + ks + j, h), ks + j, dst);
      } else {
        std::memcpy(dst, k.row(s.k0 + ks + j, h), D * sizeof(at::BFloat16));
      }
    }
    std::fill(kb + kall * D2, kb + kp * D2, 0u);
    const at::BFloat16 zero(0.f);
    for (int64_t jp = 0; jp < kp / 2; ++jp) {
      const int64_t j = 2 * jp;
      uint32_t* dst = vb + jp * DVp;
      if (j >= kall) {
        std::fill(dst, dst + DVp, 0u);
        continue;
      }
      const at::BFloat16* v0 = v.row(s.k0 + ks + j, h);
      const at::BFloat16* v1 = j + 1 < kall ? v.row(s.k0 + ks + j + 1, h) : nullptr;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = bf16_pair(v0[d], v1 ? v1[d] : zero);
      std::fill(dst + Dv, dst + DVp, 0u);
    }
  }
  void stage_q(const View<const at::BFloat16>& q, const Seq& s, int64_t i0, int64_t h, int64_t rows, int64_t ld,
               float sc) {
    scale = sc;
    for (int64_t i = 0; i < rows; ++i) {
      auto* dst = reinterpret_cast<at::BFloat16*>(tmp + i * D2);
      if (rot) {
        rotated(q.row(s.q0 + i0 + i, h), i0 + i, dst);
      } else {
        std::memcpy(dst, q.row(s.q0 + i0 + i, h), D * sizeof(at::BFloat16));
      }
    }
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(tmp), D2, reinterpret_cast<float*>(qt), ld,
                                  static_cast<int>(rows), static_cast<int>(D2));
    for (int64_t p = 0; p < D2; ++p) std::fill(qt + p * ld + rows, qt + (p + 1) * ld, 0u);
  }
  void scores(int64_t j0, int64_t nj, int64_t nqv, float* st, int64_t ld) const {
    const uint32_t* a = kb + j0 * D2;
    const int64_t rows = round_up(nj, 8);
    for (int64_t n0 = 0; n0 < nqv; n0 += kMaxNI) {
      const uint32_t* b = qt + n0 * 16;
      float* c = st + n0 * 16;
      switch (std::min<int64_t>(kMaxNI, nqv - n0)) {
        case 1: abt_cols_bf16<1>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        case 2: abt_cols_bf16<2>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        case 3: abt_cols_bf16<3>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        default: abt_cols_bf16<4>(a, D2, rows, b, ld, D2, scale, c, ld); break;
      }
    }
  }
  void pv(const float* st, int64_t ld, int64_t rows, int64_t j0, int64_t nj, float* o) const {
    // P to bf16 key pairs: pb[jp][i] = (P[2jp][i], P[2jp+1][i]), a zero key past nj.
    const int64_t np = (nj + 1) / 2, nqv = ld / 16;
    for (int64_t jp = 0; jp < np; ++jp)
      for (int64_t n = 0; n < nqv; ++n) {
        const __m512 p0 = _mm512_loadu_ps(st + 2 * jp * ld + n * 16);
        const __m512 p1 = 2 * jp + 1 < nj ? _mm512_loadu_ps(st + (2 * jp + 1) * ld + n * 16) : _mm512_setzero_ps();
        const __m256bh b0 = _mm512_cvtneps_pbh(p0), b1 = _mm512_cvtneps_pbh(p1);
        const __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b0));
        const __m512i hi = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b1));
        _mm512_storeu_si512(pb + jp * ld + n * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    const uint32_t* r = vb + j0 / 2 * DVp;
    const int64_t nr = round_up(rows, 8);
    for (int64_t v0 = 0; v0 < DVp / 16; v0 += kMaxNV) {
      const uint32_t* rv = r + v0 * 16;
      float* c = o + v0 * 16;
      switch (std::min<int64_t>(kMaxNV, DVp / 16 - v0)) {
        case 1: acc_cols_bf16<1>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 2: acc_cols_bf16<2>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 3: acc_cols_bf16<3>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 4: acc_cols_bf16<4>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 5: acc_cols_bf16<5>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 6: acc_cols_bf16<6>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 7: acc_cols_bf16<7>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        default: acc_cols_bf16<8>(pb, ld, nr, rv, DVp, np, c, DVp); break;
      }
    }
  }
};

}  // namespace fastenc::cpu::CPU_CAPABILITY
#endif
