// Rotary embeddings of the CPU flash attention, applied to fp32-staged rows of q and k (forward) and, inverted,
// to the gradients dq and dk (backward); the tables get no gradient.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <algorithm>
#include <cstdint>

#include "attention/attention.h"
#include "attention/cpu/micro_kernels.h"

namespace fastenc::cpu::CPU_CAPABILITY {

// Rotary embedding of one fp32 row x [2·half] at position pos (HF's rotate_half, (x1, x2) its halves):
//   forward  y1 = x1 c - x2 s,  y2 = x2 c + x1 s;   inverse (Rᵀ, for gradients)  y1 = x1 c + x2 s,  y2 = x2 c - x1 s.
struct Rotary {
  const float *cos = nullptr, *sin = nullptr;
  int64_t st = 0, half = 0;
  Rotary(const AttnParams& p, int64_t D) : cos(p.rot_cos), sin(p.rot_sin), st(p.rot_st), half(D / 2) {}
  explicit operator bool() const { return cos != nullptr; }
  template <bool INVERSE = false>
  void apply(float* x, int64_t pos) const {
    const float* c = cos + pos * st;
    const float* s = sin + pos * st;
    for (int64_t d = 0; d < half; d += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, half - d));
      const Vec x1 = Vec::loadu(x + d, n), x2 = Vec::loadu(x + half + d, n);
      const Vec cv = Vec::loadu(c + d, n), sv = Vec::loadu(s + d, n);
      if constexpr (INVERSE) {
        at::vec::fmadd(x2, sv, x1 * cv).store(x + d, n);
        at::vec::fmsub(x2, cv, x1 * sv).store(x + half + d, n);
      } else {
        at::vec::fmsub(x1, cv, x2 * sv).store(x + d, n);
        at::vec::fmadd(x1, sv, x2 * cv).store(x + half + d, n);
      }
    }
  }
};

}  // namespace fastenc::cpu::CPU_CAPABILITY
