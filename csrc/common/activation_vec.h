// Math<at::vec::Vectorized<float>>: the lane-wise functions activation.h's formulas need, so the CPU passes
// (ffn/cpu/act_dropout.cpp) run the formulas the CUDA kernels run.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "common/activation.h"

namespace fastenc {

using Vec = at::vec::Vectorized<float>;

template <>
struct Math<Vec> {
  static Vec erf(Vec x) { return x.erf(); }
  static Vec exp(Vec x) { return x.exp(); }
  static Vec tanh(Vec x) { return x.tanh(); }
  static Vec relu(Vec x) { return at::vec::maximum(x, Vec(0.f)); }
  static Vec step(Vec x) { return Vec::blendv(Vec(0.f), Vec(1.f), x > Vec(0.f)); }
  static Vec rcp(Vec x) { return Vec(1.f) / x; }
};

}  // namespace fastenc
