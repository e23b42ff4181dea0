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
  // ErfFit / TanhFit (activation.h; ATen's at::vec erf and tanh: 3e-8, through Sleef's exp and tanh at 3x and 6x
  // the time of these; the int8 quantization of FFN2's input and the FFN's activation passes spend it).
  static Vec erf(Vec x) { return rational<ErfFit>(x); }
  static Vec exp(Vec x) { return x.exp(); }
  static Vec tanh(Vec x) { return rational<TanhFit>(x); }
  static Vec relu(Vec x) { return at::vec::maximum(x, Vec(0.f)); }
  static Vec step(Vec x) { return Vec::blendv(Vec(0.f), Vec(1.f), x > Vec(0.f)); }
  static Vec rcp(Vec x) { return Vec(1.f) / x; }

 private:
  template <typename Fit>
  static Vec rational(Vec x) {
    return odd_rational<Fit>(at::vec::clamp(x, Vec(-Fit::kClamp), Vec(Fit::kClamp)),
                             [](const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); });
  }
};

}  // namespace fastenc
