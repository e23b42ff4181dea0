// Residual + LayerNorm on CPU tensors (kernels in cpu/layer_norm.cpp, Python bindings in
// bindings/layer_norm_api.cpp).  Per row of N columns, statistics in fp32:
//   s = x + dropout(branch + branch_bias);  y = (s - mean) · rstd · weight + bias,
//   mean = Σ s / N,  rstd = 1 / √(Σ (s - mean)² / N + eps).
// The _out functions write into tensors the caller allocated (for C++ callers that reuse
// buffers); an undefined tensor means "absent" (an input) or "not wanted" (an output).  They
// check layouts and dtypes but not the caller's shapes beyond what indexing needs.
#pragma once

#include <ATen/ATen.h>

#include "common/cpu_kernels.h"
#include "common/dropout.h"  // DropoutParams: the Philox dropout of element r·N + c of [rows, N]

namespace fastenc {

// x, branch: [rows, N], any row stride, unit column stride, one dtype (fp32 / fp16 / bf16).
// weight, bias, branch_bias: [N] contiguous, fp32 or x's dtype.  dp: dropout of (branch +
// branch_bias), element r·N + c keyed by dp.seed (dropout_keep_mask_cpu(rows, N, dp) replays it).
// Writes y [rows, N] (x's dtype, unit column stride); s likewise when defined (the prenorm residual);
// mean and rstd (fp32 [rows], contiguous) when defined, for the backward.
// With fp16/bf16 rows the statistics are taken of s rounded to x's dtype: the s a prenorm caller
// stores and the backward reads back.  y and s may alias x or branch (each row is read whole
// before any of it is written).
void residual_layer_norm_fwd_out(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& branch_bias, double eps,
                                 const DropoutParams& dp, const at::Tensor& y, const at::Tensor& s,
                                 const at::Tensor& mean, const at::Tensor& rstd);

// Backward of the forward above, with xhat = (s - mean) · rstd, g = dy · weight:
//   ds = rstd · (g - xhat · Σ(g · xhat)/N - Σ g/N) + dresid;  dx = ds;  dbranch = ds · keep / (1 - p);
//   dweight = Σ_rows dy · xhat;  dbias = Σ_rows dy;  dbranch_bias = Σ_rows dbranch.
// s is read from `resid` when defined (prenorm), else recomputed from x, branch, branch_bias, dp.
// dy, dresid (optional), resid: [rows, N] like x.  Writes dx; dbranch when defined (needed only with
// dropout: otherwise dbranch = dx); dweight, dbias, dbranch_bias ([N], any float dtype) when defined.
// dx may alias dy or dresid (every element is read before its place is written).
// The parameter sums run over fixed row chunks (a function of rows only) reduced in a fixed order:
// bitwise the same on any number of threads.
void residual_layer_norm_bwd_out(const at::Tensor& dy, const at::Tensor& dresid, const at::Tensor& x,
                                 const at::Tensor& branch, const at::Tensor& resid, const at::Tensor& weight,
                                 const at::Tensor& branch_bias, const at::Tensor& mean, const at::Tensor& rstd,
                                 const DropoutParams& dp, const at::Tensor& dx, const at::Tensor& dbranch,
                                 const at::Tensor& dweight, const at::Tensor& dbias, const at::Tensor& dbranch_bias);

namespace cpu {

// The kernels of cpu/layer_norm.cpp, one table per capability it is compiled for (the entry points above call the
// table of the capability in use: common/cpu_kernels.h).
struct LayerNormKernels {
  decltype(&residual_layer_norm_fwd_out) fwd;
  decltype(&residual_layer_norm_bwd_out) bwd;
};
FASTENC_DECLARE_CPU_KERNELS(LayerNormKernels)

}  // namespace cpu
}  // namespace fastenc
