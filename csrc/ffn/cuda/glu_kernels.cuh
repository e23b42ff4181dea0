// The gated FFN's CUDA passes (geglu, swiglu), the GLU twins of act_kernels.cuh's:
//   _ffn_glu_fwd_kernel        : h = dropout(act(a) · g) for pre [T, 2f] = [a, g] (GEMM1 + b1);
//   _ffn_dglu_bgrad_kernel     : dpre = [dh · g · act'(a), dh · act(a)], dh = gh · keep/(1-p),
//                                with per-block column sums of both halves for the b1 gradient
//                                (deterministic: the host adds the [row_blocks, 2f] partials).
// Memory-bound: VEC elements (16 bytes) per thread and access when f % VEC == 0 and every pointer
// is 16-byte aligned, else VEC = 1.  The math (ActOp, Philox dropout) is common/activation.h and
// common/philox.h, shared with the CPU passes (ffn/cpu/act_dropout.cpp); the dropout mask is the [T, f]
// hidden's, as the ungated op's.  Launched by act_fwd.cu / act_bwd.cu with the ungated kernels.
#pragma once

#include "ffn/cuda/act_kernels.cuh"

namespace fastenc {

// Rows on grid axis y, VEC-element column chunks of the [rows, f] hidden on x (f % VEC == 0), both
// grid-strided: no 64-bit division per element (its out-of-line call made the kernels spill).
template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(256) _ffn_glu_fwd_kernel(const T* __restrict__ pre, T* __restrict__ h, int64_t rows,
                                                           int64_t f, bool dropout, uint64_t seed, uint32_t thr,
                                                           float scale) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * VEC; c < f;
         c += int64_t(gridDim.x) * blockDim.x * VEC) {
      const T* src = pre + r * 2 * f + c;
      const Pack<T, VEC> a = *reinterpret_cast<const Pack<T, VEC>*>(src);
      const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(src + f);
      float ks[VEC];
      if (dropout) keep_scale<VEC>(seed, thr, scale, static_cast<uint64_t>(r * f + c), ks);
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float y = ActOp<A>::fwd(static_cast<float>(a.v[j])) * static_cast<float>(g.v[j]);
        out.v[j] = static_cast<T>(dropout ? y * ks[j] : y);
      }
      *reinterpret_cast<Pack<T, VEC>*>(h + r * f + c) = out;
    }
  }
}

// Block (kBwdThreadsX, kBwdThreadsY) covers kBwdThreadsX·VEC hidden columns of kBwdRowsPerBlock
// rows (blockIdx.x: row blocks, blockIdx.y: column blocks), as _ffn_dact_bgrad_kernel.
// gh: dy W2 [rows, f]; pre, dpre: [rows, 2f]; partial: [gridDim.x, 2f] or null.
template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(kBwdThreadsX* kBwdThreadsY) _ffn_dglu_bgrad_kernel(
    const T* __restrict__ gh, const T* __restrict__ pre, T* __restrict__ dpre, float* __restrict__ partial,
    int64_t rows, int64_t f, bool dropout, uint64_t seed, uint32_t thr, float scale) {
  const int64_t col = (blockIdx.y * int64_t(kBwdThreadsX) + threadIdx.x) * VEC;
  const int64_t r_end = min(rows, (blockIdx.x + int64_t(1)) * kBwdRowsPerBlock);
  float sum_a[VEC], sum_g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum_a[j] = sum_g[j] = 0.f;
  if (col < f) {
    for (int64_t r = blockIdx.x * int64_t(kBwdRowsPerBlock) + threadIdx.y; r < r_end; r += kBwdThreadsY) {
      const int64_t off = r * 2 * f + col;
      const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(gh + r * f + col);
      const Pack<T, VEC> av = *reinterpret_cast<const Pack<T, VEC>*>(pre + off);
      const Pack<T, VEC> bv = *reinterpret_cast<const Pack<T, VEC>*>(pre + off + f);
      float ks[VEC];
      if (dropout) keep_scale<VEC>(seed, thr, scale, static_cast<uint64_t>(r * f + col), ks);
      Pack<T, VEC> da, dg;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dh = dropout ? static_cast<float>(gv.v[j]) * ks[j] : static_cast<float>(gv.v[j]);
        const float a = static_cast<float>(av.v[j]);
        const float d_a = dh * static_cast<float>(bv.v[j]) * ActOp<A>::grad(a);
        const float d_g = dh * ActOp<A>::fwd(a);
        da.v[j] = static_cast<T>(d_a);
        dg.v[j] = static_cast<T>(d_g);
        sum_a[j] += d_a;
        sum_g[j] += d_g;
      }
      store_pack<T, VEC>(dpre + off, da);
      store_pack<T, VEC>(dpre + off + f, dg);
    }
  }
  if (partial == nullptr) return;
  // Sum the kBwdThreadsY row-partials of each column in shared memory, fixed order: a, then g.
  __shared__ float smem[kBwdThreadsY][kBwdThreadsX * VEC];
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) smem[threadIdx.y][threadIdx.x * VEC + j] = half ? sum_g[j] : sum_a[j];
    __syncthreads();
    if (threadIdx.y == 0 && col < f) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float s = 0.f;
#pragma unroll
        for (int y = 0; y < kBwdThreadsY; ++y) s += smem[y][threadIdx.x * VEC + j];
        partial[blockIdx.x * 2 * f + half * f + col + j] = s;
      }
    }
    __syncthreads();
  }
}

}  // namespace fastenc
