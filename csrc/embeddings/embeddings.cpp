// BERT's embeddings on CPU (embeddings.h), baseline code: the LayerNorm's parameters as fp32, then the kernel
// compiled for the capability in use (cpu/embeddings.cpp; common/cpu_kernels.h).
#include "embeddings/embeddings.h"

#include <vector>

#include "common/dtype.h"

namespace fastenc {

namespace cpu {
FASTENC_REGISTER_CPU_KERNELS(EmbeddingsKernels);
}  // namespace cpu

namespace {

// An [d] parameter (fp32 or T, contiguous) as fp32, `fill` where absent: read directly, no ATen call.
template <typename T>
std::vector<float> param_f32(const at::Tensor& t, float fill, int64_t d) {
  std::vector<float> out(d, fill);
  if (!t.defined()) return out;
  if (t.scalar_type() == at::kFloat) {
    const float* p = t.const_data_ptr<float>();
    std::copy(p, p + d, out.begin());
  } else {
    const T* p = t.const_data_ptr<T>();
    for (int64_t c = 0; c < d; ++c) out[c] = static_cast<float>(p[c]);
  }
  return out;
}

}  // namespace

at::Tensor bert_embeddings_cpu(const at::Tensor& ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                               const at::Tensor& word, const at::Tensor& types, const at::Tensor& pos,
                               const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t d = word.size(1);
  at::Tensor y = at::empty({ids.size(0), ids.size(1), d}, word.options());
  std::vector<float> g, beta;
  dispatch_dtype(word.scalar_type(), [&](auto tag) {
    g = param_f32<decltype(tag)>(weight, 1.f, d);
    beta = param_f32<decltype(tag)>(bias, 0.f, d);
  });
  cpu::cpu_kernels<cpu::EmbeddingsKernels>().rows(
      {ids, token_type_ids, position_ids, word, types, pos, y, g.data(), beta.data(), eps});
  return y;
}

}  // namespace fastenc
