// The FFN's activations, value and derivative, shared by the CPU passes and the CUDA kernels: every function is
// a template over the float type F, so the CPU path instantiates it with at::vec::Vectorized<float> and the CUDA
// kernels with float (the CPU tests run the formulas the GPU runs).  A type F needs a Math<F> specialisation
// (erf, exp, tanh, relu, step, rcp); Math<float> is here, Math<Vectorized<float>> in activation_vec.h.
#pragma once

#include <cmath>
#include <cstdint>
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
