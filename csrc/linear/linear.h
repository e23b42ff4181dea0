// CPU linear layers through oneDNN: y = act(x wᵀ + b) (+ add), nn.Linear weight layout.
//
// The GEMM runs as a oneDNN inner product with the bias, the activation (erf-GELU, tanh-GELU,
// ReLU) or the add as post-ops: one pass over the output.  It is reached through torch's own
// registered ops mkldnn::_linear_pointwise and mkldnn::_linear_pointwise.binary (what
// torch.compile's CPU freezing path emits), called through the dispatcher, because torch's
// wheels ship oneDNN's headers but not its symbols.  Why: on this AMD Zen 5 build machine torch's
// default fp32 GEMM (MKL sgemm) reaches ~40 GFLOP/s per core and oneDNN ~85-100 (see
// benchmarks/README.md, "CPU GEMMs"); in bf16 both go to oneDNN and the gain is the fused epilogue.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/activation.h"  // Act

namespace fastenc {

// Whether the oneDNN linear ops exist in this torch and run `dtype` on this CPU: float32 always,
// bfloat16 / float16 where torch's own checks pass (mkldnn::_is_mkldnn_bf16_supported /
// _is_mkldnn_fp16_supported: AVX512-BF16 or AMX, AVX512-FP16 or AMX-FP16).
bool onednn_linear_supported(at::ScalarType dtype);

// Whether oneDNN's GEMM is the faster one on weights it has not prepacked (training; per-op inference): where it
// runs `dtype` and the CPU capability in use (run-time dispatch, capped by FASTENC_CPU_CAPABILITY) has AVX-512.
// Measured, a BERT-base training step (2 layers, B=16 x 128, 0% padding) against HF sdpa's ATen (MKL) GEMMs:
// oneDNN 1.24x with AVX-512, 0.90x capped to AVX2, where ATen's GEMMs take it to 1.02x.  The fused inference
// stack keeps oneDNN with prepacked weights at every capability.
bool onednn_unpacked_preferred(at::ScalarType dtype);

// y [M, N] = act(x [M, K] · w [N, K]ᵀ + b [N]) (+ add [M, N]), in x's dtype; act and add exclude each
// other (oneDNN applies the add after the bias).  x and w may be strided views (a transposed x is
// copied to rows by torch's wrapper; w is read through its strides); b and add in x's dtype.
// M > 0 and K > 0 (oneDNN takes no empty reduction); callers route empty problems to ATen.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         std::optional<Act> act, const at::Tensor& add);

}  // namespace fastenc
