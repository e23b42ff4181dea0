// One instantiation per file so nvcc compiles them in parallel (see ffn_sm90_gelu.cuh).
#include "ffn/cuda/cutlass/ffn_sm90_gelu.cuh"

namespace fastenc {

using Sm90GeluAuxBf16 = Sm90LinearBiasGelu<cutlass::bfloat16_t, true>;

size_t sm90_linear_bias_gelu_aux_bf16_workspace_size(const Sm90GemmArgs& args) {
  return Sm90GeluAuxBf16::workspace_size(args);
}

Sm90Status sm90_linear_bias_gelu_aux_bf16(const Sm90GemmArgs& args, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  return Sm90GeluAuxBf16::run(args, workspace, workspace_bytes, stream);
}

}  // namespace fastenc
