// The FFN's activations, value and derivative, shared by the CPU passes and the CUDA kernels: every function is
// a template over the float type F, so the CPU path instantiates it with at::vec::Vectorized<float> and the CUDA
// kernels with float (the CPU tests run the formulas the GPU runs).  A type F needs a Math<F> specialisation
// (erf, exp, tanh, relu, step, rcp); Math<float> is here, Math<Vectorized<float>> in activation_vec.h.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>

#include "common/host_device.h"

namespace fastenc {

// In the order of fastenc/constants.py's ACTIVATIONS then GATED_ACTIVATIONS (activation.cpp checks it).
// kGeGLU / kSwiGLU are gated (GLU): GEMM1 gives [a, g] = x W1ᵀ + b1 (W1 [2f, d]: the rows of the
// activated half first, HF ModernBERT's Wi) and the hidden is h = act(a) · g [.., f], act = erf-GELU
// / SiLU; ActOp<A> of a gated A is that act.  Backward: da = dh · g · act'(a), dg = dh · act(a).
enum class Act : int { kReLU = 0, kGelu = 1, kGeluTanh = 2, kGeGLU = 3, kSwiGLU = 4 };

FASTENC_HD constexpr bool is_gated(Act a) { return a == Act::kGeGLU || a == Act::kSwiGLU; }

// The activation of a name (ValueError naming the valid ones) and back (activation.cpp).
Act parse_activation(const std::string& name);
const char* activation_name(Act act);

constexpr float kSqrt1_2 = 0.70710678118654752f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f; // √(2/π)
constexpr float kGeluTanhC = 0.044715f;

// erf and tanh on the CPU as x P(x²) / Q(x²) on a clamped x (beyond the clamp both round to ±1 in fp32): rational
// fits of scripts/fit_rational.py (`erf 5 5 3.92`, `tanh 4 4 7.9`), max abs error 4.4e-7 and 3.5e-7 in fp32.
// Used by the Math specialisations of CPU lanes (activation_vec.h, linear/panel_act.h).
struct ErfFit {
  static constexpr float kClamp = 3.92f;
  static constexpr float kP[] = {1.12837911f, 0.19208926f, 0.0529704243f, 0.00383909116f, 0.000286749011f,
                                 2.0389034e-06f};
  static constexpr float kQ[] = {1.f, 0.503566623f, 0.114804737f, 0.0151139945f, 0.00118088431f, 3.80758902e-05f};
};
struct TanhFit {
  static constexpr float kClamp = 7.9f;
  static constexpr float kP[] = {1.f, 0.134444043f, 0.00357163791f, 2.19023841e-05f, 1.52581396e-08f};
  static constexpr float kQ[] = {1.f, 0.467777252f, 0.0261641964f, 0.000341164443f, 8.52993765e-07f};
};

// Fit::kP(z) / Fit::kQ(z) · x with z = x² (Horner, fmadd(a, b, c) = a·b + c), on lanes of any type V.
template <typename Fit, typename V, typename Fma>
inline V odd_rational(const V& x, Fma fmadd) {
  const V z = x * x;
  constexpr size_t NP = std::size(Fit::kP), NQ = std::size(Fit::kQ);
  V num(Fit::kP[NP - 1]), den(Fit::kQ[NQ - 1]);
  for (size_t i = NP - 1; i-- > 0;) num = fmadd(num, z, V(Fit::kP[i]));
  for (size_t i = NQ - 1; i-- > 0;) den = fmadd(den, z, V(Fit::kQ[i]));
  return x * num / den;
}

template <typename F>
struct Math;

template <>
struct Math<float> {
  FASTENC_HD static float erf(float x) { return ::erff(x); }
  FASTENC_HD static float exp(float x) { return ::expf(x); }
  // Built without --use_fast_math, so tanhf is the accurate libdevice tanh on the device (the
  // fast-math tanh.approx.f32 has relative error 2^-11, fp16-level, even for fp32 inputs).
  FASTENC_HD static float tanh(float x) { return ::tanhf(x); }
  FASTENC_HD static float relu(float x) { return x > 0.f ? x : 0.f; }
  FASTENC_HD static float step(float x) { return x > 0.f ? 1.f : 0.f; }  // relu'(x), 0 at 0 as torch
  // 1/x for x >= 1 (inf gives 0).  On the device MUFU.RCP's approximation (2 ulp): the IEEE
  // division's out-of-line slow path made the SiLU kernels spill around its call.
#if defined(__CUDA_ARCH__)
  FASTENC_HD static float rcp(float x) { return __fdividef(1.f, x); }
#else
  FASTENC_HD static float rcp(float x) { return 1.f / x; }
#endif
};

template <Act A, typename F = float>
struct ActOp;

// relu(x) = max(x, 0).  relu'(x) = [x > 0]; since relu keeps the sign, relu'(pre) = relu'(relu(pre)),
// so the backward may be fed the activation output instead of the pre-activation.
template <typename F>
struct ActOp<Act::kReLU, F> {
  FASTENC_HD static F fwd(F x) { return Math<F>::relu(x); }
  FASTENC_HD static F grad(F x) { return Math<F>::step(x); }
};

// gelu(x) = x Φ(x) = ½ x (1 + erf(x/√2));  gelu'(x) = Φ(x) + x φ(x), φ(x) = e^{-x²/2} / √(2π).
template <typename F>
struct ActOp<Act::kGelu, F> {
  FASTENC_HD static F fwd(F x) { return F(0.5f) * x * (F(1.f) + Math<F>::erf(x * F(kSqrt1_2))); }
  FASTENC_HD static F grad(F x) {
    const F cdf = F(0.5f) * (F(1.f) + Math<F>::erf(x * F(kSqrt1_2)));
    const F pdf = Math<F>::exp(F(-0.5f) * x * x) * F(kInvSqrt2Pi);
    return cdf + x * pdf;
  }
};

// tanh-GELU: u = √(2/π)(x + 0.044715 x³), t = tanh(u), gelu(x) = ½ x (1 + t);
// gelu'(x) = ½ (1 + t) + ½ x (1 - t²) √(2/π)(1 + 3·0.044715 x²).
template <typename F>
struct ActOp<Act::kGeluTanh, F> {
  FASTENC_HD static F fwd(F x) {
    const F t = Math<F>::tanh(F(kSqrt2OverPi) * (x + F(kGeluTanhC) * x * x * x));
    return F(0.5f) * x * (F(1.f) + t);
  }
  FASTENC_HD static F grad(F x) {
    const F x2 = x * x;
    const F t = Math<F>::tanh(F(kSqrt2OverPi) * (x + F(kGeluTanhC) * x2 * x));
    const F du = F(kSqrt2OverPi) * (F(1.f) + F(3.f * kGeluTanhC) * x2);
    return F(0.5f) * (F(1.f) + t) + F(0.5f) * x * (F(1.f) - t * t) * du;
  }
};

// geglu's activation: erf-GELU.
template <typename F>
struct ActOp<Act::kGeGLU, F> : ActOp<Act::kGelu, F> {};

// swiglu's activation: silu(x) = x σ(x), σ(x) = 1 / (1 + e^{-x});  silu'(x) = σ(x) (1 + x (1 - σ(x))).
// e^{-x} = inf for x < -88 gives σ = 0: silu = -0 and silu' = 0, as the limits.
template <typename F>
struct ActOp<Act::kSwiGLU, F> {
  FASTENC_HD static F sigmoid(F x) { return Math<F>::rcp(F(1.f) + Math<F>::exp(F(0.f) - x)); }
  FASTENC_HD static F fwd(F x) { return x * sigmoid(x); }
  FASTENC_HD static F grad(F x) {
    const F s = sigmoid(x);
    return s * (F(1.f) + x * (F(1.f) - s));
  }
};

}  // namespace fastenc
