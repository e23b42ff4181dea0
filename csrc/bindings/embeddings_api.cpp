// Python bindings of BERT's CPU embeddings (embeddings/embeddings.h): every argument checked by name
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_INDEX -> IndexError for an id
// outside its table), then the kernel.
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"

#include <cmath>
#include <optional>

#include "embeddings/embeddings.h"

namespace fastenc {

namespace {

using OptT = std::optional<at::Tensor>;
constexpr const char* kOp = "fastenc bert_embeddings: ";

// An index tensor: int64 on the CPU, 2-D, each value in [0, rows); returned with a unit last stride.
at::Tensor check_ids(const at::Tensor& t, const char* name, const char* table, int64_t rows) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, kOp, name, " must be int64 (torch.long), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, kOp, name, " must be [batch, seq], got shape ", t.sizes());
  at::Tensor c = t.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = c.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < rows, kOp, name, " holds ", p[i], " at flat index ", i, ", outside the ",
                      table, "'s ", rows, " rows");
  }
  return c;
}

void check_table(const at::Tensor& t, const char* name, const at::Tensor& word) {
  TORCH_CHECK_VALUE(word.dim() == 2 && word.size(0) >= 1 && word.size(1) >= 1, kOp,
                    "word must be [rows >= 1, cols >= 1], got shape ", word.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp, name,
                   " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_TYPE(dt == word.scalar_type(), kOp, name, " has dtype ", dt, " but word has ", word.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) >= 1 && t.size(1) == word.size(1) && t.stride(1) == 1, kOp, name,
                    " must be [rows >= 1, ", word.size(1), "] with a unit last stride, got shape ", t.sizes(),
                    " strides ", t.strides());
}

void check_param(const OptT& t, const char* name, const at::Tensor& word) {
  if (!t) return;
  TORCH_CHECK_VALUE(t->device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == word.scalar_type(), kOp, name,
                   " must be float32 or the tables' dtype ", word.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == word.size(1), kOp, name, " must have shape [", word.size(1),
                    "], got ", t->sizes());
}

at::Tensor embeddings(const at::Tensor& input_ids, const OptT& token_type_ids, const OptT& position_ids,
                      const at::Tensor& word, const at::Tensor& types, const at::Tensor& pos, const OptT& weight,
                      const OptT& bias, double eps) {
  check_table(word, "word", word);
  check_table(types, "types", word);
  check_table(pos, "pos", word);
  check_param(weight, "weight", word);
  check_param(bias, "bias", word);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, kOp, "eps must be finite and >= 0, got ", eps);
  const at::Tensor ids = check_ids(input_ids, "input_ids", "word table", word.size(0));
  const int64_t B = ids.size(0), L = ids.size(1);
  at::Tensor tt, pid;
  if (token_type_ids) {
    TORCH_CHECK_VALUE(token_type_ids->sizes() == ids.sizes(), kOp, "token_type_ids must have input_ids' shape ",
                      ids.sizes(), ", got ", token_type_ids->sizes());
    tt = check_ids(*token_type_ids, "token_type_ids", "token type table", types.size(0));
  }
  if (position_ids) {
    TORCH_CHECK_VALUE(position_ids->dim() == 2 && position_ids->size(1) == L &&
                          (position_ids->size(0) == 1 || position_ids->size(0) == B),
                      kOp, "position_ids must be [1 or ", B, ", ", L, "], got ", position_ids->sizes());
    pid = check_ids(*position_ids, "position_ids", "position table", pos.size(0));
  } else {
    TORCH_CHECK_INDEX(L <= pos.size(0), kOp, "input_ids has ", L, " positions but the position table has ",
                      pos.size(0), " rows");
  }
  py::gil_scoped_release no_gil;
  return bert_embeddings_cpu(ids, tt, pid, word, types, pos, weight ? *weight : at::Tensor(),
                             bias ? *bias : at::Tensor(), eps);
}

}  // namespace

void bind_embeddings(py::module_& m) {
  m.def("bert_embeddings_cpu", &embeddings,
        "CPU LayerNorm(round(word[ids] + types[token types]) + pos[positions]) * weight + bias: BERT's embeddings",
        py::arg("input_ids"), py::arg("token_type_ids"), py::arg("position_ids"), py::arg("word"), py::arg("types"),
        py::arg("pos"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
}

}  // namespace fastenc
