// One instantiation per file so nvcc compiles them in parallel (see ffn_sm90_gelu.cuh).
#include "cuda/cutlass/ffn_sm90_gelu.cuh"

namespace fastenc {

void sm90_linear_bias_gelu_aux_bf16(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                    const at::Tensor& h, const at::Tensor& pre) {
  Sm90LinearBiasGelu<cutlass::bfloat16_t, true>::run(x, w1, b1, h, pre);
}

}  // namespace fastenc
