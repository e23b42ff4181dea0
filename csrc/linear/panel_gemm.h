// Few-row GEMMs on CPU (inference): y = x Wᵀ + bias (+ residual) in fp32 or bf16, for the M of a single
// request (batch 1: M = its tokens), where oneDNN's inner product spends more time in its own machinery than
// in arithmetic.  The weight is prepacked once into panels of 64 output channels (fp32: [panels, k, 64];
// bf16: [panels, k/2, 64, 2], pairs of k for vdpbf16ps); a 6 x 64 tile of the output lives in 24 zmm
// accumulators, fed by one broadcast of x per row and four weight vectors per k step (fp32 FMA) or k pair
// (bf16 dot products, fp32 accumulation).  The same structure as the int8 kernel (linear/int8_linear.h).
// AVX-512 (and AVX512-BF16 for bf16) at run time; panel_gemm_supported says whether it runs here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/activation.h"

namespace fastenc::cpu {

struct PanelWeight {
  at::Tensor packed;  // fp32 [panels, k, 64] or bf16 [panels, k2, 64, 2] (k2 = ceil(k / 2)), zero padded
  int64_t n = 0, k = 0;
  at::ScalarType dtype = at::kFloat;
};

// w [n, k] (fp32 or bf16) -> its panels.
PanelWeight pack_panel_weight(const at::Tensor& w);

// Whether the kernel for dtype runs on this CPU.
bool panel_gemm_supported(at::ScalarType dtype);

// y [m, n] = act(x [m, k] Wᵀ + bias (+ residual)), in x's dtype (= the weight's); bias [n] fp32 or x's dtype,
// residual [m, n] in x's dtype; x with unit last stride; act ungated, on each tile's fp32 values before they are
// stored (linear/panel_act.h), where a pass of its own would read the output back and cost a parallel region.
at::Tensor panel_gemm(const at::Tensor& x, const PanelWeight& w, const at::Tensor& bias, const at::Tensor& residual,
                      std::optional<Act> act = std::nullopt);

// panel_gemm into y [m, n] (x's dtype, contiguous).
void panel_gemm_out(const at::Tensor& x, const PanelWeight& w, const at::Tensor& bias, const at::Tensor& residual,
                    const at::Tensor& y, std::optional<Act> act = std::nullopt);

}  // namespace fastenc::cpu
