// Few-row fp32 / bf16 GEMMs on CPU (see panel_gemm.h).
#include "linear/panel_gemm.h"

#include <cstring>

#include "common/cpu_kernels.h"
#include "linear/panel_act.h"
#include "linear/panel_tiles.h"

namespace fastenc::cpu {
namespace AVX512 {  // the kernels below run only at capability avx512 and up (bf16: avx512_bf16)
namespace {

using panel::kMR;
using panel::kNR;

struct Args {
  const void* x;  // [m, lda] fp32 or bf16
  int64_t lda;
  const PanelWeight* w;
  const float* bias;     // fp32 [n] or null
  const void* residual;  // [m, n] in x's dtype or null
  void* out;             // [m, n]
  bool bf16;
  int64_t m, n;
  const void* w_packed;  // w->packed's data, read once per GEMM rather than per tile
  std::optional<Act> act;  // on each stored tile
};

#if defined(FASTENC_PANEL_X86)
#define FASTENC_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

// y = act(acc + bias (+ residual)) for rows r0.. of panel p; A < 0: no activation.
template <int MR, int A>
FASTENC_AVX512 __attribute__((always_inline)) inline void store_tile(const Args& g, int64_t p, int64_t r0,
                                                                     __m512 (&acc)[kMR][4]) {
  const size_t esz = g.bf16 ? 2 : 4;
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const int64_t c = p * kNR + 16 * v;
    if (c >= g.n) break;
    const __mmask16 mask = panel::edge_mask(g.n, c);
    const __m512 bv = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + c) : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const size_t off = (static_cast<size_t>(r0 + r) * g.n + c) * esz;
      __m512 y = _mm512_add_ps(acc[r][v], bv);
      if (g.residual) y = _mm512_add_ps(y, panel::load16(static_cast<const char*>(g.residual) + off, g.bf16, mask));
      if constexpr (A >= 0) y = panel::act16<static_cast<Act>(A)>(y);
      panel::store16(static_cast<char*>(g.out) + off, y, g.bf16, mask);
    }
  }
}

// The activation on the fp32 tile before its one rounding to the output dtype.  Against the pass over the stored
// output it replaced from 128 rows: the stacks at 4,096 tokens -0.5 to -0.8% (MiniLM fp32 / bf16, BERT-base bf16);
// against that pass's function called on each stored tile up to 128 rows: batch 1 (32 tokens) -0.9 to -2.2%.
template <int MR>
FASTENC_AVX512 __attribute__((always_inline)) inline void epilogue(const Args& g, int64_t p, int64_t r0,
                                                                   __m512 (&acc)[kMR][4]) {
  if (!g.act) return store_tile<MR, -1>(g, p, r0, acc);
  switch (*g.act) {
    case Act::kReLU: return store_tile<MR, static_cast<int>(Act::kReLU)>(g, p, r0, acc);
    case Act::kGelu: return store_tile<MR, static_cast<int>(Act::kGelu)>(g, p, r0, acc);
    case Act::kGeluTanh: return store_tile<MR, static_cast<int>(Act::kGeluTanh)>(g, p, r0, acc);
    case Act::kGeGLU:
    case Act::kSwiGLU: TORCH_CHECK(false, "fastenc panel GEMM: a gated activation pairs columns across panels");
  }
}

// pf: the next panel's lines this tile prefetches (panel::next_panel).
template <int MR>
FASTENC_AVX512 void tile_f32(const Args& g, int64_t p, int64_t r0, panel::NextPanel pf) {
  __m512 acc[kMR][4];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t k = g.w->k;
  const float* b = static_cast<const float*>(g.w_packed) + p * k * kNR;
  const float* a = static_cast<const float*>(g.x) + r0 * g.lda;
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * kNR;
    if (kk < pf.count) _mm_prefetch(pf.lines + kk * 64, _MM_HINT_T1);
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16), b2 = _mm512_loadu_ps(bk + 32),
                 b3 = _mm512_loadu_ps(bk + 48);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * g.lda + kk]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, b3, acc[r][3]);
    }
  }
  epilogue<MR>(g, p, r0, acc);
}

// acc += x's pair kk of rows r0.. times the panel's pair kk.  WHOLE: the pair (2kk, 2kk+1) is one 32-bit load
// broadcast to the 16 lanes (vpbroadcastd m32); the last pair of an odd k has one element and is read alone (never
// past the row).  Against two 16-bit loads joined in a register and broadcast from it: the bf16 stack 1.1-1.6%
// faster (MiniLM at 32 and 4,096 tokens, BERT-base at 4,096), the GEMMs alone at 4,096 rows +1 to +5%.
template <int MR, bool WHOLE>
FASTENC_AVX512BF16 inline void pair_bf16(const uint16_t* a, int64_t lda, const uint16_t* bk, int64_t kk,
                                         __m512 (&acc)[kMR][4]) {
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk), b1 = (__m512bh)_mm512_loadu_si512(bk + 32),
                 b2 = (__m512bh)_mm512_loadu_si512(bk + 64), b3 = (__m512bh)_mm512_loadu_si512(bk + 96);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    uint32_t word = 0;
    if constexpr (WHOLE) {
      std::memcpy(&word, a + r * lda + 2 * kk, 4);
    } else {
      word = a[r * lda + 2 * kk];
    }
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(word));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
    acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
  }
}

template <int MR>
FASTENC_AVX512BF16 void tile_bf16(const Args& g, int64_t p, int64_t r0, panel::NextPanel pf) {
  __m512 acc[kMR][4];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t k = g.w->k, k2 = (k + 1) / 2;
  const uint16_t* b = static_cast<const uint16_t*>(g.w_packed) + p * k2 * kNR * 2;
  const uint16_t* a = static_cast<const uint16_t*>(g.x) + r0 * g.lda;
  for (int64_t kk = 0; kk < k2; ++kk) {
    if (kk < pf.count) _mm_prefetch(pf.lines + kk * 64, _MM_HINT_T1);
    if (2 * kk + 1 < k) {
      pair_bf16<MR, true>(a, g.lda, b + kk * kNR * 2, kk, acc);
    } else {
      pair_bf16<MR, false>(a, g.lda, b + kk * kNR * 2, kk, acc);
    }
  }
  epilogue<MR>(g, p, r0, acc);
}

template <bool BF16, int MR>
void run_tile(const Args& g, int64_t p, int64_t r0, panel::NextPanel pf) {
  if constexpr (BF16) {
    tile_bf16<MR>(g, p, r0, pf);
  } else {
    tile_f32<MR>(g, p, r0, pf);
  }
}

template <bool BF16>
void gemm(const Args& g) {
  // by panels: by rows ran level in the fp32 and bf16 stacks, and each thread reads half the weight
  const int64_t k_steps = BF16 ? (g.w->k + 1) / 2 : g.w->k;
  panel::for_each_tile(g.m, g.n, false, [&](int64_t p, int64_t r0, int rows) {
    const panel::NextPanel pf = panel::next_panel(g.w_packed, g.n, k_steps, p, g.m, r0, rows);
    switch (rows) {
      case 6: run_tile<BF16, 6>(g, p, r0, pf); break;
      case 5: run_tile<BF16, 5>(g, p, r0, pf); break;
      case 4: run_tile<BF16, 4>(g, p, r0, pf); break;
      case 3: run_tile<BF16, 3>(g, p, r0, pf); break;
      case 2: run_tile<BF16, 2>(g, p, r0, pf); break;
      default: run_tile<BF16, 1>(g, p, r0, pf); break;
    }
  });
}
#endif  // FASTENC_PANEL_X86

}  // namespace
}  // namespace AVX512

bool panel_gemm_supported(at::ScalarType dtype) {
#if defined(FASTENC_PANEL_X86)
  // The capability in use (the CPU's, capped by FASTENC_CPU_CAPABILITY: common/cpu_kernels.h).
  const Capability c = capability();
  return dtype == at::kFloat ? c >= Capability::kAvx512 : dtype == at::kBFloat16 ? c >= Capability::kAvx512Bf16 : false;
#else
  (void)dtype;
  return false;
#endif
}

PanelWeight pack_panel_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "fastenc panel GEMM: the weight is fp32 or bf16 [n, k]");
  PanelWeight out;
  out.n = w.size(0);
  out.k = w.size(1);
  out.dtype = w.scalar_type();
  const int64_t np = AVX512::panel::panels(out.n);
  const at::Tensor src = w.contiguous();
  if (out.dtype == at::kFloat) {
    // [panels, k, 64]: element (p, kk, c) = w[64p + c, kk]
    at::Tensor padded = at::zeros({np * AVX512::panel::kNR, out.k}, w.options());
    padded.narrow(0, 0, out.n).copy_(src);
    out.packed = padded.view({np, AVX512::panel::kNR, out.k}).transpose(1, 2).contiguous();
  } else {
    // [panels, k2, 64, 2]: element (p, kk, c, t) = w[64p + c, 2kk + t]
    const int64_t k2 = (out.k + 1) / 2;
    at::Tensor padded = at::zeros({np * AVX512::panel::kNR, 2 * k2}, w.options());
    padded.narrow(0, 0, out.n).narrow(1, 0, out.k).copy_(src);
    out.packed = padded.view({np, AVX512::panel::kNR, k2, 2}).transpose(1, 2).contiguous();
  }
  return out;
}

at::Tensor panel_gemm(const at::Tensor& x, const PanelWeight& w, const at::Tensor& bias, const at::Tensor& residual,
                      std::optional<Act> act) {
  at::Tensor y = at::empty({x.dim() == 2 ? x.size(0) : 0, w.n}, x.options());
  panel_gemm_out(x, w, bias, residual, y, act);
  return y;
}

void panel_gemm_out(const at::Tensor& x, const PanelWeight& w, const at::Tensor& bias, const at::Tensor& residual,
                    const at::Tensor& y, std::optional<Act> act) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.k && x.scalar_type() == w.dtype && x.stride(1) == 1,
              "fastenc panel GEMM: x must be [m, ", w.k, "] in the weight's dtype with unit last stride");
  TORCH_CHECK(panel_gemm_supported(w.dtype), "fastenc panel GEMM: no kernel for ", w.dtype, " on this CPU");
  TORCH_CHECK(!act || !is_gated(*act), "fastenc panel GEMM: a gated activation pairs columns across panels");
  const int64_t m = x.size(0);
  TORCH_CHECK(y.sizes() == at::IntArrayRef({m, w.n}) && y.scalar_type() == w.dtype && y.is_contiguous(),
              "fastenc panel GEMM: y must be a contiguous [", m, ", ", w.n, "] tensor in x's dtype");
  if (m == 0) return;
  const at::Tensor b = !bias.defined() ? at::Tensor()
                       : bias.scalar_type() == at::kFloat && bias.is_contiguous() ? bias
                                                                                  : bias.to(at::kFloat).contiguous();
  const at::Tensor r = residual.defined() ? residual.contiguous() : at::Tensor();
#if defined(FASTENC_PANEL_X86)
  const AVX512::Args g{x.const_data_ptr(), x.stride(0), &w, b.defined() ? b.const_data_ptr<float>() : nullptr,
               r.defined() ? r.const_data_ptr() : nullptr, y.data_ptr(), w.dtype == at::kBFloat16, m, w.n,
               w.packed.const_data_ptr(), act};
  if (g.bf16) {
    AVX512::gemm<true>(g);
  } else {
    AVX512::gemm<false>(g);
  }
#endif
}

}  // namespace fastenc::cpu
