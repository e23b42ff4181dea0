// Launchers of the FFN forward pass, h = dropout(act(pre)) or, gated, dropout(act(a) · g), and of the keep-mask
// replay.

#include <algorithm>

#include "ffn/cuda/act_kernels.cuh"
#include "ffn/cuda/glu_kernels.cuh"

namespace fastenc {

namespace {

int grid_for(int64_t work, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, int64_t(sms) * 16)));
}

// Each thread draws one Philox block: the keep bits of 4 consecutive elements.
__global__ void _ffn_dropout_mask_kernel(bool* mask, int64_t n, uint64_t seed, uint32_t thr) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; 4 * b < n; b += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t bits = dropout_keep4(seed, static_cast<uint64_t>(b), thr);
    for (int j = 0; j < 4 && 4 * b + j < n; ++j) mask[4 * b + j] = (bits >> j) & 1u;
  }
}

}  // namespace

void act_dropout_cuda(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  const int64_t rows = h.size(0), f = h.size(1);
  dispatch_dtype(pre.scalar_type(), [&](auto t_) {
    using T = decltype(t_);
    constexpr int kVec = 16 / sizeof(T);
    const T* p = pre.const_data_ptr<T>();
    T* out = h.data_ptr<T>();
    const bool vec = f % kVec == 0 && aligned16(p) && aligned16(out);
    const auto stream = at::cuda::getCurrentCUDAStream();
    constexpr int kThreads = 256;
    dispatch_act_cuda(act, [&](auto a_) {
      constexpr Act A = decltype(a_)::value;
      if constexpr (is_gated(A)) {
        // x: enough blocks for one row's chunks (capped); y: rows, up to ~16 blocks per SM in all.
        const int width = vec ? kVec : 1;
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t gx = std::min<int64_t>((f / width + kThreads - 1) / kThreads, 64);
        const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({rows, int64_t(sms) * 16 / gx + 1, 65535}));
        const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
        if (vec) {
          _ffn_glu_fwd_kernel<T, A, kVec><<<grid, kThreads, 0, stream>>>(p, out, rows, f, dp.enabled, dp.seed,
                                                                          dp.threshold24, dp.scale);
        } else {
          _ffn_glu_fwd_kernel<T, A, 1><<<grid, kThreads, 0, stream>>>(p, out, rows, f, dp.enabled, dp.seed,
                                                                       dp.threshold24, dp.scale);
        }
      } else if (vec) {
        _ffn_act_fwd_kernel<T, A, kVec><<<grid_for(rows * f / kVec, kThreads), kThreads, 0, stream>>>(
            p, out, rows, f, dp.enabled, dp.seed, dp.threshold24, dp.scale);
      } else {
        _ffn_act_fwd_kernel<T, A, 1><<<grid_for(rows * f, kThreads), kThreads, 0, stream>>>(
            p, out, rows, f, dp.enabled, dp.seed, dp.threshold24, dp.scale);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor dropout_keep_mask_cuda(int64_t rows, int64_t cols, const DropoutParams& dp, const at::Device& device) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool).device(device));
  const int64_t n = rows * cols;
  if (n == 0) return mask;
  const c10::cuda::CUDAGuard guard(device);
  _ffn_dropout_mask_kernel<<<grid_for((n + 3) / 4, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), n, dp.seed, dp.threshold24);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace fastenc
