// The CPU flash attention's work: packed sequences (cu_seqlens read on the host), [tokens, heads, dim] views, the
// dynamic scheduling of (sequence, head, query run) items over at::get_num_threads() threads, and prefetching of
// the next item's rows.
#pragma once

#ifndef CPU_CAPABILITY
#error "a CPU kernel header: include it only from kernel files (compiled per capability: build_tools/cpu_kernels.py)"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace fastenc::cpu::CPU_CAPABILITY {

struct Seq {
  int64_t q0, k0, L, S;  // first row in q and in k/v, lengths
};

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

inline std::vector<Seq> sequences(const at::Tensor& cu_q, const at::Tensor& cu_k) {
  const auto cq = cu_q.accessor<int32_t, 1>(), ck = cu_k.accessor<int32_t, 1>();
  std::vector<Seq> seqs(cu_q.numel() - 1);
  for (size_t b = 0; b < seqs.size(); ++b)
    seqs[b] = {cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]};
  return seqs;
}

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

}  // namespace fastenc::cpu::CPU_CAPABILITY
