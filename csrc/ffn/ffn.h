// Feed-forward op: y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual), nn.Linear layouts
// (W1 [f, d], W2 [d, f]; gated activations: W1 [2f, d]).  Declarations shared by the bindings
// (bindings/ffn_api.cpp), the GEMM-path dispatch table (gemm_paths.cpp), the driver (ffn.cpp), the CPU
// passes (cpu/act_dropout.cpp) and the CUDA code (cuda/, compiled only with FASTENC_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/activation.h"
#include "common/cpu_kernels.h"
#include "common/dropout.h"
#include "common/dtype.h"

namespace fastenc {

// ------------------------------------------------------------------ GEMM-path dispatch table
enum class GemmPath : int { kCpu = 0, kUnfused = 1, kCublasLt = 2, kCutlassSm90 = 3 };
const char* gemm_path_name(GemmPath p);

struct PlanQuery {
  bool cuda = false;
  int cc = 0;  // compute capability as 10·major + minor (90 for H100/H200)
  at::ScalarType dtype = at::kFloat;
  int64_t d = 0, f = 0;   // model and hidden widths
  Act act = Act::kGelu;
  bool has_b1 = true;
  bool dropout = false;
  bool training = false;  // the pre-activation (aux) must be kept for backward
  bool aligned = true;    // every operand pointer is 16-byte aligned
  std::string requested = "auto";  // auto | unfused | cublaslt | cutlass
};
struct Plan {
  GemmPath path;
  std::string why;
  bool forced = false;  // requested by name: a library that declines the call raises, no fallback
};
// The path `auto` takes (first eligible entry of the arch's table row), or the requested
// one; a requested path that cannot run this call raises ValueError.
Plan plan_gemm_path(const PlanQuery& q);
std::string dispatch_table_description();
bool cutlass_sm90_built();

// ------------------------------------------------------------------ forward / backward (ffn.cpp)
// 2-D contiguous operands: x [T, d], w1 [f, d] (gated: [2f, d]), w2 [d, f], residual [T, d].
// Returns {y [T, d], h [T, f], pre [T, f] (gated: [T, 2f])}; h and pre are empty unless `save` (pre stays
// empty for relu, whose backward reads h).
std::vector<at::Tensor> ffn_forward_2d(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                       const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                       const std::optional<at::Tensor>& residual, Act act, const DropoutParams& dp,
                                       const Plan& plan, bool save);
// Returns {dx, dW1, db1, dW2, db2}; a bias gradient is empty when that bias is absent.
std::vector<at::Tensor> ffn_backward_2d(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& w2, const at::Tensor& h, const at::Tensor& pre, Act act,
                                        const DropoutParams& dp, const Plan& plan, bool has_b1, bool has_b2);

// CPU path (plan kCpu): whether this call's GEMMs (x [T, d] by an [f, d] weight) run oneDNN rather
// than ATen (enough multiply-adds to pay oneDNN's per-call cost; T > 0), and a · b through the one
// chosen (oneDNN reads b transposed through its strides).
bool cpu_onednn_gemms(const Plan& plan, const at::Tensor& x, int64_t f);
at::Tensor cpu_mm(bool onednn, const at::Tensor& a, const at::Tensor& b);

// ------------------------------------------------------------------ elementwise passes
// Forward epilogue of the unfused path: h = dropout(act(pre)), pre [T, f] = x W1ᵀ + b1 from
// the GEMM (bias in the GEMM's epilogue: one rounding, so sign(pre) and relu' are exact);
// h may alias pre (inference: pre is overwritten, never kept).  Gated (geglu, swiglu): pre [T, 2f] =
// [a, g] per row, h [T, f] = dropout(act(a) · g), the dropout mask the [T, f] hidden's.
void act_dropout_cpu(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp);
// Backward: g [T, f] = dy W2.  Writes dpre = g · keep · scale · act'(saved) into `dpre`
// (may alias g) and, when db1 (fp32 [f]) is defined, db1 = Σ_rows dpre.  `saved` is the
// pre-activation, or for relu the activation output h (relu'(pre) = relu'(h)).  Gated: saved = pre
// [T, 2f], dpre [T, 2f] = [dh · g · act'(a), dh · act(a)] with dh = g · keep · scale, db1 fp32 [2f].
void dact_dropout_bgrad_cpu(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre,
                            const at::Tensor& db1, Act act, const DropoutParams& dp);
namespace cpu {
// The passes of cpu/act_dropout.cpp, one table per capability it is compiled for (the two entry points above, in
// ffn.cpp, call the table of the capability in use: common/cpu_kernels.h).
struct FfnPassKernels {
  decltype(&act_dropout_cpu) act_dropout;
  decltype(&dact_dropout_bgrad_cpu) dact_dropout_bgrad;
};
FASTENC_DECLARE_CPU_KERNELS(FfnPassKernels)
}  // namespace cpu

#ifdef FASTENC_WITH_CUDA
// The CUDA twins of the passes above (gated included), and the keep-mask replay (cuda/act_fwd.cu, act_bwd.cu).
void act_dropout_cuda(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp);
void dact_dropout_bgrad_cuda(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre,
                             const at::Tensor& db1, Act act, const DropoutParams& dp);
at::Tensor dropout_keep_mask_cuda(int64_t rows, int64_t cols, const DropoutParams& dp, const at::Device& device);

// cuBLASLt GEMM with a fused epilogue on row-major operands (see cuda/cublaslt.cpp):
// out[M, N] = a[M, K] · b[N, K]ᵀ (+ bias[N]) (+ c[M, N]) -> act, storing the
// pre-activation in aux [M, N] when aux is defined.  Returns false (nothing written) when
// cuBLASLt has no algorithm for this problem; the caller then falls back to ATen GEMMs.
// Any other cuBLASLt error raises.
enum class LtEpilogue : int { kBias, kReluBias, kGeluBias, kGeluAuxBias };
bool lt_linear(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& c, const at::Tensor& out, const at::Tensor& aux, LtEpilogue ep);
// dpre[M, N] = (g_in[M, K] · w[K, N]) ⊙ gelu_tanh'(aux[M, N]) and dbias[N] = Σ_rows dpre.
bool lt_dgelu_bgrad(const at::Tensor& g_in, const at::Tensor& w, const at::Tensor& aux, const at::Tensor& dpre,
                    const at::Tensor& dbias);
// dw[N, K] = dy[M, N]ᵀ · h[M, K] and dbias[N] = Σ_rows dy (cuBLASLt BGRADB epilogue).
bool lt_wgrad_bgrad(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& dw, const at::Tensor& dbias);

// The column-major cuBLASLt call behind each function above, from shapes alone:
// D[m, n] = op(A)[m, k] · op(B)[k, n], A stored (trans_a ? k×m : m×k) with leading dimension
// lda (likewise B), D m×n with ldd, aux (ld_aux > 0) with D's shape.  a_operand / b_operand
// name the row-major argument passed as A / B.  Exposed as fastenc._C.ffn_lt_describe so a
// CPU test replays the calls on a column-major model.
enum class LtEp : int {
  kDefault, kBias, kRelu, kReluBias, kGelu, kGeluBias, kGeluAux, kGeluAuxBias, kDGelu, kDGeluBgrad, kBgradB
};
struct LtDesc {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldd = 0, ld_aux = 0;
  LtEp epilogue = LtEp::kDefault;
  bool bias = false;  // a bias (or bias-gradient) pointer is passed
  const char* a_operand = "";
  const char* b_operand = "";
};
LtDesc lt_linear_desc(int64_t M, int64_t N, int64_t K, bool has_bias, LtEpilogue ep);
LtDesc lt_dgelu_bgrad_desc(int64_t M, int64_t N, int64_t K, bool has_dbias);
LtDesc lt_wgrad_bgrad_desc(int64_t M, int64_t N, int64_t K, bool has_dbias);
const char* lt_epilogue_name(LtEp e);

#ifdef FASTENC_WITH_CUTLASS_SM90
// CUTLASS 3.x sm90 TMA warp-specialized GEMM with the epilogue visitor
// h = gelu(x W1ᵀ + b1) (erf-GELU), also storing pre = x W1ᵀ + b1 when pre is defined.
void cutlass_sm90_linear_bias_gelu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& h, const at::Tensor& pre);
#endif
#endif

}  // namespace fastenc
