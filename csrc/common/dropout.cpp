// Dropout parameters and the CPU replay of the keep mask (dropout.h).
#include "common/dropout.h"

#include <ATen/Parallel.h>

#include "common/philox.h"

namespace fastenc {

DropoutParams make_dropout(double p, int64_t seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "fastenc ffn: dropout_p must be in [0, 1], got ", p);
  DropoutParams dp;
  dp.enabled = p > 0.0;
  dp.seed = static_cast<uint64_t>(seed);
  dp.threshold24 = dropout_threshold24(p);
  dp.scale = dropout_scale(p);
  return dp;
}

at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, const DropoutParams& dp) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const int64_t n = rows * cols;
  at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint32_t bits = dropout_keep4(dp.seed, static_cast<uint64_t>(b), dp.threshold24);
      for (int64_t j = 0; j < 4 && 4 * b + j < n; ++j) m[4 * b + j] = (bits >> j) & 1u;
    }
  });
  return mask;
}

}  // namespace fastenc
