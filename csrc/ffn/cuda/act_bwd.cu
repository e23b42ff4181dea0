// Launcher of the FFN backward pass: dpre = g · keep/(1-p) · act'(saved) or, gated (saved = pre = [a, g], g the
// gradient of the hidden), dpre = [dh · g · act'(a), dh · act(a)] with dh = g · keep/(1-p); and db1 = Σ_rows dpre.

#include <limits>

#include "ffn/cuda/act_kernels.cuh"
#include "ffn/cuda/glu_kernels.cuh"

namespace fastenc {

void dact_dropout_bgrad_cuda(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre,
                             const at::Tensor& db1, Act act, const DropoutParams& dp) {
  const int64_t rows = g.size(0), f = g.size(1), width = is_gated(act) ? 2 * f : f;  // dpre's columns
  const int64_t row_blocks = (rows + kBwdRowsPerBlock - 1) / kBwdRowsPerBlock;
  at::Tensor partial = db1.defined() ? at::empty({row_blocks, width}, g.options().dtype(at::kFloat)) : at::Tensor();
  dispatch_dtype(g.scalar_type(), [&](auto t_) {
    using T = decltype(t_);
    constexpr int kVec = 16 / sizeof(T);
    const T* gp = g.const_data_ptr<T>();
    const T* sp = saved.const_data_ptr<T>();
    T* out = dpre.data_ptr<T>();
    float* part = partial.defined() ? partial.data_ptr<float>() : nullptr;
    const bool vec = f % kVec == 0 && aligned16(gp) && aligned16(sp) && aligned16(out);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 block(kBwdThreadsX, kBwdThreadsY);
    const int vec_width = vec ? kVec : 1;
    const int64_t col_blocks = (f / vec_width + kBwdThreadsX - 1) / kBwdThreadsX;
    TORCH_CHECK(col_blocks <= 65535 && row_blocks <= std::numeric_limits<int32_t>::max(), "fastenc ffn: the backward ",
                is_gated(act) ? "GLU" : "activation", " pass takes f <= ", 65535 * kBwdThreadsX * vec_width,
                " and fewer than 2^31 row blocks of ", kBwdRowsPerBlock, " tokens, got f=", f, ", tokens=", rows);
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
    dispatch_act_cuda(act, [&](auto a_) {
      constexpr Act A = decltype(a_)::value;
      if constexpr (is_gated(A)) {
        if (vec) {
          _ffn_dglu_bgrad_kernel<T, A, kVec><<<grid, block, 0, stream>>>(gp, sp, out, part, rows, f, dp.enabled,
                                                                        dp.seed, dp.threshold24, dp.scale);
        } else {
          _ffn_dglu_bgrad_kernel<T, A, 1><<<grid, block, 0, stream>>>(gp, sp, out, part, rows, f, dp.enabled,
                                                                     dp.seed, dp.threshold24, dp.scale);
        }
      } else if (vec) {
        _ffn_dact_bgrad_kernel<T, A, kVec><<<grid, block, 0, stream>>>(gp, sp, out, part, rows, f, dp.enabled,
                                                                      dp.seed, dp.threshold24, dp.scale);
      } else {
        _ffn_dact_bgrad_kernel<T, A, 1><<<grid, block, 0, stream>>>(gp, sp, out, part, rows, f, dp.enabled,
                                                                   dp.seed, dp.threshold24, dp.scale);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (db1.defined()) db1.copy_(partial.sum(0));
}

}  // namespace fastenc
