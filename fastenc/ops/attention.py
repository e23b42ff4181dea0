"""Multi-head attention op: dispatch between the reference and the Triton flash kernel.

Layout [batch, seqlen, heads, head_dim] (packed [total, heads, head_dim] for varlen).
Masks follow torch.nn: bool True = masked out, float = additive.  A query row with
every key masked outputs zeros (and zero gradients), never NaN.

The Triton branch runs through two ``torch.library`` custom ops, ``fastenc::attention_fwd``
(returns out and the per-row log-sum-exp) and ``fastenc::attention_bwd``, with fake
implementations and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces
through them.  attn_mask and key_padding_mask get no gradient there: a mask that requires grad
sends "auto" to the reference (which differentiates it) and makes a forced "triton" raise.
Dropout draws its Philox seed from torch's RNG (``torch.manual_seed`` makes it reproducible).
fp16/bf16 run on tensor cores with fp32 accumulation; fp32 inputs are computed with IEEE fp32
dots (no TF32), matching torch's fp32 to rounding but slowly.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import reference
from ..backends import register_op, resolve, triton_check

Tensor = torch.Tensor

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_available(device, dtype=None, head_dim=None, head_dim_v=None, mask_requires_grad=False,
                      **_) -> Optional[str]:
    reason = triton_check(device, dtype)
    if reason is not None:
        return reason
    from ..triton_kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

    if dtype is not None and dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not one of float16, bfloat16, float32"
    if head_dim is not None and not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        return f"head dim {head_dim} is unsupported (multiples of 8 from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
    if head_dim_v is not None and head_dim is not None and head_dim_v != head_dim:
        return f"v head dim {head_dim_v} differs from q/k head dim {head_dim}"
    if mask_requires_grad:
        return "a mask requires grad, and the Triton kernel computes no mask gradient"
    return None


register_op("attention", {"triton": _triton_available}, auto_cuda=("triton",))


# --------------------------------------------------------------------------- custom ops (Triton branch)


@torch.library.custom_op("fastenc::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    from ..triton_kernels.attention import attention_forward

    return attention_forward(
        q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_causal=is_causal,
        scale=scale, dropout_p=dropout_p, seed=seed,
    )


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, is_causal, scale, dropout_p, seed):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])  # [H, Tq]
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, H, L]
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastenc::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.attention import attention_backward

    return attention_backward(
        dout, q, k, v, out, lse, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p, seed=seed,
    )


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, kpm, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed)
    ctx.params = (max_q, max_k, is_causal, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, is_causal, scale, dropout_p = ctx.params
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, max_q, max_k, is_causal,
                                scale, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 10


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------- validation and masks


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"attention: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} shapes disagree")
    # batch (dense only), heads and head dim must agree between q and k
    same = (q.shape[0] == k.shape[0] if ndim == 4 else True) and q.shape[-2:] == k.shape[-2:]
    if not same:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on {layout}")


def _check_dropout(dropout_p: float) -> float:
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def normalize_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int,
                    S: int, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Validate masks; attn_mask -> [B, H, L, S] view (stride 0 on broadcast dims, never a copy).

    attn_mask: bool or float, broadcastable to [B, H, L, S] ([L, S], [B, 1, L, S], [B, H, L, S]...).
    key_padding_mask: bool or float [B, S].  Both on q's device.
    """
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is None:
            continue
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"attention: {name} must be bool (True = masked) or float (additive), got {m.dtype}")
        if m.device != device:
            raise ValueError(f"attention: {name} is on {m.device}, q on {device}")
    if attn_mask is not None:
        try:
            shape = tuple(torch.broadcast_shapes(attn_mask.shape, (B, H, L, S)))
        except RuntimeError:
            shape = None
        if shape != (B, H, L, S):
            raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, L, S] = {[B, H, L, S]}")
        attn_mask = attn_mask.expand(B, H, L, S)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
        raise ValueError(f"attention: key_padding_mask must be [B, S] = {[B, S]}, got {tuple(key_padding_mask.shape)}")
    return attn_mask, key_padding_mask


def _draw_seed(device: torch.device) -> Tensor:
    """Philox key for the dropout kernels, from torch's generator of ``device`` (int64 [1])."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _needs_grad(*masks: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(m is not None and m.requires_grad for m in masks)


# --------------------------------------------------------------------------- public API


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
    is_causal: top-left aligned (key j hidden from query i when j > i), as torch's SDPA.
    dropout_p is applied as given (pass 0.0 in eval).
    """
    _check_qkv(q, k, v, 4, "[batch, seqlen, heads, head_dim]")
    dropout_p = _check_dropout(dropout_p)
    B, L, H, D = q.shape
    S = k.shape[1]
    attn_mask, key_padding_mask = normalize_masks(attn_mask, key_padding_mask, B, H, L, S, q.device)
    b = resolve("attention", backend, device=q.device, dtype=q.dtype, head_dim=D, head_dim_v=v.shape[-1],
                mask_requires_grad=_needs_grad(attn_mask, key_padding_mask))
    if b == "reference":
        return reference.attention(
            q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
            scale=scale, dropout_p=dropout_p,
        )
    if b == "triton":
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        seed = _draw_seed(q.device) if dropout_p > 0.0 else None
        out, _ = _attention_fwd(q, k, v, attn_mask, key_padding_mask, None, None, L, S, bool(is_causal), scale,
                                dropout_p, seed)
        return out
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
    """Packed attention: q [Tq, H, D], k/v [Tk, H, D], sequences delimited by int32 cu_seqlens [B+1].

    max_seqlen_q/k must be at least the longest sequence (the kernel's grid is sized by them).
    """
    _check_qkv(q, k, v, 3, "[total, heads, head_dim]")
    dropout_p = _check_dropout(dropout_p)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            raise TypeError(f"attention_varlen: {name} must be an int32 tensor, got "
                            f"{getattr(cu, 'dtype', type(cu).__name__)}")
        if cu.dim() != 1 or cu.numel() < 1 or cu.device != q.device:
            raise ValueError(f"attention_varlen: {name} must be 1-D [B+1] on {q.device}, got shape "
                             f"{tuple(cu.shape)} on {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"attention_varlen: cu_seqlens_q has {cu_seqlens_q.numel()} entries, "
                         f"cu_seqlens_k {cu_seqlens_k.numel()}")
    if int(max_seqlen_q) < 0 or int(max_seqlen_k) < 0:
        raise ValueError(f"attention_varlen: max_seqlen_q/k must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")
    D = q.shape[-1]
    b = resolve("attention", backend, device=q.device, dtype=q.dtype, head_dim=D, head_dim_v=v.shape[-1])
    if b == "reference":
        return reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p
        )
    if b == "triton":
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        seed = _draw_seed(q.device) if dropout_p > 0.0 else None
        out, _ = _attention_fwd(q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                int(max_seqlen_k), bool(is_causal), scale, dropout_p, seed)
        return out
    raise AssertionError(b)
