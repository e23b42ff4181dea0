// CPU passes of the gated FFN (geglu, swiglu): h = dropout(act(a) · g) after GEMM1, and its
// backward with the fused b1-gradient reduction.  pre [T, 2f] holds [a, g] per row (a: columns
// :f, g: f:); the activation formulas are ffn_math.h's on at::vec::Vectorized<float> lanes
// (fp16/bf16 widened to fp32); dropout is the [T, f] hidden's mask, a row at a time from
// cpu::dropout_keep_scale (cpu/vec_io.h), as the ungated passes draw it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/vec_io.h"
#include "ffn/ffn.h"
#include "common/activation_vec.h"

namespace fastenc {

namespace {

using cpu::kW;
using cpu::load_f32;
using cpu::store_f32;

template <typename T, Act A>
void glu_impl(const at::Tensor& pre, const at::Tensor& h, const DropoutParams& dp) {
  const int64_t rows = h.size(0), f = h.size(1);
  const T* src = pre.const_data_ptr<T>();
  T* out = h.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(f, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> keep(dp.enabled ? f : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (dp.enabled) cpu::dropout_keep_scale(dp, static_cast<uint64_t>(r * f), f, keep.data());
      const T* a = src + r * 2 * f;
      for (int64_t c = 0; c < f; c += kW) {
        const int64_t n = std::min<int64_t>(kW, f - c);
        Vec y = ActOp<A, Vec>::fwd(load_f32(a + c, n)) * load_f32(a + f + c, n);
        if (dp.enabled) y = y * Vec::loadu(keep.data() + c, n);
        store_f32(y, out + r * f + c, n);
      }
    }
  });
}

template <typename T, Act A>
void dglu_impl(const at::Tensor& gh, const at::Tensor& pre, const at::Tensor& dpre, const at::Tensor& db1,
               const DropoutParams& dp) {
  const int64_t rows = gh.size(0), f = gh.size(1);
  const T* gp = gh.const_data_ptr<T>();
  const T* src = pre.const_data_ptr<T>();
  T* out = dpre.data_ptr<T>();
  cpu::rows_with_bias_grad(rows, f, 2 * f, dp, db1, [&](int64_t r, const float* keep, float* part) {
    const T* a = src + r * 2 * f;
    T* d = out + r * 2 * f;
    for (int64_t c = 0; c < f; c += kW) {
      const int64_t n = std::min<int64_t>(kW, f - c);
      Vec dh = load_f32(gp + r * f + c, n);
      if (keep) dh = dh * Vec::loadu(keep + c, n);
      const Vec av = load_f32(a + c, n), gv = load_f32(a + f + c, n);
      const Vec da = dh * gv * ActOp<A, Vec>::grad(av), dg = dh * ActOp<A, Vec>::fwd(av);
      store_f32(da, d + c, n);
      store_f32(dg, d + f + c, n);
      if (part) {
        (Vec::loadu(part + c, n) + da).store(part + c, n);
        (Vec::loadu(part + f + c, n) + dg).store(part + f + c, n);
      }
    }
  });
}

template <typename Fn>
void dispatch_glu(Act act, Fn&& fn) {
  if (act == Act::kGeGLU) return fn(std::integral_constant<Act, Act::kGeGLU>{});
  TORCH_CHECK(act == Act::kSwiGLU, "fastenc ffn: the GLU passes take geglu or swiglu, got ", activation_name(act));
  fn(std::integral_constant<Act, Act::kSwiGLU>{});
}

}  // namespace

void glu_dropout_cpu(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  dispatch_dtype(pre.scalar_type(), [&](auto t_) {
    dispatch_glu(act, [&](auto a) { glu_impl<decltype(t_), decltype(a)::value>(pre, h, dp); });
  });
}

void dglu_dropout_bgrad_cpu(const at::Tensor& gh, const at::Tensor& pre, const at::Tensor& dpre, const at::Tensor& db1,
                            Act act, const DropoutParams& dp) {
  dispatch_dtype(gh.scalar_type(), [&](auto t_) {
    dispatch_glu(act, [&](auto a) { dglu_impl<decltype(t_), decltype(a)::value>(gh, pre, dpre, db1, dp); });
  });
}

}  // namespace fastenc
