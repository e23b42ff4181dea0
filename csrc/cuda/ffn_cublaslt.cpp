// cuBLASLt GEMMs with fused epilogues for the FFN (row-major operands, fp32 accumulate).
// cuBLASLt is column-major: a row-major [M, N] matrix is a column-major [N, M] one, so
// every call below computes the transposed product.  Epilogues used:
//   GEMM1 fwd : RELU_BIAS, GELU_BIAS, GELU_AUX_BIAS (aux = pre-activation; GELU is tanh-GELU)
//   GEMM2 fwd : BIAS with beta = 1 and C = residual
//   bwd       : DGELU_BGRAD (dpre and db1 from dy W2 and aux), BGRADB (dW2 and db2).
// A call returns false (nothing written) when cuBLASLt reports no algorithm or an error;
// the caller then runs the unfused path.
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>

#include "ffn.h"

namespace fastenc {

namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS's recommendation for Hopper

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// One column-major D[m, n] = op(A)[m, k] · op(B)[k, n] + beta · C with an epilogue.
struct LtCall {
  cublasOperation_t ta, tb;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  const void* c;  // null: beta = 0
  void* d;
  int64_t ldd;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bias input, or bias-gradient output for *BGRAD* epilogues
  void* aux = nullptr;
  int64_t ld_aux = 0;
  cudaDataType_t dtype;
};

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

#define FASTENC_LT(expr)                              \
  do {                                                \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return false; \
  } while (0)

bool run(const LtCall& c, const at::TensorOptions& opts) {
  LtHandles hd;
  FASTENC_LT(cublasLtMatmulDescCreate(&hd.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_TRANSA, &c.ta, sizeof(c.ta)));
  FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_TRANSB, &c.tb, sizeof(c.tb)));
  FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &c.epilogue, sizeof(c.epilogue)));
  if (c.bias) {
    FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
  }
  if (c.aux) {
    FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &c.aux,
                                              sizeof(c.aux)));
    FASTENC_LT(cublasLtMatmulDescSetAttribute(hd.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &c.ld_aux,
                                              sizeof(c.ld_aux)));
  }
  const bool ta = c.ta == CUBLAS_OP_T, tb = c.tb == CUBLAS_OP_T;
  FASTENC_LT(cublasLtMatrixLayoutCreate(&hd.la, c.dtype, ta ? c.k : c.m, ta ? c.m : c.k, c.lda));
  FASTENC_LT(cublasLtMatrixLayoutCreate(&hd.lb, c.dtype, tb ? c.n : c.k, tb ? c.k : c.n, c.ldb));
  FASTENC_LT(cublasLtMatrixLayoutCreate(&hd.lc, c.dtype, c.m, c.n, c.ldd));
  FASTENC_LT(cublasLtMatmulPreferenceCreate(&hd.pref));
  const size_t ws_bytes = kWorkspaceBytes;
  FASTENC_LT(cublasLtMatmulPreferenceSetAttribute(hd.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                  sizeof(ws_bytes)));
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  FASTENC_LT(cublasLtMatmulAlgoGetHeuristic(handle, hd.op, hd.la, hd.lb, hd.lc, hd.lc, hd.pref, 1, &heur, &found));
  if (found == 0) return false;
  at::Tensor workspace = at::empty({static_cast<int64_t>(heur.workspaceSize)}, opts.dtype(at::kByte));
  const float alpha = 1.f, beta = c.c ? 1.f : 0.f;
  FASTENC_LT(cublasLtMatmul(handle, hd.op, &alpha, c.a, hd.la, c.b, hd.lb, &beta, c.c ? c.c : c.d, hd.lc, c.d, hd.lc,
                            &heur.algo, workspace.data_ptr(), heur.workspaceSize, at::cuda::getCurrentCUDAStream()));
  return true;
}

#undef FASTENC_LT

}  // namespace

bool lt_linear(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& c, const at::Tensor& out, const at::Tensor& aux, LtEpilogue ep) {
  // out[M, N] = a[M, K] · b[N, K]ᵀ  <=>  column-major outᶜ[N, M] = bᶜᵀ[N, K] · aᶜ[K, M].
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  LtCall call{CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, b.data_ptr(), K, a.data_ptr(), K,
              c ? c->data_ptr() : nullptr, out.data_ptr(), N};
  call.dtype = cuda_dtype(a.scalar_type());
  const bool has_bias = bias.has_value();
  switch (ep) {
    case LtEpilogue::kNone: break;
    case LtEpilogue::kBias: call.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT; break;
    case LtEpilogue::kReluBias: call.epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU; break;
    case LtEpilogue::kGeluBias: call.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU; break;
    case LtEpilogue::kGeluAuxBias:
      call.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      call.aux = aux.data_ptr();
      call.ld_aux = N;
      break;
  }
  if (has_bias) call.bias = bias->data_ptr();
  return run(call, a.options());
}

bool lt_dgelu_bgrad(const at::Tensor& g_in, const at::Tensor& w, const at::Tensor& aux, const at::Tensor& dpre,
                    const at::Tensor& dbias) {
  // dpre[M, N] = g_in[M, K] · w[K, N]  <=>  dpreᶜ[N, M] = wᶜ[N, K] · g_inᶜ[K, M].
  const int64_t M = g_in.size(0), K = g_in.size(1), N = w.size(1);
  LtCall call{CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, w.data_ptr(), N, g_in.data_ptr(), K, nullptr, dpre.data_ptr(), N};
  call.dtype = cuda_dtype(g_in.scalar_type());
  call.epilogue = dbias.defined() ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
  call.aux = aux.data_ptr();
  call.ld_aux = N;
  if (dbias.defined()) call.bias = dbias.data_ptr();
  return run(call, g_in.options());
}

bool lt_wgrad_bgrad(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& dw, const at::Tensor& dbias) {
  // dw[N, K] = dy[M, N]ᵀ · h[M, K]  <=>  dwᶜ[K, N] = hᶜ[K, M] · (dyᶜ[N, M])ᵀ; BGRADB sums op(B) = dy over M.
  const int64_t M = dy.size(0), N = dy.size(1), K = h.size(1);
  LtCall call{CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, h.data_ptr(), K, dy.data_ptr(), N, nullptr, dw.data_ptr(), K};
  call.dtype = cuda_dtype(dy.scalar_type());
  if (dbias.defined()) {
    call.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    call.bias = dbias.data_ptr();
  }
  return run(call, dy.options());
}

}  // namespace fastenc
