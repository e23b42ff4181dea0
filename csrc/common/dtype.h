// The floating dtypes of fastenc's kernels (float32, float16, bfloat16: no double kernels).
#pragma once

#include <ATen/ATen.h>

namespace fastenc {

// Calls fn(T{}) with T = float, at::Half or at::BFloat16 for t; any other dtype is a TypeError (callers
// validate dtypes first, so it names no op).
template <typename Fn>
void dispatch_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "fastenc: no kernel for dtype ", t, " (float32, float16 and bfloat16 only)");
  }
}

}  // namespace fastenc
