// Math<at::vec::Vectorized<float>>: the lane-wise functions activation.h's formulas need, so the CPU passes
// (ffn/cpu/act_dropout.cpp) run the formulas the CUDA kernels run.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/cpu/vec/vec.h>

#include "common/activation.h"

namespace fastenc {

// Vectorized<float> of the capability this file is compiled for (at::vec::CPU_CAPABILITY): one specialisation each.
template <>
struct Math<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  // erf and tanh as x P(x²) / Q(x²) on a clamped x (beyond the clamp both round to ±1 in fp32): rational fits of
  // scripts/fit_rational.py (`erf 5 5 3.92`, `tanh 4 4 7.9`), max abs error 4.4e-7 and 3.5e-7 in fp32 (ATen's
  // at::vec erf and tanh: 3e-8, through Sleef's exp and tanh at 3x and 6x the time of these; the int8
  // quantization of FFN2's input and the activation pass after the fused stack's panel GEMMs spend it).
  static Vec erf(Vec x) {
    static constexpr float kP[] = {1.12837911f, 0.19208926f, 0.0529704243f, 0.00383909116f, 0.000286749011f,
                                   2.0389034e-06f};
    static constexpr float kQ[] = {1.f, 0.503566623f, 0.114804737f, 0.0151139945f, 0.00118088431f, 3.80758902e-05f};
    return odd_rational(at::vec::clamp(x, Vec(-3.92f), Vec(3.92f)), kP, kQ);
  }
  static Vec exp(Vec x) { return x.exp(); }
  static Vec tanh(Vec x) {
    static constexpr float kP[] = {1.f, 0.134444043f, 0.00357163791f, 2.19023841e-05f, 1.52581396e-08f};
    static constexpr float kQ[] = {1.f, 0.467777252f, 0.0261641964f, 0.000341164443f, 8.52993765e-07f};
    return odd_rational(at::vec::clamp(x, Vec(-7.9f), Vec(7.9f)), kP, kQ);
  }
  static Vec relu(Vec x) { return at::vec::maximum(x, Vec(0.f)); }
  static Vec step(Vec x) { return Vec::blendv(Vec(0.f), Vec(1.f), x > Vec(0.f)); }
  static Vec rcp(Vec x) { return Vec(1.f) / x; }

 private:
  template <size_t NP, size_t NQ>
  static Vec odd_rational(const Vec& x, const float (&p)[NP], const float (&q)[NQ]) {
    const Vec z = x * x;
    Vec num(p[NP - 1]), den(q[NQ - 1]);
    for (size_t i = NP - 1; i-- > 0;) num = at::vec::fmadd(num, z, Vec(p[i]));
    for (size_t i = NQ - 1; i-- > 0;) den = at::vec::fmadd(den, z, Vec(q[i]));
    return x * num / den;
  }
};

}  // namespace fastenc
