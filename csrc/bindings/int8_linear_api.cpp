// Python bindings of the CPU int8 linear layer (linear/int8_linear.h): the packed weight class, the quantized
// GEMM with its run-time activation quantization, and whether the VNNI kernel runs here.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <memory>
#include <optional>
#include <string>

#include "ffn/ffn.h"  // parse_activation
#include "linear/int8_linear.h"

namespace fastenc {

namespace {

constexpr const char* kOp = "fastenc linear_int8 (cpu): ";

std::shared_ptr<cpu::Int8Weight> pack(const at::Tensor& q, const at::Tensor& scale,
                                      const std::optional<at::Tensor>& smooth,
                                      const std::optional<at::Tensor>& float_channels,
                                      const std::optional<at::Tensor>& float_weight) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, kOp,
                   "weight_q must be int8 and weight_scale float32, got ", q.scalar_type(), " and ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && scale.device().is_cpu() && q.dim() == 2 && q.size(0) >= 1 &&
                        q.size(1) >= 1 && scale.dim() == 1 && scale.size(0) == q.size(0),
                    kOp, "weight_q must be a CPU [n, k] tensor (n, k >= 1) and weight_scale [n], got ", q.sizes(),
                    " and ", scale.sizes());
  if (smooth) {
    TORCH_CHECK_VALUE(smooth->scalar_type() == at::kFloat && smooth->device().is_cpu() && smooth->dim() == 1 &&
                          smooth->size(0) == q.size(1),
                      kOp, "smooth must be a float32 CPU [", q.size(1), "] tensor, got ", smooth->scalar_type(), " ",
                      smooth->sizes());
  }
  TORCH_CHECK_VALUE(float_channels.has_value() == float_weight.has_value(), kOp,
                    "float_channels and float_weight come together (both or neither)");
  if (float_channels) {
    TORCH_CHECK_TYPE(float_channels->scalar_type() == at::kLong && float_channels->device().is_cpu() &&
                         float_weight->device().is_cpu(),
                     kOp, "float_channels must be an int64 CPU tensor and float_weight on the CPU, got ",
                     float_channels->scalar_type(), " on ", float_channels->device());
  }
  return std::make_shared<cpu::Int8Weight>(cpu::pack_int8_weight(
      q, scale.contiguous(), smooth.value_or(at::Tensor()), float_channels.value_or(at::Tensor()),
      float_weight.value_or(at::Tensor())));
}

at::Tensor linear(const at::Tensor& x, const cpu::Int8Weight& w, const std::optional<at::Tensor>& bias,
                  const std::string& act_in, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, kOp,
                    "x must be a CPU [m, k] tensor with unit last stride, got ", x.device(), " ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kOp,
                   "x must be float32 or bfloat16, got ", x.scalar_type());
  std::optional<Act> act;
  if (act_in != "none") act = parse_activation(act_in);
  const bool gated = act && (*act == Act::kGeGLU || *act == Act::kSwiGLU);
  TORCH_CHECK_VALUE(x.size(1) == w.k * (gated ? 2 : 1), kOp, "x has ", x.size(1), " columns but the weight is [",
                    w.n, ", ", w.k, "]", gated ? " (a gated act_in halves x's columns)" : "");
  at::Tensor b;
  if (bias) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == w.n, kOp,
                      "bias must be a CPU [", w.n, "] tensor, got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor r;
  if (residual) {
    TORCH_CHECK_VALUE(residual->device().is_cpu() && residual->sizes() == at::IntArrayRef({x.size(0), w.n}), kOp,
                      "residual must be a CPU [", x.size(0), ", ", w.n, "] tensor, got ", residual->sizes());
    r = residual->to(x.scalar_type()).contiguous();
  }
  return cpu::int8_linear(cpu::quantize_rows(x, act, w.smooth, w.float_channels), w, b, r, x.scalar_type());
}

}  // namespace

void bind_int8_linear(py::module_& m) {
  py::class_<cpu::Int8Weight, std::shared_ptr<cpu::Int8Weight>>(
      m, "Int8Weight",
      "an int8 weight [n, k] with per-channel scales (and optionally the 1/s of its SmoothQuant smoothing, which "
      "multiplies the activations before they are quantized, and input channels kept in float: float_channels "
      "int64 [f] with their columns float_weight [n, f]), packed for cpu_int8_linear")
      .def(py::init(&pack), py::arg("weight_q"), py::arg("weight_scale"), py::arg("smooth") = py::none(),
           py::arg("float_channels") = py::none(), py::arg("float_weight") = py::none())
      .def_property_readonly("shape", [](const cpu::Int8Weight& w) { return py::make_tuple(w.n, w.k); });
  m.def("cpu_int8_linear", &linear,
        "y = (q_x q_w^T) s_x s_w + bias (+ residual): x quantized per row after act_in (none, relu, gelu, gelu_tanh, "
        "geglu, swiglu), int8 GEMM with int32 accumulation, output in x's dtype",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("act_in") = "none",
        py::arg("residual") = py::none());
  m.def("cpu_int8_kernel", [] { return std::string(cpu::int8_kernel_name(cpu::int8_kernel())); },
        "the int8 GEMM that runs on this CPU: 'avx512_vnni', 'avx2' (vpmaddwd on 16-bit operands) or 'fp32_exact' "
        "(exact fp32 GEMMs of the int8 values, below avx2)");
}

}  // namespace fastenc
