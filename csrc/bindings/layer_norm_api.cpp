// Python bindings of the CPU residual + LayerNorm (layer_norm/layer_norm.h): argument checks that
// name the argument (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError), [..., N]
// tensors viewed as [rows, N], and one m.def per entry point.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <cmath>

#include "layer_norm/layer_norm.h"

namespace fastenc {

namespace {

using OptT = std::optional<at::Tensor>;

at::Tensor or_undefined(const OptT& t) { return t ? *t : at::Tensor(); }

// t must match ref (x in the forward, dy in the backward) in device, dtype and shape.
void check_activation(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastenc residual_layer_norm: ", name,
                    " must be a CPU tensor (fastenc._C's LayerNorm is CPU-only), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastenc residual_layer_norm: ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fastenc residual_layer_norm: ", name, " must have ", ref_name,
                    "'s shape ", ref.sizes(), ", got ", t.sizes());
}

// t: None, or [N] (x's last dim) in float32 or x's dtype.
void check_param(const OptT& t, const char* name, const at::Tensor& x) {
  if (!t) return;
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(t->device().is_cpu(), "fastenc residual_layer_norm: ", name, " must be a CPU tensor, got ",
                    t->device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == x.scalar_type(),
                   "fastenc residual_layer_norm: ", name, " must be float32 or x's dtype ", x.scalar_type(),
                   ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, "fastenc residual_layer_norm: ", name, " must have shape [",
                    n, "] (x's last dim), got ", t->sizes());
}

// x's checks shared by forward and backward.
void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "fastenc residual_layer_norm: ", name,
                    " must be a CPU tensor (fastenc._C's LayerNorm is CPU-only), got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastenc residual_layer_norm: ", name,
                   " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "fastenc residual_layer_norm: ", name,
                    " must have shape [..., N] with N >= 1, got ", x.sizes());
}

DropoutParams dropout_params(double p, int64_t seed, bool has_branch) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "fastenc residual_layer_norm: dropout_p must be in [0, 1], got ", p);
  return make_dropout(has_branch ? p : 0.0, seed);
}

// [..., N] as [rows, N] with a unit column stride (a view when the layout allows).
at::Tensor rows2d(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  if (t.dim() == 2 && (n <= 1 || t.stride(1) == 1)) return t;
  at::Tensor r = t.reshape({-1, n});
  return n <= 1 || r.stride(1) == 1 ? r : r.contiguous();
}

// (y, s, mean, rstd): s is the prenorm residual (x itself without a branch; empty unless prenorm);
// mean and rstd are fp32 [rows] for the backward.
std::vector<at::Tensor> fwd(const at::Tensor& x, const OptT& branch, const OptT& weight, const OptT& bias,
                            const OptT& branch_bias, double eps, double dropout_p, int64_t seed, bool prenorm) {
  check_x(x, "x");
  if (branch) check_activation(*branch, "branch", x, "x");
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  check_param(branch_bias, "branch_bias", x);
  TORCH_CHECK_VALUE(!branch_bias || branch, "fastenc residual_layer_norm: branch_bias is given but branch is None");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "fastenc residual_layer_norm: eps must be positive, got ", eps);
  const DropoutParams dp = dropout_params(dropout_p, seed, branch.has_value());
  const at::Tensor x2 = rows2d(x);
  const int64_t rows = x2.size(0), n = x2.size(1);
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor s = prenorm && branch ? at::empty({rows, n}, x.options()) : at::Tensor();
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({rows}, f32), rstd = at::empty({rows}, f32);
  residual_layer_norm_fwd_out(x2, branch ? rows2d(*branch) : at::Tensor(), or_undefined(weight), or_undefined(bias),
                              or_undefined(branch_bias), eps, dp, y, s, mean, rstd);
  at::Tensor s_out = !prenorm ? x.new_empty({0}) : branch ? s.view(x.sizes()) : x;
  return {y.view(x.sizes()), s_out, mean, rstd};
}

// [dx, dbranch, dweight, dbias, dbranch_bias]: dbranch is dx itself without dropout, empty without a
// branch; each parameter gradient has its parameter's dtype and is empty when the parameter is None
// (bias and branch_bias are read for their presence and dtype only).
std::vector<at::Tensor> bwd(const at::Tensor& dy, const OptT& dresid, const OptT& x, const OptT& branch,
                            const OptT& resid, const OptT& weight, const OptT& bias, const OptT& branch_bias,
                            const at::Tensor& mean, const at::Tensor& rstd, bool has_branch, double dropout_p,
                            int64_t seed) {
  check_x(dy, "dy");
  TORCH_CHECK_VALUE(resid || x, "fastenc residual_layer_norm: backward needs resid (prenorm) or x");
  for (const auto& [t, name] : {std::pair{&dresid, "dresid"}, {&x, "x"}, {&branch, "branch"}, {&resid, "resid"}}) {
    if (*t) check_activation(**t, name, dy, "dy");
  }
  TORCH_CHECK_VALUE(resid || !has_branch || branch,
                    "fastenc residual_layer_norm: has_branch without resid needs the branch to recompute s");
  check_param(weight, "weight", dy);
  check_param(bias, "bias", dy);
  check_param(branch_bias, "branch_bias", dy);
  const int64_t n = dy.size(-1), rows = dy.numel() / n;
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&rstd, "rstd"}}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows,
                      "fastenc residual_layer_norm: ", name, " must be the forward's float32 [", rows,
                      "] CPU tensor, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  const DropoutParams dp = dropout_params(dropout_p, seed, has_branch);
  auto r2 = [](const OptT& t) { return t ? rows2d(*t) : at::Tensor(); };
  const at::Tensor dy2 = rows2d(dy);
  at::Tensor dx = at::empty({rows, n}, dy.options());
  at::Tensor dbranch = has_branch && dp.enabled ? at::empty({rows, n}, dy.options()) : at::Tensor();
  auto grad_of = [&](const OptT& p) { return p ? at::empty({n}, p->options()) : at::Tensor(); };
  at::Tensor dweight = grad_of(weight), dbias = grad_of(bias);
  at::Tensor dbranch_bias = has_branch ? grad_of(branch_bias) : at::Tensor();
  residual_layer_norm_bwd_out(dy2, r2(dresid), r2(x), has_branch ? r2(branch) : at::Tensor(), r2(resid),
                              or_undefined(weight), has_branch ? or_undefined(branch_bias) : at::Tensor(),
                              mean.contiguous(), rstd.contiguous(), dp, dx, dbranch, dweight, dbias, dbranch_bias);
  const at::Tensor empty = dy.new_empty({0});
  dx = dx.view(dy.sizes());
  at::Tensor dbranch_out = !has_branch ? empty : dbranch.defined() ? dbranch.view(dy.sizes()) : dx;
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : empty; };
  return {dx, dbranch_out, or_empty(dweight), or_empty(dbias), or_empty(dbranch_bias)};
}

at::Tensor dropout_mask(int64_t rows, int64_t n, double p, int64_t seed) {
  TORCH_CHECK_VALUE(rows >= 0 && n >= 0, "fastenc residual_layer_norm: mask shape must be non-negative, got [", rows,
                    ", ", n, "]");
  return dropout_keep_mask_cpu(rows, n, dropout_params(p, seed, true));
}

}  // namespace

void bind_layer_norm(py::module_& m) {
  m.def("residual_layer_norm_fwd", &fwd,
        "CPU y, s, mean, rstd of s = x + dropout(branch + branch_bias), y = LayerNorm(s) * weight + bias",
        py::arg("x"), py::arg("branch"), py::arg("weight"), py::arg("bias"), py::arg("branch_bias"), py::arg("eps"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("prenorm"));
  m.def("residual_layer_norm_bwd", &bwd, "CPU [dx, dbranch, dweight, dbias, dbranch_bias] of residual_layer_norm_fwd",
        py::arg("dy"), py::arg("dresid"), py::arg("x"), py::arg("branch"), py::arg("resid"), py::arg("weight"),
        py::arg("bias"), py::arg("branch_bias"), py::arg("mean"), py::arg("rstd"), py::arg("has_branch"),
        py::arg("dropout_p"), py::arg("seed"));
  m.def("residual_layer_norm_dropout_mask", &dropout_mask,
        "bool keep mask [rows, N] of the CPU residual_layer_norm's dropout (element r*N + c)", py::arg("rows"),
        py::arg("n"), py::arg("p"), py::arg("seed"));
}

}  // namespace fastenc
