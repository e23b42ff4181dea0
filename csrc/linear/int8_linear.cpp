// Int8 linear layers on CPU (see int8_linear.h), baseline code: the VNNI and AVX2 kernels carry their instruction
// set in a target attribute and run after a cpuid check (int8_kernel); the activations' quantization is a kernel
// file compiled per capability (cpu/int8_quantize.cpp), called through its table (common/cpu_kernels.h).
#include "linear/int8_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "linear/panel_tiles.h"

namespace fastenc::cpu {
namespace AVX512_VNNI {  // the VNNI kernel below runs only at capability avx512_vnni and up
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
  bool bf16_insn;         // the CPU has AVX512-BF16 (capability avx512_bf16): bf16 outputs rounded by vcvtneps2bf16
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
      if (g.bf16 && !g.bf16_insn) {
        panel::store16_bf16_int(static_cast<char*>(g.out) + off, yv, mask);
      } else {
        panel::store16(static_cast<char*>(g.out) + off, yv, g.bf16, mask);
      }
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
}  // namespace AVX512_VNNI

namespace AVX2 {  // the AVX2 kernel below runs at capabilities avx2 and avx512 (no VNNI)
namespace {

#if defined(FASTENC_PANEL_X86)
#define FASTENC_AVX2_INT8 __attribute__((target("avx2,fma")))

namespace panel = AVX512::panel;
using panel::kNR;
// A tile's rows x 16 columns at a time: 6 rows x 2 ymm of 8 int32 accumulators, 2 weight vectors, a broadcast and a
// product fill the 16 ymm registers.  The 8 encoder shapes at 2,048 rows, capped to AVX2 on Zen 4
// (scripts/cpu_gemm_bench.py): 295-323 GOP/s, 79-86% of vpmaddwd + vpaddd's rate (376 GOP/s there), 1.4-1.7x the
// best fp32 GEMM; passes of 3 or 4 rows ran at 180-240.
constexpr int kBlock = 16;
static_assert(panel::kMR == 6, "a pass holds 6 rows");

struct GemmArgs {
  const uint8_t* a;  // u8 [m, lda]
  int64_t lda;
  const float* a_scale;
  const float* bias;     // fp32 [n] or null
  const void* residual;  // [m, n] in the output dtype, or null
  void* out;             // [m, n]
  bool bf16;             // output and residual dtype
  int64_t m, n, k2;
  const float* floats;  // fp32 [m, f] or null
  int64_t f;
  const int16_t* w_packed;  // Int8Weight::packed16
  const float* w_scale;
  const int32_t* w_comp;
  const float* w_float_packed;  // or null
};

// 8 fp32 values rounded to bf16 (to nearest even; a NaN stays a quiet NaN of its sign), in the low 128 bits.
FASTENC_AVX2_INT8 inline __m128i to_bf16(__m256 y) {
  const __m256i b = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// acc += x in acc's register: written as intrinsics, GCC adds into x's register and copies the sum back (a move
// per accumulator and k step, a quarter of the loop's instructions).
FASTENC_AVX2_INT8 inline void add_to(__m256i& acc, __m256i x) { asm("vpaddd %1, %0, %0" : "+x"(acc) : "x"(x)); }

// The first `count` (1..8) of 8 output values at p (fp32, or bf16 when bf16), as fp32; the others 0.
FASTENC_AVX2_INT8 inline __m256 load8(const char* p, bool bf16, int count) {
  if (count == 8) {
    if (!bf16) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  alignas(32) float tmp[8] = {};
  if (!bf16) {
    std::memcpy(tmp, p, count * 4);
  } else {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    for (int i = 0; i < count; ++i) {
      const uint32_t bits = uint32_t{h[i]} << 16;
      std::memcpy(&tmp[i], &bits, 4);
    }
  }
  return _mm256_load_ps(tmp);
}

FASTENC_AVX2_INT8 inline void store8(char* p, __m256 y, bool bf16, int count) {
  if (!bf16) {
    if (count == 8) {
      _mm256_storeu_ps(reinterpret_cast<float*>(p), y);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, y);
      std::memcpy(p, tmp, count * 4);
    }
    return;
  }
  const __m128i h = to_bf16(y);
  if (count == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, count * 2);
  }
}

// Rows r0.. r0+R of column block c0 (16 columns): acc[r][h] = Σ_g a16[r, 2g..2g+1] · b[g, 8h..8h+7, 0..1] over
// the k pairs, then the VNNI kernel's epilogue: y = (acc - comp) · s_x s_w + floats · W_float + bias (+ residual).
template <int R>
FASTENC_AVX2_INT8 void pass(const GemmArgs& g, const uint16_t* a16, int64_t lda16, const int16_t* b, int64_t r0,
                            int64_t c0, const float* wf) {
  __m256i acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kg = 0; kg < g.k2; ++kg) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kg * 2 * kBlock));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kg * 2 * kBlock + 16));
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a16 + r * lda16 + 2 * kg, 4);
      const __m256i av = _mm256_set1_epi32(pair);
      add_to(acc[r][0], _mm256_madd_epi16(av, b0));
      add_to(acc[r][1], _mm256_madd_epi16(av, b1));
    }
  }
  const size_t esz = g.bf16 ? 2 : 4;
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int64_t c = c0 + 8 * h;
    if (c >= g.n) break;
    const int count = static_cast<int>(std::min<int64_t>(8, g.n - c));
    const __m256 sw = _mm256_loadu_ps(g.w_scale + c);  // padded to whole panels: in bounds
    const __m256i comp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.w_comp + c));
    __m256 bias = _mm256_setzero_ps();
    if (g.bias) bias = count == 8 ? _mm256_loadu_ps(g.bias + c) : load8(reinterpret_cast<const char*>(g.bias + c),
                                                                       false, count);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], comp)),
                               _mm256_mul_ps(_mm256_set1_ps(g.a_scale[row]), sw));
      for (int64_t j = 0; j < g.f; ++j) {
        y = _mm256_fmadd_ps(_mm256_set1_ps(g.floats[row * g.f + j]), _mm256_loadu_ps(wf + j * kNR + 8 * h), y);
      }
      y = _mm256_add_ps(y, bias);
      const size_t off = (static_cast<size_t>(row) * g.n + c) * esz;
      if (g.residual) y = _mm256_add_ps(y, load8(static_cast<const char*>(g.residual) + off, g.bf16, count));
      store8(static_cast<char*>(g.out) + off, y, g.bf16, count);
    }
  }
}

// The tile of `rows` rows (<= panel::kMR) at r0 of panel p: the rows widened to 16 bits once (thread_local
// buffer), then each 16-column block in one pass.
FASTENC_AVX2_INT8 void tile(const GemmArgs& g, int64_t p, int64_t r0, int rows) {
  thread_local std::vector<uint16_t> wide;
  const int64_t lda16 = (g.k2 * 2 + 15) / 16 * 16;
  if (static_cast<int64_t>(wide.size()) < panel::kMR * lda16) wide.resize(panel::kMR * lda16);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* src = g.a + (r0 + r) * g.lda;
    uint16_t* dst = wide.data() + r * lda16;
    int64_t k = 0;
    for (; k + 16 <= g.k2 * 2; k += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_cvtepu8_epi16(v));
    }
    for (; k < g.k2 * 2; ++k) dst[k] = src[k];  // g.k2 * 2 <= lda: the padding columns hold 128 (q = 0)
  }
  const int16_t* bp = g.w_packed + p * (kNR / kBlock) * g.k2 * 2 * kBlock;
  for (int v = 0; v < kNR / kBlock; ++v) {
    const int64_t c0 = p * kNR + v * kBlock;
    if (c0 >= g.n) break;
    const int16_t* b = bp + v * g.k2 * 2 * kBlock;
    const float* wf = g.floats ? g.w_float_packed + p * g.f * kNR + v * kBlock : nullptr;
    switch (rows) {
      case 6: pass<6>(g, wide.data(), lda16, b, r0, c0, wf); break;
      case 5: pass<5>(g, wide.data(), lda16, b, r0, c0, wf); break;
      case 4: pass<4>(g, wide.data(), lda16, b, r0, c0, wf); break;
      case 3: pass<3>(g, wide.data(), lda16, b, r0, c0, wf); break;
      case 2: pass<2>(g, wide.data(), lda16, b, r0, c0, wf); break;
      default: pass<1>(g, wide.data(), lda16, b, r0, c0, wf); break;
    }
  }
}

void gemm(const GemmArgs& g) {
  panel::for_each_tile(g.m, g.n, true, [&](int64_t p, int64_t r0, int rows) { tile(g, p, r0, rows); });
}
#endif  // FASTENC_PANEL_X86

}  // namespace
}  // namespace AVX2

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

Int8Kernel int8_kernel() {
#if defined(FASTENC_PANEL_X86)
  // avx512_vnni and up include AVX512-VNNI (common/cpu_kernels.h); capped by FASTENC_CPU_CAPABILITY.
  if (capability() >= Capability::kAvx512Vnni) return Int8Kernel::kVnni;
  if (capability() >= Capability::kAvx2) return Int8Kernel::kAvx2;
#endif
  return Int8Kernel::kFp32Exact;
}

const char* int8_kernel_name(Int8Kernel k) {
  switch (k) {
    case Int8Kernel::kVnni: return "avx512_vnni";
    case Int8Kernel::kAvx2: return "avx2";
    default: return "fp32_exact";
  }
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
  const int64_t panels = w.panels(), k4 = w.k4(), k2 = w.k2(), np = panels * kInt8PanelCols;
  const Int8Kernel kernel = int8_kernel();
  constexpr int64_t kBlock = 16;  // the AVX2 kernel's column block
  if (kernel == Int8Kernel::kVnni) w.packed = at::zeros({panels, k4, kInt8PanelCols, 4}, q.options());
  if (kernel == Int8Kernel::kAvx2) {
    w.packed16 = at::zeros({panels, kInt8PanelCols / kBlock, k2, kBlock, 2}, q.options().dtype(at::kShort));
  }
  w.scale = at::zeros({np}, scale.options());
  w.scale.narrow(0, 0, w.n).copy_(scale);
  w.comp = at::zeros({np}, q.options().dtype(at::kInt));
  const int8_t* src = w.q.const_data_ptr<int8_t>();
  int8_t* dst = w.packed.defined() ? w.packed.data_ptr<int8_t>() : nullptr;
  int16_t* dst16 = w.packed16.defined() ? w.packed16.data_ptr<int16_t>() : nullptr;
  int32_t* comp = w.comp.data_ptr<int32_t>();
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kInt8PanelCols, c = n % kInt8PanelCols, v = c / kBlock, cb = c % kBlock;
      int32_t sum = 0;
      for (int64_t k = 0; k < w.k; ++k) {
        const int8_t x = src[n * w.k + k];
        if (dst) dst[((p * k4 + k / 4) * kInt8PanelCols + c) * 4 + k % 4] = x;
        if (dst16) dst16[(((p * (kInt8PanelCols / kBlock) + v) * k2 + k / 2) * kBlock + cb) * 2 + k % 2] = x;
        sum += x;
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
  if (w.packed.defined()) {
    AVX512_VNNI::GemmArgs g{x.q.const_data_ptr<uint8_t>(), x.q.size(1), x.scale.const_data_ptr<float>(), &w,
                            bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                            residual.defined() ? residual.const_data_ptr() : nullptr, y.data_ptr(),
                            out_dtype == at::kBFloat16, capability() >= Capability::kAvx512Bf16, m, w.n,
                            x.floats.defined() ? x.floats.const_data_ptr<float>() : nullptr,
                            x.floats.defined() ? x.floats.size(1) : 0, w.packed.const_data_ptr<int8_t>(),
                            w.scale.const_data_ptr<float>(), w.comp.const_data_ptr<int32_t>(),
                            x.floats.defined() ? w.float_packed.const_data_ptr<float>() : nullptr};
    AVX512_VNNI::gemm_vnni(g);
    return;
  }
  if (w.packed16.defined()) {
    AVX2::GemmArgs g{x.q.const_data_ptr<uint8_t>(), x.q.size(1), x.scale.const_data_ptr<float>(),
                     bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                     residual.defined() ? residual.const_data_ptr() : nullptr, y.data_ptr(),
                     out_dtype == at::kBFloat16, m, w.n, w.k2(),
                     x.floats.defined() ? x.floats.const_data_ptr<float>() : nullptr,
                     x.floats.defined() ? x.floats.size(1) : 0, w.packed16.const_data_ptr<int16_t>(),
                     w.scale.const_data_ptr<float>(), w.comp.const_data_ptr<int32_t>(),
                     x.floats.defined() ? w.float_packed.const_data_ptr<float>() : nullptr};
    AVX2::gemm(g);
    return;
  }
#endif
  // Below avx2 (no int8 kernel): the integer products by fp32 GEMMs over chunks of kExactK columns, each exact
  // (|partial sums| <= kExactK · 127² < 2^24), summed in int32; then the same epilogue in ATen ops.  Not
  // torch._int_mm: oneDNN's int8 GEMM without VNNI adds byte pairs in int16 (vpmaddubsw) and saturates (measured
  // under ONEDNN_MAX_CPU_ISA=AVX512_CORE: sums off by up to 6e4); the AVX2 kernel widens them to 16 bits instead.
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
