// Int8 linear layers on CPU (inference): y = (q_x q_wᵀ) · s_x s_wᵀ + bias (+ residual), the math of
// fastenc.reference.linear_int8.  Weights are int8 per output channel (quantized once, in Python, by
// reference.quantize_int8); activations are quantized per token at run time by quantize_rows, which may
// first apply the previous GEMM's activation (gated ones halve the width), so an FFN's activation costs no
// pass of its own: the FFN's hidden is read once, activated and quantized.  A weight may keep some input
// channels in float (their outliers would set every token's scale): quantize_rows also gathers their activated
// values (fp32), and the micro-kernel adds their products with the weight's float columns in its epilogue.
//
// GEMM: a hand-written AVX512-VNNI micro-kernel (vpdpbusd: u8 x s8 -> s32, 64 multiply-adds per
// instruction) on an MR = 6 rows x NR = 64 columns tile held in 24 zmm accumulators, the weight prepacked
// into 64-column panels (pack_int8_weight), the activations stored as u8 (q + 128; the offset's
// contribution 128 · Σ_k q_w[n, k] is subtracted in the epilogue).  The epilogue dequantizes (s_x s_w),
// adds the bias and the residual and stores fp32 or bf16 (rounded by vcvtneps2bf16 where the CPU has AVX512-BF16,
// in integer operations at avx512_vnni: Cascade Lake, Ice Lake).  At the avx2 and avx512 capabilities (no VNNI) an
// AVX2 micro-kernel multiplies the same u8 activations, widened to 16 bits, with the weight held as int16
// (vpmaddwd: 16-bit pairs -> s32, exact: 2 · 255 · 127 < 2^31; then vpaddd), 16 columns at a time, with the same
// epilogue; below avx2 the integer products run as exact fp32 GEMMs over column chunks, the epilogue in ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/activation.h"  // Act
#include "common/cpu_kernels.h"

namespace fastenc::cpu {

constexpr int64_t kInt8PanelCols = 64;  // output channels per packed panel (NR)

// An int8 weight [n, k] in the micro-kernel's layout.  With a smoothing vector (SmoothQuant: the weight was
// quantized as W · diag(s)), its activations are quantized as x · diag(1/s): smooth holds 1/s.
struct Int8Weight {
  at::Tensor packed;  // int8 [panels, k4, 64, 4]: panel p, k group g, channel c, t: q[64p + c, 4g + t] (0 padded);
                      // packed where the VNNI kernel runs (int8_kernel() == kVnni), else undefined
  at::Tensor packed16;  // int16 [panels, 4, k2, 16, 2]: panel p, column block v, k pair g, channel c, t:
                        // q[64p + 16v + c, 2g + t] (0 padded); packed where the AVX2 kernel runs, else undefined
  at::Tensor q;       // int8 [n, k]: the row-major copy (the fallback's GEMM)
  at::Tensor scale;   // fp32 [panels · 64]: s_w (0 past n)
  at::Tensor comp;    // int32 [panels · 64]: 128 · Σ_k q[n, k]
  at::Tensor smooth;  // fp32 [k]: 1/s, or undefined (no smoothing); 0 at the channels kept in float
  at::Tensor float_channels;  // int64 [f]: input channels computed in float (q's columns 0 there), or undefined
  at::Tensor float_weight;    // [n, f] in the weight's dtype: those channels' columns (the fallback's GEMM)
  at::Tensor float_packed;    // fp32 [panels, f, 64]: float_weightᵀ in 64-column panels (0 padded)
  int64_t n = 0, k = 0;
  int64_t k4() const { return (k + 3) / 4; }
  int64_t k2() const { return (k + 1) / 2; }
  int64_t panels() const { return (n + kInt8PanelCols - 1) / kInt8PanelCols; }
};

// q int8 [n, k] and scale fp32 [n] (reference.quantize_int8 of a weight, smoothed or not), smooth fp32 [k]
// or undefined, float_channels int64 [f] and float_weight [n, f] or both undefined -> the packed weight.
Int8Weight pack_int8_weight(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& smooth,
                            const at::Tensor& float_channels = at::Tensor(),
                            const at::Tensor& float_weight = at::Tensor());

// Activations quantized per row: u8 [m, k4 · 4] holding q + 128 (padding columns 128, i.e. 0), scales [m],
// and act_in(x) at the weight's float channels, fp32 [m, f] (undefined without them).
struct Int8Rows {
  at::Tensor q;
  at::Tensor scale;
  at::Tensor floats;
  int64_t k = 0;
};

// x [m, k_in] (fp32 or bf16, unit last stride) -> q, s of act_in(x) · smooth (k = k_in, or k_in / 2 when
// gated; smooth fp32 [k] or undefined), and act_in(x)[:, float_channels] (int64 [f] or undefined).
Int8Rows quantize_rows(const at::Tensor& x, std::optional<Act> act_in, const at::Tensor& smooth,
                       const at::Tensor& float_channels);

// quantize_rows into out's contiguous tensors (q u8 [m, k4 · 4], scale fp32 [m], floats fp32 [m, f] when f > 0);
// out.k is set.
void quantize_rows_out(const at::Tensor& x, std::optional<Act> act_in, const at::Tensor& smooth,
                       const at::Tensor& float_channels, Int8Rows& out);

// y [m, n] = (q_x q_wᵀ) s_x s_w + x.floats w.float_weightᵀ + bias (+ residual) in out_dtype (fp32 or bf16); bias
// fp32 [n] or undefined, residual [m, n] in out_dtype or undefined.
at::Tensor int8_linear(const Int8Rows& x, const Int8Weight& w, const at::Tensor& bias, const at::Tensor& residual,
                       at::ScalarType out_dtype);

// int8_linear into y [m, n] (fp32 or bf16, contiguous).
void int8_linear_out(const Int8Rows& x, const Int8Weight& w, const at::Tensor& bias, const at::Tensor& residual,
                     const at::Tensor& y);

// The int8 GEMM that runs on this CPU (its capability, capped by FASTENC_CPU_CAPABILITY): the AVX512-VNNI
// micro-kernel (avx512_vnni and up), the AVX2 one (avx2, avx512), or exact fp32 GEMMs in ATen (below avx2).
enum class Int8Kernel { kFp32Exact, kAvx2, kVnni };
Int8Kernel int8_kernel();
const char* int8_kernel_name(Int8Kernel k);  // "fp32_exact", "avx2", "avx512_vnni"

// quantize_rows of cpu/int8_quantize.cpp, one table per capability it is compiled for (common/cpu_kernels.h).
struct Int8QuantizeKernels {
  decltype(&quantize_rows_out) quantize;
};
FASTENC_DECLARE_CPU_KERNELS(Int8QuantizeKernels)

}  // namespace fastenc::cpu
