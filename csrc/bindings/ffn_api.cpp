// Python bindings of the FFN op: argument checks (TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError) and one m.def per entry point.  The math is in
// ffn/ffn.cpp, the path choice in ffn/gemm_paths.cpp, the kernels in ffn/cpu/ and ffn/cuda/.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#ifdef FASTENC_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "ffn/ffn.h"

// setup.py passes the archs as one token (-DFASTENC_CUDA_ARCHS=80_90a).
#define FASTENC_STR_(x) #x
#define FASTENC_STR(x) FASTENC_STR_(x)
#ifdef FASTENC_CUDA_ARCHS
constexpr const char* kCudaArchs = FASTENC_STR(FASTENC_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

namespace fastenc {

namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
bool aligned16(const std::optional<at::Tensor>& t) { return !t || aligned16(*t); }

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastenc ffn: ", name, " has dtype ", t.scalar_type(),
                   " but x has ", ref.scalar_type(), "; all operands must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastenc ffn: ", name, " is on ", t.device(), " but x is on ",
                    ref.device());
}

int compute_capability(const at::Tensor& x) {
#ifdef FASTENC_WITH_CUDA
  if (x.is_cuda()) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
    return prop->major * 10 + prop->minor;
  }
#endif
  return 0;
}

void check_device(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.is_cuda(), "fastenc ffn: tensors on ", x.device(),
                    " are not supported (cpu or cuda)");
#ifndef FASTENC_WITH_CUDA
  TORCH_CHECK_VALUE(!x.is_cuda(), "fastenc ffn: fastenc._C was built without CUDA; cuda tensors need a CUDA build");
#endif
}

// Validates shapes, dtypes and devices; returns (d, f), f = w1's rows (2× the hidden when gated).
std::pair<int64_t, int64_t> check_inputs(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                         const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                         const std::optional<at::Tensor>& residual, Act act) {
  check_device(x);
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "fastenc ffn: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastenc ffn: x must have shape [..., d], got a 0-d tensor");
  TORCH_CHECK_VALUE(w1.dim() == 2, "fastenc ffn: w1 must be [f, d] (nn.Linear(d, f).weight), got shape ", w1.sizes());
  const int64_t d = w1.size(1), f = w1.size(0);
  TORCH_CHECK_VALUE(d > 0 && f > 0, "fastenc ffn: w1 must be [f, d] with f, d >= 1, got shape ", w1.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == d, "fastenc ffn: x has last dim ", x.size(-1), " but w1 is [f, d] = ", w1.sizes());
  TORCH_CHECK_VALUE(!is_gated(act) || f % 2 == 0, "fastenc ffn: a gated activation (", activation_name(act),
                    ") needs w1 [2f, d] with an even row count, got shape ", w1.sizes());
  const int64_t hidden = is_gated(act) ? f / 2 : f;
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == d && w2.size(1) == hidden,
                    "fastenc ffn: w2 must be [d, f] = [", d, ", ", hidden, "] (nn.Linear(f, d).weight), got shape ",
                    w2.sizes());
  check_same(x, w1, "w1");
  check_same(x, w2, "w2");
  if (b1) {
    TORCH_CHECK_VALUE(b1->dim() == 1 && b1->size(0) == f, "fastenc ffn: b1 must be [f] = [", f, "], got ", b1->sizes());
    check_same(x, *b1, "b1");
  }
  if (b2) {
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == d, "fastenc ffn: b2 must be [d] = [", d, "], got ", b2->sizes());
    check_same(x, *b2, "b2");
  }
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "fastenc ffn: residual must have x's shape ", x.sizes(),
                      ", got ", residual->sizes());
    check_same(x, *residual, "residual");
  }
  return {d, f};
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

Plan plan_for(const at::Tensor& x, std::initializer_list<std::optional<at::Tensor>> operands, int64_t d, int64_t f,
              bool has_b1, Act act, double p, bool training, const std::string& requested) {
  PlanQuery q;
  q.cuda = x.is_cuda();
  q.cc = compute_capability(x);
  q.dtype = x.scalar_type();
  q.d = d;
  q.f = f;
  q.act = act;
  q.has_b1 = has_b1;
  q.dropout = p > 0.0;
  q.training = training;
  q.aligned = true;
  for (const auto& t : operands) q.aligned = q.aligned && aligned16(t);
  q.requested = requested;
  return plan_gemm_path(q);
}

// x [..., d] -> {y [..., d], h [T, f], pre [T, f]} (h, pre empty unless save).
std::vector<at::Tensor> ffn_forward(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                    const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                    const std::optional<at::Tensor>& residual, const std::string& activation,
                                    double dropout_p, int64_t seed, const std::string& gemm_path, bool save) {
  const Act act = parse_activation(activation);
  const auto [d, f] = check_inputs(x, w1, b1, w2, b2, residual, act);
  const DropoutParams dp = make_dropout(dropout_p, seed);
#ifdef FASTENC_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(x.is_cuda() ? std::optional<at::Device>(x.device()) : std::nullopt);
#endif
  const at::Tensor x2 = x.reshape({-1, d}).contiguous();
  const std::optional<at::Tensor> r2 =
      residual ? std::optional<at::Tensor>(residual->reshape({-1, d}).contiguous()) : std::nullopt;
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const auto b1c = contiguous(b1), b2c = contiguous(b2);
  const Plan plan = plan_for(x2, {x2, w1c, b1c, w2c, b2c, r2}, d, f, b1.has_value(), act, dropout_p, save, gemm_path);
  std::vector<at::Tensor> out = ffn_forward_2d(x2, w1c, b1c, w2c, b2c, r2, act, dp, plan, save);
  out[0] = out[0].view(x.sizes());
  return out;
}

std::vector<at::Tensor> ffn_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                     const at::Tensor& w2, const at::Tensor& h, const at::Tensor& pre,
                                     const std::string& activation, double dropout_p, int64_t seed, bool has_b1,
                                     bool has_b2, const std::string& gemm_path) {
  const Act act = parse_activation(activation);
  const auto [d, f] = check_inputs(x, w1, std::nullopt, w2, std::nullopt, std::nullopt, act);
  const DropoutParams dp = make_dropout(dropout_p, seed);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "fastenc ffn: dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  check_same(x, dy, "dy");
  const int64_t T = x.numel() / d;
  const std::vector<int64_t> hidden = {T, is_gated(act) ? f / 2 : f}, gemm1 = {T, f};
  TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef(hidden) && (act == Act::kReLU || pre.sizes() == at::IntArrayRef(gemm1)),
                    "fastenc ffn: backward needs the hidden tensors saved by a training forward (save=True)");
  check_same(x, h, "h");
  if (act != Act::kReLU) check_same(x, pre, "pre");
#ifdef FASTENC_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(x.is_cuda() ? std::optional<at::Device>(x.device()) : std::nullopt);
#endif
  const at::Tensor x2 = x.reshape({-1, d}).contiguous(), dy2 = dy.reshape({-1, d}).contiguous();
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor hc = h.contiguous(), prec = pre.contiguous();
  const Plan plan = plan_for(x2, {x2, dy2, w1c, w2c, hc, prec}, d, f, has_b1, act, dropout_p, true, gemm_path);
  std::vector<at::Tensor> out = ffn_backward_2d(dy2, x2, w1c, w2c, hc, prec, act, dp, plan, has_b1, has_b2);
  out[0] = out[0].view(x.sizes());
  return out;
}

// The GEMM path and the reason for a call with these properties (for backend_report).
std::vector<std::string> ffn_plan(const std::string& device_type, int64_t cc, const std::string& dtype, int64_t d,
                                  int64_t f, const std::string& activation, double dropout_p, bool training,
                                  bool has_b1, const std::string& requested) {
  PlanQuery q;
  q.cuda = device_type == "cuda";
  q.cc = static_cast<int>(cc);
  q.dtype = dtype == "float16" ? at::kHalf : dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  q.d = d;
  q.f = f;
  q.act = parse_activation(activation);
  q.has_b1 = has_b1;
  q.dropout = dropout_p > 0.0;
  q.training = training;
  q.requested = requested;
  const Plan p = plan_gemm_path(q);
  return {gemm_path_name(p.path), p.why};
}

at::Tensor ffn_dropout_mask(int64_t rows, int64_t cols, double p, int64_t seed, const at::Device& device) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "fastenc ffn: mask shape must be non-negative");
  const DropoutParams dp = make_dropout(p, seed);
#ifdef FASTENC_WITH_CUDA
  if (device.is_cuda()) return dropout_keep_mask_cuda(rows, cols, dp, device);
#endif
  TORCH_CHECK_VALUE(device.is_cpu(), "fastenc ffn: no dropout mask kernel for ", device);
  return dropout_keep_mask_cpu(rows, cols, dp);
}

#ifdef FASTENC_WITH_CUDA
// The column-major cuBLASLt call (see LtDesc in ffn.h) behind one FFN GEMM, from shapes alone:
// gemm = "linear" (out[M, N] = a[M, K] b[N, K]ᵀ, epilogue bias | relu_bias | gelu_bias |
// gelu_aux_bias), "dgelu_bgrad" (dpre[M, N] = g[M, K] w[K, N]) or "wgrad_bgradb"
// (dw[N, K] = dy[M, N]ᵀ h[M, K]).
py::dict ffn_lt_describe(const std::string& gemm, int64_t M, int64_t N, int64_t K, bool has_bias,
                         const std::string& epilogue) {
  LtDesc d;
  if (gemm == "linear") {
    LtEpilogue ep = LtEpilogue::kBias;
    if (epilogue == "relu_bias") ep = LtEpilogue::kReluBias;
    else if (epilogue == "gelu_bias") ep = LtEpilogue::kGeluBias;
    else if (epilogue == "gelu_aux_bias") ep = LtEpilogue::kGeluAuxBias;
    else TORCH_CHECK_VALUE(epilogue == "bias", "fastenc ffn: unknown linear epilogue '", epilogue, "'");
    d = lt_linear_desc(M, N, K, has_bias, ep);
  } else if (gemm == "dgelu_bgrad") {
    d = lt_dgelu_bgrad_desc(M, N, K, has_bias);
  } else {
    TORCH_CHECK_VALUE(gemm == "wgrad_bgradb", "fastenc ffn: unknown cuBLASLt GEMM '", gemm,
                      "'; expected linear, dgelu_bgrad or wgrad_bgradb");
    d = lt_wgrad_bgrad_desc(M, N, K, has_bias);
  }
  py::dict r;
  r["trans_a"] = d.trans_a;
  r["trans_b"] = d.trans_b;
  r["m"] = d.m;
  r["n"] = d.n;
  r["k"] = d.k;
  r["lda"] = d.lda;
  r["ldb"] = d.ldb;
  r["ldd"] = d.ldd;
  r["ld_aux"] = d.ld_aux;
  r["epilogue"] = std::string(lt_epilogue_name(d.epilogue));
  r["bias"] = d.bias;
  r["a_operand"] = std::string(d.a_operand);
  r["b_operand"] = std::string(d.b_operand);
  return r;
}
#endif

bool has_cuda() {
#ifdef FASTENC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

void bind_ffn(py::module_& m) {
  m.def("ffn_forward", &fastenc::ffn_forward, "y, h, pre = FFN forward", py::arg("x"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("residual"), py::arg("activation"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("gemm_path"), py::arg("save"));
  m.def("ffn_backward", &fastenc::ffn_backward, "dx, dw1, db1, dw2, db2 = FFN backward", py::arg("dy"),
        py::arg("x"), py::arg("w1"), py::arg("w2"), py::arg("h"), py::arg("pre"), py::arg("activation"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("has_b1"), py::arg("has_b2"), py::arg("gemm_path"));
  m.def("ffn_plan", &fastenc::ffn_plan, "(gemm path, reason) the dispatch table picks", py::arg("device_type"),
        py::arg("cc"), py::arg("dtype"), py::arg("d"), py::arg("f"), py::arg("activation"), py::arg("dropout_p"),
        py::arg("training"), py::arg("has_b1"), py::arg("requested"));
  m.def("ffn_dropout_mask", &fastenc::ffn_dropout_mask, "bool keep mask [rows, cols] drawn by the FFN kernels",
        py::arg("rows"), py::arg("cols"), py::arg("p"), py::arg("seed"), py::arg("device"));
  m.def("ffn_dispatch_table", &fastenc::dispatch_table_description, "the GEMM-path table, one row per arch/act");
  m.def("has_cuda", &fastenc::has_cuda, "whether the CUDA kernels were compiled");
#ifdef FASTENC_WITH_CUDA
  m.def("ffn_lt_describe", &fastenc::ffn_lt_describe, "the column-major cuBLASLt call of one FFN GEMM (shapes only)",
        py::arg("gemm"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("has_bias"), py::arg("epilogue") = "bias");
#endif
  m.def("cutlass_sm90_built", &fastenc::cutlass_sm90_built, "whether the CUTLASS sm90 kernels were compiled");
  m.def("cuda_archs", []() { return std::string(kCudaArchs); }, "the CUDA archs of the build, as 80_90a");
  py::list acts;  // fastenc/constants.py's ACTIVATIONS + GATED_ACTIVATIONS, as parse_activation takes them
  for (int a = static_cast<int>(Act::kReLU); a <= static_cast<int>(Act::kSwiGLU); ++a) {
    acts.append(activation_name(static_cast<Act>(a)));
  }
  m.attr("FFN_ACTIVATIONS") = py::tuple(acts);
}

}  // namespace fastenc
