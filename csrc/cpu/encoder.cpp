// Encoder stack inference on CPU (see encoder.h).  Per layer, on packed rows x [T, d]:
//   post-norm:  x = LN1(x + (attn(x W_inᵀ + b_in) W_outᵀ + b_out));  x = LN2(x + FFN(x))
//   pre-norm:   s = x + attn(LN1(x) ...) W_outᵀ + b_out;  x = s + FFN(LN2(s))
// with FFN(h) = act(h W1ᵀ + b1) W2ᵀ + b2.  Every activation buffer is allocated once per call and
// reused by every layer; q, k and v are strided views of the QKV projection (no copies); the
// out-projection bias is added inside the residual + LayerNorm pass.  The FFN runs on chunks of
// kFfnChunk rows, so its [chunk, f] hidden block stays in the last-level cache between the
// activation pass and the second GEMM, and never takes [T, f] of memory.
#include "cpu/encoder.h"

#include <cmath>
#include <utility>

#include "cpu/attention.h"
#include "cpu/layer_norm.h"

namespace fastenc::cpu {
namespace {

constexpr int64_t kFfnChunk = 512;

// out = a Wᵀ (+ bias), W in nn.Linear layout [n, k].
void linear_out(at::Tensor out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// y = LN(x + branch + branch_bias) (branch optional); s = x + branch + branch_bias when defined.
void add_norm(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& branch_bias, const at::Tensor& w,
              const at::Tensor& b, double eps, const at::Tensor& y, const at::Tensor& s) {
  residual_layer_norm_fwd_out(x, branch, w, b, branch.defined() ? branch_bias : at::Tensor(), eps, DropoutParams{},
                              y, s, at::Tensor(), at::Tensor());
}

// out[r] = act(x[r] W1ᵀ + b1) W2ᵀ (+ b2 when add_bias), chunk by chunk through the hidden buffer h.
void ffn_out(const at::Tensor& out, const at::Tensor& x, const EncoderLayerWeights& w, Act act, const at::Tensor& h,
             bool add_bias) {
  const int64_t T = x.size(0);
  for (int64_t r0 = 0; r0 < T; r0 += kFfnChunk) {
    const int64_t rows = std::min(kFfnChunk, T - r0);
    at::Tensor hc = h.narrow(0, 0, rows);
    linear_out(hc, x.narrow(0, r0, rows), w.linear1_weight, w.linear1_bias);
    act_dropout_cpu(hc, hc, act, DropoutParams{});
    linear_out(out.narrow(0, r0, rows), hc, w.linear2_weight, add_bias ? w.linear2_bias : at::Tensor());
  }
}

}  // namespace

at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<EncoderLayerWeights>& layers, const EncoderConfig& cfg) {
  const int64_t T = x.size(0), d = x.size(1), H = cfg.nhead, D = d / H;
  const int64_t f = layers.empty() ? 0 : layers.front().linear1_weight.size(0);
  const auto opts = x.options();
  // Ping-pong residual streams, the QKV projection, the attention output, a [T, d] scratch and the
  // FFN's hidden chunk: every layer reuses them.
  at::Tensor bufs[2] = {at::empty({T, d}, opts), at::empty({T, d}, opts)};
  at::Tensor qkv = at::empty({T, 3 * d}, opts);
  at::Tensor attn = at::empty({T, d}, opts);
  at::Tensor tmp = at::empty({T, d}, opts);
  at::Tensor hidden = at::empty({std::min(kFfnChunk, T), f}, opts);
  at::Tensor normed = cfg.norm_first ? at::empty({T, d}, opts) : at::Tensor();

  AttnParams p;
  p.causal = cfg.causal;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const at::Tensor qkv5 = qkv.view({T, 3, H, D});
  const at::Tensor q = qkv5.select(1, 0), k = qkv5.select(1, 1), v = qkv5.select(1, 2);
  const at::Tensor attn3 = attn.view({T, H, D});

  at::Tensor cur = x;  // read, never written: the first layer writes bufs[0]
  int next = 0;
  if (T == 0) return at::empty({0, d}, opts);
  for (const EncoderLayerWeights& w : layers) {
    at::Tensor out = bufs[next];
    next ^= 1;
    const at::Tensor& attn_in = cfg.norm_first ? normed : cur;
    if (cfg.norm_first) add_norm(cur, at::Tensor(), at::Tensor(), w.norm1_weight, w.norm1_bias, cfg.eps, normed,
                                 at::Tensor());
    linear_out(qkv, attn_in, w.in_proj_weight, w.in_proj_bias);
    attention_forward_out(q, k, v, cu_seqlens, cu_seqlens, p, attn3, at::Tensor());
    linear_out(tmp, attn, w.out_proj_weight, at::Tensor());  // its bias joins the residual pass
    if (cfg.norm_first) {
      // out = s = cur + attn_out + b_out;  normed = LN2(s);  out += FFN(normed)
      add_norm(cur, tmp, w.out_proj_bias, w.norm2_weight, w.norm2_bias, cfg.eps, normed, out);
      ffn_out(tmp, normed, w, cfg.act, hidden, /*add_bias=*/true);
      out.add_(tmp);
    } else {
      add_norm(cur, tmp, w.out_proj_bias, w.norm1_weight, w.norm1_bias, cfg.eps, out, at::Tensor());
      ffn_out(tmp, out, w, cfg.act, hidden, /*add_bias=*/false);
      at::Tensor out2 = bufs[next];  // LN2 reads `out` and writes the other buffer
      next ^= 1;
      add_norm(out, tmp, w.linear2_bias, w.norm2_weight, w.norm2_bias, cfg.eps, out2, at::Tensor());
      out = out2;
    }
    cur = out;
  }
  if (cfg.final_weight.defined() || cfg.final_bias.defined()) {
    at::Tensor out = bufs[next];
    add_norm(cur, at::Tensor(), at::Tensor(), cfg.final_weight, cfg.final_bias, cfg.final_eps, out, at::Tensor());
    cur = out;
  }
  return cur.data_ptr() == x.data_ptr() ? x.clone() : cur;
}

}  // namespace fastenc::cpu
