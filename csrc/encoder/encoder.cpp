// Encoder stack inference on CPU (see encoder.h).  Per layer, on packed rows x [T, d]:
//   post-norm:  x = LN1(x + (attn(x W_qkvᵀ + b_qkv) W_outᵀ + b_out));  x = LN2(x + FFN(x))
//   pre-norm:   s = x + attn(LN1(x) ...) W_outᵀ + b_out;  x = s + FFN(LN2(s))   (LN1 skipped without attn_norm)
// with FFN(h) = act(h W1ᵀ + b1) W2ᵀ + b2, or for gated activations act(a) · g with [a, g] = h W1ᵀ + b1.
// GEMMs: the panel GEMM (linear/panel_gemm.h; fp32, and bf16 without AMX: encoder_panel_rows) with the bias, the
// residual and the ungated activation in its epilogue; elsewhere oneDNN inner
// products (linear/linear.h: about 2x MKL's fp32 GEMM on AMD) with the bias, the activation or the residual
// fused; for the GEMMs a layer holds
// in int8, the int8 kernel (linear/int8_linear.h) on activations quantized per token, with the bias and residual in
// its epilogue and the FFN's activation in the quantization of GEMM2's input (which also gathers GEMM2's input
// channels kept in float; the kernel's epilogue adds their products).  Small GEMMs without a panel kernel (below
// constants::kOnednnMinMacs multiply-adds, where oneDNN's per-call cost dominates) run ATen's GEMM.  q, k and v
// are strided views of the QKV projection (no copies); attention applies the window and the rotary embeddings;
// the out-projection bias is added inside the residual + LayerNorm pass; every intermediate is a view of buffers
// allocated once per call or kept from the thread's last one (Scratch).  A large batch runs in chunks of whole
// sequences (EncoderCall::chunk_elements): every op but attention is row by row, attention sequence by sequence.
#include "encoder/encoder.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <c10/core/CPUAllocator.h>

#include "attention/attention.h"
#include "common/cpu_kernels.h"
#include "fastenc_constants.h"
#include "layer_norm/layer_norm.h"
#include "linear/linear.h"

namespace fastenc::cpu {
namespace {

// The stack's intermediates, each a flat buffer allocated once per call for its largest chunk (or kept from the
// thread's last call); a layer's tensors are views of them, so no op allocates.  Why: with a fresh tensor per
// GEMM output, glibc gave the freed top of the heap back to the system between layers (brk down and up again,
// strace) and the next layer page-faulted it in again (65 k minor faults a call, 6-8% of an fp32 BERT-base batch
// of 4096 tokens).  Lifetimes: kWide holds the
// QKV projection until attention has read it, then FFN1's output; kBranch the out projection, then FFN2's output;
// post-norm, kNorm0 LN1's output and kNorm1 LN2's (the layer's output); pre-norm, kNorm0 the LayerNorms' outputs,
// kRes0 the residual stream s and kRes1 the layer's output; kQ, kScale and kFloats one int8 GEMM's quantized
// input at a time; kOut is the caller's output rows (set_out), where the last layer writes.
enum Slot { kWide, kHidden, kAttn, kBranch, kNorm0, kNorm1, kRes0, kRes1, kQ, kScale, kFloats, kOut, kSlots };

class Scratch {
  // The buffers of the last call on this thread, kept for its next call when they fit kKeptBytes (a chunk's do:
  // constants::kEncoderChunkElements bounds the widest): freed, glibc gave them back to the system and the next
  // call page-faulted them in again (3,700-10,700 faults a MiniLM call at 4096 tokens; kept: fp32, bf16 and int8
  // MiniLM -1.3%, -2.3%, -1.1%, BERT-base level).
  static constexpr int64_t kKeptBytes = int64_t{96} << 20;
  struct Kept {
    c10::DataPtr mem[kSlots];
    int64_t bytes[kSlots] = {};
  };
  static Kept& kept() {
    thread_local Kept k;
    return k;
  }

 public:
  Scratch(const std::vector<std::shared_ptr<EncoderLayer>>& layers, int64_t rows, const at::TensorOptions& opts) {
    int64_t width[kSlots] = {};
    auto grow = [&](Slot s, int64_t n) { width[s] = std::max(width[s], n); };
    for (const auto& l : layers) {
      const EncoderLayer& w = *l;
      grow(kWide, std::max(w.qkv.weight.size(0), w.ffn1.weight.size(0)));
      if (w.gated() && !w.ffn2.int8) grow(kHidden, w.ffn2.weight.size(1));
      for (Slot s : {kAttn, kBranch, kNorm0}) grow(s, w.d_model);
      if (w.norm_first) {
        grow(kRes0, w.d_model);
        grow(kRes1, w.d_model);
      } else {
        grow(kNorm1, w.d_model);
      }
      for (const EncoderLinear* lin : {&w.qkv, &w.out, &w.ffn1, &w.ffn2}) {
        if (!lin->int8) continue;
        grow(kQ, lin->int8->k4() * 4);
        grow(kScale, 1);
        if (lin->int8->float_channels.defined()) grow(kFloats, lin->int8->float_channels.numel());
      }
    }
    int64_t bytes[kSlots] = {}, total = 0;
    at::ScalarType dtypes[kSlots];
    for (int s = 0; s < kOut; ++s) {
      dtypes[s] = s == kQ ? at::kByte : s == kScale || s == kFloats ? at::kFloat : opts.dtype().toScalarType();
      bytes[s] = rows * width[s] * static_cast<int64_t>(c10::elementSize(dtypes[s]));
      total += bytes[s];
    }
    const bool keep = total <= kKeptBytes;
    for (int s = 0; s < kOut; ++s) {
      if (width[s] == 0) continue;
      c10::DataPtr* mem = &own_[s];
      if (keep) {
        Kept& k = kept();
        if (k.bytes[s] < bytes[s]) {
          k.mem[s] = c10::GetCPUAllocator()->allocate(bytes[s]);
          k.bytes[s] = bytes[s];
        }
        mem = &k.mem[s];
      } else {
        own_[s] = c10::GetCPUAllocator()->allocate(bytes[s]);
      }
      bufs_[s] = at::from_blob(mem->get(), {rows * width[s]}, opts.dtype(dtypes[s]));
    }
  }

  void set_out(const at::Tensor& out) { views_[kOut] = {out, out.size(0), out.size(1)}; }

  // A contiguous [m, n] view of the slot (the same view object while m and n stay).
  const at::Tensor& view(Slot s, int64_t m, int64_t n) {
    View& v = views_[s];
    if (s == kOut) {
      TORCH_CHECK(v.m == m && v.n == n, "fastenc encoder: the output rows are [", v.m, ", ", v.n, "], not [", m, ", ",
                  n, "]");
      return v.t;
    }
    if (!v.t.defined() || v.m != m || v.n != n) v = {bufs_[s].narrow(0, 0, m * n).view({m, n}), m, n};
    return v.t;
  }

  // A's quantized rows in kQ / kScale / kFloats, for the int8 weight w.
  Int8Rows quantize(const at::Tensor& a, std::optional<Act> act, const Int8Weight& w) {
    Int8Rows r;
    const int64_t m = a.size(0), f = w.float_channels.defined() ? w.float_channels.numel() : 0;
    r.q = view(kQ, m, w.k4() * 4);
    r.scale = bufs_[kScale].narrow(0, 0, m);
    if (f > 0) r.floats = view(kFloats, m, f);
    quantize_rows_out(a, act, w.smooth, w.float_channels, r);
    return r;
  }

 private:
  struct View {
    at::Tensor t;
    int64_t m = 0, n = 0;
  };
  c10::DataPtr own_[kSlots];  // this call's buffers when they are not kept
  at::Tensor bufs_[kSlots];
  View views_[kSlots];
};

// act(a Wᵀ + bias) (+ add) in slot `to` of ws, or a tensor of its own where oneDNN's GEMM runs; act and add
// exclude each other.  An int8 GEMM quantizes a per row first.
at::Tensor linear(const at::Tensor& a, const EncoderLinear& lin, std::optional<Act> act, const at::Tensor& add,
                  Scratch& ws, Slot to) {
  const int64_t M = a.size(0), K = a.size(1), N = lin.weight.size(0);
  if (lin.int8) {
    const at::Tensor& y = ws.view(to, M, N);
    int8_linear_out(ws.quantize(a, std::nullopt, *lin.int8), *lin.int8, lin.bias_f32, add, y);
    if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
    return y;
  }
  if (lin.panel && M <= lin.panel_rows) {
    const at::Tensor& y = ws.view(to, M, N);
    panel_gemm_out(a, *lin.panel, lin.bias_f32, add, y, act);  // fp32 bias: no conversion
    return y;
  }
  if (M > 0 && K > 0 && M * N * K >= constants::kOnednnMinMacs && onednn_linear_supported(a.scalar_type())) {
    return onednn_linear(a, lin.packed.defined() ? lin.packed : lin.weight,
                         lin.bias.defined() ? std::optional<at::Tensor>(lin.bias) : std::nullopt, act, add);
  }
  at::Tensor y = ws.view(to, M, N);
  if (lin.bias.defined()) {
    at::addmm_out(y, lin.bias, a, lin.weight.t());
  } else {
    at::mm_out(y, a, lin.weight.t());
  }
  if (add.defined()) y.add_(add);
  if (act) act_dropout_cpu(y, y, *act, DropoutParams{});
  return y;
}

// FFN(h) (+ add) in slot `to`: act(h W1ᵀ + b1) W2ᵀ + b2, the gated act(a) · g with [a, g] = h W1ᵀ + b1.  An int8
// W2 quantizes GEMM1's output after applying the activation, in one pass; otherwise the activation is fused into
// GEMM1's epilogue (oneDNN, the panel GEMM) or its own pass (the ATen GEMM, int8 GEMM1, the GLU).
at::Tensor ffn(const at::Tensor& h, const EncoderLayer& w, const at::Tensor& add, Scratch& ws, Slot to) {
  const int64_t M = h.size(0);
  if (w.ffn2.int8) {
    const at::Tensor pre = linear(h, w.ffn1, std::nullopt, at::Tensor(), ws, kWide);
    const at::Tensor& y = ws.view(to, M, w.ffn2.weight.size(0));
    int8_linear_out(ws.quantize(pre, w.act, *w.ffn2.int8), *w.ffn2.int8, w.ffn2.bias_f32, add, y);
    return y;
  }
  at::Tensor hidden;
  if (!w.gated()) {
    hidden = linear(h, w.ffn1, w.act, at::Tensor(), ws, kWide);
  } else {
    const at::Tensor pre = linear(h, w.ffn1, std::nullopt, at::Tensor(), ws, kWide);
    hidden = ws.view(kHidden, M, pre.size(1) / 2);
    act_dropout_cpu(pre, hidden, w.act, DropoutParams{});
  }
  return linear(hidden, w.ffn2, std::nullopt, add, ws, to);
}

// y = LN(x + branch + branch_bias) (branch optional); s = x + branch + branch_bias when defined.
void add_norm(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& branch_bias, const at::Tensor& w,
              const at::Tensor& b, double eps, const at::Tensor& y, const at::Tensor& s) {
  residual_layer_norm_fwd_out(x, branch, w, b, branch.defined() ? branch_bias : at::Tensor(), eps, DropoutParams{},
                              y, s, at::Tensor(), at::Tensor());
}

// The stack on rows x [T, d] (T >= 1) holding the sequences of cu_seqlens, all at once, into out [T, d].
void forward_rows(const at::Tensor& x, const at::Tensor& cu_seqlens,
                  const std::vector<std::shared_ptr<EncoderLayer>>& layers, const EncoderCall& call, Scratch& ws,
                  const at::Tensor& out) {
  const int64_t T = x.size(0), d = x.size(1);
  at::Tensor cur = x;  // x itself is never written
  ws.set_out(out);
  for (size_t i = 0; i < layers.size(); ++i) {
    const EncoderLayer& w = *layers[i];
    const bool last = i + 1 == layers.size() && !call.final_norm;  // this layer writes out
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
    const at::Tensor attn = ws.view(kAttn, T, d);
    auto self_attention = [&](const at::Tensor& h) {
      const at::Tensor qkv = linear(h, w.qkv, std::nullopt, at::Tensor(), ws, kWide).view({T, 3, H, D});
      attention_forward_out(qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2), cu_seqlens, cu_seqlens, p,
                            attn.view({T, H, D}), at::Tensor());
      // The out projection's bias goes into the residual + LayerNorm pass.
      EncoderLinear out_no_bias = w.out;
      out_no_bias.bias = at::Tensor();
      out_no_bias.bias_f32 = at::Tensor();
      return linear(attn, out_no_bias, std::nullopt, at::Tensor(), ws, kBranch);
    };
    if (w.norm_first) {
      // s = cur + proj + b_out (the new residual stream); normed = LN2(s); out = s + FFN(normed), written over
      // cur (kRes1 after the first layer), read for the last time by the pass that makes s.
      const at::Tensor normed = ws.view(kNorm0, T, d);
      at::Tensor h = cur;
      if (w.attn_norm) {
        add_norm(cur, at::Tensor(), at::Tensor(), w.norm1_weight, w.norm1_bias, w.eps1, normed, at::Tensor());
        h = normed;
      }
      const at::Tensor proj = self_attention(h);
      const at::Tensor s = ws.view(kRes0, T, d);
      add_norm(cur, proj, w.out.bias_f32, w.norm2_weight, w.norm2_bias, w.eps2, normed, s);
      cur = ffn(normed, w, s, ws, last ? kOut : kRes1);
    } else {
      const at::Tensor proj = self_attention(cur);
      const at::Tensor x1 = ws.view(kNorm0, T, d);
      add_norm(cur, proj, w.out.bias_f32, w.norm1_weight, w.norm1_bias, w.eps1, x1, at::Tensor());
      const at::Tensor f = ffn(x1, w, at::Tensor(), ws, kBranch);
      const at::Tensor x2 = ws.view(last ? kOut : kNorm1, T, d);  // over cur, read for the last time by LN1
      add_norm(x1, f, at::Tensor(), w.norm2_weight, w.norm2_bias, w.eps2, x2, at::Tensor());
      cur = x2;
    }
  }
  if (call.final_norm) {
    add_norm(cur, at::Tensor(), at::Tensor(), call.final_weight, call.final_bias, call.final_eps, out, at::Tensor());
  } else if (cur.data_ptr() != out.data_ptr()) {
    out.copy_(cur);  // x itself without layers, or the output of a oneDNN GEMM (a tensor of its own)
  }
}

}  // namespace

// The panel GEMM against oneDNN's inner product on prepacked weights (scripts/cpu_gemm_bench.py, benchmarks/README.md
// "CPU GEMMs"): ahead at 32, 64 and 128 rows on 15 of 16 encoder shapes in fp32 and all 16 in bf16; at 1365 rows
// (a BERT-base chunk) fp32 +1 to +11% on all 8 shapes, bf16 level; at 2730 level in fp32 (Zen 4, AVX512-BF16).
// In the stack, where its output goes to the scratch and oneDNN's is allocated per call, it runs fp32 BERT-base at
// 4096 tokens 7% faster, MiniLM 4%, bf16 1-2% (interleaved A/B).  oneDNN keeps bf16 where AMX runs it on tiles.
int64_t encoder_panel_rows(at::ScalarType dtype) {
  constexpr int64_t kFewRows = 128;  // a single request's tokens, small batches
  if (!panel_gemm_supported(dtype)) return 0;
  if (dtype == at::kFloat || capability() < Capability::kAmx) return std::numeric_limits<int64_t>::max();
  return kFewRows;
}

at::Tensor encoder_forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                           const std::vector<std::shared_ptr<EncoderLayer>>& layers, const EncoderCall& call) {
  (void)max_seqlen;  // the attention kernel reads the lengths from cu_seqlens; the caller checked them
  const int64_t T = x.size(0), B = cu_seqlens.numel() - 1;
  at::Tensor out = at::empty_like(x);
  if (T == 0) return out;
  int64_t width = 1;  // the widest intermediate row: the QKV projection's or FFN1's
  for (const auto& w : layers) width = std::max({width, w->qkv.weight.size(0), w->ffn1.weight.size(0)});
  const int64_t chunk_rows = std::max<int64_t>(1, call.chunk_elements / width);
  if (call.chunk_elements <= 0 || T <= chunk_rows || B < 2) {
    Scratch ws(layers, T, x.options());
    forward_rows(x, cu_seqlens, layers, call, ws, out);
    return out;
  }
  // Chunks of sequences b .. e-1: at least one, more while their rows fit; the first starts at row 0 and the
  // last ends at T.
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  std::vector<int64_t> ends;  // e of each chunk
  int64_t rows = 0;
  for (int64_t b = 0, r0 = 0; b < B;) {
    int64_t e = b + 1;
    while (e < B && cu[e + 1] - cu[b] <= chunk_rows) ++e;
    const int64_t r1 = e == B ? T : cu[e];
    rows = std::max(rows, r1 - r0);
    ends.push_back(e);
    b = e;
    r0 = r1;
  }
  Scratch ws(layers, rows, x.options());
  for (int64_t b = 0, r0 = 0, c = 0; b < B; ++c) {
    const int64_t e = ends[c], r1 = e == B ? T : cu[e];
    if (r1 > r0) {
      forward_rows(x.narrow(0, r0, r1 - r0), cu_seqlens.slice(0, b, e + 1) - r0, layers, call, ws,
                   out.narrow(0, r0, r1 - r0));
    }
    b = e;
    r0 = r1;
  }
  return out;
}

}  // namespace fastenc::cpu
