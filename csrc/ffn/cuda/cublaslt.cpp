// cuBLASLt GEMMs with fused epilogues for the FFN (row-major operands, fp32 accumulate).
// cuBLASLt is column-major: a row-major [R, C] matrix is the column-major [C, R] matrix with
// leading dimension C, so every call computes the transposed product with swapped operands:
//   row-major out = P·Qᵀ  <=>  column-major outᶜ = Qᶜᵀ·Pᶜ.
// Epilogues used (GELU is cuBLASLt's tanh-GELU):
//   GEMM1 fwd : RELU_BIAS, GELU_BIAS, GELU_AUX_BIAS (aux = pre-activation, ld = f)
//   GEMM2 fwd : BIAS with beta = 1 and C = residual (D is a separate buffer)
//   bwd       : DGELU_BGRAD (dpre and db1 = Σ_tokens dpre), BGRADB (dW2 and db2 = Σ_tokens dy).
// The descriptors are built from shapes alone (lt_*_desc) so a CPU test can replay them on a
// column-major model (fastenc._C.ffn_lt_describe).  A call returns false, writing nothing,
// only when the heuristic offers no algorithm; any other cuBLASLt error raises.
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>

#include "ffn/ffn.h"

namespace fastenc {

namespace {

constexpr size_t kMaxWorkspaceBytes = 32u << 20;  // cuBLAS's recommendation for Hopper

cudaDataType_t cuda_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16, "fastenc ffn: the cuBLASLt path takes float16/bfloat16, got ", t);
  return t == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

cublasLtEpilogue_t to_cublas(LtEp e) {
  switch (e) {
    case LtEp::kDefault: return CUBLASLT_EPILOGUE_DEFAULT;
    case LtEp::kBias: return CUBLASLT_EPILOGUE_BIAS;
    case LtEp::kRelu: return CUBLASLT_EPILOGUE_RELU;
    case LtEp::kReluBias: return CUBLASLT_EPILOGUE_RELU_BIAS;
    case LtEp::kGelu: return CUBLASLT_EPILOGUE_GELU;
    case LtEp::kGeluBias: return CUBLASLT_EPILOGUE_GELU_BIAS;
    case LtEp::kGeluAux: return CUBLASLT_EPILOGUE_GELU_AUX;
    case LtEp::kGeluAuxBias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case LtEp::kDGelu: return CUBLASLT_EPILOGUE_DGELU;
    case LtEp::kDGeluBgrad: return CUBLASLT_EPILOGUE_DGELU_BGRAD;
    case LtEp::kBgradB: return CUBLASLT_EPILOGUE_BGRADB;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

// Largest power of two (<= 256, cuBLASLt's default assumption) dividing the address.
uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

struct LtHandles {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtHandles() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

void check(cublasStatus_t s, const char* what, const LtDesc& d) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "fastenc ffn: cuBLASLt ", what, " failed with ", cublasLtGetStatusName(s),
              " (", cublasLtGetStatusString(s), ") for the ", lt_epilogue_name(d.epilogue), " GEMM m=", d.m,
              " n=", d.n, " k=", d.k, " lda=", d.lda, " ldb=", d.ldb, " ldd=", d.ldd);
}

// Pointers of one call; c null means beta = 0 (D is then also passed as C, never read).
struct LtPtrs {
  const void* a;
  const void* b;
  const void* c;
  void* d;
  const void* bias = nullptr;  // bias input, or the bias-gradient output of the BGRAD epilogues
  const void* aux = nullptr;   // GELU input: written by GELU_AUX*, read by DGELU*
};

bool run(const LtDesc& d, const LtPtrs& p, at::ScalarType dtype, const at::TensorOptions& opts) {
  const cudaDataType_t dt = cuda_dtype(dtype);
  const cublasOperation_t ta = d.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = d.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasLtEpilogue_t ep = to_cublas(d.epilogue);
  LtHandles hd;
  // fp32 accumulation and fp32 alpha/beta (host pointers, the default pointer mode).
  check(cublasLtMatmulDescCreate(&hd.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate", d);
  check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA", d);
  check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB", d);
  check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)), "EPILOGUE", d);
  // Bias, bias gradient and aux keep the default data type: D's (float16/bfloat16).
  // The heuristic reads these pointers' alignment, so they are set before it runs.
  if (d.bias) {
    TORCH_CHECK(p.bias != nullptr, "fastenc ffn: the ", lt_epilogue_name(d.epilogue), " epilogue needs a bias pointer");
    check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)),
          "BIAS_POINTER", d);
  }
  if (d.ld_aux > 0) {
    TORCH_CHECK(p.aux != nullptr, "fastenc ffn: the ", lt_epilogue_name(d.epilogue), " epilogue needs an aux pointer");
    check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.aux, sizeof(p.aux)),
          "EPILOGUE_AUX_POINTER", d);
    const int64_t ld_aux = d.ld_aux;
    check(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux, sizeof(ld_aux)),
          "EPILOGUE_AUX_LD", d);
  }
  // Stored shapes: op(A) is m×k, so A is stored k×m when transposed; op(B) is k×n.
  check(cublasLtMatrixLayoutCreate(&hd.la, dt, d.trans_a ? d.k : d.m, d.trans_a ? d.m : d.k, d.lda), "layout A", d);
  check(cublasLtMatrixLayoutCreate(&hd.lb, dt, d.trans_b ? d.n : d.k, d.trans_b ? d.k : d.n, d.ldb), "layout B", d);
  check(cublasLtMatrixLayoutCreate(&hd.lc, dt, d.m, d.n, d.ldd), "layout C/D", d);
  check(cublasLtMatmulPreferenceCreate(&hd.pref), "PreferenceCreate", d);
  const size_t ws_max = kMaxWorkspaceBytes;
  check(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_max,
                                             sizeof(ws_max)),
        "MAX_WORKSPACE_BYTES", d);
  // The heuristic assumes 256-byte aligned A/B/C/D unless told otherwise; a 16-byte aligned
  // view (x[1:] of a [T, 768] bf16 tensor) would otherwise get an algorithm it cannot run.
  const uint32_t al_a = alignment(p.a), al_b = alignment(p.b), al_c = alignment(p.c ? p.c : p.d),
                 al_d = alignment(p.d);
  check(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)),
        "MIN_ALIGNMENT_A", d);
  check(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)),
        "MIN_ALIGNMENT_B", d);
  check(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)),
        "MIN_ALIGNMENT_C", d);
  check(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d)),
        "MIN_ALIGNMENT_D", d);
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const cublasStatus_t hs =
      cublasLtMatmulAlgoGetHeuristic(handle, hd.op, hd.la, hd.lb, hd.lc, hd.lc, hd.pref, 1, &heur, &found);
  if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && found == 0)) return false;
  check(hs, "AlgoGetHeuristic", d);
  // Workspace from the caching allocator, on the current device and stream.
  at::Tensor workspace = at::empty({static_cast<int64_t>(heur.workspaceSize)}, opts.dtype(at::kByte));
  const float alpha = 1.f, beta = p.c ? 1.f : 0.f;
  check(cublasLtMatmul(handle, hd.op, &alpha, p.a, hd.la, p.b, hd.lb, &beta, p.c ? p.c : p.d, hd.lc, p.d, hd.lc,
                       &heur.algo, workspace.data_ptr(), heur.workspaceSize, at::cuda::getCurrentCUDAStream()),
        "Matmul", d);
  return true;
}

}  // namespace

// out[M, N] = a[M, K] · b[N, K]ᵀ  <=>  outᶜ[N, M] = bᶜᵀ · aᶜ: A = b stored K×N (ld K), transposed;
// B = a stored K×M (ld K); D N×M (ld N).  The bias (length m = N) is added per row of Dᶜ,
// i.e. per column of out; aux has D's layout.
LtDesc lt_linear_desc(int64_t M, int64_t N, int64_t K, bool has_bias, LtEpilogue ep) {
  LtDesc d;
  d.trans_a = true;
  d.trans_b = false;
  d.m = N, d.n = M, d.k = K;
  d.lda = K, d.ldb = K, d.ldd = N;
  d.a_operand = "b", d.b_operand = "a";
  d.bias = has_bias;
  switch (ep) {
    case LtEpilogue::kBias: d.epilogue = has_bias ? LtEp::kBias : LtEp::kDefault; break;
    case LtEpilogue::kReluBias: d.epilogue = has_bias ? LtEp::kReluBias : LtEp::kRelu; break;
    case LtEpilogue::kGeluBias: d.epilogue = has_bias ? LtEp::kGeluBias : LtEp::kGelu; break;
    case LtEpilogue::kGeluAuxBias:
      d.epilogue = has_bias ? LtEp::kGeluAuxBias : LtEp::kGeluAux;
      d.ld_aux = N;
      break;
  }
  return d;
}

// dpre[M, N] = g[M, K] · w[K, N]  <=>  dpreᶜ[N, M] = wᶜ · gᶜ: A = w stored N×K (ld N); B = g
// stored K×M (ld K); D N×M (ld N); aux = pre with D's layout.  DGELU_BGRAD's bias gradient
// has length m = N and sums D over its columns n = M (the tokens): db1 = Σ_tokens dpre.
LtDesc lt_dgelu_bgrad_desc(int64_t M, int64_t N, int64_t K, bool has_dbias) {
  LtDesc d;
  d.trans_a = false;
  d.trans_b = false;
  d.m = N, d.n = M, d.k = K;
  d.lda = N, d.ldb = K, d.ldd = N, d.ld_aux = N;
  d.a_operand = "w", d.b_operand = "g";
  d.bias = has_dbias;
  d.epilogue = has_dbias ? LtEp::kDGeluBgrad : LtEp::kDGelu;
  return d;
}

// dw[N, K] = dy[M, N]ᵀ · h[M, K]  <=>  dwᶜ[K, N] = hᶜ · dyᶜᵀ: A = h stored K×M (ld K); B = dy
// stored N×M (ld N), transposed; D K×N (ld K).  BGRADB's bias gradient has length n = N and
// sums op(B) = dy over the GEMM's k = M (the tokens): db2 = Σ_tokens dy.
LtDesc lt_wgrad_bgrad_desc(int64_t M, int64_t N, int64_t K, bool has_dbias) {
  LtDesc d;
  d.trans_a = false;
  d.trans_b = true;
  d.m = K, d.n = N, d.k = M;
  d.lda = K, d.ldb = N, d.ldd = K;
  d.a_operand = "h", d.b_operand = "dy";
  d.bias = has_dbias;
  d.epilogue = has_dbias ? LtEp::kBgradB : LtEp::kDefault;
  return d;
}

const char* lt_epilogue_name(LtEp e) {
  switch (e) {
    case LtEp::kDefault: return "DEFAULT";
    case LtEp::kBias: return "BIAS";
    case LtEp::kRelu: return "RELU";
    case LtEp::kReluBias: return "RELU_BIAS";
    case LtEp::kGelu: return "GELU";
    case LtEp::kGeluBias: return "GELU_BIAS";
    case LtEp::kGeluAux: return "GELU_AUX";
    case LtEp::kGeluAuxBias: return "GELU_AUX_BIAS";
    case LtEp::kDGelu: return "DGELU";
    case LtEp::kDGeluBgrad: return "DGELU_BGRAD";
    case LtEp::kBgradB: return "BGRADB";
  }
  return "?";
}

bool lt_linear(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& c, const at::Tensor& out, const at::Tensor& aux, LtEpilogue ep) {
  const LtDesc d = lt_linear_desc(a.size(0), b.size(0), a.size(1), bias.has_value(), ep);
  LtPtrs p{b.data_ptr(), a.data_ptr(), c ? c->data_ptr() : nullptr, out.data_ptr()};
  if (bias) p.bias = bias->data_ptr();
  if (d.ld_aux > 0) p.aux = aux.data_ptr();
  return run(d, p, a.scalar_type(), a.options());
}

bool lt_dgelu_bgrad(const at::Tensor& g_in, const at::Tensor& w, const at::Tensor& aux, const at::Tensor& dpre,
                    const at::Tensor& dbias) {
  const LtDesc d = lt_dgelu_bgrad_desc(g_in.size(0), w.size(1), g_in.size(1), dbias.defined());
  LtPtrs p{w.data_ptr(), g_in.data_ptr(), nullptr, dpre.data_ptr()};
  if (dbias.defined()) p.bias = dbias.data_ptr();
  p.aux = aux.data_ptr();
  return run(d, p, g_in.scalar_type(), g_in.options());
}

bool lt_wgrad_bgrad(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& dw, const at::Tensor& dbias) {
  const LtDesc d = lt_wgrad_bgrad_desc(dy.size(0), dy.size(1), h.size(1), dbias.defined());
  LtPtrs p{h.data_ptr(), dy.data_ptr(), nullptr, dw.data_ptr()};
  if (dbias.defined()) p.bias = dbias.data_ptr();
  return run(d, p, dy.scalar_type(), dy.options());
}

}  // namespace fastenc
