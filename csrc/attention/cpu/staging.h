// The CPU flash attention's fp32 staging: rows of q/k/v/dout (fp32, fp16 or bf16) widened into fp32 buffers,
// scaled, or transposed with at::vec's register transposes, outputs rounded back; and the per-thread scratch
// those buffers are carved from (grows to the largest request, then reused: no per-call allocation).
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention/cpu/micro_kernels.h"

namespace fastenc::cpu::CPU_CAPABILITY {

// dst[0, n) = src · mul in fp32, dst[n, npad) = 0.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n, int64_t npad, float mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]) * mul;
  for (int64_t d = n; d < npad; ++d) dst[d] = 0.f;
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n, float mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

// dst[d·ld + i] = src[i·ld_src + d] · mul for i < rows, d < n: a row block staged transposed, with
// at::vec's register transposes (fp32 sources directly; others widened through tmp [rows][n]).
template <typename T>
void load_transposed(const T* src, int64_t ld_src, int64_t rows, int64_t n, float mul, float* tmp, float* dst,
                     int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld, static_cast<int>(rows), static_cast<int>(n));
    if (mul != 1.f) {
      for (int64_t d = 0; d < n; ++d)
        for (int64_t i = 0; i < rows; i += kW) {
          const int64_t c = std::min<int64_t>(kW, rows - i);
          (Vec::loadu(dst + d * ld + i, c) * Vec(mul)).store(dst + d * ld + i, c);
        }
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) load_row(src + i * ld_src, tmp + i * n, n, n, mul);
    at::vec::transpose_mxn<float>(tmp, n, dst, ld, static_cast<int>(rows), static_cast<int>(n));
  }
}

// Per-thread scratch: grows to the largest request seen, then is reused (no per-call allocation).
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n + 16) buf.resize(n + 16);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));  // 64-byte aligned
}

// Carves 64-byte aligned pieces out of one scratch block.
struct Carver {
  float* p;
  float* take(int64_t n) {
    float* r = p;
    p += round_up(n, 16);
    return r;
  }
};

}  // namespace fastenc::cpu::CPU_CAPABILITY
