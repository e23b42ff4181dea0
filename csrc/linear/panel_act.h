// The FFN's ungated activations (common/activation.h's formulas, its erf and tanh fits) on the 16 fp32 lanes of a
// panel GEMM epilogue (panel_gemm.cpp): applied to a tile's accumulators before they are stored, so the
// activation costs its arithmetic alone (no pass reading the output back, no bf16 rounding before it).
#pragma once

#include "common/activation.h"
#include "linear/panel_tiles.h"

#if defined(FASTENC_PANEL_X86)
namespace fastenc {
namespace cpu::AVX512::panel {

// 16 fp32 lanes with the operators activation.h's formulas use (a scalar converts to all lanes).
struct Lanes16 {
  __m512 v;
  FASTENC_AVX512 Lanes16(__m512 x) : v(x) {}
  FASTENC_AVX512 Lanes16(float x) : v(_mm512_set1_ps(x)) {}
};
FASTENC_AVX512 inline Lanes16 operator+(Lanes16 a, Lanes16 b) { return _mm512_add_ps(a.v, b.v); }
FASTENC_AVX512 inline Lanes16 operator*(Lanes16 a, Lanes16 b) { return _mm512_mul_ps(a.v, b.v); }
FASTENC_AVX512 inline Lanes16 operator/(Lanes16 a, Lanes16 b) { return _mm512_div_ps(a.v, b.v); }
struct Fma16 {
  FASTENC_AVX512 Lanes16 operator()(Lanes16 a, Lanes16 b, Lanes16 c) const { return _mm512_fmadd_ps(a.v, b.v, c.v); }
};

}  // namespace cpu::AVX512::panel

template <>
struct Math<cpu::AVX512::panel::Lanes16> {
  using L = cpu::AVX512::panel::Lanes16;
  FASTENC_AVX512 static L erf(L x) { return rational<ErfFit>(x); }
  FASTENC_AVX512 static L tanh(L x) { return rational<TanhFit>(x); }
  // max(0, x): a NaN x stays NaN (vmaxps returns its second operand when either is NaN)
  FASTENC_AVX512 static L relu(L x) { return _mm512_max_ps(_mm512_setzero_ps(), x.v); }

 private:
  template <typename Fit>
  FASTENC_AVX512 static L rational(L x) {
    const __m512 c = _mm512_set1_ps(Fit::kClamp);
    return odd_rational<Fit>(L(_mm512_min_ps(_mm512_max_ps(x.v, _mm512_sub_ps(_mm512_setzero_ps(), c)), c)),
                             cpu::AVX512::panel::Fma16{});
  }
};

namespace cpu::AVX512::panel {

// act(y) lane-wise; A ungated.  flatten: ActOp's formula (compiled for any target) and the lanes' AVX-512
// operators all inline here, never a call passing zmm values through baseline code.
template <Act A>
FASTENC_AVX512 __attribute__((flatten)) inline __m512 act16(__m512 y) {
  return ActOp<A, Lanes16>::fwd(Lanes16(y)).v;
}

}  // namespace cpu::AVX512::panel
}  // namespace fastenc
#endif
