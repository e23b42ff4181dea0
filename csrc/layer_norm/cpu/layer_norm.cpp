// CPU residual + LayerNorm: forward and backward over rows of N columns (math in layer_norm.h).
//
// Forward, one row at a time, rows split across threads with at::parallel_for:
//   pass 1 reads x (and branch) once, forms s in fp32 (rounded to the row dtype for fp16/bf16),
//     keeps it in a per-thread fp32 row buffer (L1/L2-resident), writes s when asked, and sums
//     s - s[0]: shifting by the first element makes a constant row's mean exact, so its xhat is
//     exactly 0 and an all-zero row with eps = 1e-12 gives y = bias (not rounding noise · 10^6);
//   pass 2 sums (s - mean)² from the buffer (centred, no cancellation);
//   pass 3 writes y.
//   Memory traffic is the minimum: read x (+ branch), write y (+ s).
// Backward, rows in fixed chunks (chunk_rows depends on rows only), chunks split across threads:
//   pass 1 rebuilds s (read from resid, or recomputed from x, branch and the Philox seed exactly as
//     the forward did), xhat and g = dy · weight into row buffers and sums g · xhat and g;
//   pass 2 writes dx (and dbranch) and adds dy · xhat, dy and dbranch into the chunk's fp32 row of
//     partial sums; a last pass sums the partial rows column by column in chunk order.
//   Traffic: read dy, s or x (+ branch) (+ dresid), write dx (+ dbranch), plus 3·N·4 bytes of
//   partial sums per chunk of up to 64 rows.
// Dropout factors come from dropout_keep_scale (vectorised Philox), one row at a time.
#include "layer_norm/layer_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "common/vec_io.h"

namespace fastenc::cpu::CPU_CAPABILITY {

namespace {

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows per task: ~4k elements, so that a batch-1 request's rows (32 x 384) split across the threads: inside the
// fused stack the threads are awake and a region costs ~2 us (the stack alone at MiniLM batch 1 x 32, median of
// 60 alternating rounds: fp32 -1.7%, bf16 -0.8%, int8 -2.2% against 32k elements; BERT-base level).
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)); }

// Rows per partial-sum chunk of the backward: a function of rows only (never of the thread count).
int64_t chunk_rows(int64_t rows) { return std::clamp<int64_t>((rows + 63) / 64, 8, 64); }

// An [N] parameter as fp32: an fp32 unit-stride tensor in place, else buf filled with it widened (fp16/bf16, or
// any stride) or with `fill` (absent).  No ATen call: at batch 1 the fused stack runs 13 LayerNorms a MiniLM call,
// and three conversions or fills each were 48 ATen calls, 8% of a bf16 call's time.
const float* param_f32(const at::Tensor& t, float fill, int64_t n, std::vector<float>& buf) {
  if (t.defined() && t.scalar_type() == at::kFloat && t.stride(0) == 1) return t.const_data_ptr<float>();
  buf.assign(n, fill);
  if (t.defined()) {
    dispatch_dtype(t.scalar_type(), [&](auto tag) {
      using P = decltype(tag);
      const P* p = t.const_data_ptr<P>();
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i * t.stride(0)]);
    });
  }
  return buf.data();
}

// t: [rows, N] like ref (x in the forward, dy in the backward), unit column stride, ref's dtype.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == ref.size(0) && t.size(1) == ref.size(1), "fastenc layer_norm: ",
                    name, " must be [rows, N] = ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "fastenc layer_norm: ", name,
                    " must have a unit column stride, got strides ", t.strides());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastenc layer_norm: ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastenc layer_norm: ", name, " must be a CPU tensor, got ", t.device());
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, bool f32_only) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "fastenc layer_norm: ", name, " must be [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(!f32_only || t.scalar_type() == at::kFloat, "fastenc layer_norm: ", name,
                   " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(!f32_only || t.is_contiguous(), "fastenc layer_norm: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastenc layer_norm: ", name, " must be a CPU tensor, got ", t.device());
}

template <typename T>
const T* row_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* row_mut(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
int64_t row_stride(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

// s = x + h · keep (keep: the row's dropout factors at this column, or null), rounded to T: the one expression
// of the forward and of the backward's recompute, with an explicit fma so that both round alike (two copies of
// h * keep then + x had not: post-norm with dropout recomputed s 1 ulp off, which rstd multiplies into xhat;
// rows of one column got dx = 1e-4 instead of 0).
template <typename T>
Vec residual_sum(const Vec& x, const Vec& h, const float* keep, int64_t n) {
  return round_to<T>(keep ? at::vec::fmadd(h, Vec::loadu(keep, n), x) : x + h);
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& branch, const float* w, const float* b, const float* bb,
              float eps, const DropoutParams& dp, const at::Tensor& y, const at::Tensor& s, float* mean,
              float* rstd) {
  const int64_t rows = x.size(0), N = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* bp = row_ptr<T>(branch);
  T* yp = y.data_ptr<T>();
  T* sp = row_mut<T>(s);
  const int64_t sx = x.stride(0), sb = row_stride(branch), sy = y.stride(0), ss = row_stride(s);
  const bool drop = bp && dp.enabled;
  at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(round_up(N, kW)), keep(drop ? N : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * sx;
      const T* br = bp ? bp + r * sb : nullptr;
      T* sr = sp ? sp + r * ss : nullptr;
      if (drop) dropout_keep_scale(dp, static_cast<uint64_t>(r * N), N, keep.data());
      // Pass 1: s into the buffer (and out), Σ (s - s[0]).
      Vec acc(0.f), k(0.f);
      for (int64_t c = 0; c < N; c += kW) {
        const int64_t n = std::min(kW, N - c);
        Vec v = load_f32(xr + c, n);
        if (br) v = residual_sum<T>(v, load_f32(br + c, n) + Vec::loadu(bb + c, n), drop ? keep.data() + c : nullptr, n);
        if (sr) store_f32(v, sr + c, n);
        v.store(buf.data() + c);
        if (c == 0) k = Vec(buf[0]);
        acc = acc + Vec::set(Vec(0.f), v - k, n);
      }
      const float mu = buf[0] + sum_lanes(acc) / static_cast<float>(N);
      // Pass 2: Σ (s - mean)².
      const Vec m(mu);
      Vec acc2(0.f);
      for (int64_t c = 0; c < N; c += kW) {
        const int64_t n = std::min(kW, N - c);
        const Vec d = Vec::loadu(buf.data() + c) - m;
        acc2 = acc2 + Vec::set(Vec(0.f), d * d, n);
      }
      const float rs = 1.f / std::sqrt(sum_lanes(acc2) / static_cast<float>(N) + eps);
      // Pass 3: y.
      const Vec rv(rs);
      T* yr = yp + r * sy;
      for (int64_t c = 0; c < N; c += kW) {
        const int64_t n = std::min(kW, N - c);
        const Vec xhat = (Vec::loadu(buf.data() + c) - m) * rv;
        store_f32(at::vec::fmadd(xhat, Vec::loadu(w + c, n), Vec::loadu(b + c, n)), yr + c, n);
      }
      if (mean) mean[r] = mu;
      if (rstd) rstd[r] = rs;
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& dy, const at::Tensor& dresid, const at::Tensor& x, const at::Tensor& branch,
              const at::Tensor& resid, const float* w, const float* bb, const float* mean, const float* rstd,
              const DropoutParams& dp, const at::Tensor& dx, const at::Tensor& dbranch, float* part, bool want_dw,
              bool want_db, bool want_dbb) {
  const int64_t rows = dy.size(0), N = dy.size(1);
  const int64_t crows = chunk_rows(rows), chunks = (rows + crows - 1) / crows;
  const T* dyp = dy.const_data_ptr<T>();
  const T* drp = row_ptr<T>(dresid);
  const T* xp = row_ptr<T>(x);
  const T* bp = row_ptr<T>(branch);
  const T* rp = row_ptr<T>(resid);
  T* dxp = dx.data_ptr<T>();
  T* dbp = row_mut<T>(dbranch);
  const int64_t sdy = dy.stride(0), sdr = row_stride(dresid), sx = row_stride(x), sb = row_stride(branch),
                sr = row_stride(resid), sdx = dx.stride(0), sdb = row_stride(dbranch);
  const bool drop = dp.enabled;
  const float inv_n = 1.f / static_cast<float>(N);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    const int64_t np = round_up(N, kW);
    std::vector<float> xh(np), g(np), keep(drop ? N : 0);
    for (int64_t k = k0; k < k1; ++k) {
      float* pw = part ? part + (3 * k + 0) * N : nullptr;
      float* pb = part ? part + (3 * k + 1) * N : nullptr;
      float* pbb = part ? part + (3 * k + 2) * N : nullptr;
      if (part) std::fill(pw, pw + 3 * N, 0.f);
      for (int64_t r = k * crows; r < std::min(rows, (k + 1) * crows); ++r) {
        if (drop) dropout_keep_scale(dp, static_cast<uint64_t>(r * N), N, keep.data());
        const T* dyr = dyp + r * sdy;
        const Vec mu(mean[r]), rs(rstd[r]);
        // Pass 1: xhat and g into the buffers, Σ g · xhat, Σ g.
        Vec acc_gx(0.f), acc_g(0.f);
        for (int64_t c = 0; c < N; c += kW) {
          const int64_t n = std::min(kW, N - c);
          Vec s;
          if (rp) {
            s = load_f32(rp + r * sr + c, n);
          } else {
            s = load_f32(xp + r * sx + c, n);
            if (bp) {
              s = residual_sum<T>(s, load_f32(bp + r * sb + c, n) + Vec::loadu(bb + c, n),
                                  drop ? keep.data() + c : nullptr, n);
            }
          }
          const Vec xhat = (s - mu) * rs;
          const Vec gg = load_f32(dyr + c, n) * Vec::loadu(w + c, n);  // zero past n
          xhat.store(xh.data() + c);
          gg.store(g.data() + c);
          acc_gx = at::vec::fmadd(gg, xhat, acc_gx);
          acc_g = acc_g + gg;
        }
        const Vec a(sum_lanes(acc_gx) * inv_n), bsum(sum_lanes(acc_g) * inv_n);
        // Pass 2: ds, dx, dbranch and the partial sums.
        const T* drr = drp ? drp + r * sdr : nullptr;
        T* dxr = dxp + r * sdx;
        T* dbr = dbp ? dbp + r * sdb : nullptr;
        for (int64_t c = 0; c < N; c += kW) {
          const int64_t n = std::min(kW, N - c);
          const Vec xhat = Vec::loadu(xh.data() + c);
          const Vec d = part ? load_f32(dyr + c, n) : Vec(0.f);  // read before dx is stored: dx may alias dy
          Vec ds = (Vec::loadu(g.data() + c) - xhat * a - bsum) * rs;
          if (drr) ds = ds + load_f32(drr + c, n);
          store_f32(ds, dxr + c, n);
          const Vec dh = drop ? ds * Vec::loadu(keep.data() + c, n) : ds;
          if (dbr) store_f32(dh, dbr + c, n);
          if (part) {
            if (want_dw) at::vec::fmadd(d, xhat, Vec::loadu(pw + c, n)).store(pw + c, n);
            if (want_db) (Vec::loadu(pb + c, n) + d).store(pb + c, n);
            if (want_dbb) (Vec::loadu(pbb + c, n) + dh).store(pbb + c, n);
          }
        }
      }
    }
  });
}

// out_j[c] = Σ_k part[k, j, c] in chunk order, for the wanted j (fp32 [N] outputs).
void reduce_partials(const float* part, int64_t chunks, int64_t N, float* const out[3]) {
  at::parallel_for(0, N, 2048, [&](int64_t c0, int64_t c1) {
    for (int j = 0; j < 3; ++j) {
      if (!out[j]) continue;
      for (int64_t c = c0; c < c1; c += kW) {
        const int64_t n = std::min(kW, c1 - c);
        Vec acc(0.f);
        for (int64_t k = 0; k < chunks; ++k) acc = acc + Vec::loadu(part + (3 * k + j) * N + c, n);
        acc.store(out[j] + c, n);
      }
    }
  });
}

}  // namespace

void fwd_out(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight, const at::Tensor& bias,
             const at::Tensor& branch_bias, double eps, const DropoutParams& dp, const at::Tensor& y,
             const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(x.dim() == 2, "fastenc layer_norm: x must be [rows, N], got ", x.sizes());
  check_rows(x, "x", x, "x");
  const int64_t rows = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1, "fastenc layer_norm: x must have N >= 1 columns, got ", x.sizes());
  if (branch.defined()) check_rows(branch, "branch", x, "x");
  check_rows(y, "y", x, "x");
  if (s.defined()) check_rows(s, "s", x, "x");
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&branch_bias, "branch_bias"}}) {
    if (t->defined()) check_vector(*t, name, N, false);
  }
  if (mean.defined()) check_vector(mean, "mean", rows, true);
  if (rstd.defined()) check_vector(rstd, "rstd", rows, true);
  if (rows == 0) return;
  std::vector<float> w_buf, b_buf, bb_buf;
  const float* w = param_f32(weight, 1.f, N, w_buf);
  const float* b = param_f32(bias, 0.f, N, b_buf);
  const float* bb = param_f32(branch_bias, 0.f, N, bb_buf);
  dispatch_dtype(x.scalar_type(), [&](auto t_) {
    fwd_impl<decltype(t_)>(x, branch, w, b, bb, static_cast<float>(eps), dp, y, s,
                           mean.defined() ? mean.data_ptr<float>() : nullptr,
                           rstd.defined() ? rstd.data_ptr<float>() : nullptr);
  });
}

void bwd_out(const at::Tensor& dy, const at::Tensor& dresid, const at::Tensor& x, const at::Tensor& branch,
             const at::Tensor& resid, const at::Tensor& weight, const at::Tensor& branch_bias, const at::Tensor& mean,
             const at::Tensor& rstd, const DropoutParams& dp, const at::Tensor& dx, const at::Tensor& dbranch,
             const at::Tensor& dweight, const at::Tensor& dbias, const at::Tensor& dbranch_bias) {
  TORCH_CHECK_VALUE(dy.dim() == 2, "fastenc layer_norm: dy must be [rows, N], got ", dy.sizes());
  check_rows(dy, "dy", dy, "dy");
  const int64_t rows = dy.size(0), N = dy.size(1);
  TORCH_CHECK_VALUE(N >= 1, "fastenc layer_norm: dy must have N >= 1 columns, got ", dy.sizes());
  TORCH_CHECK_VALUE(resid.defined() || x.defined(), "fastenc layer_norm: backward needs resid (s) or x");
  for (const auto& [t, name] : {std::pair{&dresid, "dresid"}, {&x, "x"}, {&branch, "branch"}, {&resid, "resid"},
                                {&dx, "dx"}, {&dbranch, "dbranch"}}) {
    if (t->defined()) check_rows(*t, name, dy, "dy");
  }
  TORCH_CHECK_VALUE(!dp.enabled || branch.defined() || resid.defined(),
                    "fastenc layer_norm: a dropout backward needs the branch (or resid, with prenorm)");
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, {&branch_bias, "branch_bias"},
                                {&dweight, "dweight"}, {&dbias, "dbias"}, {&dbranch_bias, "dbranch_bias"}}) {
    if (t->defined()) check_vector(*t, name, N, false);
  }
  check_vector(mean, "mean", rows, true);
  check_vector(rstd, "rstd", rows, true);
  const at::Tensor* outs[3] = {&dweight, &dbias, &dbranch_bias};
  const bool any_param = dweight.defined() || dbias.defined() || dbranch_bias.defined();
  if (rows == 0) {
    for (const at::Tensor* o : outs) {
      if (o->defined()) o->zero_();
    }
    return;
  }
  std::vector<float> w_buf, bb_buf;
  const float* w = param_f32(weight, 1.f, N, w_buf);
  const float* bb = param_f32(branch_bias, 0.f, N, bb_buf);
  const int64_t crows = chunk_rows(rows), chunks = (rows + crows - 1) / crows;
  at::Tensor part = any_param ? at::empty({chunks, 3, N}, dy.options().dtype(at::kFloat)) : at::Tensor();
  dispatch_dtype(dy.scalar_type(), [&](auto t_) {
    bwd_impl<decltype(t_)>(dy, dresid, x, branch, resid, w, bb, mean.const_data_ptr<float>(),
                           rstd.const_data_ptr<float>(), dp, dx, dbranch,
                           any_param ? part.data_ptr<float>() : nullptr, dweight.defined(), dbias.defined(),
                           dbranch_bias.defined());
  });
  if (!any_param) return;
  // fp32 contiguous outputs are summed into directly; others through an fp32 [N] copied over.
  at::Tensor tmp[3];
  float* dst[3] = {nullptr, nullptr, nullptr};
  for (int j = 0; j < 3; ++j) {
    const at::Tensor& o = *outs[j];
    if (!o.defined()) continue;
    tmp[j] = o.scalar_type() == at::kFloat && o.is_contiguous() ? o : at::empty({N}, part.options());
    dst[j] = tmp[j].data_ptr<float>();
  }
  reduce_partials(part.const_data_ptr<float>(), chunks, N, dst);
  for (int j = 0; j < 3; ++j) {
    if (dst[j] && !tmp[j].is_same(*outs[j])) outs[j]->copy_(tmp[j]);
  }
}

FASTENC_DEFINE_CPU_KERNELS(LayerNormKernels) = {&fwd_out, &bwd_out};

}  // namespace fastenc::cpu::CPU_CAPABILITY
