"""Fused residual-add + LayerNorm in Triton: forward, backward, dropout-mask replay.

Math (per row of N columns, statistics in fp32):
    h = dropout(branch + branch_bias)            keep ~ U[0,1) >= p, survivors scaled by 1/(1-p)
    s = x + h                                    (s = x when there is no branch)
    mean = mean(s);  var = mean((s - mean)^2);  rstd = 1/sqrt(var + eps)
    y = (s - mean) * rstd * weight + bias
Backward, with xhat = (s - mean) * rstd and g = dy * weight:
    ds = rstd * (g - xhat * mean(xhat * g) - mean(g))  (+ d_residual with prenorm)
    dx = ds;  dbranch = ds * keep / (1-p);  dbranch_bias = sum_rows dbranch
    dweight = sum_rows dy * xhat;  dbias = sum_rows dy

Design (after Triton's tutorial 05-layer-norm and flash-attention's
ops/triton/layer_norm.py; neither code is copied):
  * A whole row lives in registers (BLOCK_N = next power of two >= N), so every
    input is read once and every output written once.  Small rows are packed
    ROWS to a program ([ROWS, BLOCK_N] tiles) so each program moves a few KB.
  * The variance is taken from centred values, and the row is first shifted by
    its first element, so a constant row gives exactly xhat = 0 and an all-zero
    row with eps=1e-12 gives y = bias (both finite in fp16).
  * Dropout draws one Philox call per 4 columns of a row (per column, tl.rand, when N is not
    a multiple of 16; _keep_mask): the keep mask is a pure function of (seed, N, row, col),
    regenerated in the backward and by `dropout_keep_mask`; nothing is stored.
  * Post-norm keeps no copy of s: the backward recomputes it from x, branch and
    the seed.  With prenorm s is an output anyway and the backward reads it.
  * Backward, whole rows (N <= 4096; N <= 8192 for 16-bit rows without dropout): a
    persistent grid; each program takes whole rows, accumulates dweight, dbias and
    dbranch_bias over them in fp32 registers and writes one row of partial sums, reduced
    afterwards by one torch sum (deterministic, no atomics).  Above 4096 columns each
    program takes one row and dbranch_bias (when asked for) is a column sum over the
    dbranch (or dx) just written, by _ln_bwd_params_kernel.
  * Backward, two kernels (N > 8192; N > 4096 with dropout or fp32 rows): a row plus its
    accumulators no longer fits in registers, so _ln_bwd_wide_kernel takes one row per
    program, a first pass over column chunks for the two row sums and a second that
    re-reads the row, mostly from L2, for dx and dbranch; _ln_bwd_params_kernel (column
    tiles over all rows, re-reading s or x and branch, dy and dbranch) makes the parameter
    sums.  Which sizes take which path, and why: layer_norm_config.py.
  * Row offsets are int64 (more than 2^31 elements); row indices are int32.
    Inputs may have arbitrary strides over two leading dims ([outer, inner, N]);
    the last dim must be unit-stride (else copied).  Outputs are contiguous.
Compute: with dropout, a quarter of a Philox-4x32-10 call per element (N a multiple of 16;
a whole call otherwise) in the forward and again in the backward.  Bytes moved per path and
static SASS counts: benchmarks/README.md ("Kernel resource figures").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dropout_rng import keep_threshold, kept
from .layer_norm_config import LayerNormBwdConfig, LayerNormFwdConfig

Tensor = torch.Tensor

_MAX_ROWS = 2**31 - 2**16  # row indices are int32 inside the kernels (offsets are int64)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _row_ptrs(PTR, rows, cols, INNER, stride_outer, stride_inner):
    """Pointers to [rows, cols] of a strided [outer, inner, N] tensor: a 64-bit row base plus
    32-bit column offsets (fewer live registers than 64-bit offsets per element)."""
    outer = (rows // INNER).to(tl.int64)
    inner = (rows % INNER).to(tl.int64)
    return (PTR + outer * stride_outer + inner * stride_inner)[:, None] + cols[None, :]


@triton.jit
def _keep_mask(seed, rows, col0, N, dropout_p, drop_thresh, BLOCK: tl.constexpr, GROUP_RNG: tl.constexpr):
    """Dropout keep flags [rows, BLOCK] for columns col0 + [0, BLOCK), col0 % 4 == 0.

    GROUP_RNG: Philox-4x32 with key seed and counter (c // 4, row, 0, 0), column c taking output
    c % 4 (one call per 4 columns), and dropout_rng.kept deciding.  Otherwise tl.rand(seed,
    row * N + c) >= p, one call per element, as before grouping: the integer threshold there
    made ptxas spill in some configs (Triton 3.6 or 3.8), this form in none.  GROUP_RNG is a
    function of N alone (_group_rng: rows of a multiple of 16 columns, which load 4 or more wide
    per thread), so every kernel of a call agrees.  With single columns per thread Triton 3.6
    replicates grouped calls across lanes and spills.
    """
    if GROUP_RNG:
        g = (col0 // 4 + tl.arange(0, BLOCK // 4))[None, :, None]
        r = rows[:, None, None]
        c0 = g + r * 0
        r0, r1, r2, r3 = tl.philox(seed, c0, r + g * 0, c0 * 0, c0 * 0)
        j = tl.arange(0, 4)[None, None, :]
        word = tl.where(j < 2, tl.where(j == 0, r0, r1), tl.where(j == 2, r2, r3))
        keep = tl.reshape(kept(word, drop_thresh), [rows.shape[0], BLOCK])
    else:
        keep = tl.rand(seed, rows.to(tl.int64)[:, None] * N + (col0 + tl.arange(0, BLOCK))[None, :]) >= dropout_p
    return keep


@triton.jit
def _residual_sum(X, BRANCH, BRANCH_BIAS, rows, cols, mask, keep, N, INNER, stride_x_outer, stride_x_inner,
                  stride_br_outer, stride_br_inner, dropout_scale, HAS_BRANCH: tl.constexpr,
                  HAS_BRANCH_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """s = x + dropout(branch + branch_bias) in fp32 on a [rows, cols] tile, 0 in columns >= N."""
    s = tl.load(_row_ptrs(X, rows, cols, INNER, stride_x_outer, stride_x_inner), mask=mask, other=0.0)
    s = s.to(tl.float32)
    if HAS_BRANCH:
        h = tl.load(_row_ptrs(BRANCH, rows, cols, INNER, stride_br_outer, stride_br_inner), mask=mask, other=0.0)
        h = h.to(tl.float32)
        if HAS_BRANCH_BIAS:
            h += tl.load(BRANCH_BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            h = tl.where(keep, h * dropout_scale, 0.0)
        s += h  # 0 outside mask for rows < M (masked loads); rows >= M are never stored
    return s


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _ln_fwd_kernel(
    X,  # [outer, inner, N] input rows (strided), unit-stride columns
    BRANCH,  # same shape as X: the sub-layer output added to x (if HAS_BRANCH)
    BRANCH_BIAS,  # [N] bias of the sub-layer's last Linear (if HAS_BRANCH_BIAS)
    W,  # [N] LayerNorm weight (if HAS_W)
    B,  # [N] LayerNorm bias (if HAS_B)
    SEED,  # [1] int64 dropout seed (if HAS_DROPOUT)
    Y,  # [M, N] contiguous output, x's dtype
    RESID,  # [M, N] contiguous un-normalised sum s (if STORE_RESID)
    MEAN,  # [M] fp32 row means
    RSTD,  # [M] fp32 row 1/std
    M,  # rows
    N,  # columns
    INNER,  # size of the inner row dim: row r is (r // INNER, r % INNER)
    stride_x_outer,
    stride_x_inner,
    stride_br_outer,
    stride_br_inner,
    eps,
    dropout_p,
    drop_thresh,  # dropout_rng.keep_threshold(p)
    dropout_scale,  # 1 / (1 - p), 0 when p == 1
    HAS_BRANCH: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_RESID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_RNG: tl.constexpr,  # dropout draws per 4 columns (_keep_mask)
):
    # One [ROWS, BLOCK_N] tile of whole rows per program.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    keep = mask
    if HAS_DROPOUT:
        keep = _keep_mask(tl.load(SEED), rows, 0, N, dropout_p, drop_thresh, BLOCK_N, GROUP_RNG)
    s = _residual_sum(X, BRANCH, BRANCH_BIAS, rows, cols, mask, keep, N, INNER, stride_x_outer, stride_x_inner,
                      stride_br_outer, stride_br_inner, dropout_scale, HAS_BRANCH, HAS_BRANCH_BIAS, HAS_DROPOUT)
    if STORE_RESID:
        # The backward reads s back from RESID: normalise s as stored there (rounded to its dtype), so that its
        # xhat = (s - mean) * rstd is the forward's (with fp16 rows of one column, the fp32 sum against the
        # rounded one had made xhat ~0.3 instead of 0, and dx wrong by rstd times that).
        s = s.to(RESID.dtype.element_ty)
        tl.store((RESID + rows64 * N)[:, None] + cols[None, :], s, mask=mask)
        s = s.to(tl.float32)

    # Shift by the row's first element, then two-pass centred statistics.
    shift = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)
    v = tl.where(mask, s - shift[:, None], 0.0)
    mean_v = tl.sum(v, axis=1) / N
    d = tl.where(mask, v - mean_v[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
    tl.store(MEAN + rows, shift + mean_v, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)

    y = d * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store((Y + rows64 * N)[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_tile(
    X, BRANCH, BRANCH_BIAS, RESID, W, MEAN, RSTD, DY, seed, rows, col0, cols, row_ok, mask,
    N, INNER, stride_x_outer, stride_x_inner, stride_br_outer, stride_br_inner, stride_dy_outer, stride_dy_inner,
    dropout_p, drop_thresh, dropout_scale,
    HAS_BRANCH: tl.constexpr, HAS_BRANCH_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_W: tl.constexpr,
    RECOMPUTE: tl.constexpr, GROUP_RNG: tl.constexpr,
):
    """(xhat, dy, g = dy * weight, keep, rstd) on a [rows, cols = col0 + arange] tile; s recomputed (RECOMPUTE)
    exactly as in the forward, or read back from RESID.  keep is drawn here only to recompute
    s; otherwise it is `mask` and the caller draws it when it needs it (_late_keep)."""
    keep = mask
    if HAS_DROPOUT and RECOMPUTE:
        keep = _keep_mask(seed, rows, col0, N, dropout_p, drop_thresh, cols.shape[0], GROUP_RNG)
    if RECOMPUTE:
        s = _residual_sum(X, BRANCH, BRANCH_BIAS, rows, cols, mask, keep, N, INNER, stride_x_outer,
                          stride_x_inner, stride_br_outer, stride_br_inner, dropout_scale, HAS_BRANCH,
                          HAS_BRANCH_BIAS, HAS_DROPOUT)
    else:
        s = tl.load((RESID + rows.to(tl.int64) * N)[:, None] + cols[None, :], mask=mask, other=0.0)
        s = s.to(tl.float32)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    # Outside mask xhat is finite but not 0: dy = g = 0 there, so no sum sees it.
    xhat = (s - mean[:, None]) * rstd[:, None]
    dy, g = _load_dy(DY, W, rows, cols, mask, N, INNER, stride_dy_outer, stride_dy_inner, HAS_W)
    return xhat, dy, g, keep, rstd


@triton.jit
def _load_dy(DY, W, rows, cols, mask, N, INNER, stride_dy_outer, stride_dy_inner, HAS_W: tl.constexpr):
    """(dy, g = dy * weight) in fp32 on a [rows, cols] tile."""
    dy = tl.load(_row_ptrs(DY, rows, cols, INNER, stride_dy_outer, stride_dy_inner), mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    if HAS_W:
        g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    else:
        g = dy
    return dy, g


@triton.jit
def _late_keep(keep, seed, rows, col0, N, dropout_p, drop_thresh, BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               RECOMPUTE: tl.constexpr, GROUP_RNG: tl.constexpr):
    """The keep mask for dbranch: drawn after the row sums when _ln_bwd_tile did not need it, so
    it is not live (in registers) across them."""
    if HAS_DROPOUT and not RECOMPUTE:
        keep = _keep_mask(seed, rows, col0, N, dropout_p, drop_thresh, BLOCK, GROUP_RNG)
    return keep


@triton.jit
def _ln_bwd_store(DX, DBRANCH, DRESID, ds, keep, rows, cols, mask, N, INNER, stride_dres_outer, stride_dres_inner,
                  dropout_scale, HAS_DROPOUT: tl.constexpr, HAS_DRESID: tl.constexpr,
                  STORE_DBRANCH: tl.constexpr):
    """Store dx = ds (+ d_residual) and dbranch = dx * keep / (1-p); return dbranch in fp32."""
    if HAS_DRESID:
        dres = tl.load(_row_ptrs(DRESID, rows, cols, INNER, stride_dres_outer, stride_dres_inner), mask=mask,
                       other=0.0)
        ds += dres.to(tl.float32)
    rows64 = rows.to(tl.int64)
    tl.store((DX + rows64 * N)[:, None] + cols[None, :], ds.to(DX.dtype.element_ty), mask=mask)
    dh = ds
    if HAS_DROPOUT:
        dh = tl.where(keep, ds * dropout_scale, 0.0)
    if STORE_DBRANCH:
        tl.store((DBRANCH + rows64 * N)[:, None] + cols[None, :], dh.to(DBRANCH.dtype.element_ty), mask=mask)
    return dh


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _ln_bwd_kernel(
    X,  # [outer, inner, N] forward input x (if RECOMPUTE)
    BRANCH,  # forward branch, same shape (if RECOMPUTE and HAS_BRANCH)
    BRANCH_BIAS,  # [N] (if RECOMPUTE and HAS_BRANCH_BIAS)
    RESID,  # [M, N] contiguous s saved by the forward (if not RECOMPUTE)
    W,  # [N] LayerNorm weight (if HAS_W)
    SEED,  # [1] int64 dropout seed of the forward (if HAS_DROPOUT)
    MEAN,  # [M] fp32
    RSTD,  # [M] fp32
    DY,  # [outer, inner, N] gradient of y
    DRESID,  # [outer, inner, N] gradient of the prenorm residual output (if HAS_DRESID)
    DX,  # [M, N] contiguous gradient of x (= ds), x's dtype
    DBRANCH,  # [M, N] contiguous gradient of branch (if STORE_DBRANCH)
    DW_PART,  # [programs, N] fp32 partial sums of dweight (if COMPUTE_DW)
    DB_PART,  # [programs, N] fp32 partial sums of dbias (if COMPUTE_DB)
    DBB_PART,  # [programs, N] fp32 partial sums of dbranch_bias (if COMPUTE_DBB)
    M,
    N,
    INNER,
    stride_x_outer,
    stride_x_inner,
    stride_br_outer,
    stride_br_inner,
    stride_dy_outer,
    stride_dy_inner,
    stride_dres_outer,
    stride_dres_inner,
    dropout_p,
    drop_thresh,
    dropout_scale,
    tiles_per_program,
    HAS_BRANCH: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_W: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    HAS_DRESID: tl.constexpr,
    STORE_DBRANCH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    COMPUTE_DBB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_RNG: tl.constexpr,
):
    """Whole rows in registers (N <= 4096; N <= 8192 for 16-bit rows without dropout): dx,
    dbranch and per-program parameter-gradient sums."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    dbb = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    # Persistent loop: program pid takes row tiles pid, pid + programs, ...
    for i in range(0, tiles_per_program):
        rows = (pid + i * tl.num_programs(0)) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < N)[None, :]
        xhat, dy, g, keep, rstd = _ln_bwd_tile(
            X, BRANCH, BRANCH_BIAS, RESID, W, MEAN, RSTD, DY, seed, rows, 0, cols, row_ok, mask, N, INNER,
            stride_x_outer, stride_x_inner, stride_br_outer, stride_br_inner, stride_dy_outer, stride_dy_inner,
            dropout_p, drop_thresh, dropout_scale, HAS_BRANCH, HAS_BRANCH_BIAS, HAS_DROPOUT, HAS_W, RECOMPUTE,
            GROUP_RNG)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        keep = _late_keep(keep, seed, rows, 0, N, dropout_p, drop_thresh, BLOCK_N, HAS_DROPOUT, RECOMPUTE, GROUP_RNG)
        dh = _ln_bwd_store(DX, DBRANCH, DRESID, ds, keep, rows, cols, mask, N, INNER, stride_dres_outer,
                           stride_dres_inner, dropout_scale, HAS_DROPOUT, HAS_DRESID, STORE_DBRANCH)
        if COMPUTE_DBB:
            dbb += dh

    if COMPUTE_DW:
        _store_partial(DW_PART, pid, dw, cols, N, ROWS)
    if COMPUTE_DB:
        _store_partial(DB_PART, pid, db, cols, N, ROWS)
    if COMPUTE_DBB:
        _store_partial(DBB_PART, pid, dbb, cols, N, ROWS)


@triton.jit
def _store_partial(PART, pid, acc, cols, N, ROWS: tl.constexpr):
    """Row pid of a [programs, N] partial-sum buffer: the column sums of acc [ROWS, BLOCK_N]."""
    if ROWS == 1:  # stored as it is: no sum over rows, nor the layout change (through shared memory) it needs
        tl.store(PART + pid * N + cols[None, :], acc, mask=(cols < N)[None, :])
    else:
        tl.store(PART + pid * N + cols, tl.sum(acc, axis=0), mask=cols < N)


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _ln_bwd_wide_kernel(
    X, BRANCH, BRANCH_BIAS, RESID, W, SEED, MEAN, RSTD, DY, DRESID, DX, DBRANCH,  # as in _ln_bwd_kernel
    M,
    N,
    INNER,
    stride_x_outer,
    stride_x_inner,
    stride_br_outer,
    stride_br_inner,
    stride_dy_outer,
    stride_dy_inner,
    stride_dres_outer,
    stride_dres_inner,
    dropout_p,
    drop_thresh,
    dropout_scale,
    HAS_BRANCH: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_W: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    HAS_DRESID: tl.constexpr,
    STORE_DBRANCH: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_RNG: tl.constexpr,
):
    """Rows too wide for registers (N > 8192; N > 4096 with dropout or fp32): one row per program in
    BLOCK_C-column chunks, a first pass for the two row sums and a second (re-reading the row,
    from L2) for dx and dbranch.  Parameter gradients come from _ln_bwd_params_kernel."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rows < M
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    c1 = tl.zeros([1], dtype=tl.float32)
    c2 = tl.zeros([1], dtype=tl.float32)
    for start in range(0, N, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < N)[None, :]
        xhat, dy, g, keep, rstd = _ln_bwd_tile(
            X, BRANCH, BRANCH_BIAS, RESID, W, MEAN, RSTD, DY, seed, rows, start, cols, row_ok, mask, N, INNER,
            stride_x_outer, stride_x_inner, stride_br_outer, stride_br_inner, stride_dy_outer, stride_dy_inner,
            dropout_p, drop_thresh, dropout_scale, HAS_BRANCH, HAS_BRANCH_BIAS, HAS_DROPOUT, HAS_W, RECOMPUTE,
            GROUP_RNG)
        c1 += tl.sum(xhat * g, axis=1)
        c2 += tl.sum(g, axis=1)
    c1 = c1 / N
    c2 = c2 / N
    for start in range(0, N, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < N)[None, :]
        xhat, dy, g, keep, rstd = _ln_bwd_tile(
            X, BRANCH, BRANCH_BIAS, RESID, W, MEAN, RSTD, DY, seed, rows, start, cols, row_ok, mask, N, INNER,
            stride_x_outer, stride_x_inner, stride_br_outer, stride_br_inner, stride_dy_outer, stride_dy_inner,
            dropout_p, drop_thresh, dropout_scale, HAS_BRANCH, HAS_BRANCH_BIAS, HAS_DROPOUT, HAS_W, RECOMPUTE,
            GROUP_RNG)
        ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        keep = _late_keep(keep, seed, rows, start, N, dropout_p, drop_thresh, BLOCK_C, HAS_DROPOUT, RECOMPUTE,
                          GROUP_RNG)
        _ln_bwd_store(DX, DBRANCH, DRESID, ds, keep, rows, cols, mask, N, INNER, stride_dres_outer,
                      stride_dres_inner, dropout_scale, HAS_DROPOUT, HAS_DRESID, STORE_DBRANCH)


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _ln_bwd_params_kernel(
    X, BRANCH, BRANCH_BIAS, RESID, SEED, MEAN, RSTD, DY,  # as in _ln_bwd_kernel
    DH,  # [M, N] contiguous dbranch (dx when they are one tensor), written by _ln_bwd_wide_kernel
    DW_PART, DB_PART, DBB_PART,  # [row programs, N] fp32 partial sums
    M,
    N,
    INNER,
    stride_x_outer,
    stride_x_inner,
    stride_br_outer,
    stride_br_inner,
    stride_dy_outer,
    stride_dy_inner,
    dropout_p,
    drop_thresh,
    dropout_scale,
    tiles_per_program,
    HAS_BRANCH: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    COMPUTE_DBB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_RNG: tl.constexpr,
):
    """Column-tiled sums over rows: dweight = sum dy * xhat, dbias = sum dy, dbranch_bias =
    sum dbranch (all after the wide kernel; dbranch_bias alone after _ln_bwd_kernel at
    N > 4096).  Grid (column tiles, row programs); re-reads s (or x, branch) and dy, which
    is the price of rows that do not fit in registers."""
    pid_r = tl.program_id(1)
    col0 = tl.program_id(0) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dw = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    dbb = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        rows = (pid_r + i * tl.num_programs(1)) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < N)[None, :]
        if COMPUTE_DW or COMPUTE_DB:
            xhat, dy, g, keep, rstd = _ln_bwd_tile(
                X, BRANCH, BRANCH_BIAS, RESID, X, MEAN, RSTD, DY, seed, rows, col0, cols, row_ok, mask, N, INNER,
                stride_x_outer, stride_x_inner, stride_br_outer, stride_br_inner, stride_dy_outer,
                stride_dy_inner, dropout_p, drop_thresh, dropout_scale, HAS_BRANCH, HAS_BRANCH_BIAS, HAS_DROPOUT, False,
                RECOMPUTE, GROUP_RNG)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
        if COMPUTE_DBB:
            dh = tl.load((DH + rows.to(tl.int64) * N)[:, None] + cols[None, :], mask=mask, other=0.0)
            dbb += dh.to(tl.float32)
    part = pid_r * N + cols
    if COMPUTE_DW:
        tl.store(DW_PART + part, tl.sum(dw, axis=0), mask=cols < N)
    if COMPUTE_DB:
        tl.store(DB_PART + part, tl.sum(db, axis=0), mask=cols < N)
    if COMPUTE_DBB:
        tl.store(DBB_PART + part, tl.sum(dbb, axis=0), mask=cols < N)


@triton.jit(do_not_specialize=["drop_thresh"])  # its value changes with p
def _dropout_keep_kernel(
    SEED,  # [1] int64
    KEEP,  # [M, N] contiguous bool output
    M,
    N,
    dropout_p,
    drop_thresh,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP_RNG: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    keep = _keep_mask(tl.load(SEED), rows, 0, N, dropout_p, drop_thresh, BLOCK_N, GROUP_RNG)
    tl.store((KEEP + rows.to(tl.int64) * N)[:, None] + cols[None, :], keep, mask=mask)


# --------------------------------------------------------------------------- launchers


def _group_rng(n: int) -> bool:
    """Dropout draws per 4 columns (_keep_mask) where rows load 4+ wide: n a multiple of 16."""
    return n % 16 == 0


def _rows3d(t: Tensor) -> Tensor:
    """View t [..., N] as [outer, inner, N] with unit-stride columns (copy only if impossible)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    n = t.shape[-1]
    if t.dim() == 1:
        return t.view(1, 1, n)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    return t.reshape(-1, t.shape[-2], n)


def _strides(t3: Tensor) -> Tuple[int, int]:
    return t3.stride(0), t3.stride(1)


def _check_row_input(name: str, t: Tensor, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but x has shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_vector(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != x.shape[-1]:
        raise ValueError(f"{name} must have shape ({x.shape[-1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read [N] vectors densely: a strided or expanded (stride 0) one is copied first."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _num_programs(device: torch.device, tiles: int, programs_per_sm: int) -> int:
    # The interpreter runs programs one after another: a few suffice on CPU.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(tiles, sms * programs_per_sm))


def residual_layer_norm_fwd(
    x: Tensor,
    branch: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    branch_bias: Optional[Tensor],
    eps: float,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    store_residual: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """y = LayerNorm(x + dropout(branch + branch_bias)) * weight + bias over the last dim.

    x, branch: [..., N] (any strides); weight, bias, branch_bias: [N] or None.
    seed: [1] int64 tensor on x's device, required when dropout_p > 0 and a branch is given.
    Returns (y, s or None, mean, rstd): y and s contiguous in x's dtype, mean/rstd fp32 [M].
    """
    n = x.shape[-1]
    f = LayerNormFwdConfig.for_hidden(n)
    if branch is not None:
        _check_row_input("branch", branch, x)
    for name, t in (("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        _check_vector(name, t, x)
    weight, bias, branch_bias = (_unit_stride(t) for t in (weight, bias, branch_bias))
    has_dropout = branch is not None and dropout_p > 0.0
    if has_dropout and (seed is None or seed.dtype != torch.int64 or seed.device != x.device):
        raise ValueError("dropout needs a seed: an int64 tensor of shape [1] on x's device")
    x3 = _rows3d(x)
    br3 = _rows3d(branch) if branch is not None else x3
    m = x3.shape[0] * x3.shape[1]
    if m >= _MAX_ROWS:
        raise ValueError(f"{m} rows: the kernels index rows with int32 and take fewer than {_MAX_ROWS}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    resid = torch.empty(x.shape, dtype=x.dtype, device=x.device) if store_residual else None
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if m == 0:
        return y, resid, mean, rstd
    grid = (triton.cdiv(m, f.ROWS),)
    _ln_fwd_kernel[grid](
        x3, br3, branch_bias if branch_bias is not None else x3,
        weight if weight is not None else x3, bias if bias is not None else x3,
        seed if has_dropout else x3,
        y, resid if resid is not None else y, mean, rstd,
        m, n, x3.shape[1], *_strides(x3), *_strides(br3),
        eps, dropout_p, keep_threshold(dropout_p), _dropout_scale(dropout_p),
        HAS_BRANCH=branch is not None, HAS_BRANCH_BIAS=branch is not None and branch_bias is not None,
        HAS_DROPOUT=has_dropout, HAS_W=weight is not None, HAS_B=bias is not None,
        STORE_RESID=store_residual, BLOCK_N=f.BLOCK_N, ROWS=f.ROWS, GROUP_RNG=_group_rng(n),
        num_warps=f.num_warps, num_stages=f.num_stages,
    )
    return y, resid, mean, rstd


def residual_layer_norm_bwd(
    dy: Tensor,
    dresid: Optional[Tensor],
    x: Optional[Tensor],
    branch: Optional[Tensor],
    resid: Optional[Tensor],
    weight: Optional[Tensor],
    branch_bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    *,
    has_branch: bool,
    branch_dtype: Optional[torch.dtype] = None,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    need_dweight: bool = True,
    need_dbias: bool = False,
    bias_dtype: Optional[torch.dtype] = None,
    need_dbranch_bias: bool = False,
    branch_bias_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of residual_layer_norm_fwd.

    Pass resid (the forward's s) to read it back, else x (and branch, branch_bias,
    seed) to recompute s.  dresid: gradient of the prenorm residual output or None.
    Returns (dx, dbranch, dweight, dbias, dbranch_bias); dbranch is None when it
    equals dx (no dropout, same dtype) or there is no branch; unrequested
    parameter gradients are None.
    """
    n = dy.shape[-1]
    weight, branch_bias = _unit_stride(weight), _unit_stride(branch_bias)
    has_dropout = has_branch and dropout_p > 0.0
    recompute = resid is None
    ref = resid if resid is not None else x
    if ref is None:
        raise ValueError("the backward needs either the saved residual or x")
    loaded = (dy, ref, dresid, branch if recompute else None)
    b = LayerNormBwdConfig.for_hidden(n, dropout=has_dropout,
                                      element_size=max(t.element_size() for t in loaded if t is not None))
    branch_dtype = branch_dtype or (branch.dtype if branch is not None else ref.dtype)
    store_dbranch = has_branch and (has_dropout or branch_dtype != ref.dtype)
    need_dweight = need_dweight and weight is not None
    need_dbranch_bias = need_dbranch_bias and has_branch
    dy3 = _rows3d(dy)
    x3 = _rows3d(x) if recompute else dy3
    br3 = _rows3d(branch) if (recompute and has_branch) else dy3
    dres3 = _rows3d(dresid) if dresid is not None else dy3
    res2 = resid.reshape(-1, n) if resid is not None else dy3
    m = dy3.shape[0] * dy3.shape[1]
    dx = torch.empty(dy.shape, dtype=ref.dtype, device=dy.device)
    dbranch = torch.empty(dy.shape, dtype=branch_dtype, device=dy.device) if store_dbranch else None

    common = dict(HAS_BRANCH=has_branch, HAS_BRANCH_BIAS=has_branch and branch_bias is not None,
                  HAS_DROPOUT=has_dropout, RECOMPUTE=recompute, GROUP_RNG=_group_rng(n))
    pointers = (x3, br3, branch_bias if (recompute and branch_bias is not None) else dy3, res2)
    seed_arg = seed if has_dropout else dy3
    # Which parameter sums the whole-row kernel keeps in registers and which the column-tiled
    # _ln_bwd_params_kernel makes (all of them after the wide kernel, dbranch_bias alone after
    # a whole-row kernel too tight in registers for a third accumulator).
    needs = dict(COMPUTE_DW=need_dweight, COMPUTE_DB=need_dbias, COMPUTE_DBB=need_dbranch_bias)
    in_rows = {k: v and not b.wide and not (k == "COMPUTE_DBB" and b.dbb_pass) for k, v in needs.items()}
    in_cols = {k: v and not in_rows[k] for k, v in needs.items()}
    if not b.wide:
        tiles = triton.cdiv(m, b.ROWS)
        programs = _num_programs(dy.device, tiles, b.programs_per_sm)
    if any(in_cols.values()):
        p = b.params
        tiles_p = triton.cdiv(m, p.ROWS)
        col_tiles = triton.cdiv(n, p.BLOCK_C)
        programs_p = max(1, min(tiles_p, _num_programs(dy.device, tiles_p, p.programs_per_sm) // col_tiles))
    dw_part, db_part, dbb_part = (
        torch.empty((programs if in_rows[k] else programs_p, n), dtype=torch.float32, device=dy.device)
        if needs[k] else None
        for k in ("COMPUTE_DW", "COMPUTE_DB", "COMPUTE_DBB")
    )
    parts = tuple(t if t is not None else mean for t in (dw_part, db_part, dbb_part))
    if m > 0 and not b.wide:
        _ln_bwd_kernel[(programs,)](
            *pointers, weight if weight is not None else dy3, seed_arg, mean, rstd, dy3, dres3,
            dx, dbranch if dbranch is not None else dx, *parts,
            m, n, dy3.shape[1], *_strides(x3), *_strides(br3), *_strides(dy3), *_strides(dres3),
            dropout_p, keep_threshold(dropout_p), _dropout_scale(dropout_p), triton.cdiv(tiles, programs),
            HAS_W=weight is not None, HAS_DRESID=dresid is not None, STORE_DBRANCH=store_dbranch, **common,
            **in_rows, BLOCK_N=b.BLOCK_N, ROWS=b.ROWS, num_warps=b.num_warps, num_stages=b.num_stages,
        )
    elif m > 0:
        _ln_bwd_wide_kernel[(m,)](
            *pointers, weight if weight is not None else dy3, seed_arg, mean, rstd, dy3, dres3,
            dx, dbranch if dbranch is not None else dx,
            m, n, dy3.shape[1], *_strides(x3), *_strides(br3), *_strides(dy3), *_strides(dres3),
            dropout_p, keep_threshold(dropout_p), _dropout_scale(dropout_p),
            HAS_W=weight is not None, HAS_DRESID=dresid is not None, STORE_DBRANCH=store_dbranch, **common,
            BLOCK_C=b.BLOCK_C, num_warps=b.num_warps, num_stages=b.num_stages,
        )
    if m > 0 and any(in_cols.values()):
        _ln_bwd_params_kernel[(col_tiles, programs_p)](
            *pointers, seed_arg, mean, rstd, dy3, dbranch if dbranch is not None else dx, *parts,
            m, n, dy3.shape[1], *_strides(x3), *_strides(br3), *_strides(dy3),
            dropout_p, keep_threshold(dropout_p), _dropout_scale(dropout_p), triton.cdiv(tiles_p, programs_p),
            **common, **in_cols,
            BLOCK_C=p.BLOCK_C, ROWS=p.ROWS, num_warps=p.num_warps, num_stages=p.num_stages,
        )

    def reduce(partial: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
        """The one deterministic reduction of the per-program partial sums."""
        if partial is None:
            return None
        return (partial.sum(0) if m > 0 else torch.zeros(n, device=dy.device)).to(dtype or torch.float32)

    return (
        dx,
        dbranch,
        reduce(dw_part, weight.dtype if weight is not None else None),
        reduce(db_part, bias_dtype),
        reduce(dbb_part, branch_bias_dtype),
    )


def dropout_keep_mask(seed: Tensor, shape: Tuple[int, ...], dropout_p: float) -> Tensor:
    """The boolean keep mask (True = kept) the kernels draw for ``seed`` over rows of ``shape`` [..., N]."""
    n = shape[-1]
    f = LayerNormFwdConfig.for_hidden(n)
    keep = torch.empty(shape, dtype=torch.bool, device=seed.device)
    m = keep.numel() // n
    if m > 0 and dropout_p >= 1.0:  # the kernels scale by 1 - p = 0: nothing is kept (dropout_rng)
        keep.zero_()
    elif m > 0:
        _dropout_keep_kernel[(triton.cdiv(m, f.ROWS),)](
            seed, keep, m, n, dropout_p, keep_threshold(dropout_p), BLOCK_N=f.BLOCK_N, ROWS=f.ROWS,
            GROUP_RNG=_group_rng(n),
            num_warps=f.num_warps,
        )
    return keep
