// Int8 linear layers on CPU (see int8_linear.h), baseline code: the VNNI kernels carry their instruction set in a
// target attribute and run after a cpuid check; the activations' quantization is a kernel file compiled per
// capability (cpu/int8_quantize.cpp), called through its table (common/cpu_kernels.h).
#include "linear/int8_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "linear/panel_tiles.h"

namespace fastenc::cpu {
namespace AVX512_BF16 {  // the VNNI kernels below run only at capability avx512_bf16 (which includes VNNI) and up
namespace {

namespace panel = AVX512::panel;
using panel::kMR;
using panel::kNR;
static_assert(kNR == kInt8PanelCols);

// ------------------------------------------------------------------ the VNNI GEMM

#if defined(FASTENC_PANEL_X86)
#define FASTENC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")))

struct GemmArgs {
  const uint8_t* a;  // u8 [m, lda]
  int64_t lda;
  const float* a_scale;
  const Int8Weight* w;
  const float* bias;      // fp32 [n] or null
  const void* residual;   // [m, n] in the output dtype, or null
  void* out;              // [m, n]
  bool bf16;              // output and residual dtype
  int64_t m, n;
  const float* floats;    // fp32 [m, f]: the activations of the weight's float channels, or null
  int64_t f;
  // w's tensors' data, read once per GEMM rather than per tile (an ATen accessor costs about a tile's 1%)
  const int8_t* w_packed;
  const float* w_scale;
  const int32_t* w_comp;
  const float* w_float_packed;  // or null
};

// Rows r0.. r0+MR of panel p: acc[r][v] = Σ_g a[r, 4g..4g+3] · b[g, 16v..16v+15, 0..3] over the k4 groups,
// then y = (acc - comp) · s_x s_w + bias (+ residual).
// pf: the next panel's lines this tile prefetches (panel::next_panel).
template <int MR>
FASTENC_VNNI void tile(const GemmArgs& g, int64_t p, int64_t r0, panel::NextPanel pf) {
  __m512i acc[kMR][4];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  }
  const int64_t k4 = g.w->k4();
  const int8_t* b = g.w_packed + p * k4 * kNR * 4;
  const uint8_t* a = g.a + r0 * g.lda;
  for (int64_t kg = 0; kg < k4; ++kg) {
    const int8_t* bg = b + kg * kNR * 4;
    if (kg < pf.count) _mm_prefetch(pf.lines + kg * 64, _MM_HINT_T1);
    const __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64);
    const __m512i b2 = _mm512_loadu_si512(bg + 128), b3 = _mm512_loadu_si512(bg + 192);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * g.lda + 4 * kg, 4);
      const __m512i av = _mm512_set1_epi32(word);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, b3);
    }
  }
  const int64_t n0 = p * kNR;
  const float* sw = g.w_scale + n0;
  const int32_t* comp = g.w_comp + n0;
  const size_t esz = g.bf16 ? 2 : 4;
  const float* wf = g.floats ? g.w_float_packed + p * g.f * kNR : nullptr;
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    const int64_t c = n0 + 16 * v;
    if (c >= g.n) break;
    const __mmask16 mask = panel::edge_mask(g.n, c);
    const __m512 swv = _mm512_loadu_ps(sw + 16 * v);
    const __m512i cv = _mm512_loadu_si512(comp + 16 * v);
    __m512 y[kMR];  // this column block's (acc - comp) s_x s_w, then + the float channels' products
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      y[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], cv)),
                           _mm512_mul_ps(_mm512_set1_ps(g.a_scale[r0 + r]), swv));
    }
    for (int64_t j = 0; j < g.f; ++j) {  // the float channels: y[r] += floats[r, j] · W_float[c.., j], fp32
      const __m512 w = _mm512_loadu_ps(wf + j * kNR + 16 * v);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) y[r] = _mm512_fmadd_ps(_mm512_set1_ps(g.floats[(r0 + r) * g.f + j]), w, y[r]);
    }
    const __m512 bv = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + c) : _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const int64_t row = r0 + r;
      __m512 yv = y[r];
      if (g.bias) yv = _mm512_add_ps(yv, bv);
      const size_t off = (static_cast<size_t>(row) * g.n + c) * esz;
      if (g.residual) yv = _mm512_add_ps(yv, panel::load16(static_cast<const char*>(g.residual) + off, g.bf16, mask));
      panel::store16(static_cast<char*>(g.out) + off, yv, g.bf16, mask);
    }
  }
}

void gemm_vnni(const GemmArgs& g) {
  // by rows from kRowSplitMin rows: each thread's rows of a were quantized on that thread (panel_tiles.h)
  panel::for_each_tile(g.m, g.n, true, [&](int64_t p, int64_t r0, int rows) {
    const panel::NextPanel pf = panel::next_panel(g.w_packed, g.n, g.w->k4(), p, g.m, r0, rows);
    switch (rows) {
      case 6: tile<6>(g, p, r0, pf); break;
      case 5: tile<5>(g, p, r0, pf); break;
      case 4: tile<4>(g, p, r0, pf); break;
      case 3: tile<3>(g, p, r0, pf); break;
      case 2: tile<2>(g, p, r0, pf); break;
      default: tile<1>(g, p, r0, pf); break;
    }
  });
}
#endif  // FASTENC_PANEL_X86

}  // namespace
}  // namespace AVX512_BF16

FASTENC_REGISTER_CPU_KERNELS(Int8QuantizeKernels);

Int8Rows quantize_rows(const at::Tensor& x, std::optional<Act> act_in, const at::Tensor& smooth,
                       const at::Tensor& float_channels) {
  const bool gated = act_in && (*act_in == Act::kGeGLU || *act_in == Act::kSwiGLU);
  const int64_t m = x.size(0), k = x.size(1) / (gated ? 2 : 1);
  const int64_t f = float_channels.defined() ? float_channels.numel() : 0;
  Int8Rows out;
  out.q = at::empty({m, (k + 3) / 4 * 4}, x.options().dtype(at::kByte));
  out.scale = at::empty({m}, x.options().dtype(at::kFloat));
  if (f > 0) out.floats = at::empty({m, f}, x.options().dtype(at::kFloat));
  quantize_rows_out(x, act_in, smooth, float_channels, out);
  return out;
}

void quantize_rows_out(const at::Tensor& x, std::optional<Act> act_in, const at::Tensor& smooth,
                       const at::Tensor& float_channels, Int8Rows& out) {
  cpu_kernels<Int8QuantizeKernels>().quantize(x, act_in, smooth, float_channels, out);
}

bool int8_vnni_supported() {
#if defined(FASTENC_PANEL_X86)
  // avx512_bf16 and up include AVX512-VNNI (common/cpu_kernels.h); capped by FASTENC_CPU_CAPABILITY.
  return capability() >= Capability::kAvx512Bf16;
#else
  return false;
#endif
}

Int8Weight pack_int8_weight(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& smooth,
                            const at::Tensor& float_channels, const at::Tensor& float_weight) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && scale.scalar_type() == at::kFloat &&
                  scale.dim() == 1 && scale.size(0) == q.size(0),
              "fastenc int8: a weight is int8 [n, k] with fp32 scales [n]");
  Int8Weight w;
  w.n = q.size(0);
  w.k = q.size(1);
  w.q = q.contiguous();
  if (smooth.defined()) {
    TORCH_CHECK(smooth.scalar_type() == at::kFloat && smooth.dim() == 1 && smooth.size(0) == w.k,
                "fastenc int8: smooth must be fp32 [k]");
    w.smooth = smooth.contiguous();
  }
  TORCH_CHECK(float_channels.defined() == float_weight.defined(),
              "fastenc int8: float_channels and float_weight come together");
  if (float_channels.defined()) {
    const int64_t f = float_channels.numel();
    TORCH_CHECK(float_channels.scalar_type() == at::kLong && float_channels.dim() == 1 && f >= 1 && f <= w.k &&
                    float_weight.dim() == 2 && float_weight.size(0) == w.n && float_weight.size(1) == f &&
                    at::isFloatingType(float_weight.scalar_type()),
                "fastenc int8: float_channels must be int64 [f] (1 <= f <= ", w.k, ") and float_weight [", w.n,
                ", f] floating point, got ", float_channels.scalar_type(), " ", float_channels.sizes(), " and ",
                float_weight.scalar_type(), " ", float_weight.sizes());
    TORCH_CHECK(float_channels.min().item<int64_t>() >= 0 && float_channels.max().item<int64_t>() < w.k,
                "fastenc int8: float_channels must lie in [0, ", w.k, ")");
    w.float_channels = float_channels.contiguous();
    w.float_weight = float_weight.detach().contiguous();
    // [panels, f, 64]: panel p, channel j, column c = float_weight[64p + c, j] (0 past n)
    at::Tensor padded = at::zeros({w.panels() * kInt8PanelCols, f}, scale.options());
    padded.narrow(0, 0, w.n).copy_(w.float_weight);
    w.float_packed = padded.view({w.panels(), kInt8PanelCols, f}).transpose(1, 2).contiguous();
  }
  const int64_t panels = w.panels(), k4 = w.k4(), np = panels * kInt8PanelCols;
  w.packed = at::zeros({panels, k4, kInt8PanelCols, 4}, q.options());
  w.scale = at::zeros({np}, scale.options());
  w.scale.narrow(0, 0, w.n).copy_(scale);
  w.comp = at::zeros({np}, q.options().dtype(at::kInt));
  const int8_t* src = w.q.const_data_ptr<int8_t>();
  int8_t* dst = w.packed.data_ptr<int8_t>();
  int32_t* comp = w.comp.data_ptr<int32_t>();
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kInt8PanelCols, c = n % kInt8PanelCols;
      int32_t sum = 0;
      for (int64_t k = 0; k < w.k; ++k) {
        const int8_t v = src[n * w.k + k];
        dst[((p * k4 + k / 4) * kInt8PanelCols + c) * 4 + k % 4] = v;
        sum += v;
      }
      comp[n] = 128 * sum;
    }
  });
  return w;
}

at::Tensor int8_linear(const Int8Rows& x, const Int8Weight& w, const at::Tensor& bias, const at::Tensor& residual,
                       at::ScalarType out_dtype) {
  at::Tensor y = at::empty({x.q.size(0), w.n}, x.q.options().dtype(out_dtype));
  int8_linear_out(x, w, bias, residual, y);
  return y;
}

void int8_linear_out(const Int8Rows& x, const Int8Weight& w, const at::Tensor& bias, const at::Tensor& residual,
                     const at::Tensor& y) {
  TORCH_CHECK(x.k == w.k, "fastenc int8: activations have ", x.k, " columns, the weight ", w.k);
  TORCH_CHECK(x.floats.defined() == w.float_channels.defined(),
              "fastenc int8: quantize_rows must gather the weight's float channels");
  const int64_t m = x.q.size(0);
  const at::ScalarType out_dtype = y.scalar_type();
  TORCH_CHECK(y.sizes() == at::IntArrayRef({m, w.n}) && y.is_contiguous() &&
                  (out_dtype == at::kFloat || out_dtype == at::kBFloat16),
              "fastenc int8: y must be a contiguous fp32 or bf16 [", m, ", ", w.n, "] tensor");
  if (m == 0 || w.n == 0) return;
#if defined(FASTENC_PANEL_X86)
  if (int8_vnni_supported()) {
    AVX512_BF16::GemmArgs g{x.q.const_data_ptr<uint8_t>(), x.q.size(1), x.scale.const_data_ptr<float>(), &w,
               bias.defined() ? bias.const_data_ptr<float>() : nullptr,
               residual.defined() ? residual.const_data_ptr() : nullptr, y.data_ptr(), out_dtype == at::kBFloat16, m,
               w.n, x.floats.defined() ? x.floats.const_data_ptr<float>() : nullptr,
               x.floats.defined() ? x.floats.size(1) : 0, w.packed.const_data_ptr<int8_t>(),
               w.scale.const_data_ptr<float>(), w.comp.const_data_ptr<int32_t>(),
               x.floats.defined() ? w.float_packed.const_data_ptr<float>() : nullptr};
    AVX512_BF16::gemm_vnni(g);
    return;
  }
#endif
  // Without the VNNI kernel: the integer products by fp32 GEMMs over chunks of kExactK columns, each exact
  // (|partial sums| <= kExactK · 127² < 2^24), summed in int32; then the same epilogue in ATen ops.  Not
  // torch._int_mm: oneDNN's int8 GEMM without VNNI adds byte pairs in int16 (vpmaddubsw) and saturates (measured
  // under ONEDNN_MAX_CPU_ISA=AVX512_CORE: sums off by up to 6e4).
  constexpr int64_t kExactK = 1024;
  const at::Tensor a = x.q.narrow(1, 0, x.k).to(at::kFloat) - 128.f;
  const at::Tensor b = w.q.to(at::kFloat);
  at::Tensor acc = at::zeros({m, w.n}, x.q.options().dtype(at::kInt));
  for (int64_t k0 = 0; k0 < x.k; k0 += kExactK) {
    const int64_t kc = std::min(kExactK, x.k - k0);
    acc.add_(at::mm(a.narrow(1, k0, kc), b.narrow(1, k0, kc).t()).to(at::kInt));
  }
  at::Tensor f = acc.to(at::kFloat) * (x.scale.unsqueeze(1) * w.scale.narrow(0, 0, w.n).unsqueeze(0));
  if (x.floats.defined()) f.add_(at::mm(x.floats, w.float_weight.to(at::kFloat).t()));
  if (bias.defined()) f.add_(bias);
  if (residual.defined()) f.add_(residual.to(at::kFloat));
  y.copy_(f);
}

}  // namespace fastenc::cpu
