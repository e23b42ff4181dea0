"""Row gather for padding removal and restoration, in Triton.

    out[r, :] = src[idx[r], :]   if idx[r] >= 0
    out[r, :] = 0                otherwise

Removing padding is a gather with idx = positions of the real tokens in the
flattened [B*L] layout; restoring it is the same kernel with the inverse map
(packed row of each position, -1 at padding), so zeros are written in the same
single pass (no separate fill).  Each is the other's backward.
Row offsets are int64; the last dim must be unit-stride (rows may have any
stride).  Launch policy: padding_config.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .padding_config import GatherConfig

Tensor = torch.Tensor


@triton.jit
def _gather_rows_kernel(
    src,  # *T [n_src, n_cols], row stride src_stride, unit column stride
    idx,  # *int [n_out]: source row of each output row, -1 = write zeros
    out,  # *T [n_out, n_cols], contiguous
    n_cols,
    src_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    s = tl.load(idx + row).to(tl.int64)
    vals = tl.load(src + s * src_stride + cols, mask=in_row & (s >= 0), other=0.0)
    tl.store(out + row * n_cols + cols, vals, mask=in_row)


def gather_rows(src: Tensor, idx: Tensor) -> Tensor:
    """out [len(idx), *src.shape[1:]] with out[r] = src[idx[r]] (zeros where idx[r] < 0)."""
    if src.dim() < 1 or idx.dim() != 1:
        raise ValueError(f"gather_rows expects src [n, ...] and idx [m], got {tuple(src.shape)}, {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"gather_rows index must be int32 or int64, got {idx.dtype}")
    if src.device != idx.device:
        raise ValueError(f"src on {src.device} but idx on {idx.device}")
    n_cols = math.prod(src.shape[1:])
    rows = src.reshape(src.shape[0], n_cols)  # not (n, -1): a batch of padding only has n = 0 rows
    if rows.numel() and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((idx.shape[0], n_cols), dtype=src.dtype, device=src.device)
    if out.numel():
        cfg = GatherConfig.for_rows(n_cols, src.element_size())
        grid = (idx.shape[0], triton.cdiv(n_cols, cfg.BLOCK))
        _gather_rows_kernel[grid](rows, idx, out, n_cols, rows.stride(0), BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)
    return out.view(idx.shape[0], *src.shape[1:])
