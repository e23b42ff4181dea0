// Per-row int8 quantization of the activations (int8_linear.h: quantize_rows), a kernel file compiled once per CPU
// capability (build_tools/cpu_kernels.py): at::vec's width is the capability's.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/activation_vec.h"
#include "common/vec_io.h"
#include "linear/int8_linear.h"

namespace fastenc::cpu::CPU_CAPABILITY {
namespace {

constexpr int kNoAct = -1;  // A: an Act's value, or no activation

// act_in(y) (gated: act(y) · g) for the activation A, known at compile time: the row loop then makes no calls
// for none and relu, and its max stays in a register.
template <int A>
inline Vec activate(Vec y, const Vec& g) {
  if constexpr (A == kNoAct) {
    return y;
  } else if constexpr (is_gated(Act(A))) {
    return ActOp<Act(A), Vec>::fwd(y) * g;
  } else {
    return ActOp<Act(A), Vec>::fwd(y);
  }
}

// One row: v = act_in(x) · smooth in fp32 (scratch), then q = round(v · 127 / max|v|) + 128 as u8; with float
// channels (fidx [f]), act_in(x) there goes to fout (u: scratch of act_in(x) before smoothing).
template <typename T, int A>
void quantize_row(const T* x, int64_t k, const float* smooth, float* v, uint8_t* q, int64_t k_pad, float* s,
                  const int64_t* fidx, int64_t f, float* u, float* fout) {
  // v's lanes [c, c + n) (lanes past n are act(0) · 0 = 0)
  const auto value = [&](int64_t c, int64_t n) {
    Vec g(0.f);
    if constexpr (A != kNoAct && is_gated(Act(A))) g = load_f32(x + k + c, n);
    Vec y = activate<A>(load_f32(x + c, n), g);
    if (f > 0) y.store(u + c, n);
    if (smooth) y = y * Vec::loadu(smooth + c, n);
    y.store(v + c, n);
    return y;
  };
  float m = 0.f;
#if defined(CPU_CAPABILITY_AVX512)
  // Four running maxima (one chain of maxima is bound by their latency) and the NaN lanes in a mask: a NaN in
  // the row makes m, and so its scale and its GEMM output row, NaN.
  __m512 m4[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  __mmask16 nan = 0;
  int64_t c = 0;
  for (; c + 4 * kW <= k; c += 4 * kW) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 y = value(c + j * kW, kW);
      nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
      m4[j] = _mm512_max_ps(m4[j], _mm512_abs_ps(y));
    }
  }
  for (; c < k; c += kW) {
    const __m512 y = value(c, std::min<int64_t>(kW, k - c));
    nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    m4[0] = _mm512_max_ps(m4[0], _mm512_abs_ps(y));
  }
  m = nan ? std::numeric_limits<float>::quiet_NaN()
          : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m4[0], m4[1]), _mm512_max_ps(m4[2], m4[3])));
#else
  Vec amax(0.f);
  for (int64_t c = 0; c < k; c += kW) amax = at::vec::maximum(amax, value(c, std::min<int64_t>(kW, k - c)).abs());
  float lanes[kW];
  amax.store(lanes);  // at::vec::maximum keeps a NaN; std::max would drop it (then its row came out finite)
  for (int64_t i = 0; i < kW; ++i) m = std::isnan(lanes[i]) || lanes[i] > m ? lanes[i] : m;
#endif
  for (int64_t j = 0; j < f; ++j) fout[j] = u[fidx[j]];
  const float inv = m > 0.f ? 127.f / m : 0.f;
  *s = m / 127.f;
  // q + 128 = clamp(round_half_even(v · inv), -127, 127) + 128 as u8.
  const Vec vinv(inv), lo(-127.f), hi(127.f);
#if defined(CPU_CAPABILITY_AVX512)
  // In one pass: vcvtps2dq rounds half to even (the default MXCSR mode), the offset is added in int32.
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t c = 0; c < k; c += kW) {
    const int64_t n = std::min<int64_t>(kW, k - c);
    const __m512 t = at::vec::clamp(Vec::loadu(v + c, n) * vinv, lo, hi);
    const __mmask16 mask = n == kW ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
    _mm512_mask_cvtusepi32_storeu_epi8(q + c, mask, _mm512_add_epi32(_mm512_cvtps_epi32(t), offset));
  }
#else
  const Vec offset(128.f);
  for (int64_t c = 0; c < k; c += kW) {
    const int64_t n = std::min<int64_t>(kW, k - c);
    const Vec t = at::vec::clamp(Vec::loadu(v + c, n) * vinv, lo, hi);
    (Vec::blendv(t, Vec(0.f), t != t).round() + offset).store(v + c, n);  // a NaN (its row's scale is NaN) as 0
  }
  for (int64_t c = 0; c < k; ++c) q[c] = static_cast<uint8_t>(static_cast<int>(v[c]));
#endif
  std::memset(q + k, 128, static_cast<size_t>(k_pad - k));
}

template <typename T, int A>
void rows(const at::Tensor& x, int64_t m, int64_t k, int64_t k_pad, int64_t ld, const float* sm,
          const int64_t* fidx, int64_t f, uint8_t* q, float* s, const at::Tensor& floats) {
  const T* src = x.const_data_ptr<T>();
  float* fout = f > 0 ? floats.data_ptr<float>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> v(k), u(f > 0 ? k : 0);
    for (int64_t r = r0; r < r1; ++r) {
      quantize_row<T, A>(src + r * ld, k, sm, v.data(), q + r * k_pad, k_pad, s + r, fidx, f, u.data(),
                         fout ? fout + r * f : nullptr);
    }
  });
}

template <typename T>
void rows_for(std::optional<Act> act, const at::Tensor& x, int64_t m, int64_t k, int64_t k_pad, int64_t ld,
              const float* sm, const int64_t* fidx, int64_t f, uint8_t* q, float* s, const at::Tensor& floats) {
  if (!act) return rows<T, kNoAct>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
  switch (*act) {
    case Act::kReLU: return rows<T, int(Act::kReLU)>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
    case Act::kGelu: return rows<T, int(Act::kGelu)>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
    case Act::kGeluTanh: return rows<T, int(Act::kGeluTanh)>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
    case Act::kGeGLU: return rows<T, int(Act::kGeGLU)>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
    case Act::kSwiGLU: return rows<T, int(Act::kSwiGLU)>(x, m, k, k_pad, ld, sm, fidx, f, q, s, floats);
  }
}

}  // namespace

void quantize_rows_out(const at::Tensor& x, std::optional<Act> act_in, const at::Tensor& smooth,
                       const at::Tensor& float_channels, Int8Rows& out) {
  const bool gated = act_in && (*act_in == Act::kGeGLU || *act_in == Act::kSwiGLU);
  const int64_t m = x.size(0), k = x.size(1) / (gated ? 2 : 1), k_pad = (k + 3) / 4 * 4;
  const int64_t f = float_channels.defined() ? float_channels.numel() : 0;
  TORCH_CHECK(out.q.sizes() == at::IntArrayRef({m, k_pad}) && out.q.scalar_type() == at::kByte &&
                  out.q.is_contiguous() && out.scale.numel() == m && out.scale.scalar_type() == at::kFloat &&
                  out.scale.is_contiguous() &&
                  (f == 0 || (out.floats.sizes() == at::IntArrayRef({m, f}) &&
                              out.floats.scalar_type() == at::kFloat && out.floats.is_contiguous())),
              "fastenc int8 quantize_rows: q must be u8 [", m, ", ", k_pad, "], scale fp32 [", m,
              "] and floats fp32 [", m, ", ", f, "], contiguous");
  out.k = k;
  uint8_t* q = out.q.data_ptr<uint8_t>();
  float* s = out.scale.data_ptr<float>();
  const int64_t ld = x.stride(0);
  const float* sm = smooth.defined() ? smooth.const_data_ptr<float>() : nullptr;
  const int64_t* fidx = f > 0 ? float_channels.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "fastenc int8 quantize_rows",
    AT_DISPATCH_CASE(at::kFloat, [&] { rows_for<float>(act_in, x, m, k, k_pad, ld, sm, fidx, f, q, s, out.floats); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      rows_for<at::BFloat16>(act_in, x, m, k, k_pad, ld, sm, fidx, f, q, s, out.floats);
    }));
}

FASTENC_DEFINE_CPU_KERNELS(Int8QuantizeKernels) = {&quantize_rows_out};

}  // namespace fastenc::cpu::CPU_CAPABILITY
