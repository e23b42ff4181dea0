// Encoder stack inference on CPU (see encoder.h).  Per layer, on packed rows x [T, d]:
//   post-norm:  x = LN1(x + (attn(x W_inᵀ + b_in) W_outᵀ + b_out));  x = LN2(x + FFN(x))
//   pre-norm:   s = x + attn(LN1(x) ...) W_outᵀ + b_out;  x = s + FFN(LN2(s))
// with FFN(h) = act(h W1ᵀ + b1) W2ᵀ + b2.  GEMMs are oneDNN inner products (cpu/linear.h: about 2x
// MKL's fp32 GEMM on AMD) with their epilogue fused: b_in; b1 and the activation; b2 (and, pre-norm, the
// residual add).  q, k and v are strided views of the QKV projection (no copies); the out-projection
// bias is added inside the residual + LayerNorm pass; the attention output and the LayerNorm outputs
// reuse two buffers allocated once per call.  Small GEMMs (below kOneDnnMinMacs multiply-adds, where
// oneDNN's per-call cost dominates) run ATen's GEMM and the vectorised activation pass instead.
#include "encoder/encoder.h"

#include <cmath>
#include <optional>
#include <utility>

#include "attention/attention.h"
#include "layer_norm/layer_norm.h"
#include "linear/linear.h"

namespace fastenc::cpu {
namespace {

constexpr int64_t kOneDnnMinMacs = int64_t(1) << 21;  // as the FFN op's CPU path (ffn_ops.cpp)

// act(a Wᵀ + bias) (+ add), W in nn.Linear layout [n, k] (packed: the same weight prepacked for oneDNN,
// or undefined); act and add exclude each other.
at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& packed, const at::Tensor& bias,
                  std::optional<Act> act, const at::Tensor& add) {
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  if (M > 0 && K > 0 && M * N * K >= kOneDnnMinMacs && onednn_linear_supported(a.scalar_type())) {
    return onednn_linear(a, packed.defined() ? packed : w,
                         bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, act, add);
  }
  at::Tensor y = bias.defined() ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
  if (add.defined()) y.add_(add);
  if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
  return y;
}

// y = LN(x + branch + branch_bias) (branch optional); s = x + branch + branch_bias when defined.
void add_norm(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& branch_bias, const at::Tensor& w,
              const at::Tensor& b, double eps, const at::Tensor& y, const at::Tensor& s) {
  residual_layer_norm_fwd_out(x, branch, w, b, branch.defined() ? branch_bias : at::Tensor(), eps, DropoutParams{},
                              y, s, at::Tensor(), at::Tensor());
}

}  // namespace

at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<EncoderLayerWeights>& layers, const EncoderConfig& cfg) {
  const int64_t T = x.size(0), d = x.size(1), H = cfg.nhead, D = d / H;
  const auto opts = x.options();
  if (T == 0) return at::empty({0, d}, opts);
  // The attention output and two LayerNorm outputs are reused by every layer (the residual stream
  // alternates between the two norm buffers; x itself is never written).
  at::Tensor attn = at::empty({T, d}, opts);
  at::Tensor bufs[2] = {at::empty({T, d}, opts), at::empty({T, d}, opts)};
  const at::Tensor attn3 = attn.view({T, H, D});
  AttnParams p;
  p.causal = cfg.causal;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));

  at::Tensor cur = x;
  int next = 0;
  auto take = [&]() { at::Tensor t = bufs[next]; next ^= 1; return t; };
  for (const EncoderLayerWeights& w : layers) {
    const at::Tensor normed = cfg.norm_first ? take() : at::Tensor();
    if (cfg.norm_first) add_norm(cur, at::Tensor(), at::Tensor(), w.norm1_weight, w.norm1_bias, cfg.eps, normed,
                                 at::Tensor());
    const at::Tensor qkv = linear(cfg.norm_first ? normed : cur, w.in_proj_weight, w.in_proj_packed, w.in_proj_bias, std::nullopt,
                                  at::Tensor()).view({T, 3, H, D});
    attention_forward_out(qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2), cu_seqlens, cu_seqlens, p, attn3,
                          at::Tensor());
    const at::Tensor proj = linear(attn, w.out_proj_weight, w.out_proj_packed, at::Tensor(), std::nullopt, at::Tensor());
    if (cfg.norm_first) {
      // s = cur + proj + b_out (a fresh tensor: the new residual stream); normed = LN2(s); out = s + FFN(normed)
      at::Tensor s = at::empty({T, d}, opts);
      add_norm(cur, proj, w.out_proj_bias, w.norm2_weight, w.norm2_bias, cfg.eps, normed, s);
      const at::Tensor h = linear(normed, w.linear1_weight, w.linear1_packed, w.linear1_bias, cfg.act, at::Tensor());
      cur = linear(h, w.linear2_weight, w.linear2_packed, w.linear2_bias, std::nullopt, s);
    } else {
      const at::Tensor x1 = take();
      add_norm(cur, proj, w.out_proj_bias, w.norm1_weight, w.norm1_bias, cfg.eps, x1, at::Tensor());
      const at::Tensor h = linear(x1, w.linear1_weight, w.linear1_packed, w.linear1_bias, cfg.act, at::Tensor());
      const at::Tensor f = linear(h, w.linear2_weight, w.linear2_packed, w.linear2_bias, std::nullopt, at::Tensor());
      const at::Tensor x2 = take();  // the other buffer: LN2 reads x1
      add_norm(x1, f, at::Tensor(), w.norm2_weight, w.norm2_bias, cfg.eps, x2, at::Tensor());
      cur = x2;
    }
  }
  if (cfg.final_weight.defined() || cfg.final_bias.defined()) {
    const at::Tensor out = at::empty({T, d}, opts);
    add_norm(cur, at::Tensor(), at::Tensor(), cfg.final_weight, cfg.final_bias, cfg.final_eps, out, at::Tensor());
    return out;
  }
  // A buffer of this call (or the pre-norm residual, a fresh tensor); never x itself.
  return cur.data_ptr() == x.data_ptr() ? x.clone() : cur;
}

}  // namespace fastenc::cpu
