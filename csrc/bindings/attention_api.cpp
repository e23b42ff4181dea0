// Python bindings of the CPU attention kernels (attention/attention.h): argument checks
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError) and one m.def per entry point.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <cmath>
#include <limits>

#include "attention/attention.h"

namespace fastenc {
namespace cpu {
namespace {

constexpr const char* kOp = "fastenc attention (cpu): ";

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), kOp, name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got one on ", t.device());
}

// [rows, H, d] with a unit last stride, in dtype dt.
void check_rows(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t H, int64_t d, const char* dname) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == dt, kOp, name, " has dtype ", t.scalar_type(), " but q has ", dt,
                   "; all operands must share one dtype");
  TORCH_CHECK_VALUE(t.dim() == 3, kOp, name, " must be [tokens, heads, ", dname, "], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) == H, kOp, name, " has ", t.size(1), " heads but q has ", H);
  if (d >= 0) TORCH_CHECK_VALUE(t.size(2) == d, kOp, name, " has ", dname, " ", t.size(2), ", expected ", d);
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) == 1, kOp, name,
                    " must have a unit last stride (token and head strides are free), got strides ", t.strides());
}

void check_cu_format(const at::Tensor& cu, const char* name) {
  check_cpu(cu, name);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, kOp, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, kOp, name, " must be 1-D [batch + 1], got shape ",
                    cu.sizes());
}

// The values: they index the packed tensors, so a bad one would read out of bounds.
void check_cu_values(const at::Tensor& cu, const char* name, int64_t rows, int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_VALUE(max_seqlen >= 0, kOp, max_name, " must be >= 0, got ", max_seqlen);
  const auto c = cu.accessor<int32_t, 1>();
  TORCH_CHECK_VALUE(c[0] >= 0, kOp, name, "[0] = ", c[0], " is negative");
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    const int64_t len = static_cast<int64_t>(c[b + 1]) - c[b];
    TORCH_CHECK_VALUE(len >= 0, kOp, name, " must be non-decreasing, but ", name, "[", b + 1, "] = ", c[b + 1],
                      " < ", name, "[", b, "] = ", c[b]);
    TORCH_CHECK_VALUE(len <= max_seqlen, kOp, "sequence ", b, " has length ", len, " (", name, ") but ", max_name,
                      " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[cu.numel() - 1] <= rows, kOp, name, "[-1] = ", c[cu.numel() - 1],
                    " is beyond the packed length ", rows);
}

void check_mask(const std::optional<at::Tensor>& m, const char* name, at::IntArrayRef shape) {
  if (!m) return;
  check_cpu(*m, name);
  TORCH_CHECK_TYPE(m->scalar_type() == at::kBool || at::isFloatingType(m->scalar_type()), kOp, name,
                   " must be bool (True = masked) or floating (additive), got ", m->scalar_type());
  TORCH_CHECK_VALUE(m->sizes() == shape, kOp, name, " must have shape ", shape,
                    " (an expanded view is fine), got ", m->sizes());
}

// The rotary tables as contiguous fp32 (kept alive for the kernel call).
struct RotaryTables {
  at::Tensor cos, sin;
};

// window_left/right >= -1; rotary_cos/sin both or neither: floating CPU tables [P, D/2], D even,
// P covering every position of the longest sequence.
RotaryTables check_window_rotary(const at::Tensor& q, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
                                 int64_t window_right, const std::optional<at::Tensor>& rotary_cos,
                                 const std::optional<at::Tensor>& rotary_sin) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp,
                    "window_left and window_right must be >= 0, or -1 for unbounded; got ", window_left, " and ",
                    window_right);
  TORCH_CHECK_VALUE(rotary_cos.has_value() == rotary_sin.has_value(), kOp,
                    "rotary_cos and rotary_sin must be given together");
  if (!rotary_cos) return {};
  const at::Tensor &cos = *rotary_cos, &sin = *rotary_sin;
  check_cpu(cos, "rotary_cos");
  check_cpu(sin, "rotary_sin");
  TORCH_CHECK_TYPE(cos.is_floating_point() && sin.is_floating_point(), kOp,
                   "rotary_cos and rotary_sin must be floating point, got ", cos.scalar_type(), " and ",
                   sin.scalar_type());
  const int64_t D = q.size(2);
  TORCH_CHECK_VALUE(D % 2 == 0, kOp, "rotary embeddings need an even head_dim, got ", D);
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D / 2, kOp,
                    "rotary_cos and rotary_sin must both be [positions, head_dim / 2] = [P, ", D / 2, "], got ",
                    cos.sizes(), " and ", sin.sizes());
  const int64_t need = std::max(max_seqlen_q, max_seqlen_k);
  TORCH_CHECK_VALUE(cos.size(0) >= need, kOp, "rotary tables cover ", cos.size(0),
                    " positions, the sequences need ", need);
  return {cos.to(at::kFloat).contiguous(), sin.to(at::kFloat).contiguous()};  // no copy when they are so
}

AttnParams make_params(const at::Tensor& q, const std::optional<at::Tensor>& attn_mask,
                       const std::optional<at::Tensor>& key_padding_mask, bool is_causal, std::optional<double> scale,
                       double dropout_p, int64_t seed, int64_t window_left, int64_t window_right,
                       const RotaryTables& rotary) {
  AttnParams p;
  p.attn_mask = make_mask(attn_mask, false);
  p.key_padding = make_mask(key_padding_mask, true);
  p.causal = is_causal;
  p.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(2))));
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  // Sides beyond any int32 sequence length act as unbounded ones; the clamp keeps index sums in range.
  constexpr int64_t kFar = std::numeric_limits<int32_t>::max();
  p.window_left = std::min(window_left, kFar);
  p.window_right = std::min(window_right, kFar);
  if (rotary.cos.defined()) {
    p.rot_cos = rotary.cos.const_data_ptr<float>();
    p.rot_sin = rotary.sin.const_data_ptr<float>();
    p.rot_st = rotary.cos.size(1);
  }
  return p;
}

// Whether some rows of the packed tensor belong to no sequence (then outputs start from zeros).
bool uncovered(const at::Tensor& cu, int64_t rows) {
  const auto c = cu.accessor<int32_t, 1>();
  return c[0] != 0 || c[cu.numel() - 1] != rows;
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, const std::optional<at::Tensor>& attn_mask,
                                const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                                std::optional<double> scale, double dropout_p, int64_t seed, bool return_lse,
                                int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& rotary_cos,
                                const std::optional<at::Tensor>& rotary_sin) {
  validate_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                     dropout_p);
  const RotaryTables rotary = check_window_rotary(q, max_seqlen_q, max_seqlen_k, window_left, window_right,
                                                  rotary_cos, rotary_sin);
  const int64_t Tq = q.size(0), H = q.size(1);
  const bool gaps = uncovered(cu_seqlens_q, Tq);
  at::Tensor out = gaps ? at::zeros({Tq, H, v.size(2)}, q.options()) : at::empty({Tq, H, v.size(2)}, q.options());
  at::Tensor lse;
  if (return_lse) {
    lse = at::empty({H, Tq}, q.options().dtype(at::kFloat));
    if (gaps) lse.fill_(std::numeric_limits<float>::infinity());
  }
  attention_forward_out(q, k, v, cu_seqlens_q, cu_seqlens_k,
                        make_params(q, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed, window_left,
                                    window_right, rotary),
                        out, lse);
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const std::optional<at::Tensor>& attn_mask,
                                 const std::optional<at::Tensor>& key_padding_mask, bool is_causal,
                                 std::optional<double> scale, double dropout_p, int64_t seed, int64_t window_left,
                                 int64_t window_right, const std::optional<at::Tensor>& rotary_cos,
                                 const std::optional<at::Tensor>& rotary_sin) {
  validate_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                     dropout_p);
  const RotaryTables rotary = check_window_rotary(q, max_seqlen_q, max_seqlen_k, window_left, window_right,
                                                  rotary_cos, rotary_sin);
  const int64_t Tq = q.size(0), H = q.size(1), Dv = v.size(2);
  check_rows(dout, "dout", q.scalar_type(), H, Dv, "head dim of v");
  check_rows(out, "out", q.scalar_type(), H, Dv, "head dim of v");
  TORCH_CHECK_VALUE(dout.size(0) == Tq && out.size(0) == Tq, kOp, "dout and out must have q's ", Tq,
                    " tokens, got ", dout.size(0), " and ", out.size(0));
  check_cpu(lse, "lse");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, kOp, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == H && lse.size(1) == Tq, kOp, "lse must be [heads, Tq] = [", H,
                    ", ", Tq, "], got shape ", lse.sizes());
  const bool gaps = uncovered(cu_seqlens_q, Tq) || uncovered(cu_seqlens_k, k.size(0));
  auto alloc = [&](const at::Tensor& like) { return gaps ? at::zeros_like(like, at::MemoryFormat::Contiguous)
                                                         : at::empty_like(like, at::MemoryFormat::Contiguous); };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  attention_backward_out(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                         make_params(q, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed, window_left,
                                     window_right, rotary),
                         dq, dk, dv);
  return {dq, dk, dv};
}

at::Tensor dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double dropout_p,
                        int64_t seed) {
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0, kOp,
                    "dropout mask sizes must be >= 0, got ", batch, ", ", heads, ", ", seqlen_q, ", ", seqlen_k);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, "dropout_p must be in [0, 1], got ", dropout_p);
  return attention_dropout_mask(batch, heads, seqlen_q, seqlen_k, dropout_p, static_cast<uint64_t>(seed));
}

}  // namespace

void validate_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, const std::optional<at::Tensor>& attn_mask,
                        const std::optional<at::Tensor>& key_padding_mask, double dropout_p) {
  check_cpu(q, "q");
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, kOp,
                   "q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(q.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got shape ", q.sizes());
  const int64_t H = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(H >= 1 && D >= 1, kOp, "q must have heads >= 1 and head_dim >= 1, got shape ", q.sizes());
  check_rows(q, "q", dt, H, D, "head_dim");
  check_rows(k, "k", dt, H, D, "head_dim");
  check_rows(v, "v", dt, H, -1, "head_dim");
  TORCH_CHECK_VALUE(v.size(2) >= 1, kOp, "v must have head_dim >= 1, got shape ", v.sizes());
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), kOp, "k and v must have the same tokens, got ", k.size(0), " and ",
                    v.size(0));
  check_cu_format(cu_seqlens_q, "cu_seqlens_q");
  check_cu_format(cu_seqlens_k, "cu_seqlens_k");
  const int64_t B = cu_seqlens_q.numel() - 1;
  TORCH_CHECK_VALUE(cu_seqlens_k.numel() == B + 1, kOp, "cu_seqlens_q and cu_seqlens_k must have the same length, "
                    "got ", B + 1, " and ", cu_seqlens_k.numel());
  check_cu_values(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_values(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");
  check_mask(attn_mask, "attn_mask", {B, H, max_seqlen_q, max_seqlen_k});
  check_mask(key_padding_mask, "key_padding_mask", {B, max_seqlen_k});
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, "dropout_p must be in [0, 1], got ", dropout_p);
}

}  // namespace cpu

void bind_attention(py::module_& m) {
  m.def("attention_forward_cpu", &cpu::forward,
        "out [Tq, H, Dv], lse float32 [H, Tq] (None unless return_lse) = CPU flash attention on packed sequences; "
        "window_left/right: query i sees keys i - left .. i + right (-1 = unbounded); rotary_cos/sin [P, D/2]: q and "
        "k rotated at their sequence-local positions (rotate_half)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("attn_mask") = py::none(),
        py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false, py::arg("scale") = py::none(),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("return_lse") = true, py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("rotary_cos") = py::none(), py::arg("rotary_sin") = py::none());
  m.def("attention_backward_cpu", &cpu::backward, "dq, dk, dv = backward of attention_forward_cpu", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("attn_mask") = py::none(),
        py::arg("key_padding_mask") = py::none(), py::arg("is_causal") = false, py::arg("scale") = py::none(),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("window_left") = -1, py::arg("window_right") = -1,
        py::arg("rotary_cos") = py::none(), py::arg("rotary_sin") = py::none());
  m.def("attention_dropout_mask_cpu", &cpu::dropout_mask,
        "bool keep mask [B, H, L, S] of the CPU attention kernels' dropout (True = kept)", py::arg("batch"),
        py::arg("heads"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("dropout_p"), py::arg("seed"));
}

}  // namespace fastenc
