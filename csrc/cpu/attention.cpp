// CPU flash attention on packed variable-length sequences: FlashAttention-2 (Dao, 2023) —
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
// q/k/v/dout are staged into fp32 buffers (bf16/fp16 widened there), accumulation is fp32.  With
// AVX512-BF16 (FASTENC_AVX512BF16), the forward of bf16 inputs with an even head dim runs both
// products as bf16 pair dot products instead (Bf16Dots: P rounded to bf16 before P V, as torch's
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
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/attention.h"
#include "dtype.h"
#include "ffn_math.h"

#define FASTENC_UNROLL_ALL _Pragma("GCC unroll 16")

namespace fastenc::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kW = Vec::size();
constexpr int kPad = kW > 8 ? kW : 8;   // row padding of the buffers: a multiple of kW and of every tile height
constexpr int kAcc = kW >= 16 ? 16 : 8;  // accumulators per tile (AVX-512 has 32 registers, AVX2 16)
constexpr int kMaxNI = kAcc / 4;         // query vectors per abt tile
constexpr int kMaxNV = kAcc / 2;         // column vectors per acc tile
constexpr int64_t kQC = 128;             // query rows per work item (forward) / chunk (backward)
constexpr int64_t kBN = 128;             // keys per block in the forward
constexpr int64_t kBNb = 64;             // keys per block in the backward
constexpr int64_t kPrefetchRows = 128;   // keys of the next work item prefetched
constexpr float kInf = std::numeric_limits<float>::infinity();
static_assert(kQC % kPad == 0 && kBN % 8 == 0 && kBNb % 8 == 0 && kW % 4 == 0);

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows per tile for nv vectors per row: a power of two <= 8 (so 8-row padding suffices).
constexpr int tile_rows(int nv) {
  const int r = kAcc / nv;
  return r >= 8 ? 8 : r >= 4 ? 4 : r >= 2 ? 2 : 1;
}

// ------------------------------------------------------------------------------- micro-kernels

// C[r][n·kW + l] = Σ_{d<kd} A[r·lda + d] · Bt[d·ldb + n·kW + l] for r < NJ, n < NI.
template <int NJ, int NI>
inline void abt_tile(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t kd, float* c, int64_t ldc) {
  Vec acc[NJ][NI];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n] = Vec(0.f);
  }
  for (int64_t d = 0; d < kd; ++d) {
    Vec b[NI];
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) b[n] = Vec::loadu(bt + d * ldb + n * kW);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NJ; ++r) {
      const Vec ar(a[r * lda + d]);
      FASTENC_UNROLL_ALL
      for (int n = 0; n < NI; ++n) acc[r][n] = at::vec::fmadd(ar, b[n], acc[r][n]);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n].store(c + r * ldc + n * kW);
  }
}

template <int NI>
void abt_cols(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t ldb, int64_t kd, float* c,
              int64_t ldc) {
  constexpr int NJ = tile_rows(NI);
  for (int64_t r = 0; r < rows; r += NJ) abt_tile<NJ, NI>(a + r * lda, lda, bt, ldb, kd, c + r * ldc, ldc);
}

// C[rows][nv·kW] = A[rows][kd] · Bt[kd][nv·kW]; rows a multiple of 8 (A padded to it).
void abt(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t ldb, int64_t kd, int64_t nv, float* c,
         int64_t ldc) {
  for (int64_t n0 = 0; n0 < nv; n0 += kMaxNI) {
    const float* b = bt + n0 * kW;
    float* cc = c + n0 * kW;
    switch (std::min<int64_t>(kMaxNI, nv - n0)) {
      case 1: abt_cols<1>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      case 2: abt_cols<2>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      case 3: abt_cols<3>(a, lda, rows, b, ldb, kd, cc, ldc); break;
      default: abt_cols<4>(a, lda, rows, b, ldb, kd, cc, ldc); break;
    }
  }
}

// C[r·ldc + v·kW + l] += Σ_{c<nc} W[c·wc + r·wr] · R[c·ldr + v·kW + l] for r < NR, v < NV.
template <int NR, int NV>
inline void acc_tile(const float* w, int64_t wc, int64_t wr, const float* rm, int64_t ldr, int64_t nc, float* c,
                     int64_t ldc) {
  Vec acc[NR][NV];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::loadu(c + r * ldc + v * kW);
  }
  for (int64_t k = 0; k < nc; ++k) {
    Vec x[NV];
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) x[v] = Vec::loadu(rm + k * ldr + v * kW);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NR; ++r) {
      const Vec wv(w[k * wc + r * wr]);
      FASTENC_UNROLL_ALL
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(wv, x[v], acc[r][v]);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * kW);
  }
}

template <int NV>
void acc_cols(const float* w, int64_t wc, int64_t wr, int64_t rows, const float* rm, int64_t ldr, int64_t nc, float* c,
              int64_t ldc) {
  constexpr int NR = tile_rows(NV);
  for (int64_t r = 0; r < rows; r += NR) acc_tile<NR, NV>(w + r * wr, wc, wr, rm, ldr, nc, c + r * ldc, ldc);
}

// C[rows][nv·kW] += Wᵀ R with W(c, r) at w[c·wc + r·wr]; rows a multiple of 8.
void acc(const float* w, int64_t wc, int64_t wr, int64_t rows, const float* rm, int64_t ldr, int64_t nc, int64_t nv,
         float* c, int64_t ldc) {
  for (int64_t v0 = 0; v0 < nv; v0 += kMaxNV) {
    const float* r = rm + v0 * kW;
    float* cc = c + v0 * kW;
    switch (std::min<int64_t>(kMaxNV, nv - v0)) {
      case 1: acc_cols<1>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 2: acc_cols<2>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 3: acc_cols<3>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 4: acc_cols<4>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 5: acc_cols<5>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 6: acc_cols<6>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      case 7: acc_cols<7>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
      default: acc_cols<8>(w, wc, wr, rows, r, ldr, nc, cc, ldc); break;
    }
  }
}

// ------------------------------------------------------------------------------- staging

// dst[0, n) = src · mul in fp32, dst[n, npad) = 0.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n, int64_t npad, float mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]) * mul;
  for (int64_t d = n; d < npad; ++d) dst[d] = 0.f;
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n, float mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

// dst[d·ld + i] = src[i·ld_src + d] · mul for i < rows, d < n: a row block staged transposed, with
// at::vec's register transposes (fp32 sources directly; others widened through tmp [rows][n]).
template <typename T>
void load_transposed(const T* src, int64_t ld_src, int64_t rows, int64_t n, float mul, float* tmp, float* dst,
                     int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld, static_cast<int>(rows), static_cast<int>(n));
    if (mul != 1.f) {
      for (int64_t d = 0; d < n; ++d)
        for (int64_t i = 0; i < rows; i += kW) {
          const int64_t c = std::min<int64_t>(kW, rows - i);
          (Vec::loadu(dst + d * ld + i, c) * Vec(mul)).store(dst + d * ld + i, c);
        }
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) load_row(src + i * ld_src, tmp + i * n, n, n, mul);
    at::vec::transpose_mxn<float>(tmp, n, dst, ld, static_cast<int>(rows), static_cast<int>(n));
  }
}

// Per-thread scratch: grows to the largest request seen, then is reused (no per-call allocation).
float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n + 16) buf.resize(n + 16);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));  // 64-byte aligned
}

// Carves 64-byte aligned pieces out of one scratch block.
struct Carver {
  float* p;
  float* take(int64_t n) {
    float* r = p;
    p += round_up(n, 16);
    return r;
  }
};

// Runs f(w0, w1) over [0, n) on at::get_num_threads() threads that take runs of items in turn
// (dynamic scheduling: ragged items balance, and a busy core does not hold the others up).  A run
// holds about 1/8 of a thread's share, at most 16 items: one atomic per run (a locked add waits
// for the stores of the previous item to drain).
template <typename F>
void run_items(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  const int64_t run = std::clamp<int64_t>(n / (threads * 8), 1, 16);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t w = next.fetch_add(run, std::memory_order_relaxed); w < n;
         w = next.fetch_add(run, std::memory_order_relaxed))
      f(w, std::min(n, w + run));
  });
}

// Asks for rows [t0, t1) (n elements each, row stride st) into L2: a short sequence's rows are a
// few scattered lines, and fetching the next item's while computing this one hides their latency.
template <bool WRITE = false, typename T>
inline void prefetch_rows(const T* base, int64_t st, int64_t t0, int64_t t1, int64_t n) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t e = 0; e < n; e += 64 / static_cast<int64_t>(sizeof(T)))
      __builtin_prefetch(base + t * st + e, WRITE ? 1 : 0, 2);
}

// ------------------------------------------------------------------------------- masks, dropout

template <typename Fn>
void dispatch_mask(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kBool: fn(bool{}); break;
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "fastenc attention: no kernel for mask dtype ", t);
  }
}

template <typename M>
inline float mask_bias(M m) {
  if constexpr (std::is_same_v<M, bool>) {
    return m ? -kInf : 0.f;
  } else {
    return static_cast<float>(m);
  }
}

struct Seq {
  int64_t q0, k0, L, S;  // first row in q and in k/v, lengths
};

// Keys [lo, hi) of a sequence with S keys that some query of [i0, i1) sees through the window and
// the causal bound (lo = hi when none does).
inline std::pair<int64_t, int64_t> key_range(const AttnParams& p, int64_t i0, int64_t i1, int64_t S) {
  const int64_t lo = p.window_left >= 0 ? std::clamp<int64_t>(i0 - p.window_left, 0, S) : 0;
  int64_t hi = S;
  if (p.window_right >= 0) hi = std::min(hi, i1 + p.window_right);
  if (p.causal) hi = std::min(hi, i1);
  return {lo, std::max(lo, hi)};
}

// Queries [lo, hi) of a sequence with L queries that see some key of [j0, j1).
inline std::pair<int64_t, int64_t> query_range(const AttnParams& p, int64_t j0, int64_t j1, int64_t L) {
  int64_t lo = p.causal ? j0 : 0, hi = L;
  if (p.window_right >= 0) lo = std::max(lo, j0 - p.window_right);
  if (p.window_left >= 0) hi = std::min(hi, j1 + p.window_left);
  lo = std::min(lo, L);
  return {lo, std::max(lo, hi)};
}

// Rotary embedding of one fp32 row x [2·half] at position pos (HF's rotate_half, (x1, x2) its halves):
//   forward  y1 = x1 c - x2 s,  y2 = x2 c + x1 s;   inverse (Rᵀ, for gradients)  y1 = x1 c + x2 s,  y2 = x2 c - x1 s.
struct Rotary {
  const float *cos = nullptr, *sin = nullptr;
  int64_t st = 0, half = 0;
  Rotary(const AttnParams& p, int64_t D) : cos(p.rot_cos), sin(p.rot_sin), st(p.rot_st), half(D / 2) {}
  explicit operator bool() const { return cos != nullptr; }
  template <bool INVERSE = false>
  void apply(float* x, int64_t pos) const {
    const float* c = cos + pos * st;
    const float* s = sin + pos * st;
    for (int64_t d = 0; d < half; d += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, half - d));
      const Vec x1 = Vec::loadu(x + d, n), x2 = Vec::loadu(x + half + d, n);
      const Vec cv = Vec::loadu(c + d, n), sv = Vec::loadu(s + d, n);
      if constexpr (INVERSE) {
        at::vec::fmadd(x2, sv, x1 * cv).store(x + d, n);
        at::vec::fmsub(x2, cv, x1 * sv).store(x + half + d, n);
      } else {
        at::vec::fmsub(x1, cv, x2 * sv).store(x + d, n);
        at::vec::fmadd(x1, sv, x2 * cv).store(x + half + d, n);
      }
    }
  }
};

// Adds key padding, attention mask and causal masking to st[jj][ii] (key j0 + jj, query i0 + ii).
void apply_masks(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t nqv, int64_t j0,
                 int64_t nj, float* st, int64_t ld) {
  if (p.key_padding) {
    dispatch_mask(p.key_padding.dtype, [&](auto m_) {
      using M = decltype(m_);
      const M* kp = static_cast<const M*>(p.key_padding.data) + b * p.key_padding.sb;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const float bias = mask_bias(kp[(j0 + jj) * p.key_padding.sj]);
        if (bias == 0.f) continue;
        const Vec bv(bias);
        for (int64_t n = 0; n < nqv; ++n) (Vec::loadu(st + jj * ld + n * kW) + bv).store(st + jj * ld + n * kW);
      }
    });
  }
  if (p.attn_mask) {
    const AttnMask& am = p.attn_mask;
    dispatch_mask(am.dtype, [&](auto m_) {
      using M = decltype(m_);
      const M* base = static_cast<const M*>(am.data) + b * am.sb + h * am.sh + i0 * am.si;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const M* col = base + (j0 + jj) * am.sj;
        float* s = st + jj * ld;
        for (int64_t ii = 0; ii < rows; ++ii) s[ii] += mask_bias(col[ii * am.si]);
      }
    });
  }
  if (p.causal) {  // key j is hidden from query i when j > i
    const Vec ninf(-kInf);
    for (int64_t jj = std::max<int64_t>(0, i0 + 1 - j0); jj < nj; ++jj) {
      const Vec j(static_cast<float>(j0 + jj));
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec i = Vec::arange(static_cast<float>(i0 + n * kW), 1.f);
        float* s = st + jj * ld + n * kW;
        Vec::blendv(Vec::loadu(s), ninf, i < j).store(s);
      }
    }
  }
  if (p.window_left >= 0 || p.window_right >= 0) {  // key j hidden from query i when j < i - left or j > i + right
    const Vec ninf(-kInf);
    const int64_t i_last = i0 + nqv * kW - 1;  // every lane, the padding ones included
    for (int64_t jj = 0; jj < nj; ++jj) {
      const int64_t j = j0 + jj;
      const bool cut_left = p.window_left >= 0 && i_last > j + p.window_left;     // a lane with i > j + left
      const bool cut_right = p.window_right >= 0 && i0 < j - p.window_right;      // a lane with i < j - right
      if (!cut_left && !cut_right) continue;
      const Vec far(static_cast<float>(j + p.window_left)), near(static_cast<float>(j - p.window_right));
      for (int64_t n = 0; n < nqv; ++n) {
        const Vec i = Vec::arange(static_cast<float>(i0 + n * kW), 1.f);
        float* s = st + jj * ld + n * kW;
        Vec x = Vec::loadu(s);
        if (cut_left) x = Vec::blendv(x, ninf, i > far);
        if (cut_right) x = Vec::blendv(x, ninf, i < near);
        x.store(s);
      }
    }
  }
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold24 = 0;
  float scale = 1.f;
};

Dropout make_dropout(const AttnParams& p) {
  Dropout d;
  d.on = p.dropout_p > 0.0;
  d.seed = p.seed;
  d.threshold24 = dropout_threshold24(p.dropout_p);
  d.scale = dropout_scale(p.dropout_p);
  return d;
}

// z[w][l] = keep·scale of element (b, h, i = ib + l, j = j0 + w) for w < 4, l < kW (j0 % 4 == 0):
// word j % 4 of philox4x32(seed, counter {i, j / 4, h, b}) (ffn_math.h), so each query lane's call
// covers 4 keys; with AVX-512 the kW calls run in the lanes of four registers.
#if defined(CPU_CAPABILITY_AVX512)
// hi and lo words of the 32x32-bit products a·m, lane-wise (mul_epu32 multiplies the even lanes).
inline void mulhilo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mullo_epi32(a, m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

void dropout_block(const Dropout& dr, int64_t b, int64_t h, int64_t ib, int64_t j0, float (*z)[kW]) {
  static_assert(kW == 16);
  __m512i c[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(ib)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                  _mm512_set1_epi32(static_cast<int>(j0 >> 2)), _mm512_set1_epi32(static_cast<int>(h)),
                  _mm512_set1_epi32(static_cast<int>(b))};
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(dr.seed), k1 = static_cast<uint32_t>(dr.seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(c[0], m0, hi0, lo0);
    mulhilo(c[2], m1, hi1, lo1);
    c[0] = _mm512_xor_si512(_mm512_xor_si512(hi1, c[1]), _mm512_set1_epi32(static_cast<int>(k0)));
    c[1] = lo1;
    c[2] = _mm512_xor_si512(_mm512_xor_si512(hi0, c[3]), _mm512_set1_epi32(static_cast<int>(k1)));
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(dr.threshold24));
  const __m512 scale = _mm512_set1_ps(dr.scale);
  for (int w = 0; w < 4; ++w)  // dropout_keep: (word >> 8) >= threshold24
    _mm512_storeu_ps(z[w], _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(c[w], 8), thr), scale));
}
#else
void dropout_block(const Dropout& dr, int64_t b, int64_t h, int64_t ib, int64_t j0, float (*z)[kW]) {
  for (int l = 0; l < kW; ++l) {
    const U32x4 r = philox4x32(dr.seed, U32x4{{static_cast<uint32_t>(ib + l), static_cast<uint32_t>(j0 >> 2),
                                               static_cast<uint32_t>(h), static_cast<uint32_t>(b)}});
    for (int w = 0; w < 4; ++w) z[w][l] = dropout_keep(r.v[w], dr.threshold24) ? dr.scale : 0.f;
  }
}
#endif

// 20-ulp exp (as torch's CPU flash attention); exp(-inf) = 0, and a NaN stays NaN (exp_u20 clamps it).
Vec vexp(Vec x) { return Vec::blendv(x.exp_u20(), x, x != x); }

// ------------------------------------------------------------------------------- forward

template <typename T>
struct View {  // [T, H, D] rows
  T* p;
  int64_t st, sh;
  T* row(int64_t t, int64_t h) const { return p + t * st + h * sh; }
};

template <typename T>
View<T> view(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
}

struct Shape {
  int64_t H, D, Dv;
};

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

#if defined(FASTENC_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
// bf16 products with AVX512-BF16 (vdpbf16ps: C += a₀b₀ + a₁b₁ on pairs of bf16, fp32 accumulation),
// for bf16 inputs with an even head dim.  Operands are staged as 32-bit pairs along the reduction:
// Qᵀ as [D/2][ld] (pairs of head-dim entries), K as its rows, V as [keys/2][Dv] (pairs of keys),
// P as [keys/2][ld].  q·k is exact before fp32 accumulation (q unscaled, scale applied to the
// sums); P is rounded to bf16 before P V, as torch's bf16 attention does.
inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// C[r][n·16 + l] = scale · Σ_{p<np} A2[r·lda + p] ⋅ Bt2[p·ldb + n·16 + l] (bf16 pair dot products).
template <int NJ, int NI>
inline void abt_tile_bf16(const uint32_t* a, int64_t lda, const uint32_t* bt, int64_t ldb, int64_t np, float scale,
                          float* c, int64_t ldc) {
  __m512 acc[NJ][NI];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < np; ++p) {
    __m512i b[NI];
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) b[n] = _mm512_loadu_si512(bt + p * ldb + n * 16);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NJ; ++r) {
      const __m512bh ar = as_bh(_mm512_set1_epi32(static_cast<int>(a[r * lda + p])));
      FASTENC_UNROLL_ALL
      for (int n = 0; n < NI; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], as_bh(b[n]), ar);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NJ; ++r) {
    FASTENC_UNROLL_ALL
    for (int n = 0; n < NI; ++n) _mm512_storeu_ps(c + r * ldc + n * 16, _mm512_mul_ps(acc[r][n], sc));
  }
}

// C[r·ldc + v·16 + l] += Σ_{k<nc} W2[k·wc + r] ⋅ R2[k·ldr + v·16 + l] (bf16 pair dot products).
template <int NR, int NV>
inline void acc_tile_bf16(const uint32_t* w, int64_t wc, const uint32_t* rm, int64_t ldr, int64_t nc, float* c,
                          int64_t ldc) {
  __m512 acc[NR][NV];
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(c + r * ldc + v * 16);
  }
  for (int64_t k = 0; k < nc; ++k) {
    __m512i x[NV];
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_si512(rm + k * ldr + v * 16);
    FASTENC_UNROLL_ALL
    for (int r = 0; r < NR; ++r) {
      const __m512bh wv = as_bh(_mm512_set1_epi32(static_cast<int>(w[k * wc + r])));
      FASTENC_UNROLL_ALL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], as_bh(x[v]), wv);
    }
  }
  FASTENC_UNROLL_ALL
  for (int r = 0; r < NR; ++r) {
    FASTENC_UNROLL_ALL
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
  }
}

template <int NI>
void abt_cols_bf16(const uint32_t* a, int64_t lda, int64_t rows, const uint32_t* bt, int64_t ldb, int64_t np,
                   float scale, float* c, int64_t ldc) {
  constexpr int NJ = tile_rows(NI);
  for (int64_t r = 0; r < rows; r += NJ)
    abt_tile_bf16<NJ, NI>(a + r * lda, lda, bt, ldb, np, scale, c + r * ldc, ldc);
}

template <int NV>
void acc_cols_bf16(const uint32_t* w, int64_t wc, int64_t rows, const uint32_t* rm, int64_t ldr, int64_t nc, float* c,
                   int64_t ldc) {
  constexpr int NR = tile_rows(NV);
  for (int64_t r = 0; r < rows; r += NR) acc_tile_bf16<NR, NV>(w + r, wc, rm, ldr, nc, c + r * ldc, ldc);
}

// The pair (lo, hi) of bf16 bit patterns in one 32-bit word.
inline uint32_t bf16_pair(at::BFloat16 lo, at::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

struct Bf16Dots {
  int64_t D, D2, Dv, DVp;
  float scale = 1.f;
  Rotary rot;
  uint32_t *kb, *vb, *qt, *tmp, *pb;
  float* row;

  Bf16Dots(const Shape& sh, const AttnParams& p)
      : D(sh.D), D2(sh.D / 2), Dv(sh.Dv), DVp(round_up(sh.Dv, 16)), rot(p, sh.D) {}
  int64_t floats(int64_t kp, int64_t bn) const {
    return kp * D2 + kp / 2 * DVp + 2 * D2 * kQC + bn / 2 * kQC + D + 96;
  }
  void carve(Carver& c, int64_t kp, int64_t bn) {
    kb = reinterpret_cast<uint32_t*>(c.take(kp * D2));        // K rows as pairs [kp][D/2]
    vb = reinterpret_cast<uint32_t*>(c.take(kp / 2 * DVp));   // V key pairs [kp/2][DVp]
    qt = reinterpret_cast<uint32_t*>(c.take(D2 * kQC));       // Qᵀ pairs [D/2][ld]
    tmp = reinterpret_cast<uint32_t*>(c.take(D2 * kQC));      // Q rows as pairs [rows][D/2]
    pb = reinterpret_cast<uint32_t*>(c.take(bn / 2 * kQC));   // P key pairs [bn/2][ld]
    row = c.take(D);                                          // one row in fp32, rotated
  }
  // src rotated at pos in fp32, rounded back to bf16 (as torch rotates bf16 tensors), into dst.
  void rotated(const at::BFloat16* src, int64_t pos, at::BFloat16* dst) const {
    load_row(src, row, D, D, 1.f);
    rot.apply(row, pos);
    store_row(row, dst, D, 1.f);
  }
  void stage_kv(const View<const at::BFloat16>& k, const View<const at::BFloat16>& v, const Seq& s, int64_t h,
                int64_t ks, int64_t kall, int64_t kp) {
    for (int64_t j = 0; j < kall; ++j) {
      auto* dst = reinterpret_cast<at::BFloat16*>(kb + j * D2);
      if (rot) {
        rotated(k.row(s.k0 + ks + j, h), ks + j, dst);
      } else {
        std::memcpy(dst, k.row(s.k0 + ks + j, h), D * sizeof(at::BFloat16));
      }
    }
    std::fill(kb + kall * D2, kb + kp * D2, 0u);
    const at::BFloat16 zero(0.f);
    for (int64_t jp = 0; jp < kp / 2; ++jp) {
      const int64_t j = 2 * jp;
      uint32_t* dst = vb + jp * DVp;
      if (j >= kall) {
        std::fill(dst, dst + DVp, 0u);
        continue;
      }
      const at::BFloat16* v0 = v.row(s.k0 + ks + j, h);
      const at::BFloat16* v1 = j + 1 < kall ? v.row(s.k0 + ks + j + 1, h) : nullptr;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = bf16_pair(v0[d], v1 ? v1[d] : zero);
      std::fill(dst + Dv, dst + DVp, 0u);
    }
  }
  void stage_q(const View<const at::BFloat16>& q, const Seq& s, int64_t i0, int64_t h, int64_t rows, int64_t ld,
               float sc) {
    scale = sc;
    for (int64_t i = 0; i < rows; ++i) {
      auto* dst = reinterpret_cast<at::BFloat16*>(tmp + i * D2);
      if (rot) {
        rotated(q.row(s.q0 + i0 + i, h), i0 + i, dst);
      } else {
        std::memcpy(dst, q.row(s.q0 + i0 + i, h), D * sizeof(at::BFloat16));
      }
    }
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(tmp), D2, reinterpret_cast<float*>(qt), ld,
                                  static_cast<int>(rows), static_cast<int>(D2));
    for (int64_t p = 0; p < D2; ++p) std::fill(qt + p * ld + rows, qt + (p + 1) * ld, 0u);
  }
  void scores(int64_t j0, int64_t nj, int64_t nqv, float* st, int64_t ld) const {
    const uint32_t* a = kb + j0 * D2;
    const int64_t rows = round_up(nj, 8);
    for (int64_t n0 = 0; n0 < nqv; n0 += kMaxNI) {
      const uint32_t* b = qt + n0 * 16;
      float* c = st + n0 * 16;
      switch (std::min<int64_t>(kMaxNI, nqv - n0)) {
        case 1: abt_cols_bf16<1>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        case 2: abt_cols_bf16<2>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        case 3: abt_cols_bf16<3>(a, D2, rows, b, ld, D2, scale, c, ld); break;
        default: abt_cols_bf16<4>(a, D2, rows, b, ld, D2, scale, c, ld); break;
      }
    }
  }
  void pv(const float* st, int64_t ld, int64_t rows, int64_t j0, int64_t nj, float* o) const {
    // P to bf16 key pairs: pb[jp][i] = (P[2jp][i], P[2jp+1][i]), a zero key past nj.
    const int64_t np = (nj + 1) / 2, nqv = ld / 16;
    for (int64_t jp = 0; jp < np; ++jp)
      for (int64_t n = 0; n < nqv; ++n) {
        const __m512 p0 = _mm512_loadu_ps(st + 2 * jp * ld + n * 16);
        const __m512 p1 = 2 * jp + 1 < nj ? _mm512_loadu_ps(st + (2 * jp + 1) * ld + n * 16) : _mm512_setzero_ps();
        const __m256bh b0 = _mm512_cvtneps_pbh(p0), b1 = _mm512_cvtneps_pbh(p1);
        const __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b0));
        const __m512i hi = _mm512_cvtepu16_epi32(reinterpret_cast<const __m256i&>(b1));
        _mm512_storeu_si512(pb + jp * ld + n * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    const uint32_t* r = vb + j0 / 2 * DVp;
    const int64_t nr = round_up(rows, 8);
    for (int64_t v0 = 0; v0 < DVp / 16; v0 += kMaxNV) {
      const uint32_t* rv = r + v0 * 16;
      float* c = o + v0 * 16;
      switch (std::min<int64_t>(kMaxNV, DVp / 16 - v0)) {
        case 1: acc_cols_bf16<1>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 2: acc_cols_bf16<2>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 3: acc_cols_bf16<3>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 4: acc_cols_bf16<4>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 5: acc_cols_bf16<5>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 6: acc_cols_bf16<6>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        case 7: acc_cols_bf16<7>(pb, ld, nr, rv, DVp, np, c, DVp); break;
        default: acc_cols_bf16<8>(pb, ld, nr, rv, DVp, np, c, DVp); break;
      }
    }
  }
};

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}
#endif

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

    for (int64_t ii = 0; ii < rows; ++ii) {
      const float mi = m[ii], li = l[ii];
      float inv = li > 0.f ? 1.f / li : 0.f, ls = li > 0.f ? mi + std::log(li) : kInf;
      if (std::isnan(mi) || std::isnan(li)) inv = ls = std::numeric_limits<float>::quiet_NaN();
      store_row(o + ii * DVp, out.row(s.q0 + i0 + ii, h), Dv, inv);
      if (lse) lse[h * lse_sh + (s.q0 + i0 + ii) * lse_st] = ls;
    }
  }
}

// ------------------------------------------------------------------------------- backward

// Whether the forward of T rows with head dim D runs Bf16Dots, which multiplies q and k rotated and rounded back
// to bf16: the backward's scores must be taken from the same rounded rows, or its P = exp(s - lse) is not the
// forward's softmax (a bf16 rounding of each score, times scale: dV was 2.5% off with one visible key).
template <typename T>
bool rounds_rotated_rows(int64_t D) {
#if defined(FASTENC_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) return D % 2 == 0 && has_avx512_bf16();
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

std::vector<Seq> sequences(const at::Tensor& cu_q, const at::Tensor& cu_k) {
  const auto cq = cu_q.accessor<int32_t, 1>(), ck = cu_k.accessor<int32_t, 1>();
  std::vector<Seq> seqs(cu_q.numel() - 1);
  for (size_t b = 0; b < seqs.size(); ++b)
    seqs[b] = {cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]};
  return seqs;
}


}  // namespace

AttnMask make_mask(const std::optional<at::Tensor>& mask, bool key_padding) {
  AttnMask m;
  if (!mask) return m;
  m.data = mask->data_ptr();
  m.dtype = mask->scalar_type();
  m.sb = mask->stride(0);
  if (key_padding) {
    m.sj = mask->stride(1);
  } else {
    m.sh = mask->stride(1);
    m.si = mask->stride(2);
    m.sj = mask->stride(3);
  }
  return m;
}

void attention_forward_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const AttnParams& p,
                           const at::Tensor& out, const at::Tensor& lse) {
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
#if defined(FASTENC_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
  const bool bf16_dots = sh.D % 2 == 0 && has_avx512_bf16();
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
#if defined(FASTENC_AVX512BF16) && defined(CPU_CAPABILITY_AVX512)
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

void attention_backward_out(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, const AttnParams& p, const at::Tensor& dq,
                            const at::Tensor& dk, const at::Tensor& dv) {
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

at::Tensor attention_dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double p,
                                  uint64_t seed) {
  at::Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const uint32_t threshold = dropout_threshold24(p);
  at::parallel_for(0, batch * heads * seqlen_q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % seqlen_q, h = r / seqlen_q % heads, b = r / seqlen_q / heads;
      for (int64_t j = 0; j < seqlen_k; ++j) {
        const U32x4 x = philox4x32(seed, U32x4{{static_cast<uint32_t>(i), static_cast<uint32_t>(j >> 2),
                                                static_cast<uint32_t>(h), static_cast<uint32_t>(b)}});
        out[r * seqlen_k + j] = dropout_keep(x.v[j & 3], threshold);
      }
    }
  });
  return mask;
}

}  // namespace fastenc::cpu
