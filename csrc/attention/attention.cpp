// The CPU attention's entry points (attention.h), baseline code: the forward and backward of the kernels compiled
// for the capability in use (cpu/flash_fwd.cpp, cpu/flash_bwd.cpp; common/cpu_kernels.h), the masks as the
// kernels read them, and the replay of the dropout mask.
#include <ATen/Parallel.h>

#include "attention/attention.h"
#include "common/philox.h"

namespace fastenc::cpu {

FASTENC_REGISTER_CPU_KERNELS(AttentionFwdKernels);
FASTENC_REGISTER_CPU_KERNELS(AttentionBwdKernels);

AttnMask make_mask(const std::optional<at::Tensor>& mask, bool key_padding) {
  AttnMask m;
  if (!mask) return m;
  m.data = mask->data_ptr();
  m.dtype = mask->scalar_type();
  m.sb = mask->stride(0);
  if (key_padding) {
    m.sj = mask->stride(1);
  } else {
    m.sh = mask->stride(1);
    m.si = mask->stride(2);
    m.sj = mask->stride(3);
  }
  return m;
}

void attention_forward_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const AttnParams& p,
                           const at::Tensor& out, const at::Tensor& lse) {
  cpu_kernels<AttentionFwdKernels>().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, p, out, lse);
}

void attention_backward_out(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, const AttnParams& p, const at::Tensor& dq,
                            const at::Tensor& dk, const at::Tensor& dv) {
  cpu_kernels<AttentionBwdKernels>().backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, p, dq, dk, dv);
}

at::Tensor attention_dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double p,
                                  uint64_t seed) {
  at::Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold24(p);
  at::parallel_for(0, batch * heads * seqlen_q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % seqlen_q, h = r / seqlen_q % heads, b = r / seqlen_q / heads;
      for (int64_t j = 0; j < seqlen_k; ++j) {
        const U32x4 x = philox4x32(seed, U32x4{{static_cast<uint32_t>(i), static_cast<uint32_t>(j >> 2),
                                                static_cast<uint32_t>(h), static_cast<uint32_t>(b)}});
        out[r * seqlen_k + j] = dropout_keep(x.v[j & 3], threshold);
      }
    }
  });
  return mask;
}

}  // namespace fastenc::cpu
