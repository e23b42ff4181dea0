// Python binding of the CPU encoder stack (cpu/encoder.cpp): argument checks naming the argument
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError) and one m.def.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/bindings.h"
#include "encoder/encoder.h"

namespace fastenc {
namespace cpu {
namespace {

constexpr const char* kOp = "fastenc encoder (cpu): ";
using Opt = std::optional<at::Tensor>;
// in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias, linear1.weight, linear1.bias,
// linear2.weight, linear2.bias, norm1.weight, norm1.bias, norm2.weight, norm2.bias
using LayerTuple = std::tuple<at::Tensor, Opt, at::Tensor, Opt, at::Tensor, Opt, at::Tensor, Opt, Opt, Opt, Opt, Opt>;
// in_proj_weight, out_proj.weight, linear1.weight, linear2.weight prepacked by cpu_pack_linear_weight
using PackedTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A packed weight: the oneDNN layout of a [n, k] weight in x's dtype (its blocked layout has no strides).
void check_packed(const at::Tensor& t, const std::string& name, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kMkldnn && t.sizes() == shape, kOp, name,
                    " must be cpu_pack_linear_weight of a ", shape, " weight, got ", t.layout(), " ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, name, " has dtype ", t.scalar_type(), " but x has ",
                   x.scalar_type());
}

void check(const Opt& t, const std::string& name, at::IntArrayRef shape, const at::Tensor& x, bool norm_param) {
  if (!t) return;
  TORCH_CHECK_VALUE(t->device().is_cpu(), kOp, name, " must be a CPU tensor, got one on ", t->device());
  TORCH_CHECK_VALUE(t->sizes() == shape, kOp, name, " must have shape ", shape, ", got ", t->sizes());
  const bool ok = t->scalar_type() == x.scalar_type() || (norm_param && t->scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, kOp, name, " has dtype ", t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->is_contiguous(), kOp, name, " must be contiguous");
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                   const std::vector<LayerTuple>& layers, int64_t nhead, bool norm_first, const std::string& activation,
                   double eps, bool is_causal, const Opt& final_weight, const Opt& final_bias, double final_eps,
                   const std::optional<std::vector<PackedTuple>>& packed) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, "x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   kOp, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), kOp, "x must be a contiguous [tokens, d_model], got shape ",
                    x.sizes());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK_VALUE(nhead >= 1 && d % nhead == 0, kOp, "d_model ", d, " must be a multiple of nhead ", nhead);
  TORCH_CHECK_VALUE(eps > 0 && final_eps > 0, kOp, "eps must be positive, got ", eps, " and ", final_eps);
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 &&
                       cu_seqlens.device().is_cpu(),
                   kOp, "cu_seqlens must be a 1-D int32 CPU tensor [batch + 1]");
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0 && c[cu.numel() - 1] <= T, kOp, "cu_seqlens must start at 0 and end at most at ", T,
                    " (the rows of x), got ", c[0], " ... ", c[cu.numel() - 1]);
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b] && c[b + 1] - c[b] <= max_seqlen, kOp, "sequence ", b, " spans rows ", c[b],
                      "..", c[b + 1], ": cu_seqlens must not decrease and no sequence may exceed max_seqlen ",
                      max_seqlen);
  }
  EncoderConfig cfg;
  cfg.nhead = nhead;
  cfg.norm_first = norm_first;
  cfg.act = parse_activation(activation);
  cfg.eps = eps;
  cfg.causal = is_causal;
  check(final_weight, "final_weight", {d}, x, true);
  check(final_bias, "final_bias", {d}, x, true);
  cfg.final_weight = final_weight.value_or(at::Tensor());
  cfg.final_bias = final_bias.value_or(at::Tensor());
  cfg.final_eps = final_eps;
  TORCH_CHECK_VALUE(!packed || packed->size() == layers.size(), kOp, "packed must hold one tuple per layer (",
                    layers.size(), "), got ", packed ? packed->size() : 0);
  std::vector<EncoderLayerWeights> ws;
  ws.reserve(layers.size());
  int64_t f = -1;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& [w_in, b_in, w_out, b_out, w1, b1, w2, b2, n1w, n1b, n2w, n2b] = layers[i];
    const std::string l = "layers[" + std::to_string(i) + "].";
    if (f < 0) f = w1.dim() == 2 ? w1.size(0) : 0;
    check(w_in, l + "in_proj_weight", {3 * d, d}, x, false);
    check(b_in, l + "in_proj_bias", {3 * d}, x, false);
    check(w_out, l + "out_proj.weight", {d, d}, x, false);
    check(b_out, l + "out_proj.bias", {d}, x, false);
    check(w1, l + "linear1.weight", {f, d}, x, false);
    check(b1, l + "linear1.bias", {f}, x, false);
    check(w2, l + "linear2.weight", {d, f}, x, false);
    check(b2, l + "linear2.bias", {d}, x, false);
    for (const auto& [t, n] : {std::pair{n1w, "norm1.weight"}, std::pair{n1b, "norm1.bias"},
                               std::pair{n2w, "norm2.weight"}, std::pair{n2b, "norm2.bias"}}) {
      check(t, l + n, {d}, x, true);
    }
    TORCH_CHECK_VALUE(f >= 1, kOp, l, "linear1.weight must be [dim_feedforward >= 1, d_model]");
    EncoderLayerWeights lw{w_in, b_in.value_or(at::Tensor()), w_out, b_out.value_or(at::Tensor()), w1,
                           b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor()), n1w.value_or(at::Tensor()),
                           n1b.value_or(at::Tensor()), n2w.value_or(at::Tensor()), n2b.value_or(at::Tensor())};
    if (packed) {
      const auto& [p_in, p_out, p1, p2] = (*packed)[i];
      check_packed(p_in, l + "in_proj_weight (packed)", {3 * d, d}, x);
      check_packed(p_out, l + "out_proj.weight (packed)", {d, d}, x);
      check_packed(p1, l + "linear1.weight (packed)", {f, d}, x);
      check_packed(p2, l + "linear2.weight (packed)", {d, f}, x);
      lw.in_proj_packed = p_in;
      lw.out_proj_packed = p_out;
      lw.linear1_packed = p1;
      lw.linear2_packed = p2;
    }
    ws.push_back(lw);
  }
  return encoder_forward(x, cu, max_seqlen, ws, cfg);
}

}  // namespace
}  // namespace cpu

void bind_encoder(py::module_& m) {
  m.def("encoder_forward_cpu", &cpu::forward,
        "inference of a stack of encoder layers on packed tokens x [T, d] in one call (see cpu/encoder.h)",
        py::arg("x"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("layers"), py::arg("nhead"),
        py::arg("norm_first"), py::arg("activation"), py::arg("eps"), py::arg("is_causal"), py::arg("final_weight"),
        py::arg("final_bias"), py::arg("final_eps"), py::arg("packed") = py::none());
}

}  // namespace fastenc
