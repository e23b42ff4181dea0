// Python binding of the CPU encoder stack (encoder/encoder.cpp): the EncoderLayer class, built once from
// fastenc.layer's LayerSpec and LayerWeights (checked then, weights packed for the panel GEMM or oneDNN's), and
// one m.def for the forward, which checks only what a call can change (x, cu_seqlens, the rotary tables).
// TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError, each naming the argument.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "encoder/encoder.h"
#include "fastenc_constants.h"
#include "linear/linear.h"

namespace fastenc {
namespace cpu {
namespace {

constexpr const char* kOp = "fastenc encoder (cpu): ";

at::Tensor tensor_attr(const py::object& obj, const char* name) {
  const py::object v = obj.attr(name);
  return v.is_none() ? at::Tensor() : v.cast<at::Tensor>();
}

// A weight in oneDNN's blocked layout (torch's mkldnn::_reorder_linear_weight, what torch.compile's CPU
// freezing pass caches): faster GEMMs for few rows; inference only.
at::Tensor pack(const at::Tensor& w) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                             .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(w.detach().contiguous(), std::nullopt);
}

// name: a field of the layer (its dtype must be the layer's) or of the call (the dtype of x).
void check_tensor(const at::Tensor& t, const std::string& name, at::IntArrayRef shape, at::ScalarType dtype,
                  bool norm_param) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided, kOp, name,
                    " must be a dense CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, name, " must have shape ", shape, ", got ", t.sizes());
  const bool ok = t.scalar_type() == dtype || (norm_param && t.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, kOp, name, " has dtype ", t.scalar_type(), ", expected ", dtype,
                   norm_param ? " (or float32)" : "", " as the layer's qkv_weight and x");
}

EncoderLinear make_linear(const py::object& w, const char* weight, const char* bias, const std::string& where,
                          at::IntArrayRef shape, at::ScalarType dtype, bool prepack) {
  EncoderLinear lin;
  lin.weight = tensor_attr(w, weight).detach();
  lin.bias = tensor_attr(w, bias);
  TORCH_CHECK_VALUE(lin.weight.defined(), kOp, where, weight, " is missing");
  check_tensor(lin.weight, where + weight, shape, dtype, false);
  lin.weight = lin.weight.contiguous();
  if (lin.bias.defined()) {
    check_tensor(lin.bias, where + bias, {shape[0]}, dtype, false);
    lin.bias = lin.bias.detach().contiguous();
  }
  if (lin.bias.defined()) lin.bias_f32 = lin.bias.to(at::kFloat).contiguous();
  lin.panel_rows = encoder_panel_rows(dtype);
  if (lin.panel_rows > 0) lin.panel = std::make_shared<PanelWeight>(pack_panel_weight(lin.weight));
  if (prepack && lin.panel_rows < std::numeric_limits<int64_t>::max()) lin.packed = pack(lin.weight);
  return lin;
}

// An int8 copy of a GEMM's weight (fastenc._C.Int8Weight), from int8: {"qkv" | "out" | "ffn1" | "ffn2": ...}.
void set_int8(EncoderLinear& lin, const py::dict& int8, const char* name, const std::string& where) {
  if (!int8.contains(name) || int8[name].is_none()) return;
  lin.int8 = int8[name].cast<std::shared_ptr<Int8Weight>>();
  TORCH_CHECK_VALUE(lin.int8->n == lin.weight.size(0) && lin.int8->k == lin.weight.size(1), kOp, where, "int8[",
                    name, "] is [", lin.int8->n, ", ", lin.int8->k, "] but the weight is ", lin.weight.sizes());
  lin.packed = at::Tensor();  // the float GEMM's copies are not used
  lin.panel.reset();
  lin.panel_rows = 0;
}

std::shared_ptr<EncoderLayer> make_layer(const py::object& spec, const py::object& w, const std::string& where,
                                         const py::dict& int8) {
  auto layer = std::make_shared<EncoderLayer>();
  const py::object act = spec.attr("activation");
  TORCH_CHECK_VALUE(py::isinstance<py::str>(act), kOp, where, "activation must be a kernel activation name, got a ",
                    std::string(py::str(act.get_type())));
  layer->act = parse_activation(act.cast<std::string>());
  layer->d_model = spec.attr("d_model").cast<int64_t>();
  layer->nhead = spec.attr("nhead").cast<int64_t>();
  const int64_t d = layer->d_model;
  TORCH_CHECK_VALUE(layer->nhead >= 1 && d >= 1 && d % layer->nhead == 0, kOp, where, "nhead ", layer->nhead,
                    " must divide d_model ", d);
  layer->norm_first = spec.attr("norm_first").cast<bool>();
  layer->attn_norm = spec.attr("attn_norm").cast<bool>();
  layer->eps1 = spec.attr("eps1").cast<double>();
  layer->eps2 = spec.attr("eps2").cast<double>();
  TORCH_CHECK_VALUE(layer->eps1 > 0 && layer->eps2 > 0, kOp, where, "eps must be positive");
  const py::object window = spec.attr("window");
  if (!window.is_none()) {
    const auto lr = window.cast<std::pair<int64_t, int64_t>>();
    TORCH_CHECK_VALUE(lr.first >= -1 && lr.second >= -1, kOp, where, "window sides must be >= -1");
    layer->window_left = lr.first;
    layer->window_right = lr.second;
  }
  layer->rotary = spec.attr("rotary").cast<bool>();
  TORCH_CHECK_VALUE(!layer->rotary || (d / layer->nhead) % 2 == 0, kOp, where, "rotary needs an even head dim");

  const at::Tensor w_qkv = tensor_attr(w, "qkv_weight");
  TORCH_CHECK_VALUE(w_qkv.defined(), kOp, where, "qkv_weight is missing");
  const at::ScalarType dtype = w_qkv.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp, where,
                   "weights must be float32, bfloat16 or float16, got ", dtype);
  const bool prepack = onednn_linear_supported(dtype);
  const at::Tensor w1 = tensor_attr(w, "ffn1_weight");
  TORCH_CHECK_VALUE(w1.defined() && w1.dim() == 2 && w1.size(0) >= (layer->gated() ? 2 : 1) &&
                        (!layer->gated() || w1.size(0) % 2 == 0),
                    kOp, where, "ffn1_weight must be [f, d_model] ([2f, d_model] when gated)");
  const int64_t f = w1.size(0) / (layer->gated() ? 2 : 1);
  layer->qkv = make_linear(w, "qkv_weight", "qkv_bias", where, {3 * d, d}, dtype, prepack);
  layer->out = make_linear(w, "out_weight", "out_bias", where, {d, d}, dtype, prepack);
  layer->ffn1 = make_linear(w, "ffn1_weight", "ffn1_bias", where, {w1.size(0), d}, dtype, prepack);
  layer->ffn2 = make_linear(w, "ffn2_weight", "ffn2_bias", where, {d, f}, dtype, prepack);
  set_int8(layer->qkv, int8, "qkv", where);
  set_int8(layer->out, int8, "out", where);
  set_int8(layer->ffn1, int8, "ffn1", where);
  set_int8(layer->ffn2, int8, "ffn2", where);
  TORCH_CHECK_TYPE(int8.empty() || dtype == at::kFloat || dtype == at::kBFloat16, kOp, where,
                   "int8 GEMMs take float32 or bfloat16 activations, not ", dtype);
  const char* norms[] = {"norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias"};
  at::Tensor* slots[] = {&layer->norm1_weight, &layer->norm1_bias, &layer->norm2_weight, &layer->norm2_bias};
  for (int j = 0; j < 4; ++j) {
    at::Tensor t = tensor_attr(w, norms[j]);
    if (t.defined()) {
      check_tensor(t, where + norms[j], {d}, dtype, true);
      *slots[j] = t.detach().to(at::kFloat).contiguous();  // the LayerNorm pass reads fp32 parameters as they are
    }
  }
  return layer;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                   const std::vector<std::shared_ptr<EncoderLayer>>& layers, bool is_causal,
                   const std::optional<at::Tensor>& final_weight, const std::optional<at::Tensor>& final_bias,
                   std::optional<double> final_eps, const std::vector<std::optional<at::Tensor>>& rotary_cos,
                   const std::vector<std::optional<at::Tensor>>& rotary_sin, int64_t chunk_elements) {
  TORCH_CHECK_VALUE(chunk_elements >= 0, kOp, "chunk_elements must be >= 0 (0: no chunks), got ", chunk_elements);
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, "x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), kOp, "x must be a contiguous [tokens, d_model], got shape ",
                    x.sizes());
  const int64_t T = x.size(0), d = x.size(1);
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 &&
                       cu_seqlens.device().is_cpu(),
                   kOp, "cu_seqlens must be a 1-D int32 CPU tensor [batch + 1]");
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0 && c[cu.numel() - 1] <= T, kOp, "cu_seqlens must start at 0 and end at most at ", T,
                    " (the rows of x), got ", c[0], " ... ", c[cu.numel() - 1]);
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b] && c[b + 1] - c[b] <= max_seqlen, kOp, "sequence ", b, " spans rows ", c[b],
                      "..", c[b + 1], ": cu_seqlens must not decrease and no sequence may exceed max_seqlen ",
                      max_seqlen);
  }
  TORCH_CHECK_VALUE(rotary_cos.size() == layers.size() && rotary_sin.size() == layers.size(), kOp,
                    "rotary_cos and rotary_sin must hold one entry per layer (None for a layer without rotary)");
  EncoderCall call;
  call.causal = is_causal;
  call.chunk_elements = chunk_elements;
  for (size_t i = 0; i < layers.size(); ++i) {
    const EncoderLayer& w = *layers[i];
    const std::string l = "layers[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(w.d_model == d, kOp, l, " has d_model ", w.d_model, " but x is [T, ", d, "]");
    TORCH_CHECK_TYPE(w.qkv.weight.scalar_type() == x.scalar_type(), kOp, l, " was built for ",
                     w.qkv.weight.scalar_type(), " but x has ", x.scalar_type());
    at::Tensor cs, sn;
    if (w.rotary) {
      TORCH_CHECK_VALUE(rotary_cos[i] && rotary_sin[i], kOp, l, " has rotary embeddings: its tables are missing");
      cs = *rotary_cos[i];
      sn = *rotary_sin[i];
      const int64_t half = d / w.nhead / 2;
      for (const at::Tensor* t : {&cs, &sn}) {
        TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 2 &&
                              t->size(0) >= std::max<int64_t>(max_seqlen, 1) && t->size(1) == half &&
                              t->stride(1) == 1 && t->stride(0) == cs.stride(0),
                          kOp, l, " rotary tables must be fp32 [P >= max_seqlen, head_dim / 2 = ", half,
                          "] with unit last stride, got ", t->scalar_type(), " ", t->sizes());
      }
    }
    call.rotary_cos.push_back(cs);
    call.rotary_sin.push_back(sn);
  }
  call.final_norm = final_eps.has_value();
  if (call.final_norm) {
    TORCH_CHECK_VALUE(*final_eps > 0, kOp, "final_eps must be positive, got ", *final_eps);
    call.final_eps = *final_eps;
    for (const auto& [t, name] : {std::pair{&final_weight, "final_weight"}, std::pair{&final_bias, "final_bias"}}) {
      if (!*t) continue;
      check_tensor(**t, name, {d}, x.scalar_type(), true);
    }
    call.final_weight = final_weight ? final_weight->contiguous() : at::Tensor();
    call.final_bias = final_bias ? final_bias->contiguous() : at::Tensor();
  }
  py::gil_scoped_release no_gil;  // pure ATen from here: other Python threads run meanwhile
  return encoder_forward(x, cu, max_seqlen, layers, call);
}

}  // namespace
}  // namespace cpu

void bind_encoder(py::module_& m) {
  py::class_<cpu::EncoderLayer, std::shared_ptr<cpu::EncoderLayer>>(
      m, "EncoderLayer",
      "one encoder layer for encoder_forward_cpu, built from a fastenc.layer.LayerSpec and LayerWeights "
      "(checked, GEMM weights packed for the panel GEMM, up to panel_rows rows, and for oneDNN where it runs above "
      "them (prepacked), or in int8 where int8 gives a GEMM's Int8Weight); it holds the weights it was built from")
      .def(py::init(&cpu::make_layer), py::arg("spec"), py::arg("weights"), py::arg("where") = "",
           py::arg("int8") = py::dict())
      .def_property_readonly("d_model", [](const cpu::EncoderLayer& l) { return l.d_model; })
      .def_property_readonly("prepacked", [](const cpu::EncoderLayer& l) { return l.qkv.packed.defined(); })
      .def_property_readonly("panel_rows", [](const cpu::EncoderLayer& l) { return l.qkv.panel_rows; })
      .def_property_readonly("int8_gemms", [](const cpu::EncoderLayer& l) {
        py::list names;
        for (const auto& [lin, name] : {std::pair{&l.qkv, "qkv"}, std::pair{&l.out, "out"}, std::pair{&l.ffn1, "ffn1"},
                                        std::pair{&l.ffn2, "ffn2"}}) {
          if (lin->int8) names.append(name);
        }
        return names;
      });
  m.def("encoder_forward_cpu", &cpu::forward,
        "inference of a stack of EncoderLayers on packed tokens x [T, d] in one call (see encoder/encoder.h)",
        py::arg("x"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("layers"), py::arg("is_causal"),
        py::arg("final_weight"), py::arg("final_bias"), py::arg("final_eps"), py::arg("rotary_cos"),
        py::arg("rotary_sin"), py::arg("chunk_elements") = constants::kEncoderChunkElements);
}

}  // namespace fastenc
