"""Multi-head attention op: validation, dispatch, autograd.

Layout [batch, seqlen, heads, head_dim] (packed [total, heads, head_dim] for varlen).
Masks follow torch.nn: bool True = masked out, float = additive.  A query row with
every key masked outputs zeros (and zero gradients), never NaN.

Backends: ``reference`` (``fastenc.reference``), ``triton`` (``fastenc.triton_kernels.attention``:
FlashAttention-2 forward + two deterministic backward kernels), ``cpu`` (the extension's C++ flash
attention on packed rows, ``csrc/attention/cpu/``).  The fast kernels run through the
custom ops ``fastenc::attention_fwd`` / ``fastenc::attention_bwd`` (fake functions, so
``torch.compile(fullgraph=True)`` traces them) under an ``autograd.Function``; eagerly the same
functions are called without the dispatcher.  attn_mask and key_padding_mask get no gradient
there: a mask that requires grad sends ``auto`` to the reference (which differentiates it) and
makes a forced fast backend raise.  Dropout keys come from ``_common.draw_seed``.

Sliding windows (``window=(left, right)``: query i sees keys i - left .. i + right, -1 = unbounded)
and rotary embeddings (``rotary=(cos, sin)``, tables [P, D/2] from ``reference.rotary_tables``, q and
k rotated at their sequence-local row in Hugging Face's rotate_half convention) run inside the
kernels; the tables get no gradient.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Optional, Tuple

import torch

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve, triton_check
from .. import constants
from ._common import (FLOAT_DTYPES, KERNEL_DTYPES, check_count, check_dropout, check_number, compiling, draw_seed,
                      needs_grad)

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import attention as kernels  # imported on first use: triton is optional

    return kernels


def shape_class(head_dim: int, head_dim_v: int, mask_grad: bool = False, windowed: bool = False,
                rotary: bool = False) -> tuple:
    """The registry's shape class of an attention call: what the backends' checks read."""
    return (head_dim, head_dim_v, mask_grad, windowed, rotary)


def _triton_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = triton_check(device, dtype)
    if reason is not None:
        return reason
    head_dim, head_dim_v, mask_grad = shape[:3]  # the kernels run every window and rotary (shape[3:])
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not one of {', '.join(constants.KERNEL_DTYPES)}"
    lo, hi = _triton_kernels().MIN_HEAD_DIM, _triton_kernels().MAX_HEAD_DIM
    if not (lo <= head_dim <= hi and head_dim % 8 == 0):
        return f"head dim {head_dim} is unsupported (multiples of 8 from {lo} to {hi})"
    if head_dim_v != head_dim:
        return f"v head dim {head_dim_v} differs from q/k head dim {head_dim}"
    if mask_grad:
        return "a mask requires grad, and the Triton kernel computes no mask gradient"
    return None


def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = cpu_check(device, dtype)
    if reason is None and shape[2]:
        return "a mask requires grad, and the C++ kernel computes no mask gradient"
    return reason  # the kernels run every window and rotary (shape[3:])


register_op("attention", {"triton": _triton_available, "cpu": _cpu_available},
            auto={"cuda": ("triton",), "cpu": ("cpu",)},
            example=lambda head_dim: shape_class(head_dim, head_dim))


# The C++ CPU kernels take packed rows: a dense [B, L, H, D] batch is B sequences of L rows (a view when
# B and L merge), its lse [H, B·L] is returned as [B, H, L] like the Triton kernel's.
@functools.lru_cache(maxsize=64)
def _uniform_cu(batch: int, length: int) -> Tensor:
    """int32 [batch + 1] offsets of batch sequences of one length (never written: cached)."""
    return torch.arange(batch + 1, dtype=torch.int32) * length


def _packed(t: Tensor, cu: Optional[Tensor]):
    if cu is not None:
        return t, cu
    B, L = t.shape[:2]
    return t.reshape(B * L, *t.shape[2:]), _uniform_cu(B, L)


def _cpu_forward(q, k, v, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed,
                 window_left=-1, window_right=-1, cos=None, sin=None, return_lse=True):
    (qp, cq), (kp, ck) = _packed(q, cu_q), _packed(k, cu_k)
    vp = _packed(v, cu_k)[0]
    out, lse = extension().attention_forward_cpu(qp, kp, vp, cq, ck, max_q, max_k, attn_mask, key_padding_mask,
                                                 is_causal, scale, dropout_p, int(seed) if seed is not None else 0,
                                                 return_lse, window_left, window_right, cos, sin)
    if cu_q is None:
        out = out.view(q.shape[:-1] + v.shape[-1:])
        if return_lse:
            B, L, H = q.shape[:3]
            lse = lse.view(H, B, L).transpose(0, 1).contiguous()
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal, scale,
                  dropout_p, seed, window_left=-1, window_right=-1, cos=None, sin=None):
    (qp, cq), (kp, ck), (vp, _) = _packed(q, cu_q), _packed(k, cu_k), _packed(v, cu_k)
    if cu_q is None:
        B, L, H = q.shape[:3]
        lse = lse.transpose(0, 1).reshape(H, B * L)
        dout, out = _packed(dout, None)[0], _packed(out, None)[0]
    dq, dk, dv = extension().attention_backward_cpu(dout, qp, kp, vp, out, lse, cq, ck, max_q, max_k, attn_mask,
                                                    key_padding_mask, is_causal, scale, dropout_p,
                                                    int(seed) if seed is not None else 0, window_left, window_right,
                                                    cos, sin)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


# --------------------------------------------------------------------------- kernels: plain functions, custom ops


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
             is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str,
             window_left: int = -1, window_right: int = -1, cos: Optional[Tensor] = None,
             sin: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out, lse) of one backend's forward kernel."""
    if backend == "cpu":
        return _cpu_forward(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, is_causal, scale, dropout_p, seed, window_left, window_right, cos, sin)
    return _triton_kernels().attention_forward(
        q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, is_causal=is_causal,
        scale=scale, dropout_p=dropout_p, seed=seed, window=_window(window_left, window_right),
        rotary=None if cos is None else (cos, sin),
    )


def _window(left: int, right: int) -> Optional[Tuple[int, int]]:
    return None if left < 0 and right < 0 else (left, right)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, is_causal: bool, scale: float,
              dropout_p: float, seed: Optional[Tensor], backend: str, window_left: int = -1,
              window_right: int = -1, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one backend's backward kernels."""
    if backend == "cpu":
        return _cpu_backward(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, seed, window_left, window_right,
                             cos, sin)
    return _triton_kernels().attention_backward(
        dout, q, k, v, out, lse, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p, seed=seed,
        window=_window(window_left, window_right), rotary=None if cos is None else (cos, sin),
    )


_forward_op = torch.library.custom_op("fastenc::attention_fwd", _forward, mutates_args=())
_backward_op = torch.library.custom_op("fastenc::attention_bwd", _backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  is_causal, scale, dropout_p, seed, backend, window_left=-1, window_right=-1, cos=None, sin=None):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])  # [H, Tq]
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # [B, H, L]
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@_backward_op.register_fake
def _backward_fake(dout, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, is_causal, scale, dropout_p, seed, backend, window_left=-1, window_right=-1,
                   cos=None, sin=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p,
                seed, backend, window_left=-1, window_right=-1, cos=None, sin=None):
        fwd = _forward_op if compiling() else _forward
        out, lse = fwd(q, k, v, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p,
                       seed, backend, window_left, window_right, cos, sin)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask, cu_q, cu_k, seed, cos, sin)
        ctx.params = (max_q, max_k, is_causal, scale, dropout_p, backend, window_left, window_right)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed, cos, sin = ctx.saved_tensors
        max_q, max_k, is_causal, scale, dropout_p, backend, window_left, window_right = ctx.params
        bwd = _backward_op if compiling() else _backward
        dq, dk, dv = bwd(dout, q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, max_q, max_k, is_causal, scale,
                         dropout_p, seed, backend, window_left, window_right, cos, sin)
        return (dq, dk, dv) + (None,) * 15


def _run(backend: str, q, k, v, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, is_causal, scale,
         dropout_p, window=None, rotary=None) -> Tensor:
    """A fast backend's output, through autograd only when a gradient is needed."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    left, right = window if window is not None else (-1, -1)
    cos, sin = rotary if rotary is not None else (None, None)
    args = (q, k, v, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, bool(is_causal), scale, dropout_p, seed,
            backend, left, right, cos, sin)
    if needs_grad(q, k, v):
        return _Attention.apply(*args)
    if compiling():
        return _forward_op(*args)[0]
    if backend == "cpu":  # inference: no log-sum-exp to keep
        return _cpu_forward(*args[:13], left, right, cos, sin, return_lse=False)[0]
    return _forward(*args)[0]


# --------------------------------------------------------------------------- validation and masks


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int, layout: str, where: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{where}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: q, k, v must be floating point (float16, bfloat16, float32 or float64), "
                        f"got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} shapes disagree")
    # batch (dense only), heads and head dim must agree between q and k
    same = (q.shape[0] == k.shape[0] if ndim == 4 else True) and q.shape[-2:] == k.shape[-2:]
    if not same:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on {layout}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"{where}: head_dim must be at least 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")


def normalize_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], B: int, H: int, L: int,
                    S: int, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Validate masks; attn_mask -> [B, H, L, S] view (stride 0 on broadcast dims, never a copy).

    attn_mask: bool or float, broadcastable to [B, H, L, S] ([L, S], [B, 1, L, S], [B, H, L, S]...).
    key_padding_mask: bool or float [B, S].  Both on q's device.
    """
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool and m.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be bool (True = masked) or float (additive; float16, bfloat16, "
                            f"float32 or float64), got {m.dtype}")
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


def check_window(window, where: str) -> Optional[Tuple[int, int]]:
    """window as None or a pair of ints >= -1 (-1 = unbounded side); (-1, -1) is no window."""
    if window is None:
        return None
    try:
        if not isinstance(window, (tuple, list)) or len(window) != 2 or any(isinstance(w, bool) for w in window):
            raise TypeError
        left, right = (operator.index(w) for w in window)  # any integer type, no float or bool
    except TypeError:
        raise TypeError(f"{where}: window must be None or a pair of ints (left, right), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{where}: window sides must be >= 0, or -1 for unbounded; got {tuple(window)}")
    return None if left == right == -1 else (left, right)


def check_rotary(rotary, head_dim: int, length: int, device: torch.device, where: str
                 ) -> Optional[Tuple[Tensor, Tensor]]:
    """rotary as None or (cos, sin): floating tables [P, head_dim/2] on q's device, P >= length."""
    if rotary is None:
        return None
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2 or not all(isinstance(t, Tensor) for t in rotary):
        raise TypeError(f"{where}: rotary must be None or a pair of tensors (cos, sin), got {type(rotary).__name__}")
    cos, sin = rotary
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"{where}: rotary tables must be floating point, got {cos.dtype} and {sin.dtype}")
    if head_dim % 2:
        raise ValueError(f"{where}: rotary embeddings need an even head dim, got {head_dim}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim // 2:
        raise ValueError(f"{where}: rotary tables must both be [positions, head_dim/2] = [P, {head_dim // 2}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[0] < length:
        raise ValueError(f"{where}: rotary tables cover {cos.shape[0]} positions, the sequences need {length}")
    if cos.device != device or sin.device != device:
        raise ValueError(f"{where}: rotary tables are on {cos.device}/{sin.device}, q on {device}")
    return cos, sin


def _mask_grad(*masks: Optional[Tensor]) -> bool:
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
    window: Optional[Tuple[int, int]] = None,
    rotary: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """softmax(q kᵀ·scale + masks) v for q [B, L, H, D], k/v [B, S, H, D] -> [B, L, H, D].

    attn_mask: bool/float broadcastable to [B, H, L, S]; key_padding_mask: bool/float [B, S].
    is_causal: top-left aligned (key j hidden from query i when j > i), as torch's SDPA.
    dropout_p is applied as given (pass 0.0 in eval).
    window: (left, right): query i sees keys i - left .. i + right (-1 = unbounded side).
    rotary: (cos, sin) tables [P, D/2] (``reference.rotary_tables``), P >= max(L, S): q and k are
    rotated at their row index before the scores.
    """
    _check_qkv(q, k, v, 4, "[batch, seqlen, heads, head_dim]", "attention")
    dropout_p = check_dropout(dropout_p, "attention")
    scale = None if scale is None else check_number(scale, "scale", "attention")
    B, L, H, D = q.shape
    S = k.shape[1]
    attn_mask, key_padding_mask = normalize_masks(attn_mask, key_padding_mask, B, H, L, S, q.device)
    window = check_window(window, "attention")
    rotary = check_rotary(rotary, D, max(L, S), q.device, "attention")
    return attention_unchecked(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, backend,
                               window, rotary)


def attention_unchecked(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], is_causal: bool, scale: Optional[float],
                        dropout_p: float, backend: Optional[str], window: Optional[Tuple[int, int]] = None,
                        rotary: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """:func:`attention` on arguments already validated (attn_mask a [B, H, L, S] view): for fastenc's modules."""
    b = resolve("attention", backend, q.device, q.dtype, shape_class(
        q.shape[-1], v.shape[-1], _mask_grad(attn_mask, key_padding_mask), window is not None, rotary is not None))
    if b == "reference":
        return reference.attention(
            q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
            scale=scale, dropout_p=dropout_p, window=window, rotary=rotary,
        )
    return _run(b, q, k, v, attn_mask, key_padding_mask, None, None, q.shape[1], k.shape[1], is_causal, scale,
                dropout_p, window, rotary)


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
    window: Optional[Tuple[int, int]] = None,
    rotary: Optional[Tuple[Tensor, Tensor]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Packed attention: q [Tq, H, D], k/v [Tk, H, D], sequences delimited by int32 cu_seqlens [B+1].

    max_seqlen_q/k must be at least the longest sequence (the kernel's grid is sized by them).
    window, rotary: as for :func:`attention`, positions counted from each sequence's first row
    (rotary tables need P >= max(max_seqlen_q, max_seqlen_k)).
    cu_seqlens must start at 0, never decrease and end at most at the packed length (checked: one host
    sync on a GPU); rows past the last sequence get zeros.
    """
    _check_qkv(q, k, v, 3, "[total, heads, head_dim]", "attention_varlen")
    dropout_p = check_dropout(dropout_p, "attention_varlen")
    scale = None if scale is None else check_number(scale, "scale", "attention_varlen")
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
    max_seqlen_q = check_count(max_seqlen_q, "max_seqlen_q", "attention_varlen")
    max_seqlen_k = check_count(max_seqlen_k, "max_seqlen_k", "attention_varlen")
    # The values decide which rows the kernels read: checked here (one host sync on a GPU), where the
    # caller built them; fastenc's modules build them with padding_info and call the unchecked variant.
    # The kernels read cu_seqlens as a dense array: a strided view is copied first.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    check_cu_seqlens((("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                      ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)), "attention_varlen")
    window = check_window(window, "attention_varlen")
    rotary = check_rotary(rotary, q.shape[-1], max(max_seqlen_q, max_seqlen_k), q.device, "attention_varlen")
    return attention_varlen_unchecked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                      scale, dropout_p, backend, window, rotary)


def check_cu_seqlens(items, where: str) -> None:
    """Each (name, cu_seqlens, packed length, max_seqlen) of ``items``: cu_seqlens starts at 0, never decreases,
    ends at most at its packed length, and no sequence is longer than its max_seqlen; (first, last, shortest,
    longest) of all read in one host sync."""
    stats = []
    for name, cu, _, _ in items:
        if cu.device.type == "meta":
            raise ValueError(f"{where}: {name} is a meta tensor; its values decide which rows are read, "
                             "so packed attention needs real tensors")
        steps = torch.cat([cu.long().diff(), cu.new_zeros(1, dtype=torch.long)])  # int64: no wrap-around
        stats.append(torch.stack([cu[0].long(), cu[-1].long(), steps.min(), steps.max()]))
    for (name, cu, total, max_seqlen), (first, last, shortest, longest) in zip(items, torch.stack(stats).tolist()):
        if first != 0 or shortest < 0 or last > total:
            raise ValueError(f"{where}: {name} must start at 0, never decrease and end at most at the "
                             f"packed length {total}; got {cu.tolist() if cu.numel() <= 16 else 'a tensor'} "
                             f"(first {first}, last {last}, smallest step {shortest})")
        if longest > max_seqlen:
            raise ValueError(f"{where}: {name} has a sequence of length {longest}, longer than "
                             f"max_seqlen {max_seqlen}")


def attention_varlen_unchecked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, is_causal: bool, scale: Optional[float],
                               dropout_p: float, backend: Optional[str], window: Optional[Tuple[int, int]] = None,
                               rotary: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """:func:`attention_varlen` on arguments already validated (cu_seqlens from ``padding_info``): for fastenc's
    modules."""
    b = resolve("attention", backend, q.device, q.dtype, shape_class(q.shape[-1], v.shape[-1], False,
                                                                     window is not None, rotary is not None))
    if b == "reference":
        return reference.attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            window=window, rotary=rotary,
        )
    return _run(b, q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                dropout_p, window, rotary)
