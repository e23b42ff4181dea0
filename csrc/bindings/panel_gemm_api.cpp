// Python bindings of the few-row CPU GEMM (linear/panel_gemm.h): its packed weight class and the GEMM.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <memory>
#include <optional>
#include <string>

#include "linear/panel_gemm.h"

namespace fastenc {

namespace {

constexpr const char* kOp = "fastenc panel_gemm (cpu): ";

std::shared_ptr<cpu::PanelWeight> pack(const at::Tensor& w) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, kOp,
                   "w must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.dim() == 2 && w.size(0) >= 1 && w.size(1) >= 1, kOp,
                    "w must be a CPU [n, k] tensor with n, k >= 1, got ", w.sizes());
  return std::make_shared<cpu::PanelWeight>(cpu::pack_panel_weight(w.detach()));
}

at::Tensor gemm(const at::Tensor& x, const cpu::PanelWeight& w, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& residual, const std::string& act) {
  TORCH_CHECK_VALUE(cpu::panel_gemm_supported(w.dtype), kOp, "no kernel for ", w.dtype,
                    " on this CPU (AVX-512; bf16 also AVX512-BF16)");
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.size(1) == w.k && x.stride(1) == 1, kOp,
                    "x must be a CPU [m, ", w.k, "] tensor with unit last stride, got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == w.dtype, kOp, "x has dtype ", x.scalar_type(), ", the weight ", w.dtype);
  if (bias) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == w.n, kOp, "bias must be [", w.n,
                      "], got ", bias->sizes());
  }
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({x.size(0), w.n}) && residual->scalar_type() == w.dtype,
                      kOp, "residual must be [", x.size(0), ", ", w.n, "] in x's dtype");
  }
  TORCH_CHECK_VALUE(act == "none" || act == "relu" || act == "gelu" || act == "gelu_tanh", kOp,
                    "act must be none, relu, gelu or gelu_tanh, got '", act, "'");
  std::optional<Act> a;
  if (act != "none") a = parse_activation(act);
  return cpu::panel_gemm(x, w, bias.value_or(at::Tensor()), residual.value_or(at::Tensor()), a);
}

}  // namespace

void bind_panel_gemm(py::module_& m) {
  py::class_<cpu::PanelWeight, std::shared_ptr<cpu::PanelWeight>>(
      m, "PanelWeight", "a float32 / bfloat16 weight [n, k] packed into 64-column panels for cpu_panel_gemm")
      .def(py::init(&pack), py::arg("w"));
  m.def("cpu_panel_gemm", &gemm,
        "y = act(x w^T + bias (+ residual)): the few-row CPU GEMM (AVX-512; bf16: AVX512-BF16), act none, relu, gelu "
        "or gelu_tanh",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("residual") = py::none(),
        py::arg("act") = "none");
  m.def("cpu_panel_gemm_supported", &cpu::panel_gemm_supported, "whether cpu_panel_gemm runs dtype on this CPU",
        py::arg("dtype"));
}

}  // namespace fastenc
