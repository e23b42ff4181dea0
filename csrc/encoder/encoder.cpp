// Encoder stack inference on CPU (see encoder.h).  Per layer, on packed rows x [T, d]:
//   post-norm:  x = LN1(x + (attn(x W_qkvᵀ + b_qkv) W_outᵀ + b_out));  x = LN2(x + FFN(x))
//   pre-norm:   s = x + attn(LN1(x) ...) W_outᵀ + b_out;  x = s + FFN(LN2(s))   (LN1 skipped without attn_norm)
// with FFN(h) = act(h W1ᵀ + b1) W2ᵀ + b2, or for gated activations act(a) · g with [a, g] = h W1ᵀ + b1.
// GEMMs are oneDNN inner products (linear/linear.h: about 2x MKL's fp32 GEMM on AMD) with their epilogue
// fused: b_qkv; b1 and an ungated activation; b2 (and, pre-norm, the residual add); or, for the GEMMs a
// layer holds in int8, the int8 kernel (linear/int8_linear.h) on activations quantized per token, with the
// bias and residual in its epilogue and the FFN's activation in the quantization of GEMM2's input (which also
// gathers GEMM2's input channels kept in float; the kernel's epilogue adds their products).  q, k and v are
// strided views of the QKV projection (no copies); attention applies the window and the rotary embeddings; the
// out-projection bias is added inside the residual + LayerNorm pass; the attention output and the
// LayerNorm outputs reuse two buffers allocated once per call.  A large batch runs in chunks of whole sequences
// (EncoderCall::chunk_elements): every op but attention is row by row, attention sequence by sequence.  Small GEMMs (below constants::kOnednnMinMacs
// multiply-adds, where oneDNN's per-call cost dominates) run ATen's GEMM and the vectorised activation
// pass instead.
#include "encoder/encoder.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "attention/attention.h"
#include "fastenc_constants.h"
#include "layer_norm/layer_norm.h"
#include "linear/linear.h"

namespace fastenc::cpu {
namespace {

// Rows up to which the panel GEMM (linear/panel_gemm.h) beats oneDNN's inner product on prepacked weights
// (a single request's tokens, small batches): at 32, 64 and 128 rows on 15 of 16 encoder shapes in fp32 and
// all 16 in bf16, level at 4096 (scripts/cpu_gemm_bench.py, benchmarks/README.md "CPU GEMMs").
constexpr int64_t kPanelMaxRows = 128;

// act(a Wᵀ + bias) (+ add); act and add exclude each other.  An int8 GEMM quantizes a per row first.
at::Tensor linear(const at::Tensor& a, const EncoderLinear& lin, std::optional<Act> act, const at::Tensor& add) {
  if (lin.int8) {
    at::Tensor y = int8_linear(quantize_rows(a, std::nullopt, lin.int8->smooth, lin.int8->float_channels),
                               *lin.int8, lin.bias_f32, add, a.scalar_type());
    if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
    return y;
  }
  const int64_t M = a.size(0), K = a.size(1), N = lin.weight.size(0);
  if (lin.panel && M <= kPanelMaxRows) {
    at::Tensor y = panel_gemm(a, *lin.panel, lin.bias_f32, add);  // fp32: no conversion per call
    if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
    return y;
  }
  if (M > 0 && K > 0 && M * N * K >= constants::kOnednnMinMacs && onednn_linear_supported(a.scalar_type())) {
    return onednn_linear(a, lin.packed.defined() ? lin.packed : lin.weight,
                         lin.bias.defined() ? std::optional<at::Tensor>(lin.bias) : std::nullopt, act, add);
  }
  at::Tensor y = lin.bias.defined() ? at::addmm(lin.bias, a, lin.weight.t()) : at::mm(a, lin.weight.t());
  if (add.defined()) y.add_(add);
  if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
  return y;
}

// FFN(h) (+ add): act(h W1ᵀ + b1) W2ᵀ + b2, the gated act(a) · g with [a, g] = h W1ᵀ + b1.  An int8 W2
// quantizes GEMM1's output after applying the activation, in one pass; otherwise the activation is fused
// into GEMM1's epilogue (oneDNN) or its own pass (ATen's GEMM, int8, the GLU).
at::Tensor ffn(const at::Tensor& h, const EncoderLayer& w, const at::Tensor& add) {
  if (w.ffn2.int8) {
    const at::Tensor pre = linear(h, w.ffn1, std::nullopt, at::Tensor());
    return int8_linear(quantize_rows(pre, w.act, w.ffn2.int8->smooth, w.ffn2.int8->float_channels), *w.ffn2.int8,
                       w.ffn2.bias_f32, add, h.scalar_type());
  }
  at::Tensor hidden;
  if (!w.gated()) {
    hidden = linear(h, w.ffn1, w.act, at::Tensor());
  } else {
    const at::Tensor pre = linear(h, w.ffn1, std::nullopt, at::Tensor());
    hidden = at::empty({pre.size(0), pre.size(1) / 2}, pre.options());
    act_dropout_cpu(pre, hidden, w.act, DropoutParams{});
  }
  return linear(hidden, w.ffn2, std::nullopt, add);
}

// y = LN(x + branch + branch_bias) (branch optional); s = x + branch + branch_bias when defined.
void add_norm(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& branch_bias, const at::Tensor& w,
              const at::Tensor& b, double eps, const at::Tensor& y, const at::Tensor& s) {
  residual_layer_norm_fwd_out(x, branch, w, b, branch.defined() ? branch_bias : at::Tensor(), eps, DropoutParams{},
                              y, s, at::Tensor(), at::Tensor());
}

// The stack on rows x [T, d] holding the sequences of cu_seqlens, all at once.
at::Tensor forward_rows(const at::Tensor& x, const at::Tensor& cu_seqlens,
                        const std::vector<std::shared_ptr<EncoderLayer>>& layers, const EncoderCall& call) {
  const int64_t T = x.size(0), d = x.size(1);
  const auto opts = x.options();
  if (T == 0) return at::empty({0, d}, opts);
  // The attention output and two LayerNorm outputs are reused by every layer (the residual stream
  // alternates between the two norm buffers; x itself is never written).
  at::Tensor attn = at::empty({T, d}, opts);
  at::Tensor bufs[2] = {at::empty({T, d}, opts), at::empty({T, d}, opts)};

  at::Tensor cur = x;
  int next = 0;
  auto take = [&]() { at::Tensor t = bufs[next]; next ^= 1; return t; };
  for (size_t i = 0; i < layers.size(); ++i) {
    const EncoderLayer& w = *layers[i];
    const int64_t H = w.nhead, D = d / H;
    AttnParams p;
    p.causal = call.causal;
    p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    p.window_left = w.window_left;
    p.window_right = w.window_right;
    if (w.rotary) {
      p.rot_cos = call.rotary_cos[i].const_data_ptr<float>();
      p.rot_sin = call.rotary_sin[i].const_data_ptr<float>();
      p.rot_st = call.rotary_cos[i].stride(0);
    }
    auto self_attention = [&](const at::Tensor& h) {
      const at::Tensor qkv = linear(h, w.qkv, std::nullopt, at::Tensor()).view({T, 3, H, D});
      attention_forward_out(qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2), cu_seqlens, cu_seqlens, p,
                            attn.view({T, H, D}), at::Tensor());
      // The out projection's bias goes into the residual + LayerNorm pass.
      EncoderLinear out_no_bias = w.out;
      out_no_bias.bias = at::Tensor();
      out_no_bias.bias_f32 = at::Tensor();
      return linear(attn, out_no_bias, std::nullopt, at::Tensor());
    };
    if (w.norm_first) {
      // s = cur + proj + b_out (a fresh tensor: the new residual stream); normed = LN2(s); out = s + FFN(normed)
      at::Tensor normed = take();
      at::Tensor h = cur;
      if (w.attn_norm) {
        add_norm(cur, at::Tensor(), at::Tensor(), w.norm1_weight, w.norm1_bias, w.eps1, normed, at::Tensor());
        h = normed;
      }
      const at::Tensor proj = self_attention(h);
      at::Tensor s = at::empty({T, d}, opts);
      add_norm(cur, proj, w.out.bias_f32, w.norm2_weight, w.norm2_bias, w.eps2, normed, s);
      cur = ffn(normed, w, s);
    } else {
      const at::Tensor proj = self_attention(cur);
      const at::Tensor x1 = take();
      add_norm(cur, proj, w.out.bias_f32, w.norm1_weight, w.norm1_bias, w.eps1, x1, at::Tensor());
      const at::Tensor f = ffn(x1, w, at::Tensor());
      const at::Tensor x2 = take();  // the other buffer: LN2 reads x1
      add_norm(x1, f, at::Tensor(), w.norm2_weight, w.norm2_bias, w.eps2, x2, at::Tensor());
      cur = x2;
    }
  }
  if (call.final_norm) {
    const at::Tensor out = at::empty({T, d}, opts);
    add_norm(cur, at::Tensor(), at::Tensor(), call.final_weight, call.final_bias, call.final_eps, out, at::Tensor());
    return out;
  }
  // A buffer of this call (or the pre-norm residual, a fresh tensor); never x itself.
  return cur.data_ptr() == x.data_ptr() ? x.clone() : cur;
}

}  // namespace

at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<std::shared_ptr<EncoderLayer>>& layers, const EncoderCall& call) {
  (void)max_seqlen;  // the attention kernel reads the lengths from cu_seqlens; the caller checked them
  const int64_t T = x.size(0), B = cu_seqlens.numel() - 1;
  int64_t width = 1;  // the widest intermediate row: the QKV projection's or FFN1's
  for (const auto& w : layers) width = std::max({width, w->qkv.weight.size(0), w->ffn1.weight.size(0)});
  const int64_t chunk_rows = std::max<int64_t>(1, call.chunk_elements / width);
  if (call.chunk_elements <= 0 || T <= chunk_rows || B < 2) return forward_rows(x, cu_seqlens, layers, call);
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  at::Tensor out = at::empty_like(x);
  for (int64_t b = 0, r0 = 0; b < B;) {
    int64_t e = b + 1;  // sequences b .. e-1: at least one, more while their rows fit the chunk
    while (e < B && cu[e + 1] - cu[b] <= chunk_rows) ++e;
    const int64_t r1 = e == B ? T : cu[e];  // the first chunk starts at row 0, the last ends at T
    const at::Tensor rows = forward_rows(x.narrow(0, r0, r1 - r0), cu_seqlens.slice(0, b, e + 1) - r0, layers, call);
    out.narrow(0, r0, r1 - r0).copy_(rows);
    b = e;
    r0 = r1;
  }
  return out;
}

}  // namespace fastenc::cpu
