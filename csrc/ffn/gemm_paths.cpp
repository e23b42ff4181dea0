// The one dispatch table of the FFN's GEMM paths, per architecture and activation.
//
//   cpu       : CPU tensors whose dtype has oneDNN kernels on this CPU (fp32; bf16 with
//               AVX512-BF16/AMX), with AVX-512 (onednn_unpacked_preferred): oneDNN GEMMs with fused
//               epilogues (linear/linear.h).  Other CPU dtypes, CPUs below AVX-512 (ATen's GEMMs are
//               faster there), and FASTENC_FFN_GEMM=unfused take ATen GEMMs + the vectorised pass.
//   unfused   : ATen GEMMs (cuBLAS) + the handwritten fused bias+act+dropout pass
//               (cuda/act_kernels.cuh).  Runs every shape, dtype, activation and
//               dropout; writes x W1ᵀ once and reads it back once (the pass the others save).
//   cublaslt  : cuBLASLt epilogues: RELU_BIAS, GELU_BIAS / GELU_AUX_BIAS (tanh-GELU only),
//               BIAS with beta·C for b2 + residual; backward DGELU_BGRAD and BGRADB.
//   cutlass   : CUTLASS 3.x sm90 TMA warp-specialized GEMM with the epilogue visitor
//               LinCombPerColBiasEltAct(Aux) for erf-GELU (BERT's), bf16 only, with b1.
//
// Defaults (chosen without a GPU to measure; every path is forcible with
// FASTENC_FFN_GEMM=unfused|cublaslt|cutlass so a GPU session can measure and flip a row):
//   sm_90 gelu      : cutlass, unfused.  Only CUTLASS fuses erf-GELU; fusing saves the
//                     ~67 µs GELU pass at 16k tokens against a ~100-150 µs GEMM1.
//   sm_90 gelu_tanh : cublaslt, unfused.  flash-attention measured the fused cuBLASLt path
//                     slower on H100 with CUDA 11.8/12.0-era cuBLAS; llm.c saw bf16 GELU fusion
//                     fixed in CUDA 12.5; we link cuBLAS 13, so fusion is expected to win.
//   sm_90 relu      : cublaslt, unfused (same reasoning; the ReLU epilogue is trivial).
//   sm_8x gelu      : unfused (no fused erf-GELU epilogue in cuBLASLt; CUTLASS sm90 only).
//   sm_8x gelu_tanh : cublaslt, unfused.     sm_8x relu : cublaslt, unfused.
//   geglu, swiglu   : unfused (ATen GEMMs + the GLU pass, cuda/glu_kernels.cuh) on every arch; on CPU
//                     the cpu row (oneDNN GEMMs + the GLU pass, cpu/act_dropout.cpp).
// Every fused path needs fp16/bf16, no dropout (no library epilogue draws dropout),
// d and f multiples of 8 (16-byte rows: TMA and cuBLASLt's aux ld) and 16-byte aligned
// operands; otherwise the next entry runs.  Under `auto` a fused path whose library
// declines the call at run time (no cuBLASLt algorithm) falls back to ATen GEMMs; a path
// forced by FASTENC_FFN_GEMM raises instead, so a GPU test never passes on the fallback.
#include <sstream>
#include <string>
#include <vector>

#include "fastenc_constants.h"
#include "ffn/ffn.h"
#include "linear/linear.h"

namespace fastenc {

namespace {

struct Row {
  int cc_major;  // 8 or 9
  Act act;
  std::vector<GemmPath> order;
};

const std::vector<Row>& table() {
  static const std::vector<Row> rows = {
      {9, Act::kGelu, {GemmPath::kCutlassSm90, GemmPath::kUnfused}},
      {9, Act::kGeluTanh, {GemmPath::kCublasLt, GemmPath::kUnfused}},
      {9, Act::kReLU, {GemmPath::kCublasLt, GemmPath::kUnfused}},
      {8, Act::kGelu, {GemmPath::kUnfused}},
      {8, Act::kGeluTanh, {GemmPath::kCublasLt, GemmPath::kUnfused}},
      {8, Act::kReLU, {GemmPath::kCublasLt, GemmPath::kUnfused}},
      {9, Act::kGeGLU, {GemmPath::kUnfused}},
      {9, Act::kSwiGLU, {GemmPath::kUnfused}},
      {8, Act::kGeGLU, {GemmPath::kUnfused}},
      {8, Act::kSwiGLU, {GemmPath::kUnfused}},
  };
  return rows;
}

bool built_with_cuda() {
#ifdef FASTENC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Empty string when `path` can run the query, else the reason it cannot.
std::string ineligible(GemmPath path, const PlanQuery& q) {
  if (path == GemmPath::kUnfused) return built_with_cuda() ? "" : "fastenc._C was built without CUDA";
  if (!built_with_cuda()) return "fastenc._C was built without CUDA";
  if (is_gated(q.act)) return "no library epilogue multiplies the gate (gated FFNs run ATen GEMMs + the GLU pass)";
  if (q.dtype != at::kHalf && q.dtype != at::kBFloat16) return "fused GEMM paths take float16/bfloat16 only";
  if (q.dropout) return "no library epilogue draws dropout";
  if (q.d % 8 != 0 || q.f % 8 != 0) return "fused GEMM paths need d and f multiples of 8";
  if (!q.aligned) return "fused GEMM paths need 16-byte aligned operands";
  if (path == GemmPath::kCublasLt) {
    if (q.act == Act::kGelu) return "cuBLASLt's GELU epilogue is the tanh form, not erf-GELU";
    return "";
  }
  // kCutlassSm90
  if (!cutlass_sm90_built()) return "the CUTLASS sm90 kernels were not built (FASTENC_CUDA_ARCHS lacks 90a)";
  if (q.cc != 90) return "the CUTLASS kernels are sm_90a only";
  if (q.act != Act::kGelu) return "the CUTLASS epilogue is instantiated for erf-GELU only";
  if (q.dtype != at::kBFloat16) return "the CUTLASS kernels are instantiated for bfloat16 only (build time)";
  if (!q.has_b1) return "the CUTLASS epilogue is instantiated with a bias only";
  return "";
}

// constants::kOnednnMinMacs as text: 2^k for a power of two.
std::string onednn_min_macs() {
  const int64_t n = constants::kOnednnMinMacs;
  if (n > 0 && (n & (n - 1)) == 0) return "2^" + std::to_string(63 - __builtin_clzll(static_cast<uint64_t>(n)));
  return std::to_string(n);
}

GemmPath parse_path(const std::string& s) {
  if (s == "unfused") return GemmPath::kUnfused;
  if (s == "cublaslt") return GemmPath::kCublasLt;
  if (s == "cutlass") return GemmPath::kCutlassSm90;
  TORCH_CHECK_VALUE(false, "fastenc ffn: unknown GEMM path '", s, "'; expected auto, unfused, cublaslt or cutlass");
}

}  // namespace

bool cutlass_sm90_built() {
#ifdef FASTENC_WITH_CUTLASS_SM90
  return true;
#else
  return false;
#endif
}

const char* gemm_path_name(GemmPath p) {
  switch (p) {
    case GemmPath::kCpu: return "cpu";
    case GemmPath::kUnfused: return "unfused";
    case GemmPath::kCublasLt: return "cublaslt";
    case GemmPath::kCutlassSm90: return "cutlass";
  }
  return "?";
}

Plan plan_gemm_path(const PlanQuery& q) {
  if (!q.cuda) {
    if (q.requested == "unfused") {
      return {GemmPath::kUnfused, "requested: ATen GEMMs + the fused vectorised bias-activation pass", true};
    }
    if (q.requested != "auto") parse_path(q.requested);  // reject typos on CPU too
    if (onednn_unpacked_preferred(q.dtype)) {
      return {GemmPath::kCpu,
              "CPU tensors: oneDNN GEMMs (torch's mkldnn linear ops) with b1 (+ relu) and b2 + residual in their "
              "epilogues, + the fused vectorised activation pass (ATen GEMMs below " + onednn_min_macs() +
                  " multiply-adds)"};
    }
    return {GemmPath::kUnfused, std::string("CPU tensors: ATen GEMMs + the fused vectorised bias-activation pass "
                                            "(oneDNN: ") +
                                    (onednn_linear_supported(q.dtype)
                                         ? "slower than ATen's GEMMs below AVX-512"
                                         : std::string("no kernels for ") + c10::toString(q.dtype) + " on this CPU") +
                                    ")"};
  }
  if (q.requested != "auto") {
    const GemmPath p = parse_path(q.requested);
    const std::string why = ineligible(p, q);
    TORCH_CHECK_VALUE(why.empty(), "fastenc ffn: GEMM path '", q.requested,
                      "' (FASTENC_FFN_GEMM) cannot run this call: ", why, "; use auto to let the table choose");
    return {p, "requested", true};
  }
  const int major = q.cc / 10;
  std::ostringstream skipped;
  for (const Row& row : table()) {
    if (row.act != q.act || row.cc_major != (major >= 9 ? 9 : 8)) continue;
    for (GemmPath p : row.order) {
      const std::string why = ineligible(p, q);
      if (why.empty()) {
        const std::string s = skipped.str();
        return {p, s.empty() ? "table default" : "table (" + s + ")"};
      }
      skipped << (skipped.tellp() > 0 ? "; " : "") << gemm_path_name(p) << ": " << why;
    }
  }
  return {GemmPath::kUnfused, "no table row for this GPU: " + skipped.str()};
}

std::string dispatch_table_description() {
  std::ostringstream os;
  for (const Row& row : table()) {
    os << "sm_" << row.cc_major << "x " << activation_name(row.act) << ":";
    for (GemmPath p : row.order) os << " " << gemm_path_name(p);
    os << "\n";
  }
  return os.str();
}

}  // namespace fastenc
