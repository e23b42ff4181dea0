// Handwritten CUDA passes of the FFN op (what no GEMM library fuses for every case):
//   _ffn_act_fwd_kernel      : h = dropout(act(pre)), pre = x W1ᵀ + b1 from the GEMM
//                              (b1 in cuBLAS's epilogue: one rounding keeps sign(pre) exact);
//   _ffn_dact_bgrad_kernel   : dpre = g · keep/(1-p) · act'(saved), with per-block
//                              column sums of dpre for the b1 gradient (deterministic:
//                              the host adds the [row_blocks, f] partials).
// Memory-bound: VEC elements (16 bytes) per thread and access when f % VEC == 0 and every
// pointer is 16-byte aligned, else VEC = 1.  The activation and dropout math is common/activation.h
// and common/philox.h, shared with the CPU path.  The gated twins: glu_kernels.cuh.  Launchers (one for
// both, per direction) are in act_fwd.cu / act_bwd.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/philox.h"
#include "ffn/ffn.h"

namespace fastenc {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One VEC-element store for the backward kernel: there nvcc splits the plain 16-byte struct
// assignment into 2-byte stores (its SASS showed 8 STG.E.U16 per pack, no STG.E.128), so the
// bits go out through one st.global.v4.b32.  No "memory" clobber, so the next rows' loads may
// still be hoisted above it: each element is read (g, saved) only before its own store, by the
// same thread, even when dpre aliases g.  (The forward's plain assignment compiles to
// STG.E.128 already.)
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    uint32_t w[4];
    memcpy(w, &v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]));
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
  }
}

// keep · scale of VEC consecutive elements starting at flat index i0 (i0 % VEC == 0).
template <int VEC>
__device__ __forceinline__ void keep_scale(uint64_t seed, uint32_t thr, float scale, uint64_t i0, float (&ks)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const uint32_t bits = dropout_keep4(seed, (i0 >> 2) + q, thr);
#pragma unroll
      for (int j = 0; j < 4; ++j) ks[4 * q + j] = ((bits >> j) & 1u) ? scale : 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const uint64_t i = i0 + j;
      ks[j] = ((dropout_keep4(seed, i >> 2, thr) >> (i & 3)) & 1u) ? scale : 0.f;
    }
  }
}

// Grid-stride over the VEC-element chunks of the row-major [rows, f] matrix (f % VEC == 0).
// pre: x W1ᵀ + b1; h: output (may alias pre: in place in inference).
template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(256) _ffn_act_fwd_kernel(const T* pre, T* h, int64_t rows, int64_t f, bool dropout,
                                                           uint64_t seed, uint32_t thr, float scale) {
  const int64_t total = rows * (f / VEC);
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < total; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t off = v * VEC;
    const Pack<T, VEC> x = *reinterpret_cast<const Pack<T, VEC>*>(pre + off);
    float ks[VEC];
    if (dropout) keep_scale<VEC>(seed, thr, scale, static_cast<uint64_t>(off), ks);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float y = ActOp<A>::fwd(static_cast<float>(x.v[j]));
      out.v[j] = static_cast<T>(dropout ? y * ks[j] : y);
    }
    *reinterpret_cast<Pack<T, VEC>*>(h + off) = out;
  }
}

constexpr int kBwdThreadsX = 32;  // threads along columns (each VEC columns)
constexpr int kBwdThreadsY = 8;   // threads along rows
constexpr int kBwdRowsPerBlock = 128;

// Block (kBwdThreadsX, kBwdThreadsY) covers kBwdThreadsX·VEC columns of kBwdRowsPerBlock rows;
// blockIdx.x walks the row blocks (up to 2^31 - 1 of them: gridDim.y would stop at 65535,
// i.e. 8.4M tokens), blockIdx.y the column blocks.
// g: dy W2; saved: pre (or h for relu); dpre: output (may alias g);
// partial: [gridDim.x, f] fp32 column sums of dpre, or null when b1 has no gradient.
template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(kBwdThreadsX* kBwdThreadsY) _ffn_dact_bgrad_kernel(
    const T* g, const T* __restrict__ saved, T* dpre, float* __restrict__ partial, int64_t rows, int64_t f,
    bool dropout, uint64_t seed, uint32_t thr, float scale) {
  const int64_t col = (blockIdx.y * int64_t(kBwdThreadsX) + threadIdx.x) * VEC;
  const int64_t r_end = min(rows, (blockIdx.x + int64_t(1)) * kBwdRowsPerBlock);
  float colsum[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) colsum[j] = 0.f;
  if (col < f) {
    for (int64_t r = blockIdx.x * int64_t(kBwdRowsPerBlock) + threadIdx.y; r < r_end; r += kBwdThreadsY) {
      const int64_t off = r * f + col;
      const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(g + off);
      const Pack<T, VEC> sv = *reinterpret_cast<const Pack<T, VEC>*>(saved + off);
      float ks[VEC];
      if (dropout) keep_scale<VEC>(seed, thr, scale, static_cast<uint64_t>(off), ks);
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float dv = static_cast<float>(gv.v[j]) * ActOp<A>::grad(static_cast<float>(sv.v[j]));
        if (dropout) dv *= ks[j];
        out.v[j] = static_cast<T>(dv);
        colsum[j] += dv;
      }
      store_pack<T, VEC>(dpre + off, out);
    }
  }
  if (partial == nullptr) return;
  // Sum the kBwdThreadsY row-partials of each column in shared memory, fixed order.
  __shared__ float smem[kBwdThreadsY][kBwdThreadsX * VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) smem[threadIdx.y][threadIdx.x * VEC + j] = colsum[j];
  __syncthreads();
  if (threadIdx.y == 0 && col < f) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
#pragma unroll
      for (int y = 0; y < kBwdThreadsY; ++y) s += smem[y][threadIdx.x * VEC + j];
      partial[blockIdx.x * f + col + j] = s;
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Fn>
void dispatch_act_cuda(Act act, Fn&& fn) {
  switch (act) {
    case Act::kReLU: fn(std::integral_constant<Act, Act::kReLU>{}); break;
    case Act::kGelu: fn(std::integral_constant<Act, Act::kGelu>{}); break;
    case Act::kGeluTanh: fn(std::integral_constant<Act, Act::kGeluTanh>{}); break;
    case Act::kGeGLU: fn(std::integral_constant<Act, Act::kGeGLU>{}); break;
    case Act::kSwiGLU: fn(std::integral_constant<Act, Act::kSwiGLU>{}); break;
  }
}

}  // namespace fastenc
