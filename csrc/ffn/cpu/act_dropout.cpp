// CPU elementwise passes of the FFN op: activation + dropout after GEMM1 (+ b1), and
// dropout · act' · grad with the fused b1-gradient reduction in the backward.  They run
// the activation formulas of ffn_math.h on at::vec::Vectorized<float> lanes (fp16/bf16
// are widened to fp32 in registers); rows are split across threads with at::parallel_for.
// Dropout factors come a row at a time from cpu::dropout_keep_scale (cpu/vec_io.h).
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
void act_impl(const at::Tensor& pre, const at::Tensor& h, const DropoutParams& dp) {
  const int64_t rows = pre.size(0), f = pre.size(1);
  const T* a = pre.const_data_ptr<T>();
  T* out = h.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(f, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> keep(dp.enabled ? f : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (dp.enabled) cpu::dropout_keep_scale(dp, static_cast<uint64_t>(r * f), f, keep.data());
      for (int64_t c = 0; c < f; c += kW) {
        const int64_t n = std::min<int64_t>(kW, f - c), off = r * f + c;
        Vec y = ActOp<A, Vec>::fwd(load_f32(a + off, n));
        if (dp.enabled) y = y * Vec::loadu(keep.data() + c, n);
        store_f32(y, out + off, n);
      }
    }
  });
}

template <typename T, Act A>
void dact_impl(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre, const at::Tensor& db1,
               const DropoutParams& dp) {
  const int64_t rows = g.size(0), f = g.size(1);
  const T* gp = g.const_data_ptr<T>();
  const T* sp = saved.const_data_ptr<T>();
  T* out = dpre.data_ptr<T>();
  cpu::rows_with_bias_grad(rows, f, f, dp, db1, [&](int64_t r, const float* keep, float* part) {
    for (int64_t c = 0; c < f; c += kW) {
      const int64_t n = std::min<int64_t>(kW, f - c), off = r * f + c;
      Vec d = load_f32(gp + off, n) * ActOp<A, Vec>::grad(load_f32(sp + off, n));
      if (keep) d = d * Vec::loadu(keep + c, n);
      store_f32(d, out + off, n);
      if (part) (Vec::loadu(part + c, n) + d).store(part + c, n);
    }
  });
}

template <typename Fn>
void dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::kReLU: fn(std::integral_constant<Act, Act::kReLU>{}); break;
    case Act::kGelu: fn(std::integral_constant<Act, Act::kGelu>{}); break;
    case Act::kGeluTanh: fn(std::integral_constant<Act, Act::kGeluTanh>{}); break;
    case Act::kGeGLU:
    case Act::kSwiGLU: TORCH_CHECK(false, "fastenc ffn: gated activations run the GLU passes (ffn_glu_cpu.cpp)");
  }
}

}  // namespace

void act_dropout_cpu(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  dispatch_dtype(pre.scalar_type(), [&](auto t_) {
    dispatch_act(act, [&](auto a) { act_impl<decltype(t_), decltype(a)::value>(pre, h, dp); });
  });
}

void dact_dropout_bgrad_cpu(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre,
                            const at::Tensor& db1, Act act, const DropoutParams& dp) {
  dispatch_dtype(g.scalar_type(), [&](auto t_) {
    dispatch_act(act, [&](auto a) { dact_impl<decltype(t_), decltype(a)::value>(g, saved, dpre, db1, dp); });
  });
}

at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, const DropoutParams& dp) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const int64_t n = rows * cols;
  at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint32_t bits = dropout_keep4(dp.seed, static_cast<uint64_t>(b), dp.threshold24);
      for (int64_t j = 0; j < 4 && 4 * b + j < n; ++j) m[4 * b + j] = (bits >> j) & 1u;
    }
  });
  return mask;
}

}  // namespace fastenc
