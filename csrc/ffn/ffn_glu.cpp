// Forward and backward of the gated FFN (geglu, swiglu) on 2-D row-major operands.
//
// Forward:  pre = x W1ᵀ + b1 = [a, g] (W1 [2f, d]);  h = dropout(act(a) · g);  y = h W2ᵀ + b2 (+ residual).
// Backward: gh = dy W2;  dh = gh · keep/(1-p);  da = dh · g · act'(a),  dg = dh · act(a);
//           db1 = Σ_rows [da, dg];  dW2 = dyᵀ h;  db2 = Σ_rows dy;  dx = [da, dg] W1;  dW1 = [da, dg]ᵀ x.
// Saved for backward: h (for dW2) and pre.  GEMMs: on CPU oneDNN's inner products where the
// ungated FFN takes them (cpu_onednn_gemms; b1, b2 and the residual in their epilogues), else
// ATen's (cuBLAS on CUDA); the gate multiply, activation and dropout are one pass over pre, which is
// written once by GEMM1 and read once (a GEMM1 epilogue that multiplied the gate would save that
// read and the [T, 2f] write: no library offers one).
#include "linear/linear.h"
#include "ffn/ffn.h"

namespace fastenc {

namespace {

void glu_dropout(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  if (h.numel() == 0) return;
#ifdef FASTENC_WITH_CUDA
  if (pre.is_cuda()) return glu_dropout_cuda(pre, h, act, dp);
#endif
  glu_dropout_cpu(pre, h, act, dp);
}

void dglu_dropout_bgrad(const at::Tensor& gh, const at::Tensor& pre, const at::Tensor& dpre, const at::Tensor& db1,
                        Act act, const DropoutParams& dp) {
  if (gh.numel() == 0) {
    if (db1.defined()) db1.zero_();
    return;
  }
#ifdef FASTENC_WITH_CUDA
  if (gh.is_cuda()) return dglu_dropout_bgrad_cuda(gh, pre, dpre, db1, act, dp);
#endif
  dglu_dropout_bgrad_cpu(gh, pre, dpre, db1, act, dp);
}

}  // namespace

std::vector<at::Tensor> ffn_glu_forward_2d(const at::Tensor& x, const at::Tensor& w1,
                                           const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                           const std::optional<at::Tensor>& b2,
                                           const std::optional<at::Tensor>& residual, Act act,
                                           const DropoutParams& dp, const Plan& plan, bool save) {
  at::Tensor pre, y;
  const bool onednn = cpu_onednn_gemms(plan, x, w1.size(0));
  pre = onednn ? onednn_linear(x, w1, b1, std::nullopt, at::Tensor()) : b1 ? at::addmm(*b1, x, w1.t())
                                                                           : at::mm(x, w1.t());
  at::Tensor h = at::empty({x.size(0), w2.size(1)}, x.options());
  glu_dropout(pre, h, act, dp);
  if (onednn) {
    y = onednn_linear(h, w2, b2, std::nullopt, residual ? *residual : at::Tensor());
  } else if (residual) {
    y = at::addmm(*residual, h, w2.t());
    if (b2) y.add_(*b2);
  } else {
    y = b2 ? at::addmm(*b2, h, w2.t()) : at::mm(h, w2.t());
  }
  return {y, save ? h : x.new_empty({0}), save ? pre : x.new_empty({0})};
}

std::vector<at::Tensor> ffn_glu_backward_2d(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                            const at::Tensor& w2, const at::Tensor& h, const at::Tensor& pre, Act act,
                                            const DropoutParams& dp, const Plan& plan, bool has_b1, bool has_b2) {
  // fp32 only, as the ungated backward: in bf16/fp16 ATen's mm is oneDNN's matmul already.
  const bool onednn = cpu_onednn_gemms(plan, x, w1.size(0)) && x.scalar_type() == at::kFloat;
  auto mm = [&](const at::Tensor& a, const at::Tensor& b) { return cpu_mm(onednn, a, b); };
  const at::Tensor gh = mm(dy, w2);
  at::Tensor dpre = at::empty_like(pre);
  at::Tensor db1 = has_b1 ? at::empty({w1.size(0)}, x.options().dtype(at::kFloat)) : at::Tensor();
  dglu_dropout_bgrad(gh, pre, dpre, db1, act, dp);
  at::Tensor dw2 = mm(dy.t(), h);
  at::Tensor db2 = has_b2 ? at::sum(dy, {0}, false, at::kFloat).to(x.scalar_type()) : x.new_empty({0});
  return {mm(dpre, w1), mm(dpre.t(), x), has_b1 ? db1.to(x.scalar_type()) : x.new_empty({0}), dw2, db2};
}

}  // namespace fastenc
