// Entry points of the CUTLASS sm90 FFN GEMMs (one .cu file each; see ffn_sm90_gelu.cuh).
// h = gelu(x W1ᵀ + b1) (erf-GELU); the _aux variant also stores pre = x W1ᵀ + b1.
// bfloat16 only: each instantiation costs ~3 min of nvcc per arch, and the extension build
// must stay under ~8 min on 2 cores; fp16 calls take the unfused path.
#pragma once

#include <ATen/ATen.h>

namespace fastenc {

void sm90_linear_bias_gelu_bf16(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& h);
void sm90_linear_bias_gelu_aux_bf16(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                    const at::Tensor& h, const at::Tensor& pre);

}  // namespace fastenc
