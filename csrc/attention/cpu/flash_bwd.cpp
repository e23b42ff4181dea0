// CPU flash attention on packed variable-length sequences, backward (FlashAttention-2; the forward and the
// design: flash_fwd.cpp): P recomputed from the forward's log-sum-exp, per (sequence, head) task with its rows
// owned (deterministic, no atomics); per key block of kBNb keys, the query chunks that see it (window, causal
// bound) accumulate dV = (Z∘P)ᵀ dO, dK = dSᵀ Q and dQ = dS K on fp32 buffers, Z = keep / (1 - p) the replayed
// dropout.  Rotary: q and k rotated when staged, dq and dk rotated back (Rᵀ) when stored.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "attention/attention.h"
#include "attention/cpu/dropout.h"
#include "attention/cpu/mask.h"
#include "attention/cpu/micro_kernels.h"
#include "attention/cpu/rotary.h"
#include "attention/cpu/staging.h"
#include "attention/cpu/work.h"
#include "common/dtype.h"

namespace fastenc::cpu::CPU_CAPABILITY {
namespace {

// Whether the forward of T rows with head dim D runs Bf16Dots, which multiplies q and k rotated and rounded back
// to bf16: the backward's scores must be taken from the same rounded rows, or its P = exp(s - lse) is not the
// forward's softmax (a bf16 rounding of each score, times scale: dV was 2.5% off with one visible key).  The forward
// does so in its avx512_bf16 objects; this file is compiled for that capability too, and both tables follow the one
// capability in use, so the backward rounds exactly when the forward did.
template <typename T>
bool rounds_rotated_rows(int64_t D) {
#if defined(FASTENC_CPU_AVX512_BF16)
  if constexpr (std::is_same_v<T, at::BFloat16>) return D % 2 == 0;
#endif
  (void)D;
  return false;
}

// x[0, n) rounded to bf16 and back, times scale.
inline void round_to_bf16(float* x, int64_t n, float scale) {
  for (int64_t d = 0; d < n; ++d) x[d] = static_cast<float>(at::BFloat16(x[d])) * scale;
}

template <typename T>
void backward_task(const AttnParams& p, const Dropout& dr, const Shape& sh, const View<const T>& dout,
                   const View<const T>& q, const View<const T>& k, const View<const T>& v, const View<const T>& out,
                   const float* lse, int64_t lse_sh, int64_t lse_st, const View<T>& dq, const View<T>& dk,
                   const View<T>& dv, const Seq& s, int64_t b, int64_t h) {
  const int64_t D = sh.D, Dv = sh.Dv, Dp = round_up(D, kW), DVp = round_up(Dv, kW);
  const int64_t L = s.L, S = s.S, Lp = round_up(std::max<int64_t>(L, 1), kPad);
  if (L == 0 || S == 0) {  // nothing attends: zero gradients
    for (int64_t i = 0; i < L; ++i) std::fill(dq.row(s.q0 + i, h), dq.row(s.q0 + i, h) + D, T(0));
    for (int64_t j = 0; j < S; ++j) {
      std::fill(dk.row(s.k0 + j, h), dk.row(s.k0 + j, h) + D, T(0));
      std::fill(dv.row(s.k0 + j, h), dv.row(s.k0 + j, h) + Dv, T(0));
    }
    return;
  }
  const int64_t bn = std::min(kBNb, round_up(S, 8));
  Carver c{scratch(D * Lp + Lp * Dp + Dv * Lp + Lp * DVp + Lp * Dp + 2 * Lp + 2 * bn * Dp + 2 * bn * DVp +
                   2 * bn * kQC + 16 * 16)};
  float* qt = c.take(D * Lp);    // Qᵀ · scale [D][Lp]
  float* qn = c.take(Lp * Dp);   // Q · scale [Lp][Dp]
  float* dot = c.take(Dv * Lp);  // dOᵀ [Dv][Lp]
  float* don = c.take(Lp * DVp); // dO [Lp][DVp]
  float* dqa = c.take(Lp * Dp);  // dQ / scale [Lp][Dp]
  float* delta = c.take(Lp);     // Δ_i = dO_i · O_i
  float* lsb = c.take(Lp);       // lse_i
  float* kb = c.take(bn * Dp);
  float* vb = c.take(bn * DVp);
  float* dka = c.take(bn * Dp);
  float* dva = c.take(bn * DVp);
  float* st = c.take(bn * kQC);   // P, then P·keep/(1-p)
  float* dst = c.take(bn * kQC);  // dP, then dS

  const Rotary rot(p, D);  // q, k rotated when staged; dq, dk rotated back (Rᵀ) when stored
  const bool round_rot = rot && rounds_rotated_rows<T>(D);
  for (int64_t i = 0; i < L; ++i) {
    load_row(q.row(s.q0 + i, h), qn + i * Dp, D, Dp, round_rot ? 1.f : p.scale);
    if (rot) rot.apply(qn + i * Dp, i);
    if (round_rot) round_to_bf16(qn + i * Dp, D, p.scale);
    load_row(dout.row(s.q0 + i, h), don + i * DVp, Dv, DVp, 1.f);
    const T* o = out.row(s.q0 + i, h);
    float dsum = 0.f;
    for (int64_t d = 0; d < Dv; ++d) dsum += don[i * DVp + d] * static_cast<float>(o[d]);
    delta[i] = dsum;
    lsb[i] = lse[h * lse_sh + (s.q0 + i) * lse_st];
  }
  for (int64_t i = L; i < Lp; ++i) {
    std::fill(qn + i * Dp, qn + (i + 1) * Dp, 0.f);
    std::fill(don + i * DVp, don + (i + 1) * DVp, 0.f);
    delta[i] = 0.f;
    lsb[i] = kInf;
  }
  load_transposed<float>(qn, Dp, L, D, 1.f, nullptr, qt, Lp);
  load_transposed<float>(don, DVp, L, Dv, 1.f, nullptr, dot, Lp);
  for (int64_t d = 0; d < D; ++d) std::fill(qt + d * Lp + L, qt + (d + 1) * Lp, 0.f);
  for (int64_t d = 0; d < Dv; ++d) std::fill(dot + d * Lp + L, dot + (d + 1) * Lp, 0.f);
  std::fill(dqa, dqa + Lp * Dp, 0.f);

  for (int64_t j0 = 0; j0 < S; j0 += bn) {
    const int64_t nj = std::min(bn, S - j0), njp = round_up(nj, 8);
    for (int64_t jj = 0; jj < nj; ++jj) {
      load_row(k.row(s.k0 + j0 + jj, h), kb + jj * Dp, D, Dp, 1.f);
      if (rot) rot.apply(kb + jj * Dp, j0 + jj);
      if (round_rot) round_to_bf16(kb + jj * Dp, D, 1.f);
      load_row(v.row(s.k0 + j0 + jj, h), vb + jj * DVp, Dv, DVp, 1.f);
    }
    std::fill(kb + nj * Dp, kb + njp * Dp, 0.f);
    std::fill(vb + nj * DVp, vb + njp * DVp, 0.f);
    std::fill(dka, dka + njp * Dp, 0.f);
    std::fill(dva, dva + njp * DVp, 0.f);
    // The queries that see this block, in chunks from a multiple of kPad (lanes i0 .. i0 + ld stay
    // inside the Lp columns); chunks end at a multiple of 8 or at L, so that dQ's 8-row tiles
    // write no row past a chunk but padding (window-masked or past L: P = 0 there).
    const auto [q_lo, q_hi] = query_range(p, j0, j0 + nj, L);
    const int64_t q_end = std::min(L, round_up(q_hi, 8));
    for (int64_t i0 = q_lo / kPad * kPad; q_lo < q_hi && i0 < q_hi; i0 += kQC) {
      const int64_t rows = std::min(kQC, q_end - i0), ld = round_up(rows, kPad), nqv = ld / kW;
      abt(kb, Dp, njp, qt + i0, Lp, D, nqv, st, ld);      // S = (Q·scale) Kᵀ
      apply_masks(p, b, h, i0, rows, nqv, j0, nj, st, ld);
      abt(vb, DVp, njp, dot + i0, Lp, Dv, nqv, dst, ld);  // dP = dO Vᵀ
      // P = exp(S - lse); with Z = keep/(1-p): dS = P ∘ (Z ∘ dP - Δ), and dV uses Z ∘ P.
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec ls = Vec::loadu(lsb + i0 + n * kW), dl = Vec::loadu(delta + i0 + n * kW);
        float z[4][kW];
        for (int64_t jj = 0; jj < nj; ++jj) {
          float* sp = st + jj * ld + n * kW;
          float* dp = dst + jj * ld + n * kW;
          Vec pv = vexp(Vec::loadu(sp) - ls), dpv = Vec::loadu(dp);
          if (dr.on) {
            if (jj % 4 == 0) dropout_block(dr, b, h, i0 + n * kW, j0 + jj, z);
            const Vec zv = Vec::loadu(z[jj % 4]);
            (pv * (dpv * zv - dl)).store(dp);
            pv = pv * zv;
          } else {
            (pv * (dpv - dl)).store(dp);
          }
          pv.store(sp);
        }
      }
      acc(st, 1, ld, njp, don + i0 * DVp, DVp, rows, DVp / kW, dva, DVp);  // dV += (Z∘P)ᵀ dO
      acc(dst, 1, ld, njp, qn + i0 * Dp, Dp, rows, Dp / kW, dka, Dp);      // dK += dSᵀ (Q·scale)
      acc(dst, ld, 1, round_up(rows, 8), kb, Dp, nj, Dp / kW, dqa + i0 * Dp, Dp);  // dQ/scale += dS K
    }
    for (int64_t jj = 0; jj < nj; ++jj) {
      if (rot) rot.apply<true>(dka + jj * Dp, j0 + jj);
      store_row(dka + jj * Dp, dk.row(s.k0 + j0 + jj, h), D, 1.f);
      store_row(dva + jj * DVp, dv.row(s.k0 + j0 + jj, h), Dv, 1.f);
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    if (rot) rot.apply<true>(dqa + i * Dp, i);
    store_row(dqa + i * Dp, dq.row(s.q0 + i, h), D, p.scale);
  }
}

}  // namespace

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
              const at::Tensor& cu_seqlens_k, const AttnParams& p, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv) {
  const std::vector<Seq> seqs = sequences(cu_seqlens_q, cu_seqlens_k);
  const Shape sh{q.size(1), q.size(2), v.size(2)};
  const Dropout dr = make_dropout(p);
  dispatch_dtype(q.scalar_type(), [&](auto t_) {
    using T = decltype(t_);
    const View<const T> gv = view<const T>(dout), qv = view<const T>(q), kv = view<const T>(k), vv = view<const T>(v);
    const View<const T> ov = view<const T>(out);
    run_items(static_cast<int64_t>(seqs.size()) * sh.H, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        if (w + 1 < w1) {  // the next task's first kPrefetchRows queries and keys
          const Seq& s = seqs[(w + 1) / sh.H];
          const int64_t h = (w + 1) % sh.H, qend = s.q0 + std::min(s.L, kPrefetchRows);
          const int64_t kend = s.k0 + std::min(s.S, kPrefetchRows);
          prefetch_rows(qv.row(0, h), qv.st, s.q0, qend, sh.D);
          prefetch_rows(gv.row(0, h), gv.st, s.q0, qend, sh.Dv);
          prefetch_rows(ov.row(0, h), ov.st, s.q0, qend, sh.Dv);
          prefetch_rows(kv.row(0, h), kv.st, s.k0, kend, sh.D);
          prefetch_rows(vv.row(0, h), vv.st, s.k0, kend, sh.Dv);
        }
        backward_task<T>(p, dr, sh, gv, qv, kv, vv, ov, lse.const_data_ptr<float>(), lse.stride(0), lse.stride(1),
                         view<T>(dq), view<T>(dk), view<T>(dv), seqs[w / sh.H], w / sh.H, w % sh.H);
      }
    });
  });
}

FASTENC_DEFINE_CPU_KERNELS(AttentionBwdKernels) = {&backward};

}  // namespace fastenc::cpu::CPU_CAPABILITY
