"""Flash attention (forward + backward) in Triton, FlashAttention-2 style.

Math (per batch b, head h; log2 domain so the kernels use exp2):
    s_ij = (q_i · k_j) · scale + bias_ij          bias = attn_mask + key padding (+ causal), -inf = masked
    o_i  = Σ_j dropout(softmax_j(s_ij)) v_j       lse_i = log Σ_j exp(s_ij)   (natural log, +inf on empty rows)
The forward streams key blocks through an online softmax (running max m_i, running sum l_i), so the
L×S scores never exist in memory; it saves lse (one fp32 per query row) for the backward, which
recomputes P = exp(s - lse) block by block (Dao, "FlashAttention-2", 2023; Triton tutorial 06):
    dV = Pdᵀ dO,  dPd = dO Vᵀ,  dP = keep/(1-p) ∘ dPd,  dS = P ∘ (dP - Δ),  Δ_i = dO_i · o_i,
    dQ = scale · dS K,  dK = scale · dSᵀ Q
The backward is two deterministic kernels (no atomics): one program per query block for dQ (it also
writes Δ), then one per key block for dK/dV.  That recomputes QKᵀ and dO Vᵀ once more than a fused
atomic version, in exchange for bit-reproducible gradients.

Layout: q [B, L, H, D], k/v [B, S, H, D] with any strides whose last one is 1 (views of a packed QKV
projection work without copies), or packed varlen q [Tq, H, D], k/v [Tk, H, D] with int32 cu_seqlens.
Masks: attn_mask [B, H, L, S] view (stride 0 on broadcast dims; bool -> uint8, or float additive),
key padding [B, S] (bool or float additive).  Key blocks outside [first, last] unpadded key of a batch
are skipped; padded keys in between are masked elementwise.  attn_mask gets no gradient.
Dropout: one Philox-4x32 call per 4 (query, key) elements, laid out as an mma accumulator tile holds
them (see _dropout_keep); the backward replays it; ``dropout_keep_mask`` materialises the same keep
mask for tests.
Limits: head dim 8..256 in steps of 8, padded to the next power of two inside the kernel (hd 80/96
pay for 128; the padded columns load as 0).  fp32 inputs use IEEE fp32 dots (exact parity with torch
fp32, no TF32 speed) on small tiles; fp16/bf16 multiply on tensor cores with fp32 accumulation.
Tiles, warps and stages come from attention_config.py (fixed per-architecture tables, shrunk to the
device's shared memory per block); the launchers read them.
Offsets that can pass 2^31 elements (batch, head, sequence start) are computed in int64.  One
program per (query or key block, b·h) on grid axis 0.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .attention_config import AttentionConfig
from .dropout_rng import keep_threshold, kept_signed

Tensor = torch.Tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
_MAX_GRID_X = 2**31 - 1


# --------------------------------------------------------------------------- shared device helpers


@triton.jit
def _seq_bounds(CuSeq, b, dense_len, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens when packed, else (0, dense_len)."""
    if IS_VARLEN:
        start = tl.load(CuSeq + b)
        length = tl.load(CuSeq + b + 1) - start
    else:
        start = b * 0
        length = dense_len + b * 0
    return start, length


@triton.jit
def _dropout_keep(seed, bh, q0, k0, drop_thresh, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                  KEYS_FIRST: tl.constexpr):
    """Keep flags for queries q0 + [0, BLOCK_Q) x keys k0 + [0, BLOCK_K): [BLOCK_Q, BLOCK_K], or
    [BLOCK_K, BLOCK_Q] with KEYS_FIRST.  Needs q0 % 16 == 0, BLOCK_Q % 16 == 0, k0 and BLOCK_K even.

    Query i = 16a + 8b + c, key j = 2d + e: the four elements (b, e) in {0, 1}^2 of one
    (b·H + h, 16a + c, d) share a Philox-4x32 call, counter (d, 8a + c, b·H + h, 0) and key
    `seed`, and take its outputs 2b + e (dropout_rng.kept_signed decides).  Those four are the
    elements one thread holds of an mma accumulator tile (rows r and r + 8, columns 2d and
    2d + 1), so the forward and dQ kernels draw one call per 4 elements with no layout change.
    """
    tl.static_assert(BLOCK_Q % 16 == 0 and BLOCK_K % 2 == 0, "dropout tiles: BLOCK_Q % 16, BLOCK_K % 2")
    a = tl.arange(0, BLOCK_Q // 16)
    c = tl.arange(0, 8)
    d = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    two = tl.arange(0, 2)
    if KEYS_FIRST:  # [d, e, a, b, c]
        qg = ((q0 // 16 + a) * 8)[None, None, :, None, None] + c[None, None, None, None, :]
        kg = d[:, None, None, None, None]
        b = two[None, None, None, :, None]
        e = two[None, :, None, None, None]
    else:  # [a, b, c, d, e]
        qg = ((q0 // 16 + a) * 8)[:, None, None, None, None] + c[None, None, :, None, None]
        kg = d[None, None, None, :, None]
        b = two[None, :, None, None, None]
        e = two[None, None, None, None, :]
    if KEYS_FIRST:  # e is a lane bit of the transposed accumulator: drawing per e avoids a layout change
        kg = kg + e * 0
    c0 = kg + qg * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, qg + kg * 0, c0 * 0 + bh, c0 * 0)
    keep = kept_signed(tl.where(b == 0, tl.where(e == 0, r0, r1), tl.where(e == 0, r2, r3)), drop_thresh)
    shape: tl.constexpr = [BLOCK_K, BLOCK_Q] if KEYS_FIRST else [BLOCK_Q, BLOCK_K]
    return tl.reshape(keep, shape)


@triton.jit
def _masked_scores(
    s, rows, cols, q_len, k_len,  # log2-domain scores of query `rows` x key `cols` (either orientation)
    mask_ptrs, kpm_ptrs,  # attn_mask tile and key padding pointers, shaped like s / like cols
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KPM: tl.constexpr, KPM_BOOL: tl.constexpr,
):
    """Add biases to s and set masked or out-of-range entries to -inf."""
    valid = (rows < q_len) & (cols < k_len)
    if IS_CAUSAL:  # top-left aligned: query i sees keys j <= i
        valid = valid & (cols <= rows)
    if HAS_MASK:
        mval = tl.load(mask_ptrs, mask=valid, other=0)
        if MASK_BOOL:
            valid = valid & (mval == 0)
        else:
            s = s + mval.to(tl.float32) * LOG2E
    if HAS_KPM:
        pval = tl.load(kpm_ptrs, mask=cols < k_len, other=0)
        if KPM_BOOL:
            valid = valid & (pval == 0)
        else:
            s = s + pval.to(tl.float32) * LOG2E
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _key_range(KvRange, b, k_len, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of keys worth visiting: all of them, or the unpadded span of batch b, lo aligned to BLOCK_N."""
    if HAS_KPM:
        lo = tl.load(KvRange + 2 * b)
        hi = tl.minimum(tl.load(KvRange + 2 * b + 1), k_len)
        lo = tl.multiple_of((lo // BLOCK_N) * BLOCK_N, BLOCK_N)
    else:
        lo = b * 0
        hi = k_len
    return lo, hi


# --------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _attn_fwd_kernel(
    Q, K, V, Out,  # q [.., L, H, D], k/v [.., S, H, D] (strided), out like q
    Lse,  # fp32 log-sum-exp per query row, [B, H, L] (dense) or [H, Tq] (varlen)
    Mask,  # attn_mask [B, H, L, S] view: uint8 (1 = masked) or float additive
    Kpm,  # key padding [B, S]: uint8 (1 = padding) or float additive
    KvRange,  # int32 [B, 2]: first / last+1 unpadded key per batch
    CuSeqQ, CuSeqK,  # int32 [B+1] packed sequence offsets (varlen)
    Seed,  # int64 [1] Philox key (dropout)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, L, S, NUM_M,  # heads, (max) query / key lengths, query blocks per (b, h)
    sm_scale, drop_thresh, drop_scale,  # softmax scale, dropout_rng.keep_threshold(p), 1/(1-p) (0 when p = 1)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KPM: tl.constexpr, KPM_BOOL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // NUM_M
    start_m = (pid % NUM_M) * BLOCK_M
    b = bh // H
    h = bh % H
    q_start, q_len = _seq_bounds(CuSeqQ, b, L, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuSeqK, b, S, IS_VARLEN)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len

    q_base = Q + b64 * stride_qb + h64 * stride_qh + (q_start + start_m).to(tl.int64) * stride_qm
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
    kpm_b = Kpm + b64 * stride_pb
    if DROPOUT:
        seed = tl.load(Seed)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(KvRange, b, k_len, HAS_KPM, BLOCK_N)
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kv_off = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + kv_off * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # int64 only in the scalar tile origin; int32 offsets inside the tile
        mask_ptrs = (mask_bh + (tl.cast(start_m, tl.int64) * stride_mm + kv_off * stride_mn)
                     + (tl.arange(0, BLOCK_M)[:, None] * stride_mm + offs_n[None, :] * stride_mn))
        kpm_ptrs = kpm_b + kv_off * stride_pn + offs_n[None, :] * stride_pn
        s = _masked_scores(s, offs_m[:, None], cols[None, :], q_len, k_len, mask_ptrs, kpm_ptrs,
                           IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_KPM, KPM_BOOL)
        # Online softmax; a row with no visible key so far keeps m = -inf and uses 0 as its offset.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_off = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_off[:, None])
        alpha = tl.exp2(m_i - m_off)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, False), p, 0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * drop_scale
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("inf"))
    o_base = Out + b64 * stride_ob + h64 * stride_oh + (q_start + start_m).to(tl.int64) * stride_om
    tl.store(o_base + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _attn_bwd_dq_kernel(
    Q, K, V, Out, DOut, DQ,  # strided like the forward; DQ laid out like Q's shape, own strides
    Lse, Delta,  # fp32 [B, H, L] / [H, Tq]: forward log-sum-exp; Δ = rowsum(dO ∘ O), written here
    Mask, Kpm, KvRange, CuSeqQ, CuSeqK, Seed,  # as in the forward
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, L, S, NUM_M,
    sm_scale, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KPM: tl.constexpr, KPM_BOOL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // NUM_M
    start_m = (pid % NUM_M) * BLOCK_M
    b = bh // H
    h = bh % H
    q_start, q_len = _seq_bounds(CuSeqQ, b, L, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuSeqK, b, S, IS_VARLEN)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (q_start + start_m).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_M)[:, None]
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < q_len
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm + local * stride_qm + offs_d[None, :],
                mask=tile_ok, other=0.0)
    do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom + local * stride_dom + offs_d[None, :],
                 mask=tile_ok, other=0.0)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + row0 * stride_om + local * stride_om + offs_d[None, :],
                mask=tile_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_stat = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) + offs_m
    tl.store(Delta + row_stat, delta, mask=row_ok)
    lse2 = tl.load(Lse + row_stat, mask=row_ok, other=float("inf")) * LOG2E

    k_base = K + b64 * stride_kb + h64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + h64 * stride_vh + k_start.to(tl.int64) * stride_vn
    mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
    kpm_b = Kpm + b64 * stride_pb
    if DROPOUT:
        seed = tl.load(Seed)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(KvRange, b, k_len, HAS_KPM, BLOCK_N)
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols < k_len)[:, None] & d_ok[None, :]
        kv_off = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + kv_off * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + kv_off * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # int64 only in the scalar tile origin; int32 offsets inside the tile
        mask_ptrs = (mask_bh + (tl.cast(start_m, tl.int64) * stride_mm + kv_off * stride_mn)
                     + (tl.arange(0, BLOCK_M)[:, None] * stride_mm + offs_n[None, :] * stride_mn))
        kpm_ptrs = kpm_b + kv_off * stride_pn + offs_n[None, :] * stride_pn
        s = _masked_scores(s, offs_m[:, None], cols[None, :], q_len, k_len, mask_ptrs, kpm_ptrs,
                           IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_KPM, KPM_BOOL)
        p = tl.exp2(s - lse2[:, None])  # masked entries and empty rows (lse = +inf) give 0
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, False)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqm + local * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV,  # strided like the forward; DK/DV laid out like K's shape, own strides
    Lse, Delta,  # fp32 row statistics from the forward and the dQ kernel
    Mask, Kpm, KvRange, CuSeqQ, CuSeqK, Seed,  # as in the forward
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    H, L, S, NUM_N,  # NUM_N: key blocks per (b, h)
    sm_scale, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KPM: tl.constexpr, KPM_BOOL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Works on transposed tiles: rows are keys (BLOCK_N), columns are queries (BLOCK_M).
    pid = tl.program_id(0)
    bh = pid // NUM_N
    start_n = (pid % NUM_N) * BLOCK_N
    b = bh // H
    h = bh % H
    q_start, q_len = _seq_bounds(CuSeqQ, b, L, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuSeqK, b, S, IS_VARLEN)
    if start_n >= k_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    col0 = (k_start + start_n).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    local = tl.arange(0, BLOCK_N)[:, None]
    d_ok = offs_d < HEAD_DIM
    tile_ok = (offs_n < k_len)[:, None] & d_ok[None, :]

    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + col0 * stride_kn + local * stride_kn + offs_d[None, :],
                mask=tile_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + col0 * stride_vn + local * stride_vn + offs_d[None, :],
                mask=tile_ok, other=0.0)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
    do_base = DOut + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dom
    stat_base = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64)
    mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
    kpm_ptrs = Kpm + b64 * stride_pb + tl.cast(start_n, tl.int64) * stride_pn + local * stride_pn
    if DROPOUT:
        seed = tl.load(Seed)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if IS_CAUSAL:  # queries i >= start_n see this key block
        lo = (start_n // BLOCK_M) * BLOCK_M
    hi = q_len
    if HAS_KPM:  # a key block wholly outside the unpadded span gets zero gradients without a loop
        k_lo = tl.load(KvRange + 2 * b)
        k_hi = tl.load(KvRange + 2 * b + 1)
        hi = tl.where((start_n + BLOCK_N <= k_lo) | (start_n >= k_hi), lo, hi)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q_off = tl.cast(start_m, tl.int64)
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + q_off * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_ok, other=0.0)
        do = tl.load(do_base + q_off * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :],
                     mask=qd_ok, other=0.0)
        lse2 = tl.load(Lse + stat_base + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(Delta + stat_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        mask_ptrs = (mask_bh + (q_off * stride_mm + tl.cast(start_n, tl.int64) * stride_mn)
                     + (offs_m[None, :] * stride_mm + local * stride_mn))
        s_t = _masked_scores(s_t, rows[None, :], offs_n[:, None], q_len, k_len, mask_ptrs, kpm_ptrs,
                             IS_CAUSAL, HAS_MASK, MASK_BOOL, HAS_KPM, KPM_BOOL)
        p_t = tl.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, True)
            dv = tl.dot(tl.where(keep, p_t, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    if DROPOUT:
        dv = dv * drop_scale
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + col0 * stride_dkn + local * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + b64 * stride_dkb + h64 * stride_dkh + col0 * stride_dkn + local * stride_dkn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _dropout_mask_kernel(
    Keep, Seed,  # out: uint8 [B, H, L, S] contiguous (1 = kept); int64 [1] Philox key
    H, L, S, drop_thresh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    q0 = tl.program_id(1) * BLOCK_M
    k0 = tl.program_id(2) * BLOCK_N
    keep = _dropout_keep(tl.load(Seed), bh, q0, k0, drop_thresh, BLOCK_M, BLOCK_N, False)
    rows = q0 + tl.arange(0, BLOCK_M)[:, None]
    cols = k0 + tl.arange(0, BLOCK_N)[None, :]
    offs = bh.to(tl.int64) * L * S + rows.to(tl.int64) * S + cols
    tl.store(Keep + offs, keep.to(tl.uint8), mask=(rows < L) & (cols < S))


# --------------------------------------------------------------------------- launchers


def _arch(t: Tensor) -> Optional[Tuple[int, int]]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


def _smem_limit(t: Tensor) -> Optional[int]:
    """Opt-in shared memory per block of t's GPU (227 KB on H100/H200, ~99 KB on sm_86/89/120)."""
    if not t.is_cuda:
        return None
    return getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", None)


def _config(kernel: str, t: Tensor, head_dim: int, seqlen_q: int, mask: Optional[Tensor],
            dropout: bool) -> AttentionConfig:
    return AttentionConfig.for_launch(kernel, head_dim, seqlen_q, t.dtype, _arch(t), masked=mask is not None,
                                      smem_limit=_smem_limit(t),
                                      mask_elt=0 if mask is None else mask.element_size(), dropout=dropout)


def _grid(num_blocks: int, batch_heads: int) -> Tuple[int]:
    """All (block, b·h) programs on grid axis 0 (limit 2^31-1): no 65535 cap on batch × heads."""
    n = num_blocks * batch_heads
    if n > _MAX_GRID_X:
        raise ValueError(f"attention grid of {n} programs exceeds CUDA's 2^31-1 limit on grid axis 0")
    return (n,)


def _knobs(cfg: AttentionConfig) -> dict:
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_strides(t: Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, head, row) strides of a [B, L, H, D] or packed [T, H, D] tensor (batch stride 0 when packed)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(2), t.stride(1)


def _flags(q: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool,
           varlen: bool, dropout_p: float, head_dim: int) -> dict:
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=bool(is_causal), IS_VARLEN=varlen,
        HAS_MASK=attn_mask is not None, MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.uint8,
        HAS_KPM=key_padding_mask is not None,
        KPM_BOOL=key_padding_mask is not None and key_padding_mask.dtype == torch.uint8,
        DROPOUT=dropout_p > 0.0, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _prepare_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dummy: Tensor):
    """Bool masks viewed as uint8 (no copy); the unpadded key span [lo, hi) per batch; pointer placeholders."""
    mask = None if attn_mask is None else (attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask)
    kpm = key_padding_mask
    kv_range = None
    if kpm is not None:
        padded = kpm if kpm.dtype == torch.bool else torch.isneginf(kpm)
        kpm = kpm.view(torch.uint8) if kpm.dtype == torch.bool else kpm
        S = padded.shape[1]  # > 0: the launchers return early on empty keys
        pos = torch.arange(S, device=padded.device, dtype=torch.int32)
        lo = torch.where(padded, S, pos).amin(1)  # S when every key is padded: an empty range
        hi = torch.where(padded, 0, pos + 1).amax(1)
        kv_range = torch.stack([lo, hi], 1).to(torch.int32).contiguous()
    mask_args = (mask if mask is not None else dummy, *(mask.stride() if mask is not None else (0, 0, 0, 0)))
    kpm_args = (kpm if kpm is not None else dummy, *(kpm.stride() if kpm is not None else (0, 0)))
    return mask, kpm, mask_args, kpm_args, (kv_range if kv_range is not None else dummy)


def _check_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int, S: int):
    if attn_mask is not None and tuple(attn_mask.shape) != (B, H, L, S):
        raise ValueError(f"attention kernel: attn_mask must be a [B, H, L, S] = {[B, H, L, S]} view, "
                         f"got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"attention kernel: key_padding_mask must be [B, S] = {[B, S]}, "
                         f"got {tuple(key_padding_mask.shape)}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, varlen: bool):
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"attention: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention kernel: q, k, v must share one of fp16/bf16/fp32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and D % 8 == 0):
        raise ValueError(f"attention kernel: head dim {D} unsupported "
                         f"(multiples of 8 from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})")


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *,
    attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
    config: Optional[AttentionConfig] = None,
) -> Tuple[Tensor, Tensor]:
    """Run the forward kernel; returns (out like q, contiguous; lse fp32 [B, H, L] or [H, Tq]).

    attn_mask: [B, H, L, S] (broadcast dims with stride 0), bool or float; key_padding_mask: [B, S].
    Packed mode when cu_seqlens_q/k (int32 [B+1]) are given: q [Tq, H, D], k/v [Tk, H, D], no masks.
    seed: int64 [1] tensor, required when dropout_p > 0.  config overrides AttentionConfig.for_launch's choice.
    """
    varlen = cu_seqlens_q is not None
    _check_inputs(q, k, v, varlen)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if varlen:
        H, B, L, S = q.shape[1], cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
        lse = torch.full((H, q.shape[0]), float("inf"), device=q.device, dtype=torch.float32)
        out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
        stride_l = (0, lse.stride(0))
    else:
        B, L, H, _ = q.shape
        S = k.shape[1]
        lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        stride_l = (lse.stride(0), lse.stride(1))
    if varlen and (attn_mask is not None or key_padding_mask is not None):
        raise ValueError("attention kernel: packed (varlen) attention takes no masks")
    _check_masks(attn_mask, key_padding_mask, B, H, L, S)
    if B * H * L == 0:
        return out, lse
    if S == 0:
        return out.zero_(), lse.fill_(float("inf"))
    dummy = q.new_empty(0, dtype=torch.int32)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("attention kernel: dropout_p > 0 needs a seed tensor")
    mask, kpm, mask_args, kpm_args, kv_range = _prepare_masks(attn_mask, key_padding_mask, dummy)
    flags = _flags(q, mask, kpm, is_causal, varlen, dropout_p, D)
    cfg = config or _config("fwd", q, D, L, mask, flags["DROPOUT"])
    num_m = triton.cdiv(L, cfg.BLOCK_M)
    _attn_fwd_kernel[_grid(num_m, B * H)](
        q, k, v, out, lse, mask_args[0], kpm_args[0], kv_range,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy, seed if seed is not None else dummy,
        *_head_strides(q, varlen), *_head_strides(k, varlen), *_head_strides(v, varlen), *_head_strides(out, varlen),
        *stride_l, *mask_args[1:], *kpm_args[1:],
        H, L, S, num_m, scale, keep_threshold(dropout_p), _drop_scale(dropout_p),
        **flags, **_knobs(cfg),
    )
    return out, lse


def _drop_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
    attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0, max_seqlen_k: int = 0,
    is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
    config_dq: Optional[AttentionConfig] = None, config_dkdv: Optional[AttentionConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), contiguous, for the forward's arguments and its (out, lse)."""
    varlen = cu_seqlens_q is not None
    _check_inputs(q, k, v, varlen)
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    alloc = torch.zeros if varlen else torch.empty  # packed rows outside every sequence get zero gradients
    dq = alloc(q.shape, device=q.device, dtype=q.dtype)
    dk = alloc(k.shape, device=k.device, dtype=k.dtype)
    dv = alloc(v.shape, device=v.device, dtype=v.dtype)
    if varlen:
        H, B, L, S = q.shape[1], cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
        stride_l = (0, lse.stride(0))
    else:
        B, L, H, _ = q.shape
        S = k.shape[1]
        stride_l = (lse.stride(0), lse.stride(1))
    _check_masks(attn_mask, key_padding_mask, B, H, L, S)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    dummy = q.new_empty(0, dtype=torch.int32)
    mask, kpm, mask_args, kpm_args, kv_range = _prepare_masks(attn_mask, key_padding_mask, dummy)
    flags = _flags(q, mask, kpm, is_causal, varlen, dropout_p, D)
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    seed = seed if seed is not None else dummy
    common = (*mask_args[1:], *kpm_args[1:])
    tail = (scale, keep_threshold(dropout_p), _drop_scale(dropout_p))

    cfg = config_dq or _config("bwd_dq", q, D, L, mask, flags["DROPOUT"])
    num_m = triton.cdiv(L, cfg.BLOCK_M)
    _attn_bwd_dq_kernel[_grid(num_m, B * H)](
        q, k, v, out, dout, dq, lse, delta, mask_args[0], kpm_args[0], kv_range, cu_q, cu_k, seed,
        *_head_strides(q, varlen), *_head_strides(k, varlen), *_head_strides(v, varlen),
        *_head_strides(out, varlen), *_head_strides(dout, varlen), *_head_strides(dq, varlen),
        *stride_l, *common, H, L, S, num_m, *tail, **flags, **_knobs(cfg),
    )
    cfg = config_dkdv or _config("bwd_dkdv", q, D, L, mask, flags["DROPOUT"])
    num_n = triton.cdiv(S, cfg.BLOCK_N)
    _attn_bwd_dkdv_kernel[_grid(num_n, B * H)](
        q, k, v, dout, dk, dv, lse, delta, mask_args[0], kpm_args[0], kv_range, cu_q, cu_k, seed,
        *_head_strides(q, varlen), *_head_strides(k, varlen), *_head_strides(v, varlen),
        *_head_strides(dout, varlen), *_head_strides(dk, varlen),
        *stride_l, *common, H, L, S, num_n, *tail, **flags, **_knobs(cfg),
    )
    return dq, dk, dv


def dropout_keep_mask(seed: Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float) -> Tensor:
    """The kernels' dropout keep mask (bool [B, H, L, S], True = kept) for an int64 [1] seed tensor.

    Packed sequences use the same draws: sequence b's mask is ``[b, :, :L_b, :S_b]`` of the mask
    built with batch = number of sequences and the max lengths.
    """
    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), device=seed.device, dtype=torch.uint8)
    if keep.numel() == 0:
        return keep.bool()
    block = 32
    grid = (batch * heads, triton.cdiv(seqlen_q, block), triton.cdiv(seqlen_k, block))
    if dropout_p >= 1.0:  # the kernels scale by 1 - p = 0: nothing is kept (dropout_rng)
        return keep.zero_().bool()
    _dropout_mask_kernel[grid](keep, seed, heads, seqlen_q, seqlen_k, keep_threshold(dropout_p), BLOCK_M=block,
                               BLOCK_N=block)
    return keep.bool()
