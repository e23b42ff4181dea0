"""Multi-head attention op: dispatch between the reference and the Triton flash kernel.

Layout [batch, seqlen, heads, head_dim] (packed [total, heads, head_dim] for varlen).
Masks follow torch.nn: bool True = masked out, float = additive.  A query row with
every key masked outputs zeros (and zero gradients), never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import register_op, resolve, triton_check

Tensor = torch.Tensor


def _triton_available(device, dtype=None, head_dim=None, **_) -> Optional[str]:
    return triton_check(device, dtype)


register_op("attention", {"triton": _triton_available}, auto_cuda=("triton",))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """softmax(q kᵀ·scale + masks) v for q [B, L, H, D], k/v [B, S, H, D] -> [B, L, H, D].

    attn_mask: bool/float broadcastable to [B, H, L, S]; key_padding_mask: bool/float [B, S].
    dropout_p is applied as given (pass 0.0 in eval).
    """
    b = resolve("attention", backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    if b == "reference":
        return reference.attention(
            q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
            scale=scale, dropout_p=dropout_p,
        )
    raise AssertionError(b)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Packed attention: q [Tq, H, D], k/v [Tk, H, D], sequences delimited by int32 cu_seqlens [B+1]."""
    b = resolve("attention", backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    if b == "reference":
        return reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p
        )
    raise AssertionError(b)
