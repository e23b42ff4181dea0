"""FLOP and byte counts behind every TFLOP/s and GB/s figure (one formula per benchmark).

Conventions: a multiply-add is 2 FLOPs; only useful work counts, so padded tokens
add nothing and a kernel that skips padding gets the credit for it.
"""
from __future__ import annotations

from typing import Optional, Sequence

BWD_ATTENTION = 2.5  # backward = 2.5x forward (5 matmuls of the forward's 2, FlashAttention's convention)
BWD_MATMUL = 2.0  # backward of a matmul: dX and dW, each as large as the forward


def attention_flops(lengths_q: Sequence[int], lengths_k: Sequence[int], heads: int, head_dim: int, *,
                    causal: bool = False, mode: str = "fwd") -> float:
    """4·H·D·Σ_b L_b·S_b forward (QKᵀ and PV, 2 FLOPs per MAC); halved for causal; 2.5x for backward.

    With no padding this is the usual 4·B·H·L·S·D.
    """
    f = 4.0 * heads * head_dim * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k))
    if causal:
        f /= 2
    return _by_mode(f, mode, BWD_ATTENTION)


def layer_norm_bytes(tokens: int, hidden: int, elt: int, *, mode: str = "fwd", has_branch: bool = True,
                     prenorm: bool = False, param_elt: Optional[int] = None) -> float:
    """Each input read once, each output written once.

    fwd: read x, branch (T·N each) and weight, bias, branch bias (N each); write y (and s with prenorm).
    bwd: read dy, the saved sum s, weight and the saved mean/rstd (fp32, T each); write dx, dbranch
         (one tensor when they are equal), dweight, dbias, dbranch_bias.
    fwd+bwd: the sum of both.
    """
    pe = param_elt or elt
    fwd = (1 + has_branch + 1 + prenorm) * tokens * hidden * elt + 3 * hidden * pe
    bwd = (2 + 1 + has_branch) * tokens * hidden * elt + 2 * tokens * 4 + (1 + 3) * hidden * pe
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def ffn_flops(tokens: int, d_model: int, d_ff: int, *, mode: str = "fwd") -> float:
    """2·T·d·f·2 forward (two GEMMs of T·d·f MACs); backward 2x that (dX and dW of each)."""
    return _by_mode(2.0 * tokens * d_model * d_ff * 2, mode, BWD_MATMUL)


def encoder_layer_flops(lengths: Sequence[int], d_model: int, nhead: int, d_ff: int, *, mode: str = "fwd") -> float:
    """Projections 2·T·(3d² + d²) + FFN 2·T·d·f·2 + attention 4·d·Σ L_b² (T = real tokens).

    Backward: 2x for the GEMMs, 2.5x for attention.  "train" counts forward + backward.
    """
    tokens = sum(lengths)
    gemm = 2.0 * tokens * 4 * d_model * d_model + 2.0 * tokens * d_model * d_ff * 2
    attn = 4.0 * d_model * sum(n * n for n in lengths)
    if mode == "fwd":
        return gemm + attn
    if mode == "bwd":
        return BWD_MATMUL * gemm + BWD_ATTENTION * attn
    if mode in ("fwd+bwd", "train"):
        return (1 + BWD_MATMUL) * gemm + (1 + BWD_ATTENTION) * attn
    raise ValueError(f"unknown mode {mode!r}")


def _by_mode(fwd: float, mode: str, bwd_factor: float) -> float:
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd_factor * fwd
    if mode in ("fwd+bwd", "train"):
        return (1 + bwd_factor) * fwd
    raise ValueError(f"unknown mode {mode!r}")
