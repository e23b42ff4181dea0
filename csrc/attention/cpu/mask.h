// Masks of the CPU flash attention, applied to transposed score blocks st[key][query]: key padding and additive
// (or boolean) masks of any float dtype, causal masking and sliding windows; and the key (query) range a query
// (key) block can see through the window and the causal bound, so that blocks outside are skipped.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "attention/attention.h"
#include "attention/cpu/micro_kernels.h"

namespace fastenc::cpu::CPU_CAPABILITY {

template <typename Fn>
void dispatch_mask(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kBool: fn(bool{}); break;
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "fastenc attention: no kernel for mask dtype ", t);
  }
}

template <typename M>
inline float mask_bias(M m) {
  if constexpr (std::is_same_v<M, bool>) {
    return m ? -kInf : 0.f;
  } else {
    return static_cast<float>(m);
  }
}

// Keys [lo, hi) of a sequence with S keys that some query of [i0, i1) sees through the window and
// the causal bound (lo = hi when none does).
inline std::pair<int64_t, int64_t> key_range(const AttnParams& p, int64_t i0, int64_t i1, int64_t S) {
  const int64_t lo = p.window_left >= 0 ? std::clamp<int64_t>(i0 - p.window_left, 0, S) : 0;
  int64_t hi = S;
  if (p.window_right >= 0) hi = std::min(hi, i1 + p.window_right);
  if (p.causal) hi = std::min(hi, i1);
  return {lo, std::max(lo, hi)};
}

// Queries [lo, hi) of a sequence with L queries that see some key of [j0, j1).
inline std::pair<int64_t, int64_t> query_range(const AttnParams& p, int64_t j0, int64_t j1, int64_t L) {
  int64_t lo = p.causal ? j0 : 0, hi = L;
  if (p.window_right >= 0) lo = std::max(lo, j0 - p.window_right);
  if (p.window_left >= 0) hi = std::min(hi, j1 + p.window_left);
  lo = std::min(lo, L);
  return {lo, std::max(lo, hi)};
}

// Adds key padding, attention mask and causal masking to st[jj][ii] (key j0 + jj, query i0 + ii).
inline void apply_masks(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t nqv, int64_t j0,
                 int64_t nj, float* st, int64_t ld) {
  if (p.key_padding) {
    dispatch_mask(p.key_padding.dtype, [&](auto m_) {
      using M = decltype(m_);
      const M* kp = static_cast<const M*>(p.key_padding.data) + b * p.key_padding.sb;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const float bias = mask_bias(kp[(j0 + jj) * p.key_padding.sj]);
        if (bias == 0.f) continue;
        const Vec bv(bias);
        for (int64_t n = 0; n < nqv; ++n) (Vec::loadu(st + jj * ld + n * kW) + bv).store(st + jj * ld + n * kW);
      }
    });
  }
  if (p.attn_mask) {
    const AttnMask& am = p.attn_mask;
    dispatch_mask(am.dtype, [&](auto m_) {
      using M = decltype(m_);
      const M* base = static_cast<const M*>(am.data) + b * am.sb + h * am.sh + i0 * am.si;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const M* col = base + (j0 + jj) * am.sj;
        float* s = st + jj * ld;
        for (int64_t ii = 0; ii < rows; ++ii) s[ii] += mask_bias(col[ii * am.si]);
      }
    });
  }
  if (p.causal) {  // key j is hidden from query i when j > i
    const Vec ninf(-kInf);
    for (int64_t jj = std::max<int64_t>(0, i0 + 1 - j0); jj < nj; ++jj) {
      const Vec j(static_cast<float>(j0 + jj));
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec i = Vec::arange(static_cast<float>(i0 + n * kW), 1.f);
        float* s = st + jj * ld + n * kW;
        Vec::blendv(Vec::loadu(s), ninf, i < j).store(s);
      }
    }
  }
  if (p.window_left >= 0 || p.window_right >= 0) {  // key j hidden from query i when j < i - left or j > i + right
    const Vec ninf(-kInf);
    const int64_t i_last = i0 + nqv * kW - 1;  // every lane, the padding ones included
    for (int64_t jj = 0; jj < nj; ++jj) {
      const int64_t j = j0 + jj;
      const bool cut_left = p.window_left >= 0 && i_last > j + p.window_left;     // a lane with i > j + left
      const bool cut_right = p.window_right >= 0 && i0 < j - p.window_right;      // a lane with i < j - right
      if (!cut_left && !cut_right) continue;
      const Vec far(static_cast<float>(j + p.window_left)), near(static_cast<float>(j - p.window_right));
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec i = Vec::arange(static_cast<float>(i0 + n * kW), 1.f);
        float* s = st + jj * ld + n * kW;
        Vec x = Vec::loadu(s);
        if (cut_left) x = Vec::blendv(x, ninf, i > far);
        if (cut_right) x = Vec::blendv(x, ninf, i < near);
        x.store(s);
      }
    }
  }
}

}  // namespace fastenc::cpu::CPU_CAPABILITY
