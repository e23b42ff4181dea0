// BERT's embeddings on CPU (inference), HF's BertEmbeddings in one pass per token: for token (b, l) of ids [B, L],
//   e = round(word[ids[b, l]] + type[token_type_ids[b, l]]);  s = round(e + pos[position_ids[b, l]]);
//   y = (s - mean(s)) · rstd(s) · weight + bias,  rstd = 1 / √(var(s) + eps)   (statistics in fp32)
// with round() to the tables' dtype: HF's two adds in that dtype, then its LayerNorm.  Token types are 0 and
// positions l unless given; position_ids may be [1, L] (one row for the batch).  Bindings in
// bindings/embeddings_api.cpp (argument and index checks); the reference is fastenc.reference.bert_embeddings.
#pragma once

#include <ATen/ATen.h>

#include "common/cpu_kernels.h"

namespace fastenc {

// ids, token_type_ids, position_ids: int64, [B, L] ([1 or B, L] positions), unit last stride, every index valid
// (the caller checked); the last two undefined when absent.  word [V, d], types [Tv, d], pos [P, d]: one float
// dtype, unit last stride.  weight, bias: [d] contiguous, fp32 or the tables' dtype, or undefined.
// Returns y [B, L, d] in the tables' dtype.
at::Tensor bert_embeddings_cpu(const at::Tensor& ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                               const at::Tensor& word, const at::Tensor& types, const at::Tensor& pos,
                               const at::Tensor& weight, const at::Tensor& bias, double eps);

namespace cpu {

// One call's operands as the kernel reads them: the tensors above (the absent ones undefined), the LayerNorm's
// weight and bias as fp32 [d] (1 and 0 where absent), and the output y [B, L, d].
struct EmbeddingRows {
  at::Tensor ids, token_type_ids, position_ids, word, types, pos, y;
  const float* gamma;
  const float* beta;
  double eps;
};

// The kernel of cpu/embeddings.cpp, one table per capability it is compiled for (common/cpu_kernels.h).
struct EmbeddingsKernels {
  void (*rows)(const EmbeddingRows&);
};
FASTENC_DECLARE_CPU_KERNELS(EmbeddingsKernels)

}  // namespace cpu
}  // namespace fastenc
