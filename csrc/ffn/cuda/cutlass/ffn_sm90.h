// Torch-free entry points of the CUTLASS sm90 FFN GEMMs (one .cu file each; see ffn_sm90_gelu.cuh).
//   h[M, N] = gelu(x[M, K] · W1[N, K]ᵀ + b1[N])   (erf-GELU); the _aux variant also stores
//   pre[M, N] = x W1ᵀ + b1 (the pre-activation the backward reads).
// These translation units include only CUDA and CUTLASS headers, so their objects can be
// prebuilt once per nvcc version (scripts/prebuild_cutlass.py) and linked into an extension
// built against any torch; cuda/ffn_cutlass.cpp wraps them for ATen tensors.
// bfloat16 only: each instantiation costs minutes of nvcc; fp16 calls take the unfused path.
// Plain C++ ABI on purpose: POD arguments and results, no std::string, no exceptions.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastenc {

// One GEMM call.  Pointers are device pointers to bfloat16, 16-byte aligned; leading dims
// are in elements (row stride; the inner dimension is contiguous) and multiples of 8.
struct Sm90GemmArgs {
  const void* x = nullptr;  // [M, K], row stride ldx
  const void* w1 = nullptr; // [N, K], row stride ldw (nn.Linear weight)
  const void* b1 = nullptr; // [N], contiguous
  void* h = nullptr;        // [M, N] output, row stride ldh
  void* pre = nullptr;      // [M, N] pre-activation, row stride ldpre (the _aux variant only)
  int64_t ldx = 0, ldw = 0, ldh = 0, ldpre = 0;
  int M = 0, N = 0, K = 0;
  int device = 0;    // CUDA device of the pointers
  int sm_count = 0;  // SMs the persistent kernel may fill; <= 0: queried from the device
};

// Outcome of a call: ok(), or the step that failed and CUDA's / CUTLASS's status string.
struct Sm90Status {
  const char* step = nullptr;    // nullptr on success, else e.g. "can_implement", "initialize", "run"
  const char* detail = nullptr;  // static string (cutlassGetStatusString / cudaGetErrorString)
  bool ok() const { return step == nullptr; }
};

// Bytes of device workspace the call needs (may be 0).  The caller allocates it and passes
// it to the call, which checks workspace_bytes and launches on `stream` without syncing.
size_t sm90_linear_bias_gelu_bf16_workspace_size(const Sm90GemmArgs& args);
Sm90Status sm90_linear_bias_gelu_bf16(const Sm90GemmArgs& args, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream);
size_t sm90_linear_bias_gelu_aux_bf16_workspace_size(const Sm90GemmArgs& args);
Sm90Status sm90_linear_bias_gelu_aux_bf16(const Sm90GemmArgs& args, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream);

}  // namespace fastenc
