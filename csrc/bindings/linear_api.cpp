// Python bindings of the CPU oneDNN linear layer (linear/linear.h): y = act(x wᵀ + b) (+ add), with
// the weight either a plain [N, K] tensor or prepacked once into oneDNN's blocked layout
// (cpu_pack_linear_weight: torch's mkldnn::_reorder_linear_weight, what torch.compile's CPU
// freezing pass caches).  Packing pays for few rows (1-32 tokens: 1.1-2.3x, see benchmarks/README.md
// "CPU GEMMs") and is inference-only: a packed weight has no strides and no autograd.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "common/activation.h"
#include "linear/linear.h"

namespace fastenc {

namespace {

using OptT = std::optional<at::Tensor>;

void check_dtype_supported(at::ScalarType dt, const char* what) {
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "fastenc cpu_linear: ", what,
                   " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(onednn_linear_supported(dt), "fastenc cpu_linear: this torch has no oneDNN linear kernels for ",
                    dt, " on this CPU (float32 needs torch built with oneDNN; bfloat16 AVX512-BF16 or AMX; "
                    "float16 AVX512-FP16 or AMX-FP16)");
}

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.layout() == at::kStrided,
                    "fastenc cpu_pack_linear_weight: w must be a dense CPU tensor, got ", w.device(), " ", w.layout());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) >= 1 && w.size(1) >= 1,
                    "fastenc cpu_pack_linear_weight: w must be [N, K] (nn.Linear.weight) with N, K >= 1, got ",
                    w.sizes());
  check_dtype_supported(w.scalar_type(), "w");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_reorder_linear_weight", "")
                             .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(w.detach().contiguous(), std::nullopt);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const OptT& b, const std::string& activation,
                  const OptT& add) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.layout() == at::kStrided, "fastenc cpu_linear: x must be a dense CPU ",
                    "tensor, got ", x.device(), " ", x.layout());
  check_dtype_supported(x.scalar_type(), "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastenc cpu_linear: x must be [..., K], got a 0-d tensor");
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.dim() == 2, "fastenc cpu_linear: w must be a CPU [N, K] tensor ",
                    "(nn.Linear.weight, or cpu_pack_linear_weight of one), got ", w.device(), " ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "fastenc cpu_linear: w has dtype ", w.scalar_type(),
                   " but x has ", x.scalar_type());
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k && k >= 1, "fastenc cpu_linear: x has last dim ", x.size(-1),
                    " but w is [N, K] = ", w.sizes(), " (K >= 1)");
  if (b) {
    TORCH_CHECK_VALUE(b->device().is_cpu() && b->dim() == 1 && b->size(0) == n, "fastenc cpu_linear: b must be a ",
                      "CPU [N] = [", n, "] tensor, got ", b->device(), " ", b->sizes());
    TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), "fastenc cpu_linear: b has dtype ", b->scalar_type(),
                     " but x has ", x.scalar_type());
  }
  std::optional<Act> act;
  if (activation != "none") act = parse_activation(activation);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(n);
  if (add) {
    TORCH_CHECK_VALUE(!act, "fastenc cpu_linear: add and an activation cannot both be fused (act(x wT + b) + add "
                      "is not what oneDNN's post-ops compute); apply one of them separately");
    TORCH_CHECK_VALUE(add->device().is_cpu() && add->sizes() == at::IntArrayRef(out_shape),
                      "fastenc cpu_linear: add must be a CPU tensor of the output's shape ", out_shape, ", got ",
                      add->device(), " ", add->sizes());
    TORCH_CHECK_TYPE(add->scalar_type() == x.scalar_type(), "fastenc cpu_linear: add has dtype ",
                     add->scalar_type(), " but x has ", x.scalar_type());
  }
  const at::Tensor x2 = x.reshape({-1, k});
  if (x2.size(0) == 0) return x.new_empty(out_shape);
  const at::Tensor w2 = w.is_mkldnn() ? w : w.contiguous();
  const at::Tensor b2 = b ? b->contiguous() : at::Tensor();
  at::Tensor y = onednn_linear(x2, w2, b ? std::optional<at::Tensor>(b2) : std::nullopt, act,
                               add ? add->reshape({-1, n}) : at::Tensor());
  return y.view(out_shape);
}

}  // namespace

void bind_linear(py::module_& m) {
  m.def("cpu_linear", &linear,
        "y = act(x w^T + b) (+ add) on CPU through oneDNN; w is [N, K] or cpu_pack_linear_weight(w); "
        "activation: none, relu, gelu, gelu_tanh",
        py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("activation") = "none",
        py::arg("add") = py::none());
  m.def("cpu_pack_linear_weight", &pack_weight,
        "w [N, K] reordered once into oneDNN's blocked layout for cpu_linear (inference only)", py::arg("w"));
  m.def("cpu_linear_supported", &onednn_linear_supported,
        "whether cpu_linear has oneDNN kernels for this torch dtype on this CPU", py::arg("dtype"));
  m.def("cpu_linear_preferred", &onednn_unpacked_preferred,
        "whether cpu_linear (oneDNN) is faster than ATen's GEMM on unpacked weights of this dtype here: with "
        "AVX-512", py::arg("dtype"));
}

}  // namespace fastenc
