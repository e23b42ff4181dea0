// The CPU residual + LayerNorm's entry points (layer_norm.h), baseline code: the kernels compiled for the
// capability in use (cpu/layer_norm.cpp; common/cpu_kernels.h).
#include "layer_norm/layer_norm.h"

namespace fastenc {

namespace cpu {
FASTENC_REGISTER_CPU_KERNELS(LayerNormKernels);
}  // namespace cpu

void residual_layer_norm_fwd_out(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& branch_bias, double eps,
                                 const DropoutParams& dp, const at::Tensor& y, const at::Tensor& s,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  cpu::cpu_kernels<cpu::LayerNormKernels>().fwd(x, branch, weight, bias, branch_bias, eps, dp, y, s, mean, rstd);
}

void residual_layer_norm_bwd_out(const at::Tensor& dy, const at::Tensor& dresid, const at::Tensor& x,
                                 const at::Tensor& branch, const at::Tensor& resid, const at::Tensor& weight,
                                 const at::Tensor& branch_bias, const at::Tensor& mean, const at::Tensor& rstd,
                                 const DropoutParams& dp, const at::Tensor& dx, const at::Tensor& dbranch,
                                 const at::Tensor& dweight, const at::Tensor& dbias, const at::Tensor& dbranch_bias) {
  cpu::cpu_kernels<cpu::LayerNormKernels>().bwd(dy, dresid, x, branch, resid, weight, branch_bias, mean, rstd, dp,
                                                dx, dbranch, dweight, dbias, dbranch_bias);
}

}  // namespace fastenc
