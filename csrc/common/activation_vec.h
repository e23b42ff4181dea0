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
  static Vec erf(Vec x) { return x.erf(); }
  static Vec exp(Vec x) { return x.exp(); }
  static Vec tanh(Vec x) { return x.tanh(); }
  static Vec relu(Vec x) { return at::vec::maximum(x, Vec(0.f)); }
  static Vec step(Vec x) { return Vec::blendv(Vec(0.f), Vec(1.f), x > Vec(0.f)); }
  static Vec rcp(Vec x) { return Vec(1.f) / x; }
};

}  // namespace fastenc
