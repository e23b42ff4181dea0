// Dropout of the FFN's hidden and of the residual + LayerNorm's branch: element i of a row-major
// [rows, cols] matrix is kept when word i % 4 of philox4x32(seed, i / 4) has its top 24 bits >=
// round(p · 2^24) (philox.h), and survivors are scaled by 1 / (1 - p).  Kernels take the parameters;
// dropout_keep_mask_cpu replays the mask for tests and for the reference.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastenc {

struct DropoutParams {
  bool enabled = false;      // p > 0
  uint64_t seed = 0;         // Philox key
  uint32_t threshold24 = 0;  // keep an element when its 24 random bits are >= this
  float scale = 1.f;         // 1 / (1 - p) (0 when p = 1)
};
// ValueError unless 0 <= p <= 1.
DropoutParams make_dropout(double p, int64_t seed);

// The keep mask (bool [rows, cols]) the CPU and CUDA kernels draw for this seed and p.
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, const DropoutParams& dp);

}  // namespace fastenc
