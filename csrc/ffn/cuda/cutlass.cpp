// ATen wrapper of the torch-free CUTLASS sm90 GEMMs (cutlass/ffn_sm90.h): checks the
// tensors, takes the workspace from the caching allocator, launches on the current stream and
// turns a failed status into a TORCH_CHECK.  Picks the instantiation: whether pre is kept for
// backward (bf16 only).
#ifdef FASTENC_WITH_CUTLASS_SM90
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "ffn/cuda/cutlass/ffn_sm90.h"
#include "ffn/ffn.h"

namespace fastenc {

namespace {

// A 2-D bf16 CUDA matrix whose inner dimension is contiguous (the leading dim may be padded).
void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastenc ffn (CUTLASS sm90): ", name,
              " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.device() == device, "fastenc ffn (CUTLASS sm90): ", name, " is on ", t.device(), ", x on ", device);
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "fastenc ffn (CUTLASS sm90): ", name, " must be bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1 || cols == 1, "fastenc ffn (CUTLASS sm90): ", name,
              " needs a contiguous inner dimension, got strides ", t.strides());
  TORCH_CHECK(t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "fastenc ffn (CUTLASS sm90): ", name, " needs a 16-byte aligned pointer and a leading dim that is a "
              "multiple of 8 (TMA), got leading dim ", t.stride(0));
}

}  // namespace

void cutlass_sm90_linear_bias_gelu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& h, const at::Tensor& pre) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fastenc ffn: the CUTLASS sm90 GEMM is built for bfloat16 only");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && w1.dim() == 2, "fastenc ffn (CUTLASS sm90): x and w1 must be 2-D CUDA "
              "tensors, got ", x.sizes(), " on ", x.device(), " and ", w1.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w1.size(0);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kIntMax && N <= kIntMax && K <= kIntMax, "fastenc ffn (CUTLASS sm90): M=", M, " N=", N, " K=", K,
              " exceed the GEMM's int extents");
  check_matrix(x, "x", M, K, x.device());
  check_matrix(w1, "w1", N, K, x.device());
  check_matrix(h, "h", M, N, x.device());
  if (pre.defined()) check_matrix(pre, "pre", M, N, x.device());
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == N && b1.is_contiguous() && b1.device() == x.device() &&
                  b1.scalar_type() == at::kBFloat16 && reinterpret_cast<uintptr_t>(b1.data_ptr()) % 16 == 0,
              "fastenc ffn (CUTLASS sm90): b1 must be a contiguous, 16-byte aligned bfloat16 [", N,
              "] tensor on x's device, got ", b1.sizes(), " ", b1.scalar_type(), " on ", b1.device());
  if (M == 0 || N == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  Sm90GemmArgs args;
  args.x = x.data_ptr();
  args.w1 = w1.data_ptr();
  args.b1 = b1.data_ptr();
  args.h = h.data_ptr();
  args.pre = pre.defined() ? pre.data_ptr() : nullptr;
  args.ldx = x.stride(0);
  args.ldw = w1.stride(0);
  args.ldh = h.stride(0);
  args.ldpre = pre.defined() ? pre.stride(0) : 0;
  args.M = static_cast<int>(M);
  args.N = static_cast<int>(N);
  args.K = static_cast<int>(K);
  args.device = x.get_device();
  args.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  const size_t ws_bytes = pre.defined() ? sm90_linear_bias_gelu_aux_bf16_workspace_size(args)
                                        : sm90_linear_bias_gelu_bf16_workspace_size(args);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  void* ws = ws_bytes > 0 ? workspace.data_ptr() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Sm90Status st = pre.defined() ? sm90_linear_bias_gelu_aux_bf16(args, ws, ws_bytes, stream)
                                      : sm90_linear_bias_gelu_bf16(args, ws, ws_bytes, stream);
  TORCH_CHECK(st.ok(), "fastenc ffn: CUTLASS sm90 GEMM", pre.defined() ? " (aux)" : "", " failed at ", st.step,
              " for M=", M, " N=", N, " K=", K, ": ", st.detail);
}

}  // namespace fastenc
#endif
