// CPU elementwise passes of the FFN op, one driver for the ungated and the gated activations:
//   forward   h = dropout(act(pre))              pre [T, f] = x W1ᵀ + b1 (h may alias pre);
//             h = dropout(act(a) · g)            gated: pre [T, 2f] = [a, g] per row (a: columns :f, g: f:);
//   backward  dpre = g · keep·scale · act'(saved)          (saved: pre, or for relu h; dpre may alias g),
//             dpre = [dh · g · act'(a), dh · act(a)], dh = gh · keep·scale   gated: gh [T, f] = dy W2;
//   and db1 = Σ_rows dpre when db1 (fp32, dpre's width) is defined.
// The activation formulas are common/activation.h's on at::vec::Vectorized<float> lanes (fp16/bf16 widened to
// fp32 in registers), as the CUDA kernels run them on floats; rows split across threads with at::parallel_for;
// the dropout factors of a row (the [T, f] hidden's mask) from dropout_keep_scale (common/vec_io.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/activation_vec.h"
#include "common/dtype.h"
#include "common/vec_io.h"
#include "ffn/ffn.h"

namespace fastenc::cpu::CPU_CAPABILITY {
namespace {

template <typename T, Act A>
void act_impl(const at::Tensor& pre, const at::Tensor& h, const DropoutParams& dp) {
  const int64_t rows = h.size(0), f = h.size(1), width = is_gated(A) ? 2 * f : f;  // pre's row
  const T* src = pre.const_data_ptr<T>();
  T* out = h.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> keep(dp.enabled ? f : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (dp.enabled) dropout_keep_scale(dp, static_cast<uint64_t>(r * f), f, keep.data());
      const T* a = src + r * width;
      for (int64_t c = 0; c < f; c += kW) {
        const int64_t n = std::min<int64_t>(kW, f - c);
        Vec y = ActOp<A, Vec>::fwd(load_f32(a + c, n));
        if constexpr (is_gated(A)) y = y * load_f32(a + f + c, n);
        if (dp.enabled) y = y * Vec::loadu(keep.data() + c, n);
        store_f32(y, out + r * f + c, n);
      }
    }
  });
}

template <typename T, Act A>
void dact_impl(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre, const at::Tensor& db1,
               const DropoutParams& dp) {
  const int64_t rows = g.size(0), f = g.size(1), width = is_gated(A) ? 2 * f : f;  // saved's and dpre's row
  const T* gp = g.const_data_ptr<T>();
  const T* sp = saved.const_data_ptr<T>();
  T* out = dpre.data_ptr<T>();
  rows_with_bias_grad(rows, f, width, dp, db1, [&](int64_t r, const float* keep, float* part) {
    const T* a = sp + r * width;
    T* d = out + r * width;
    for (int64_t c = 0; c < f; c += kW) {
      const int64_t n = std::min<int64_t>(kW, f - c);
      if constexpr (is_gated(A)) {
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
      } else {
        Vec da = load_f32(gp + r * f + c, n) * ActOp<A, Vec>::grad(load_f32(a + c, n));
        if (keep) da = da * Vec::loadu(keep + c, n);
        store_f32(da, d + c, n);
        if (part) (Vec::loadu(part + c, n) + da).store(part + c, n);
      }
    }
  });
}

template <typename Fn>
void dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::kReLU: fn(std::integral_constant<Act, Act::kReLU>{}); break;
    case Act::kGelu: fn(std::integral_constant<Act, Act::kGelu>{}); break;
    case Act::kGeluTanh: fn(std::integral_constant<Act, Act::kGeluTanh>{}); break;
    case Act::kGeGLU: fn(std::integral_constant<Act, Act::kGeGLU>{}); break;
    case Act::kSwiGLU: fn(std::integral_constant<Act, Act::kSwiGLU>{}); break;
  }
}

void act_dropout(const at::Tensor& pre, const at::Tensor& h, Act act, const DropoutParams& dp) {
  dispatch_dtype(pre.scalar_type(), [&](auto t_) {
    dispatch_act(act, [&](auto a) { act_impl<decltype(t_), decltype(a)::value>(pre, h, dp); });
  });
}

void dact_dropout_bgrad(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& dpre, const at::Tensor& db1,
                        Act act, const DropoutParams& dp) {
  dispatch_dtype(g.scalar_type(), [&](auto t_) {
    dispatch_act(act, [&](auto a) { dact_impl<decltype(t_), decltype(a)::value>(g, saved, dpre, db1, dp); });
  });
}

}  // namespace

FASTENC_DEFINE_CPU_KERNELS(FfnPassKernels) = {&act_dropout, &dact_dropout_bgrad};

}  // namespace fastenc::cpu::CPU_CAPABILITY
