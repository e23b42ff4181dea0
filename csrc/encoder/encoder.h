// A whole stack of encoder layers in inference, on CPU, in one C++ call: the host cost of a
// layer is a few ATen calls, not a Python frame per op (as CTranslate2 and FasterTransformer run
// whole models).  Kernels: oneDNN GEMMs with fused epilogues (cpu/linear.h), the CPU flash attention
// (cpu/attention.h), the fused residual + LayerNorm (cpu/layer_norm.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "ffn/ffn.h"

namespace fastenc::cpu {

// One nn.TransformerEncoderLayer's tensors (torch's names); an undefined bias is absent.
struct EncoderLayerWeights {
  at::Tensor in_proj_weight, in_proj_bias;    // [3d, d], [3d]
  at::Tensor out_proj_weight, out_proj_bias;  // [d, d], [d]
  at::Tensor linear1_weight, linear1_bias;    // [f, d], [f]
  at::Tensor linear2_weight, linear2_bias;    // [d, f], [d]
  at::Tensor norm1_weight, norm1_bias, norm2_weight, norm2_bias;  // [d]
  // The four GEMM weights prepacked in oneDNN's blocked layout (cpu_pack_linear_weight), when defined:
  // used by the oneDNN GEMMs (faster for few rows), the plain ones by the small-problem ATen fallback.
  at::Tensor in_proj_packed, out_proj_packed, linear1_packed, linear2_packed;
};

struct EncoderConfig {
  int64_t nhead = 1;
  bool norm_first = false;
  Act act = Act::kGelu;
  double eps = 1e-5;
  bool causal = false;
  at::Tensor final_weight, final_bias;  // the encoder's final LayerNorm, when defined
  double final_eps = 1e-5;
};

// x [T, d] packed tokens (sequence b = rows cu[b]:cu[b+1], int32 cu_seqlens [B+1], values
// checked by the caller), every tensor on the CPU in x's dtype (fp32 / bf16 / fp16) except
// LayerNorm parameters, which may be fp32.  Returns the last layer's output [T, d]; x is not
// modified.  Rows of x outside every sequence give unspecified rows of the output.
at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<EncoderLayerWeights>& layers, const EncoderConfig& cfg);

}  // namespace fastenc::cpu
