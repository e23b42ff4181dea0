// A whole stack of encoder layers in inference, on CPU, in one C++ call: the host cost of a
// layer is a few ATen calls, not a Python frame per op (as CTranslate2 and FasterTransformer run
// whole models).  Kernels: the panel GEMM (linear/panel_gemm.h) or oneDNN's (linear/linear.h), the CPU flash attention
// (attention/attention.h), the fused residual + LayerNorm (layer_norm/layer_norm.h), the gated FFN's GLU pass.
//
// The layer is fastenc.layer's LayerSpec + LayerWeights (the Python types every front end fills),
// converted once into an EncoderLayer that the Python weight cache keeps until a weight changes.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <vector>

#include "ffn/ffn.h"
#include "linear/int8_linear.h"
#include "linear/panel_gemm.h"

namespace fastenc::cpu {

// One GEMM of the stack: y = x Wᵀ (+ bias), W in nn.Linear layout [n, k].
struct EncoderLinear {
  at::Tensor weight;  // [n, k]: the source tensor (ATen's GEMM for problems below the oneDNN threshold)
  at::Tensor packed;  // the same weight in oneDNN's blocked layout, when defined (oneDNN GEMMs)
  std::shared_ptr<PanelWeight> panel;  // the same weight in 64-column panels, when set
  int64_t panel_rows = 0;              // the panel GEMM runs up to this many rows, oneDNN's above
  at::Tensor bias;    // [n], or undefined
  std::shared_ptr<Int8Weight> int8;  // when set, the GEMM runs in int8 (linear/int8_linear.h) with bias_f32
  at::Tensor bias_f32;  // bias in fp32 (the int8 and panel GEMMs' epilogues, the LayerNorm's branch bias)
};

// One layer (fastenc.layer.LayerSpec's fields, LayerWeights' tensors); an undefined norm tensor is absent.
struct EncoderLayer {
  int64_t d_model = 0, nhead = 1;
  bool norm_first = false;
  bool attn_norm = true;  // pre-norm: false runs attention on x itself
  Act act = Act::kGelu;   // kGeGLU / kSwiGLU: ffn1 holds [a, g] halves
  double eps1 = 1e-5, eps2 = 1e-5;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded side
  bool rotary = false;                          // tables passed per call (they depend on the length)
  EncoderLinear qkv, out, ffn1, ffn2;
  at::Tensor norm1_weight, norm1_bias, norm2_weight, norm2_bias;  // fp32 copies

  bool gated() const { return act == Act::kGeGLU || act == Act::kSwiGLU; }
};

struct EncoderCall {
  bool causal = false;
  at::Tensor final_weight, final_bias;  // the encoder's final LayerNorm, when either is defined
  double final_eps = 1e-5;
  bool final_norm = false;
  // Per layer: fp32 cos/sin tables [P, D/2] (P >= the longest sequence) for a rotary layer, else undefined.
  std::vector<at::Tensor> rotary_cos, rotary_sin;
  // Whole sequences run in chunks with at most this many elements in the widest intermediate row block (the
  // QKV projection's or FFN1's output; a longer sequence is a chunk of its own); 0: the whole batch at once.
  int64_t chunk_elements = 0;
};

// The most rows the stack runs the panel GEMM for in dtype (oneDNN's GEMM above them; 0: no panel kernel): every
// row count in fp32 and, on a CPU without AMX (where oneDNN's bf16 GEMM runs on the tiles), in bf16.
int64_t encoder_panel_rows(at::ScalarType dtype);

// x [T, d] packed tokens (sequence b = rows cu[b]:cu[b+1], int32 cu_seqlens [B+1], values checked by
// the caller), every tensor on the CPU in x's dtype except LayerNorm parameters, which may be fp32.
// Returns the last layer's output (after the final norm) [T, d]; x is not modified.  Rows of x outside
// every sequence give unspecified rows of the output.
at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<std::shared_ptr<EncoderLayer>>& layers, const EncoderCall& call);

}  // namespace fastenc::cpu
