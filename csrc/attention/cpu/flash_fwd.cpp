// CPU flash attention on packed variable-length sequences, forward (the backward: flash_bwd.cpp; the pieces both
// use: micro_kernels.h, staging.h, work.h, mask.h, rotary.h, dropout.h): FlashAttention-2 (Dao, 2023) —
// online softmax over key blocks in the forward, P recomputed from the saved log-sum-exp in
// the backward — with key padding and additive masks, causal masking, sliding windows, rotary
// embeddings and Philox dropout.
//
// Scores are kept TRANSPOSED, st[j][i] (key j, query i): the query index runs along the SIMD
// lanes, so the softmax's max and sum over keys are lane-wise (no horizontal reductions),
// S = Q Kᵀ broadcasts K[j][d] against rows of Qᵀ (Q transposed once per work item, K never),
// and O += P V broadcasts P[i][j] against rows of V.  Every product is one of two
// register-blocked micro-kernels on fp32 buffers:
//   abt: C[r][i] = Σ_d A[r][d] · Bt[d][i]           (scores, dP = dO Vᵀ)
//   acc: C[r][:] += Σ_c W(c, r) · R[c][:]           (P V, dV = Pᵀ dO, dK = dSᵀ Q, dQ = dS K)
// q/k/v/dout are staged into fp32 buffers (bf16/fp16 widened there), accumulation is fp32.  Compiled for
// avx512_bf16 and up (FASTENC_CPU_AVX512_BF16), the forward of bf16 inputs with an even head dim runs both
// products as bf16 pair dot products instead (bf16_dots.h: P rounded to bf16 before P V, as torch's
// bf16 attention does).  Rows whose keys are all masked output zeros with lse = +inf, so the
// backward's P = exp(s - lse) and every gradient of theirs are zero.
//
// Sliding window and causal bound: key blocks outside every query's range are skipped (the forward
// visits per query chunk only its key range, the backward per key block only the query chunks that
// see it); the edges are masked elementwise.  Rotary embeddings rotate q and k while they are
// staged in fp32 (rounded back to bf16 first on the Bf16Dots path, as torch rotates bf16 tensors),
// and the backward rotates dq and dk back (Rᵀ); the tables get no gradient.
//
// Work: the forward runs (sequence, head, run of 128-query chunks) items, the backward one
// (sequence, head) task each, claimed dynamically by at::get_num_threads() threads.  Scratch is
// per thread and grows to the largest shape seen (the backward's: 4 · max_seqlen_q · D floats).
//
// Limits: the backward parallelises over (sequence, head) only, so a batch with fewer
// (sequence, head) pairs than threads leaves threads idle; no gradient for the masks; the AVX-512
// dropout RNG is the only hand-vectorised part for one ISA (elsewhere Philox runs per lane).
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "attention/cpu/bf16_dots.h"
#include "attention/cpu/dropout.h"
#include "attention/cpu/mask.h"
#include "attention/cpu/micro_kernels.h"
#include "attention/cpu/rotary.h"
#include "attention/cpu/staging.h"
#include "attention/cpu/work.h"
#include "common/dtype.h"

namespace fastenc::cpu::CPU_CAPABILITY {
namespace {

// The forward's products, fp32: q, k, v widened to fp32 when staged (q and k rotated there), Qᵀ
// pre-scaled; abt and acc.
template <typename T>
struct Fp32Dots {
  int64_t D, Dv, DVp;
  Rotary rot;
  float *kb, *vb, *qt, *tmp;

  Fp32Dots(const Shape& sh, const AttnParams& p) : D(sh.D), Dv(sh.Dv), DVp(round_up(sh.Dv, kW)), rot(p, sh.D) {}
  int64_t floats(int64_t kp, int64_t bn) const { return kp * D + kp * DVp + D * kQC + kQC * D + 64; }
  void carve(Carver& c, int64_t kp, int64_t bn) {
    kb = c.take(kp * D);    // K [kp][D]
    vb = c.take(kp * DVp);  // V [kp][DVp]
    qt = c.take(D * kQC);   // Qᵀ · scale [D][ld]
    tmp = c.take(kQC * D);  // Q widened to fp32 (when q is not fp32)
  }
  // Keys ks .. ks + kall of sequence s (positions from its start) as rows 0 .. kall - 1.
  void stage_kv(const View<const T>& k, const View<const T>& v, const Seq& s, int64_t h, int64_t ks, int64_t kall,
                int64_t kp) {
    for (int64_t j = 0; j < kall; ++j) {
      load_row(k.row(s.k0 + ks + j, h), kb + j * D, D, D, 1.f);
      if (rot) rot.apply(kb + j * D, ks + j);
      load_row(v.row(s.k0 + ks + j, h), vb + j * DVp, Dv, DVp, 1.f);
    }
    std::fill(kb + kall * D, kb + kp * D, 0.f);
  }
  // Queries i0 .. i0 + rows of sequence s.
  void stage_q(const View<const T>& q, const Seq& s, int64_t i0, int64_t h, int64_t rows, int64_t ld, float scale) {
    if (rot) {
      for (int64_t i = 0; i < rows; ++i) {
        load_row(q.row(s.q0 + i0 + i, h), tmp + i * D, D, D, scale);
        rot.apply(tmp + i * D, i0 + i);
      }
      at::vec::transpose_mxn<float>(tmp, D, qt, ld, static_cast<int>(rows), static_cast<int>(D));
    } else {
      load_transposed(q.row(s.q0 + i0, h), q.st, rows, D, scale, tmp, qt, ld);
    }
    for (int64_t d = 0; d < D; ++d) std::fill(qt + d * ld + rows, qt + (d + 1) * ld, 0.f);
  }
  // st[jj][i] = (q_i · scale) · k_{j0+jj} for jj < round_up(nj, 8) (j0 a staged row, a multiple of 8).
  void scores(int64_t j0, int64_t nj, int64_t nqv, float* st, int64_t ld) const {
    abt(kb + j0 * D, D, round_up(nj, 8), qt, ld, D, nqv, st, ld);
  }
  // o[i] += Σ_{jj<nj} st[jj][i] · v_{j0+jj} for i < round_up(rows, 8).
  void pv(const float* st, int64_t ld, int64_t rows, int64_t j0, int64_t nj, float* o) const {
    acc(st, ld, 1, round_up(rows, 8), vb + j0 * DVp, DVp, nj, DVp / kW, o, DVp);
  }
};

// Work item: queries [r0, r1) of sequence s, head h, in chunks of kQC rows.  K and V (the keys any
// of these queries sees, from a multiple of 8) are staged once for all the chunks; Dots does the
// products.  Each chunk visits only the key blocks of its own key range (causal bound, window).
template <typename T, typename Dots>
void forward_item(const AttnParams& p, const Dropout& dr, const Shape& sh, const View<const T>& q,
                  const View<const T>& k, const View<const T>& v, const View<T>& out, float* lse, int64_t lse_sh,
                  int64_t lse_st, const Seq& s, int64_t b, int64_t h, int64_t r0, int64_t r1) {
  const int64_t Dv = sh.Dv, DVp = round_up(Dv, kW);
  const auto [k_lo, k_hi] = key_range(p, r0, r1, s.S);
  // Staged keys [ks, k_hi): blocks start at multiples of 8 (Bf16Dots' key pairs, dropout's key quads).
  const int64_t ks = k_lo / 8 * 8, kall = k_hi - ks, kp = round_up(std::max<int64_t>(kall, 1), 8);
  const int64_t bn = std::min(kBN, kp);
  Dots dots(sh, p);
  Carver c{scratch(dots.floats(kp, bn) + bn * kQC + kQC * DVp + 3 * kQC + 16 * 5)};
  dots.carve(c, kp, bn);
  float* st = c.take(bn * kQC);   // scores, then P [bn][ld]
  float* o = c.take(kQC * DVp);   // unnormalised output [ld][DVp]
  float* m = c.take(kQC);         // running max
  float* l = c.take(kQC);         // running sum
  float* alpha = c.take(kQC);     // rescale of the previous blocks
  dots.stage_kv(k, v, s, h, ks, kall, kp);

  for (int64_t i0 = r0; i0 < r1; i0 += kQC) {
    const int64_t rows = std::min(kQC, r1 - i0), ld = round_up(rows, kPad), nqv = ld / kW;
    const auto [j_lo, j_hi] = key_range(p, i0, i0 + rows, s.S);
    dots.stage_q(q, s, i0, h, rows, ld, p.scale);
    std::fill(o, o + ld * DVp, 0.f);
    std::fill(m, m + ld, -kInf);
    std::fill(l, l + ld, 0.f);

    const int64_t j_first = j_lo / 8 * 8;
    for (int64_t j0 = j_first; j0 < j_hi; j0 += bn) {
      const int64_t nj = std::min(bn, j_hi - j0);
      dots.scores(j0 - ks, nj, nqv, st, ld);
      apply_masks(p, b, h, i0, rows, nqv, j0, nj, st, ld);

      // Online softmax, lane-wise over queries: m' = max(m, max_j s), P = exp(s - m'), l' = l·e^{m-m'} + Σ_j P.
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec m_old = Vec::loadu(m + n * kW);
        Vec mx[4] = {m_old, m_old, m_old, m_old};  // four chains: vmaxps latency
        int64_t jj = 0;
        for (; jj + 4 <= nj; jj += 4)
          for (int u = 0; u < 4; ++u) mx[u] = at::vec::maximum(mx[u], Vec::loadu(st + (jj + u) * ld + n * kW));
        for (; jj < nj; ++jj) mx[0] = at::vec::maximum(mx[0], Vec::loadu(st + jj * ld + n * kW));
        const Vec m_new = at::vec::maximum(at::vec::maximum(mx[0], mx[1]), at::vec::maximum(mx[2], mx[3]));
        const Vec m_ref = Vec::blendv(m_new, Vec(0.f), m_new == Vec(-kInf));  // all masked so far: P = 0
        Vec sum[2] = {Vec(0.f), Vec(0.f)};
        float z[4][kW];
        for (jj = 0; jj < nj; ++jj) {
          float* sp = st + jj * ld + n * kW;
          Vec pv = vexp(Vec::loadu(sp) - m_ref);
          sum[jj & 1] = sum[jj & 1] + pv;
          if (dr.on) {
            if (jj % 4 == 0) dropout_block(dr, b, h, i0 + n * kW, j0 + jj, z);
            pv = pv * Vec::loadu(z[jj % 4]);
          }
          pv.store(sp);
        }
        const Vec a = vexp(m_old - m_ref);
        (Vec::loadu(l + n * kW) * a + sum[0] + sum[1]).store(l + n * kW);
        m_new.store(m + n * kW);
        a.store(alpha + n * kW);
      }
      if (j0 > j_first) {
        for (int64_t ii = 0; ii < rows; ++ii) {
          const Vec a(alpha[ii]);
          for (int64_t d = 0; d < DVp; d += kW) (Vec::loadu(o + ii * DVp + d) * a).store(o + ii * DVp + d);
        }
      }
      dots.pv(st, ld, rows, j0 - ks, nj, o);
    }

    // O / l per row, and lse = m + log l only where asked for (the backward): the compiler keeps a log whose
    // result is unused (it may set errno), 1-5% of an inference call's attention.
    constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
    for (int64_t ii = 0; ii < rows; ++ii) {
      const float mi = m[ii], li = l[ii];
      const bool nan = std::isnan(mi) || std::isnan(li);
      store_row(o + ii * DVp, out.row(s.q0 + i0 + ii, h), Dv, nan ? kNaN : li > 0.f ? 1.f / li : 0.f);
      if (lse) lse[h * lse_sh + (s.q0 + i0 + ii) * lse_st] = nan ? kNaN : li > 0.f ? mi + std::log(li) : kInf;
    }
  }
}

}  // namespace

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
             const at::Tensor& cu_seqlens_k, const AttnParams& p, const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<Seq> seqs = sequences(cu_seqlens_q, cu_seqlens_k);
  const Shape sh{q.size(1), q.size(2), v.size(2)};
  const Dropout dr = make_dropout(p);
  float* lp = lse.defined() ? lse.data_ptr<float>() : nullptr;
  const int64_t lse_sh = lse.defined() ? lse.stride(0) : 0, lse_st = lse.defined() ? lse.stride(1) : 0;
  // Work items: (sequence, run of up to G query chunks of kQC rows) x head, G as large as leaves
  // about 4 items per thread (K and V are staged once per item).
  int64_t chunks = 0;
  for (const Seq& s : seqs) chunks += (s.L + kQC - 1) / kQC;
  const int64_t G = std::clamp<int64_t>(chunks * sh.H / (4 * at::get_num_threads()), 1, 16);
  std::vector<std::array<int32_t, 3>> groups;  // (b, first row, end row)
  for (size_t b = 0; b < seqs.size(); ++b)
    for (int64_t r = 0; r < seqs[b].L; r += G * kQC)
      groups.push_back({static_cast<int32_t>(b), static_cast<int32_t>(r),
                        static_cast<int32_t>(std::min(seqs[b].L, r + G * kQC))});
#if defined(FASTENC_CPU_AVX512_BF16)
  const bool bf16_dots = sh.D % 2 == 0;
#endif
  dispatch_dtype(q.scalar_type(), [&](auto t_) {
    using T = decltype(t_);
    const View<const T> qv = view<const T>(q), kv = view<const T>(k), vv = view<const T>(v);
    const View<T> ov = view<T>(out);
    run_items(static_cast<int64_t>(groups.size()) * sh.H, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        if (w + 1 < w1) {  // the next item's first q chunk and first kPrefetchRows keys
          const auto [b, r0, r1] = groups[(w + 1) / sh.H];
          const Seq& s = seqs[b];
          const auto [k_lo, k_hi] = key_range(p, r0, r1, s.S);
          const int64_t h = (w + 1) % sh.H, kstart = s.k0 + k_lo;
          const int64_t kend = kstart + std::min(k_hi - k_lo, kPrefetchRows);
          const int64_t qend = s.q0 + std::min<int64_t>(r1, r0 + kQC);
          prefetch_rows(qv.row(0, h), qv.st, s.q0 + r0, qend, sh.D);
          prefetch_rows(kv.row(0, h), kv.st, kstart, kend, sh.D);
          prefetch_rows(vv.row(0, h), vv.st, kstart, kend, sh.Dv);
          prefetch_rows<true>(ov.row(0, h), ov.st, s.q0 + r0, qend, sh.Dv);
        }
        const auto [b, r0, r1] = groups[w / sh.H];
#if defined(FASTENC_CPU_AVX512_BF16)
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (bf16_dots) {
            forward_item<T, Bf16Dots>(p, dr, sh, qv, kv, vv, ov, lp, lse_sh, lse_st, seqs[b], b, w % sh.H, r0, r1);
            continue;
          }
        }
#endif
        forward_item<T, Fp32Dots<T>>(p, dr, sh, qv, kv, vv, ov, lp, lse_sh, lse_st, seqs[b], b, w % sh.H, r0, r1);
      }
    });
  });
}

FASTENC_DEFINE_CPU_KERNELS(AttentionFwdKernels) = {&forward};

}  // namespace fastenc::cpu::CPU_CAPABILITY
