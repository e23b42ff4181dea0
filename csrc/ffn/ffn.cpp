// Forward and backward of the FFN op on 2-D row-major operands, one driver for the ungated and the gated
// activations, composed from the GEMM path the dispatch table picked (gemm_paths.cpp) and the elementwise passes
// (cpu/act_dropout.cpp, cuda/act_fwd.cu, cuda/act_bwd.cu); and the CPU passes' entry points, which call the kernels
// compiled for the capability in use (common/cpu_kernels.h).
//
// Forward:  pre = x W1ᵀ + b1;  h = dropout(act(pre));  y = h W2ᵀ + b2 (+ residual).
// Backward: g = dy W2;  dpre = g · keep/(1-p) · act'(pre);  db1 = Σ_rows dpre;
//           dW2 = dyᵀ h;  db2 = Σ_rows dy;  dx = dpre W1;  dW1 = dpreᵀ x.
// Gated (geglu, swiglu): W1 [2f, d] gives pre = [a, g], h = dropout(act(a) · g) [T, f]; backward with gh = dy W2,
// dh = gh · keep/(1-p): dpre = [dh · g · act'(a), dh · act(a)], the rest as above.  Gated FFNs run library GEMMs
// and the GLU pass (no library epilogue multiplies the gate: the dispatch table never picks a fused path), and
// save pre whenever they save.
// Saved for backward: h (needed by dW2) and, for the GELUs, pre; relu needs no pre since
// relu'(pre) = relu'(h) where the element is kept, and dropped elements get zero gradient
// either way.  Dropout saves no mask: backward redraws it from the Philox seed.
// In inference (save = false) pre is not kept: the fused paths never write it, the unfused
// path overwrites the GEMM1 result with h in place.
// CPU path (GemmPath::kCpu): every GEMM is a oneDNN inner product (linear/linear.h) with b1 (and a
// dropout-free relu) in GEMM1's epilogue and b2 + residual in GEMM2's.  In fp32 the GELUs stay in
// the vectorised pass (in place in inference), so inference and training forwards agree bit for
// bit (oneDNN's GELU rounds differently).  fp16/bf16 inference fuses the GELUs too: oneDNN applies
// them to the fp32 accumulator (one rounding where the pass rounds pre first) and the pass over
// the hidden goes (1.04-1.06x on bf16 768→3072).
#include "fastenc_constants.h"
#include "ffn/ffn.h"
#include "linear/linear.h"

namespace fastenc {

namespace cpu {
FASTENC_REGISTER_CPU_KERNELS(FfnPassKernels);
}  // namespace cpu

void act_dropout_cpu(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  cpu::cpu_kernels<cpu::FfnPassKernels>().act_dropout(pre, h, act, dp);
}

void dact_dropout_bgrad_cpu(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre,
                            const at::Tensor& db1, Act act, const DropoutParams& dp) {
  cpu::cpu_kernels<cpu::FfnPassKernels>().dact_dropout_bgrad(g, saved, dpre, db1, act, dp);
}

namespace {

// h = dropout(act(pre)), or dropout(act(a) · g) when gated.
void act_dropout(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  if (h.numel() == 0) return;
#ifdef FASTENC_WITH_CUDA
  if (pre.is_cuda()) return act_dropout_cuda(pre, h, act, dp);
#endif
  act_dropout_cpu(pre, h, act, dp);
}

// dpre = g · keep·scale · act'(saved) (saved: pre, or h for relu), or the GLU's [da, dg] when gated (saved: pre);
// db1 = Σ_rows dpre when defined.
void dact_dropout_bgrad(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre, const at::Tensor& db1,
                        Act act, const DropoutParams& dp) {
  if (g.numel() == 0) {
    if (db1.defined()) db1.zero_();
    return;
  }
#ifdef FASTENC_WITH_CUDA
  if (g.is_cuda()) return dact_dropout_bgrad_cuda(g, saved, dpre, db1, act, dp);
#endif
  dact_dropout_bgrad_cpu(g, saved, dpre, db1, act, dp);
}

// a wᵀ + bias with an ATen GEMM (the bias in cuBLAS's / oneDNN's epilogue).
at::Tensor linear_aten(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

// y = h W2ᵀ + b2 (+ residual) with ATen GEMMs.
at::Tensor linear2_aten(const at::Tensor& h, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                        const std::optional<at::Tensor>& residual) {
  if (residual) {
    at::Tensor y = at::addmm(*residual, h, w2.t());
    return b2 ? y.add_(*b2) : y;
  }
  return linear_aten(h, w2, b2);
}

// The hidden h for GEMM1's output pre: pre itself (overwritten in place) unless pre is kept; gated: [T, f] (w2's
// columns), half of pre's width.
at::Tensor hidden_for(const at::Tensor& pre, const at::Tensor& w2, Act act, bool keep_pre) {
  if (is_gated(act)) return at::empty({pre.size(0), w2.size(1)}, pre.options());
  return keep_pre ? at::empty_like(pre) : pre;
}

std::vector<at::Tensor> forward_unfused(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                        const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                        const std::optional<at::Tensor>& residual, Act act, const DropoutParams& dp,
                                        bool save) {
  const bool keep_pre = save && act != Act::kReLU;
  at::Tensor pre = linear_aten(x, w1, b1);
  at::Tensor h = hidden_for(pre, w2, act, keep_pre);
  act_dropout(pre, h, act, dp);
  at::Tensor y = linear2_aten(h, w2, b2, residual);
  return {y, save ? h : x.new_empty({0}), keep_pre ? pre : x.new_empty({0})};
}

std::vector<at::Tensor> forward_onednn(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                       const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                       const std::optional<at::Tensor>& residual, Act act, const DropoutParams& dp,
                                       bool save) {
  const bool keep_pre = save && act != Act::kReLU;
  // relu is exact in any order (oneDNN's is ours, bit for bit); the GELUs fuse in fp16/bf16 inference; no oneDNN
  // post-op multiplies a gate.
  const bool fuse_act =
      !dp.enabled && !is_gated(act) && (act == Act::kReLU || (!save && x.scalar_type() != at::kFloat));
  at::Tensor h, pre;
  if (fuse_act) {
    h = onednn_linear(x, w1, b1, act, at::Tensor());
  } else {
    pre = onednn_linear(x, w1, b1, std::nullopt, at::Tensor());
    h = hidden_for(pre, w2, act, keep_pre);
    act_dropout(pre, h, act, dp);
  }
  at::Tensor y = onednn_linear(h, w2, b2, std::nullopt, residual ? *residual : at::Tensor());
  return {y, save ? h : x.new_empty({0}), keep_pre ? pre : x.new_empty({0})};
}

#ifdef FASTENC_WITH_CUDA
// A cuBLASLt call that found no algorithm: ATen GEMMs take over (said once), unless cublaslt was
// forced. (Under a forced cutlass, GEMM2 and the backward are not what was forced: they fall back.)
bool lt_declined(bool ok, const Plan& plan, const char* gemm, const at::Tensor& x, int64_t f) {
  if (ok) return false;
  const bool forced_lt = plan.forced && plan.path == GemmPath::kCublasLt;
  TORCH_CHECK(!forced_lt, "fastenc ffn: FASTENC_FFN_GEMM=cublaslt, but cuBLASLt has no algorithm for the ", gemm,
              " GEMM (tokens=", x.size(0), ", d=", x.size(1), ", f=", f, ", ", x.scalar_type(),
              "); use auto to fall back to ATen GEMMs");
  TORCH_WARN_ONCE("fastenc ffn: cuBLASLt has no algorithm for the ", gemm, " GEMM (tokens=", x.size(0), ", d=",
                  x.size(1), ", f=", f, ", ", x.scalar_type(), "): ATen GEMMs without the fused epilogue run instead");
  return true;
}

// GEMM2 through cuBLASLt's BIAS epilogue with beta·C = residual; ATen when cuBLASLt declines.
at::Tensor linear2_fused(const at::Tensor& h, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                         const std::optional<at::Tensor>& residual, const Plan& plan, const at::Tensor& x) {
  at::Tensor y = at::empty({h.size(0), w2.size(0)}, h.options());
  const bool ok = lt_linear(h, w2, b2, residual, y, at::Tensor(), LtEpilogue::kBias);
  if (!lt_declined(ok, plan, "h W2^T + b2 (+ residual)", x, h.size(1))) return y;
  return linear2_aten(h, w2, b2, residual);
}
#endif

}  // namespace

// Below constants::kOnednnMinMacs multiply-adds per GEMM (tokens · d · f) the CPU path keeps ATen's GEMMs: oneDNN's
// per-call cost outweighs its faster kernel there (fastenc/constants.py).  Zero tokens also go to ATen (oneDNN
// takes no empty GEMM).
bool cpu_onednn_gemms(const Plan& plan, const at::Tensor& x, int64_t f) {
  return plan.path == GemmPath::kCpu && x.size(0) > 0 && x.size(0) * x.size(1) * f >= constants::kOnednnMinMacs;
}

at::Tensor cpu_mm(bool onednn, const at::Tensor& a, const at::Tensor& b) {
  return onednn ? onednn_linear(a, b.t(), std::nullopt, std::nullopt, at::Tensor()) : at::mm(a, b);
}

std::vector<at::Tensor> ffn_forward_2d(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                       const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                       const std::optional<at::Tensor>& residual, Act act, const DropoutParams& dp,
                                       const Plan& plan, bool save) {
#ifdef FASTENC_WITH_CUDA
  const bool keep_pre = save && act != Act::kReLU;
  const bool fused = plan.path == GemmPath::kCublasLt || plan.path == GemmPath::kCutlassSm90;
  // No tokens: nothing for a library GEMM to do (cuBLASLt rejects n = 0); ATen returns the shapes.
  if (fused && x.size(0) > 0) {
    at::Tensor h = at::empty({x.size(0), w1.size(0)}, x.options());
    at::Tensor pre = keep_pre ? at::empty_like(h) : at::Tensor();
    bool ok = true;
    if (plan.path == GemmPath::kCublasLt) {
      const LtEpilogue ep = act == Act::kReLU ? LtEpilogue::kReluBias
                            : keep_pre        ? LtEpilogue::kGeluAuxBias
                                              : LtEpilogue::kGeluBias;
      ok = !lt_declined(lt_linear(x, w1, b1, std::nullopt, h, pre, ep), plan, "x W1^T + b1 -> act", x, w1.size(0));
    } else {
#ifdef FASTENC_WITH_CUTLASS_SM90
      cutlass_sm90_linear_bias_gelu(x, w1, *b1, h, pre);
#else
      TORCH_CHECK(false, "fastenc ffn: the CUTLASS sm90 path was picked but not built");
#endif
    }
    if (ok) {
      at::Tensor y = linear2_fused(h, w2, b2, residual, plan, x);
      return {y, save ? h : x.new_empty({0}), keep_pre ? pre : x.new_empty({0})};
    }
  }
#endif
  if (cpu_onednn_gemms(plan, x, w1.size(0))) return forward_onednn(x, w1, b1, w2, b2, residual, act, dp, save);
  return forward_unfused(x, w1, b1, w2, b2, residual, act, dp, save);
}

std::vector<at::Tensor> ffn_backward_2d(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& w2, const at::Tensor& h, const at::Tensor& pre, Act act,
                                        const DropoutParams& dp, const Plan& plan, bool has_b1, bool has_b2) {
  const at::Tensor& saved = act == Act::kReLU ? h : pre;  // gated: pre
  at::Tensor dpre, db1, dw2, db2;
#ifdef FASTENC_WITH_CUDA
  if (plan.path == GemmPath::kCublasLt && x.size(0) > 0) {
    if (act == Act::kGeluTanh && !dp.enabled) {
      dpre = at::empty_like(h);
      db1 = has_b1 ? at::empty({w1.size(0)}, x.options()) : at::Tensor();
      if (lt_declined(lt_dgelu_bgrad(dy, w2, pre, dpre, db1), plan, "(dy W2) * gelu'(pre)", x, w1.size(0))) {
        dpre = at::Tensor();
      }
    }
    dw2 = at::empty_like(w2);
    db2 = has_b2 ? at::empty({w2.size(0)}, x.options()) : at::Tensor();
    if (lt_declined(lt_wgrad_bgrad(dy, h, dw2, db2), plan, "dy^T h", x, w1.size(0))) dw2 = at::Tensor();
  }
#endif
  // CPU path, fp32: oneDNN GEMMs, operands transposed as strided views (X Wᵀ with X = dyᵀ etc.).  In
  // bf16/fp16 ATen's mm already runs oneDNN's matmul, which reads transposed operands through their
  // strides where the inner-product op copies a transposed X (measured ~10% slower for dW1).
  const bool onednn = cpu_onednn_gemms(plan, x, w1.size(0)) && x.scalar_type() == at::kFloat;
  auto mm = [&](const at::Tensor& a, const at::Tensor& b) { return cpu_mm(onednn, a, b); };
  if (!dpre.defined()) {
    const at::Tensor g = mm(dy, w2);
    dpre = is_gated(act) ? at::empty_like(pre) : g;  // gated: [T, 2f] from g [T, f]; else in place
    at::Tensor db1_f32 = has_b1 ? at::empty({w1.size(0)}, x.options().dtype(at::kFloat)) : at::Tensor();
    dact_dropout_bgrad(g, saved, dpre, db1_f32, act, dp);
    db1 = has_b1 ? db1_f32.to(x.scalar_type()) : x.new_empty({0});
  }
  if (!dw2.defined()) {
    dw2 = mm(dy.t(), h);
    db2 = has_b2 ? at::sum(dy, {0}, false, at::kFloat).to(x.scalar_type()) : x.new_empty({0});
  }
  at::Tensor dx = mm(dpre, w1);
  at::Tensor dw1 = mm(dpre.t(), x);
  return {dx, dw1, db1.defined() ? db1 : x.new_empty({0}), dw2, db2.defined() ? db2 : x.new_empty({0})};
}

}  // namespace fastenc
