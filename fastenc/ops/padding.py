"""Padding removal: gather the real tokens of a padded batch once, scatter them back once.

``padding_info(key_padding_mask)`` computes the index maps for a batch (one host
sync: the per-sequence lengths, which fix the packed size and the attention
grid); ``unpad`` and ``pad`` move the rows.  Both directions run one Triton gather
kernel (zeros written at padding in the same pass) and are each other's backward.

The maps decide which rows the kernels read.  A map from ``padding_info`` is trusted while
its tensors' version counters are unchanged (inference tensors have none: trusted as made);
any other ``Padding`` (built by hand, ``_replace``-d, edited in place) is checked by
``pad``/``unpad`` first: ranges and consistency of ``indices`` and ``inverse``, one host
sync on a GPU (skipped while torch.compile traces).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import register_op, resolve, triton_check
from ._common import FLOAT_DTYPES, check_count, compiling, needs_grad

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


class _Built(Padding):
    """A Padding made by padding_info: pad/unpad trust it while its tensors are unmodified."""

    def _replace(self, **changes) -> Padding:  # an edited map is the caller's: checked again
        return Padding(*self)._replace(**changes)


def _versions(info: Padding) -> tuple:
    """Version counters of the map's tensors (an in-place edit bumps them; inference tensors keep none)."""
    return tuple(None if t.is_inference() else t._version for t in (info.indices, info.inverse))


def _trusted(info: Padding) -> bool:
    return type(info) is _Built and info._versions == _versions(info)


def padding_info(key_padding_mask: Tensor) -> Padding:
    """Index maps for a bool key padding mask [B, L] (True = padding)."""
    kpm = key_padding_mask
    if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool or kpm.dim() != 2:
        raise TypeError(
            f"padding_info: padding removal needs a bool key padding mask [B, L], got "
            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)} "
            f"{tuple(getattr(key_padding_mask, 'shape', ()))}"
        )
    if key_padding_mask.device.type == "meta":
        raise ValueError("padding_info: the key padding mask is a meta tensor; the packed size depends on its values")
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
    info = _Built(indices, inverse, cu_seqlens, max_seqlen, B, L)
    info._versions = _versions(info)
    return info


def _triton_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    if dtype.is_complex:
        return f"Triton has no complex dtypes ({dtype})"
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


def _check_map(info: object, device: torch.device, where: str) -> Padding:
    """``info`` itself when trusted, else a checked copy with dense index tensors (the kernel reads them densely)."""
    if not isinstance(info, Padding):
        raise TypeError(f"{where}: info must be a fastenc.ops.Padding (from padding_info), got {type(info).__name__}")
    if compiling() or _trusted(info):
        return info
    B = check_count(info.batch, "info.batch", where)
    L = check_count(info.seqlen, "info.seqlen", where)
    for name, t, n in (("indices", info.indices, None), ("inverse", info.inverse, B * L)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{where}: info.{name} must be a 1-D int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if n is not None and t.numel() != n:
            raise ValueError(f"{where}: info.inverse must have batch * seqlen = {n} entries, got {t.numel()}")
        if t.device != device:
            raise ValueError(f"{where}: info.{name} is on {t.device}, the tensor on {device}")
        if t.device.type == "meta":
            raise ValueError(f"{where}: info.{name} is a meta tensor; its values decide which rows are read")
    indices, inverse = info.indices.contiguous(), info.inverse.contiguous()
    T = indices.numel()
    if B * L == 0 or T == 0:
        ok = [T == 0, True, bool((inverse == -1).all())]
    else:  # one host sync: indices in [0, B*L), inverse in [-1, T), inverse[indices] = 0..T-1, T positions mapped
        inside = (indices >= 0) & (indices < B * L)
        consistent = inverse[indices.clamp(0, B * L - 1)] == torch.arange(T, device=device)
        ok = torch.stack([inside.all(), ((inverse >= -1) & (inverse < T)).all(),
                          (inside & consistent).all() & ((inverse >= 0).sum() == T)]).tolist()
    for good, what in zip(ok, (f"info.indices must hold positions in [0, batch * seqlen = {B * L})",
                               f"info.inverse must hold packed rows in [0, {T}) or -1 at padding",
                               "info.inverse must map info.indices[r] to r and every other position to -1")):
        if not good:
            raise ValueError(f"{where}: {what} (a hand-made map; padding_info builds consistent ones)")
    return Padding(indices, inverse, info.cu_seqlens, info.max_seqlen, B, L)


# What pad/unpad move: any real, integer or bool rows (float8 and quantized dtypes have no index_copy).
_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *FLOAT_DTYPES,
           torch.complex64, torch.complex128)


def _check(x: Tensor, info: Padding, rows: int, what: str) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{what}: cannot move rows of dtype {x.dtype} (float8 and quantized dtypes are not supported)")
    if x.dim() < 1 or x.shape[0] != rows:
        raise ValueError(f"{what}: expected {rows} rows, got tensor of shape {tuple(x.shape)}")
    if x.device != info.indices.device:
        raise ValueError(f"{what}: tensor on {x.device}, padding info on {info.indices.device}")


def unpad(x: Tensor, info: Padding, *, backend: Optional[str] = None) -> Tensor:
    """[B, L, ...] -> [T, ...]: the real tokens, in batch-major order."""
    if not isinstance(x, Tensor):
        raise TypeError(f"unpad: x must be a tensor, got {type(x).__name__}")
    info = _check_map(info, x.device, "unpad")
    if x.shape[:2] != (info.batch, info.seqlen):
        raise ValueError(f"unpad: expected [B, L, ...] = [{info.batch}, {info.seqlen}, ...], got {tuple(x.shape)}")
    flat = x.reshape(info.batch * info.seqlen, *x.shape[2:])
    _check(flat, info, info.batch * info.seqlen, "unpad")
    if resolve("padding", backend, x.device, x.dtype) == "reference":
        return flat.index_select(0, info.indices)
    return _gather_rows(flat, info.indices, info.inverse)


def pad(packed: Tensor, info: Padding, *, backend: Optional[str] = None) -> Tensor:
    """[T, ...] -> [B, L, ...] with zeros at the padding positions."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"pad: packed must be a tensor, got {type(packed).__name__}")
    info = _check_map(info, packed.device, "pad")
    _check(packed, info, info.total, "pad")
    if resolve("padding", backend, packed.device, packed.dtype) == "reference":
        return reference.pad(packed, info.indices, info.batch, info.seqlen)
    out = _gather_rows(packed, info.inverse, info.indices)
    return out.view(info.batch, info.seqlen, *packed.shape[1:])
