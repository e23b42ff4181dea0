// CPU flash attention on packed variable-length sequences: the declarations other C++ code
// calls (the bindings in attention_api.cpp, a whole-encoder C++ function).
//
// Layout: q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv], out [Tq, H, Dv]; any token and head
// strides, unit last stride.  Sequence b is rows cu_q[b]:cu_q[b+1] of q and cu_k[b]:cu_k[b+1]
// of k/v; mask positions (i, j) are relative to each sequence's start.  Rows of out/dq/dk/dv
// outside every sequence are not written.
//
// The kernels assume validated arguments (validate_attention in attention_api.cpp checks
// shapes, dtypes, strides and the cu_seqlens values): they read cu_seqlens on the host and
// trust every index they derive from them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/cpu_kernels.h"

namespace fastenc::cpu {

// An optional bool (True = masked) or floating (additive) mask; element (b, h, i, j) at
// data + b·sb + h·sh + i·si + j·sj (strides in elements, 0 on broadcast dimensions).
// key_padding [B, S] uses sb and sj only.
struct AttnMask {
  const void* data = nullptr;
  at::ScalarType dtype = at::kBool;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  explicit operator bool() const { return data != nullptr; }
};

struct AttnParams {
  AttnMask attn_mask;    // [B, H, max_q, max_k] view
  AttnMask key_padding;  // [B, max_k]
  bool causal = false;   // key j hidden from query i when j > i (top-left aligned)
  float scale = 1.f;     // scores = q·k · scale
  double dropout_p = 0.0;
  uint64_t seed = 0;     // Philox key of the dropout keep mask (see attention_dropout_mask)
  // Sliding window: query i sees keys i - window_left .. i + window_right (-1 = unbounded side),
  // positions relative to each sequence's start.  Combines with every mask above.
  int64_t window_left = -1, window_right = -1;
  // Rotary embeddings (Hugging Face's rotate_half): q and k rotated at their sequence-local
  // position p by the fp32 tables cos/sin [P, D/2] (row p at rot_cos + p·rot_st, unit last stride,
  // P > every position; D even), applied to the fp32-staged operands.  Null: no rotary.
  const float* rot_cos = nullptr;
  const float* rot_sin = nullptr;
  int64_t rot_st = 0;
};

AttnMask make_mask(const std::optional<at::Tensor>& mask, bool key_padding);

// The bindings' argument checks (TypeError / ValueError naming the argument), for C++ callers
// too: devices, dtypes, shapes, unit last strides, mask shapes [B, H, max_q, max_k] / [B, max_k],
// and the cu_seqlens VALUES (0 <= cu[0] <= ... <= cu[B] <= rows, lengths <= max_seqlen).
void validate_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, const std::optional<at::Tensor>& attn_mask,
                        const std::optional<at::Tensor>& key_padding_mask, double dropout_p);

// Forward.  Writes out (q's dtype) and, when defined, lse float32 [H, Tq] (any strides):
// lse = log Σ_j exp(s_ij) in natural-log units, +inf on rows whose keys are all masked (their
// output is zero, and the backward gives them zero gradients).  Scratch: per-thread buffers
// that grow to the largest shape seen and are then reused; no other allocation.
void attention_forward_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const AttnParams& p,
                           const at::Tensor& out, const at::Tensor& lse);

// Backward (FlashAttention-2): dq, dk, dv from dout, the forward's out and lse.  Parallel over
// (sequence, head), each task owning its rows: deterministic, no atomics.  Per-thread scratch
// holds the sequence's q and dout in fp32 (4 · max_seqlen_q · D floats).
void attention_backward_out(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, const AttnParams& p, const at::Tensor& dq,
                            const at::Tensor& dk, const at::Tensor& dv);

// The dropout keep mask bool [B, H, L, S]: element (b, h, i, j) is kept when the top 24 bits of
// word j % 4 of philox4x32(seed, counter {i, j / 4, h, b}) are >= round(p · 2^24); survivors are
// scaled by 1 / (1 - p).  A pure function of (seed, b, h, i, j): the backward replays it.
at::Tensor attention_dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double p,
                                  uint64_t seed);

// The kernels of cpu/flash_fwd.cpp and cpu/flash_bwd.cpp, one table per capability they are compiled for (the
// entry points above call the table of the capability in use: common/cpu_kernels.h).
struct AttentionFwdKernels {
  decltype(&attention_forward_out) forward;
};
struct AttentionBwdKernels {
  decltype(&attention_backward_out) backward;
};
FASTENC_DECLARE_CPU_KERNELS(AttentionFwdKernels)
FASTENC_DECLARE_CPU_KERNELS(AttentionBwdKernels)

}  // namespace fastenc::cpu
