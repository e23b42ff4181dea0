"""Padding removal: gather the real tokens of a padded batch once, scatter them back once.

``padding_info(key_padding_mask)`` computes the index maps for a batch (one host
sync: the per-sequence lengths, which fix the packed size and the attention
grid); ``unpad`` and ``pad`` move the rows.  Both directions run one Triton gather
kernel (zeros written at padding in the same pass) and are each other's backward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import register_op, resolve, triton_check
from ._common import compiling, needs_grad

Tensor = torch.Tensor


class Padding(NamedTuple):
    """Index maps between a padded [B, L] layout and the packed real tokens."""

    indices: Tensor  # int64 [T]: flattened position (b * L + l) of each real token
    inverse: Tensor  # int64 [B * L]: packed row of each position, -1 at padding
    cu_seqlens: Tensor  # int32 [B + 1]: sequence b is packed rows cu[b]:cu[b+1]
    max_seqlen: int
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]

    @property
    def padding_ratio(self) -> float:
        n = self.batch * self.seqlen
        return 1.0 - self.total / n if n else 0.0


def padding_info(key_padding_mask: Tensor) -> Padding:
    """Index maps for a bool key padding mask [B, L] (True = padding)."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise TypeError(
            f"padding removal needs a bool key padding mask [B, L], got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )
    B, L = key_padding_mask.shape
    keep = ~key_padding_mask
    lengths = keep.sum(dim=1, dtype=torch.int32)
    lengths_host = lengths.cpu()  # the one host sync per batch
    total = int(lengths_host.sum())
    max_seqlen = int(lengths_host.max()) if B else 0
    indices = torch.nonzero_static(keep.flatten(), size=total).flatten()
    inverse = torch.full((B * L,), -1, dtype=torch.int64, device=keep.device)
    inverse[indices] = torch.arange(total, device=keep.device)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return Padding(indices, inverse, cu_seqlens, max_seqlen, B, L)


def _triton_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    return triton_check(device, dtype)


register_op("padding", {"triton": _triton_available}, auto={"cuda": ("triton",)})


def _gather(src: Tensor, idx: Tensor, bwd_idx: Tensor) -> Tensor:
    """out[r] = src[idx[r]] (zeros where idx[r] < 0); bwd_idx is the inverse map, for the backward."""
    from ..triton_kernels.padding import gather_rows

    return gather_rows(src, idx)


_gather_op = torch.library.custom_op("fastenc::gather_rows", _gather, mutates_args=())


@_gather_op.register_fake
def _gather_fake(src, idx, bwd_idx):
    return src.new_empty((idx.shape[0], *src.shape[1:]))


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, idx, bwd_idx):
        ctx.save_for_backward(idx, bwd_idx)
        return (_gather_op if compiling() else _gather)(src, idx, bwd_idx)

    @staticmethod
    def backward(ctx, grad):
        idx, bwd_idx = ctx.saved_tensors
        return _Gather.apply(grad.contiguous(), bwd_idx, idx), None, None


def _gather_rows(src: Tensor, idx: Tensor, bwd_idx: Tensor) -> Tensor:
    if needs_grad(src):
        return _Gather.apply(src, idx, bwd_idx)
    return (_gather_op if compiling() else _gather)(src, idx, bwd_idx)


def _check(x: Tensor, info: Padding, rows: int, what: str) -> None:
    if x.shape[0] != rows:
        raise ValueError(f"{what}: expected {rows} rows, got tensor of shape {tuple(x.shape)}")
    if x.device != info.indices.device:
        raise ValueError(f"{what}: tensor on {x.device}, padding info on {info.indices.device}")


def unpad(x: Tensor, info: Padding, *, backend: Optional[str] = None) -> Tensor:
    """[B, L, ...] -> [T, ...]: the real tokens, in batch-major order."""
    if x.shape[:2] != (info.batch, info.seqlen):
        raise ValueError(f"unpad: expected [B, L, ...] = [{info.batch}, {info.seqlen}, ...], got {tuple(x.shape)}")
    flat = x.reshape(info.batch * info.seqlen, *x.shape[2:])
    _check(flat, info, info.batch * info.seqlen, "unpad")
    if resolve("padding", backend, x.device, x.dtype) == "reference":
        return flat.index_select(0, info.indices)
    return _gather_rows(flat, info.indices, info.inverse)


def pad(packed: Tensor, info: Padding, *, backend: Optional[str] = None) -> Tensor:
    """[T, ...] -> [B, L, ...] with zeros at the padding positions."""
    _check(packed, info, info.total, "pad")
    if resolve("padding", backend, packed.device, packed.dtype) == "reference":
        return reference.pad(packed, info.indices, info.batch, info.seqlen)
    out = _gather_rows(packed, info.inverse, info.indices)
    return out.view(info.batch, info.seqlen, *packed.shape[1:])
