"""Pure-PyTorch reference of every fastenc op: the oracle for tests and benchmarks.

Every function here is plain autograd PyTorch that runs on any device. With
``upcast=True`` the computation is done in float32 and the result is returned in
float32 (the "fp32 reference" of the parity rule); with ``upcast=False`` it runs
in the input dtype (the "plain PyTorch in the same precision" of the parity rule).

Conventions shared by all of fastenc:
  * attention tensors are ``[batch, seqlen, heads, head_dim]`` (``[total, heads,
    head_dim]`` when packed with ``cu_seqlens``);
  * boolean masks use torch.nn's convention: ``True`` means *masked out*;
  * float masks are additive biases (``-inf`` masks out);
  * a query row whose keys are all masked attends to nothing: its output is zero
    and its gradients are zero (torch.nn returns NaN there);
  * ``dropout_mask`` arguments are boolean *keep* masks (``True`` = kept), so a
    test can replay a kernel's random numbers exactly;
  * a sliding window ``(left, right)`` lets query i see keys i - left .. i + right
    (inclusive, -1 = unbounded on that side), positions counted from each sequence's
    first row, as flash-attention's ``window_size``;
  * rotary embeddings follow Hugging Face's ``rotate_half`` convention (GPT-NeoX, ModernBERT):
    the head dim splits into halves (x1, x2) rotated by angle position · inv_freq[i].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import constants

Tensor = torch.Tensor

# The FFN activations, and the gated ones: act(a) * g with [a, g] = (x W1ᵀ + b1).chunk(2, -1), the activated half
# first (HF ModernBERT's Wi); fastenc.constants, shared with the C++ extension.
ACTIVATIONS = constants.ACTIVATIONS
GATED_ACTIVATIONS = constants.GATED_ACTIVATIONS


def _maybe_upcast(upcast: bool, *tensors: Optional[Tensor]):
    if not upcast:
        return tensors
    return tuple(t.float() if t is not None and t.is_floating_point() else t for t in tensors)


def _dropout(x: Tensor, p: float, keep_mask: Optional[Tensor]) -> Tensor:
    """torch dropout semantics: zero with probability p, scale survivors by 1/(1-p)."""
    if keep_mask is not None:
        return x * keep_mask.to(x.dtype) / (1.0 - p) if p < 1.0 else x * 0.0
    if p == 0.0:
        return x
    return F.dropout(x, p, training=True)


# --------------------------------------------------------------------------- attention


def mask_to_bias(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Boolean mask (True = masked) -> additive bias in ``dtype``; float masks pass through."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


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
    dropout_mask: Optional[Tensor] = None,
    window: Optional[Tuple[int, int]] = None,
    rotary: Optional[Tuple[Tensor, Tensor]] = None,
    upcast: bool = False,
) -> Tensor:
    """softmax(q kᵀ · scale + mask) v, materialising the [B, H, L, S] scores.

    q: [B, L, H, D]; k, v: [B, S, H, D].
    attn_mask: bool (True = masked) or additive float, broadcastable to [B, H, L, S].
    key_padding_mask: bool [B, S] (True = padding) or additive float [B, S].
    is_causal: key j is masked for query i when j > i (top-left aligned, as torch's SDPA).
    dropout_mask: bool keep-mask [B, H, L, S] that replaces torch's random dropout.
    window: (left, right): query i sees keys i - left .. i + right only (-1 = unbounded side).
    rotary: (cos, sin) tables [P, D/2] (``rotary_tables``): q and k are rotated (``rotary``) at
    their row index (queries 0..L-1, keys 0..S-1) before the scores.
    Rows with every key masked give zeros.
    """
    out_dtype = torch.float32 if upcast else q.dtype
    q, k, v, attn_mask, key_padding_mask = _maybe_upcast(upcast, q, k, v, attn_mask, key_padding_mask)
    B, L, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if rotary is not None:
        q, k = rotary_embed(q, *rotary), rotary_embed(k, *rotary)
    scores = torch.einsum("blhd,bshd->bhls", q, k) * scale
    if attn_mask is not None:
        scores = scores + mask_to_bias(attn_mask, scores.dtype)
    if key_padding_mask is not None:
        scores = scores + mask_to_bias(key_padding_mask, scores.dtype)[:, None, None, :]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(window_mask(L, S, window, q.device), float("-inf"))
    if S == 0:  # no key: zero rows, computed through the graph so that gradients are zeros too
        p = scores
    else:  # softmax that returns 0 (not NaN) on rows that are entirely -inf
        row_max = scores.detach().amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        p = _dropout(p, dropout_p, dropout_mask)
    out = torch.einsum("bhls,bshd->blhd", p.to(v.dtype), v)
    return out.to(out_dtype)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_masks: Optional[list] = None,
    window: Optional[Tuple[int, int]] = None,
    rotary: Optional[Tuple[Tensor, Tensor]] = None,
    upcast: bool = False,
) -> Tensor:
    """Packed attention: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] of q [Tq, H, D], k/v [Tk, H, D].

    Computed as ``attention`` on the sequences padded to a batch (keys past each
    sequence's end masked), so it costs one batched call, not one per sequence.
    Rows past ``cu_seqlens_q[-1]`` belong to no sequence: their output is zero.
    dropout_masks: optional list of per-sequence keep-masks [1, H, Lb, Sb].
    window, rotary: as for ``attention``, positions counted from each sequence's first row.
    """
    n = cu_seqlens_q.numel() - 1
    qp, q_rows, _ = _pad_packed(q, cu_seqlens_q, n)
    kp, _, k_pad = _pad_packed(k, cu_seqlens_k, n)
    vp, _, _ = _pad_packed(v, cu_seqlens_k, n)
    keep = None
    if dropout_masks is not None:
        keep = torch.zeros(n, q.shape[1], qp.shape[1], kp.shape[1], dtype=torch.bool, device=q.device)
        for b, m in enumerate(dropout_masks):
            keep[b, :, : m.shape[-2], : m.shape[-1]] = m[0]
    out = attention(qp, kp, vp, key_padding_mask=k_pad, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                    dropout_mask=keep, window=window, rotary=rotary, upcast=upcast)
    packed = out.reshape(-1, *out.shape[2:]).index_select(0, q_rows)
    return F.pad(packed, (0, 0) * (packed.dim() - 1) + (0, q.shape[0] - packed.shape[0]))


def _pad_packed(x: Tensor, cu_seqlens: Tensor, n: int):
    """Packed [T, ...] -> ([n, Lmax, ...] zero-padded, row of each token in the flat padded layout,
    key padding mask [n, Lmax]); rows past cu_seqlens[-1] are left out."""
    lengths = cu_seqlens.diff().long()
    lmax = int(lengths.max()) if n else 0
    used = int(cu_seqlens[-1])
    seq = torch.repeat_interleave(torch.arange(n, device=x.device), lengths, output_size=used)
    pos = torch.arange(used, device=x.device) - cu_seqlens.long()[seq]
    rows = seq * lmax + pos
    padding = torch.arange(lmax, device=x.device)[None, :] >= lengths[:, None]
    return pad(x[:used], rows, n, lmax), rows, padding


def window_mask(L: int, S: int, window: Tuple[int, int], device=None) -> Tensor:
    """Bool [L, S], True where key j is outside query i's window (j < i - left or j > i + right)."""
    left, right = window
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    outside = torch.zeros(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        outside |= j < i - left
    if right >= 0:
        outside |= j > i + right
    return outside


# --------------------------------------------------------------------------- rotary embeddings


def rotary_inv_freq(head_dim: int, base: float, device=None) -> Tensor:
    """HF's default RoPE frequencies: inv_freq[i] = base^(-2i / head_dim), fp32 [head_dim / 2]."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def rotary_tables(inv_freq: Tensor, seqlen: int, scaling: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(cos, sin) fp32 [seqlen, D/2] of angle p · inv_freq[i] at positions p = 0..seqlen-1, times
    ``scaling`` (HF's attention_scaling); the same float32 arithmetic as HF's rotary embedding."""
    freqs = torch.arange(seqlen, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * scaling, freqs.sin() * scaling


def rotary_embed(x: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """Rotate x [..., L, H, D] by the tables cos/sin [P, D/2] at each row's position (HF's rotate_half):
        y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin,   (x1, x2) = halves of the head dim.
    positions: int [..., L] (default 0..L-1 along dim -3).  Computed in fp32, returned in x's dtype
    (as HF's ``apply_rotary_pos_emb``)."""
    L = x.shape[-3]
    if positions is None:
        positions = torch.arange(L, device=x.device)
    c, s = cos.float()[positions].unsqueeze(-2), sin.float()[positions].unsqueeze(-2)  # [..., L, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------- padding


def unpad(x: Tensor, key_padding_mask: Tensor):
    """Gather the real tokens of x [B, L, ...] (key_padding_mask [B, L], True = padding).

    Returns (packed [T, ...], indices [T] into the flattened B*L positions,
    cu_seqlens int32 [B+1], max_seqlen int).
    """
    keep = ~key_padding_mask.bool()
    lengths = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Scatter packed [T, ...] back to [batch, seqlen, ...], zeros at padding."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_copy(0, indices, packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])


# --------------------------------------------------------------------------- residual + LayerNorm


def residual_layer_norm(
    x: Tensor,
    branch: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    branch_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    prenorm: bool = False,
    upcast: bool = False,
):
    """s = x + dropout(branch + branch_bias);  y = LayerNorm(s) · weight + bias.

    x, branch: [..., N]; branch_bias, weight, bias: [N] (each optional; no branch
    means s = x). Returns y, or (y, s) when ``prenorm`` (s is the new residual).
    """
    out_dtype = torch.float32 if upcast else x.dtype
    x, branch, weight, bias, branch_bias = _maybe_upcast(upcast, x, branch, weight, bias, branch_bias)
    s = x
    if branch is not None:
        h = branch if branch_bias is None else branch + branch_bias
        s = x + _dropout(h, dropout_p, dropout_mask)
    weight, bias = _ln_param(weight, s.dtype), _ln_param(bias, s.dtype)
    if weight is None and bias is not None and bias.dtype != s.dtype:
        weight = torch.ones_like(bias)  # torch 2.14's backward rejects a float32 bias without a weight on half rows
    y = F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    if prenorm:
        return y.to(out_dtype), s.to(out_dtype)
    return y.to(out_dtype)


def _ln_param(p: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """F.layer_norm takes parameters in its input's dtype, or float32 for a float16/bfloat16 input."""
    if p is None or p.dtype == dtype or (p.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        return p
    return p.to(dtype)


# --------------------------------------------------------------------------- feed-forward


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """nn.Linear: x Wᵀ + b (torch's GEMM)."""
    return F.linear(x, weight, bias)


def apply_activation(x: Tensor, name: str) -> Tensor:
    """relu, erf-GELU (torch's default ``gelu``) or tanh-GELU; the gated ones halve the last dim:
    geglu(a, g) = GELU_erf(a) · g, swiglu(a, g) = SiLU(a) · g with [a, g] = x.chunk(2, -1)."""
    if name in GATED_ACTIVATIONS:
        a, g = x.chunk(2, dim=-1)
        return (F.gelu(a) if name == "geglu" else F.silu(a)) * g
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS + GATED_ACTIVATIONS}")


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    upcast: bool = False,
) -> Tensor:
    """y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual), nn.Linear weight layouts.

    Gated activations (``GATED_ACTIVATIONS``) take w1 [2f, d] (b1 [2f]): rows :f make the activated
    half, rows f: the gate; w2 is [d, f] and dropout_mask [..., f].
    """
    out_dtype = torch.float32 if upcast else x.dtype
    x, w1, b1, w2, b2, residual = _maybe_upcast(upcast, x, w1, b1, w2, b2, residual)
    h = apply_activation(F.linear(x, w1, b1), activation)
    y = F.linear(_dropout(h, dropout_p, dropout_mask), w2, b2)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype)


# --------------------------------------------------------------------------- int8 linear (inference)

INT8_MAX = 127


def bert_embeddings(input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor],
                    word: Tensor, types: Tensor, pos: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tensor:
    """BERT's embeddings as HF's ``BertEmbeddings`` computes them in eval mode: LN((word[ids] + types[token
    types]) + pos[positions]), each sum in the tables' dtype; token types 0 and positions 0..L-1 where None."""
    x = F.embedding(input_ids, word)
    x = x + (types[0] if token_type_ids is None else F.embedding(token_type_ids, types))
    x = x + (pos[: input_ids.shape[1]] if position_ids is None else F.embedding(position_ids, pos))
    return F.layer_norm(x, (word.shape[1],), weight, bias, eps)


def bert_pooler(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """HF's ``BertPooler``: tanh of each sequence's first token [B, d] of hidden [B, L, d] through the dense layer."""
    return torch.tanh(F.linear(hidden[:, 0], weight, bias))


def quantize_int8(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric int8 per row of x [..., K] (a weight's output channel, or a token): fp32 math

        inv = 127 / max|x_row|  (0 for an all-zero row),   q = round_half_even(x · inv) in [-127, 127],
        scale = max|x_row| / 127,   x ≈ q · scale.

    Returns (q int8 [..., K], scale fp32 [...])."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def smoothing(input_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's per-input-channel factors s = max|x_k|^alpha / max_n|W[n, k]|^(1 - alpha) (fp32 [K]): the
    GEMM x Wᵀ = (x / s)(W s)ᵀ then has activations with their outlier channels scaled down and weights
    with those channels scaled up, which per-token and per-channel int8 both quantize better."""
    a = input_absmax.float().clamp(min=1e-5)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    return a ** alpha / w ** (1.0 - alpha)


def linear_int8(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None, *,
                act_in: Optional[str] = None, residual: Optional[Tensor] = None, smooth: Optional[Tensor] = None,
                float_channels: Optional[Tensor] = None, float_weight: Optional[Tensor] = None) -> Tensor:
    """y = (q_x q_wᵀ) · s_x s_wᵀ + bias (+ residual), in x's dtype: an int8 GEMM with int32 accumulation.

    The activations are quantized per token at run time (``quantize_int8`` of ``act_in(x) · smooth``: the
    previous GEMM's activation, gated ones halving the width, applied in fp32 first; smooth fp32 [K] = 1/s
    when the weight was quantized smoothed, as W · diag(s)); weight_q int8 [N, K] and weight_scale fp32 [N]
    come from ``quantize_int8`` of the (smoothed) weight, per output channel.  The integer products are
    summed exactly (in float64, |sum| < 2^53), converted to fp32 and scaled.

    float_channels (int64 [F]) and float_weight ([N, F]): input channels kept in float (their smooth entries
    and weight_q's columns are 0), adding ``act_in(x)[..., float_channels] float_weightᵀ`` in fp32."""
    a = x.float() if act_in is None else apply_activation(x.float(), act_in)
    wide = None if float_channels is None else a[..., float_channels]
    if smooth is not None:
        a = a * smooth
    q, s = quantize_int8(a)
    acc = torch.matmul(q.double(), weight_q.double().t()).float()
    y = acc * (s[..., None] * weight_scale.float())
    if wide is not None:
        y = y + wide @ float_weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)
