// Picks the CUTLASS sm90 instantiation: whether pre is kept for backward (bf16 only).
#ifdef FASTENC_WITH_CUTLASS_SM90
#include "cuda/cutlass/ffn_sm90.h"
#include "ffn.h"

namespace fastenc {

void cutlass_sm90_linear_bias_gelu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& h, const at::Tensor& pre) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fastenc ffn: the CUTLASS sm90 GEMM is built for bfloat16 only");
  if (pre.defined()) {
    sm90_linear_bias_gelu_aux_bf16(x, w1, b1, h, pre);
  } else {
    sm90_linear_bias_gelu_bf16(x, w1, b1, h);
  }
}

}  // namespace fastenc
#endif
