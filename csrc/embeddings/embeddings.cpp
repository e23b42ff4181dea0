// BERT's embeddings on CPU (see embeddings.h): one row per token, split across threads; each row gathers its
// three table rows, sums them with HF's roundings into an fp32 buffer, then takes the LayerNorm from it (two
// passes over the buffer: the mean, then the centred variance, in eight fp32 partial sums added in fp64).
// Baseline-ISA code: it runs once per call on B · L · d elements (a MiniLM request: 12 k), where the ATen calls
// it replaces cost more than the arithmetic.
#include "embeddings/embeddings.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"

namespace fastenc {

namespace {

template <typename T>
float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

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

// Σ v[c] for c < d, over kLanes independent fp32 partial sums (no serial dependency chain; each holds d / kLanes
// terms), added in fp64.
constexpr int kLanes = 8;
template <typename F>
double lane_sum(int64_t d, F&& v) {
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += v(c + j);
  }
  double total = 0.0;
  for (; c < d; ++c) total += v(c);
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

template <typename T>
void run(const at::Tensor& ids, const at::Tensor& tt, const at::Tensor& pid, const at::Tensor& word,
         const at::Tensor& types, const at::Tensor& pos, const std::vector<float>& g, const std::vector<float>& beta,
         float eps, const at::Tensor& y) {
  const int64_t L = ids.size(1), rows = ids.numel(), d = word.size(1);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* tp = tt.defined() ? tt.const_data_ptr<int64_t>() : nullptr;
  const int64_t* pp = pid.defined() ? pid.const_data_ptr<int64_t>() : nullptr;
  const bool pos_per_row = pid.defined() && pid.size(0) > 1;
  const int64_t s_id = ids.stride(0), s_tt = tp ? tt.stride(0) : 0, s_pid = pp ? pid.stride(0) : 0;
  const T* W = word.const_data_ptr<T>();
  const T* Ty = types.const_data_ptr<T>();
  const T* P = pos.const_data_ptr<T>();
  const int64_t sw = word.stride(0), st = types.stride(0), sp = pos.stride(0);
  T* out = y.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / d), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, l = r % L;
      const T* w = W + id[b * s_id + l] * sw;
      const T* t = Ty + (tp ? tp[b * s_tt + l] : 0) * st;
      const T* p = P + (pp ? pp[(pos_per_row ? b : 0) * s_pid + l] : l) * sp;
      for (int64_t c = 0; c < d; ++c) {
        const float e = round_to<T>(static_cast<float>(w[c]) + static_cast<float>(t[c]));
        buf[c] = round_to<T>(e + static_cast<float>(p[c]));
      }
      const float* v = buf.data();
      const float mean = static_cast<float>(lane_sum(d, [&](int64_t c) { return v[c]; }) / static_cast<double>(d));
      const double var = lane_sum(d, [&](int64_t c) { return (v[c] - mean) * (v[c] - mean); });
      const float rstd = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(d) + eps));
      T* yr = out + r * d;
      for (int64_t c = 0; c < d; ++c) yr[c] = static_cast<T>((buf[c] - mean) * rstd * g[c] + beta[c]);
    }
  });
}

}  // namespace

at::Tensor bert_embeddings_cpu(const at::Tensor& ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                               const at::Tensor& word, const at::Tensor& types, const at::Tensor& pos,
                               const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const int64_t d = word.size(1);
  at::Tensor y = at::empty({ids.size(0), ids.size(1), d}, word.options());
  dispatch_dtype(word.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> g = param_f32<T>(weight, 1.f, d), beta = param_f32<T>(bias, 0.f, d);
    run<T>(ids, token_type_ids, position_ids, word, types, pos, g, beta, static_cast<float>(eps), y);
  });
  return y;
}

}  // namespace fastenc
