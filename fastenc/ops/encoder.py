"""Encoder-stack op: a whole stack of nn.TransformerEncoderLayer forwards, inference only.

On packed tokens x [T, d] (sequences delimited by cu_seqlens), per layer: QKV projection,
variable-length attention, out projection, residual + LayerNorm, FFN, residual + LayerNorm
(pre-norm: the norm before each block).  Backends: ``reference`` (``fastenc.reference.encoder_stack``)
and ``cpu``: the whole stack in one C++ call (``csrc/cpu/encoder.cpp``), so a layer costs a few
ATen calls of host time instead of a Python frame per op; buffers are allocated once per call.
It records no autograd graph: ``fastenc.TransformerEncoder`` takes it in inference on CPU and
runs its per-op path when a gradient is needed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve

Tensor = torch.Tensor

ACTIVATIONS = reference.ACTIVATIONS


# shape class: (needs grad,)
def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = cpu_check(device, dtype)
    if reason is not None:
        return reason
    if shape[0]:
        return "the fused encoder stack runs inference only (no autograd); training runs per op"
    return None


register_op("encoder", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)}, example=lambda head_dim: (False,))

LayerWeights = Tuple[Optional[Tensor], ...]


def encoder_stack(
    x: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    layers: Sequence[LayerWeights],
    *,
    nhead: int,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    final_norm: Optional[Tuple[Optional[Tensor], Optional[Tensor], float]] = None,
    is_causal: bool = False,
    packed: Optional[Sequence[Tuple[Tensor, Tensor, Tensor, Tensor]]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Inference of a stack of encoder layers on packed tokens x [T, d]; returns [T, d].

    layers: per layer (in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias, linear1.weight,
    linear1.bias, linear2.weight, linear2.bias, norm1.weight, norm1.bias, norm2.weight, norm2.bias),
    biases and norm parameters optional.  final_norm: (weight, bias, eps) or None.
    cu_seqlens: int32 [B+1], sequence b = rows cu_seqlens[b]:cu_seqlens[b+1]; max_seqlen >= every length.
    packed: per layer (in_proj_weight, out_proj.weight, linear1.weight, linear2.weight) prepacked by
    ``fastenc._C.cpu_pack_linear_weight`` (see :func:`packed_weights`), or None: the ``cpu`` backend's
    oneDNN GEMMs read them (faster for few rows), the reference ignores them.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"encoder_stack: x must be a floating-point [tokens, d_model] tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"encoder_stack: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(nhead, int) or nhead < 1 or x.shape[1] % nhead:
        raise ValueError(f"encoder_stack: nhead must divide d_model {x.shape[1]}, got {nhead!r}")
    for i, weights in enumerate(layers):
        if len(weights) != 12:
            raise ValueError(f"encoder_stack: layers[{i}] must hold 12 tensors (see the docstring), got {len(weights)}")
    return encoder_stack_unchecked(x, cu_seqlens, int(max_seqlen), layers, nhead, norm_first, activation, float(eps),
                                   final_norm, bool(is_causal), backend, packed)


def encoder_stack_unchecked(x: Tensor, cu_seqlens: Tensor, max_seqlen: int, layers: Sequence[LayerWeights],
                            nhead: int, norm_first: bool, activation: str, eps: float,
                            final_norm: Optional[Tuple[Optional[Tensor], Optional[Tensor], float]], is_causal: bool,
                            backend: Optional[str], packed=None) -> Tensor:
    """:func:`encoder_stack` for fastenc's modules (their own weights; cu_seqlens from ``padding_info``).

    The C++ entry point checks shapes, dtypes and the cu_seqlens values (free on a CPU) itself."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for w in layers for t in w))
    b = resolve("encoder", backend, x.device, x.dtype, (needs_grad,))
    if b == "reference":
        return reference.encoder_stack(x, cu_seqlens, list(layers), nhead=nhead, norm_first=norm_first,
                                       activation=activation, eps=eps, final_norm=final_norm, is_causal=is_causal)
    fw, fb, feps = final_norm if final_norm is not None else (None, None, 1e-5)
    return extension().encoder_forward_cpu(x.contiguous(), cu_seqlens, max_seqlen, list(layers), nhead, norm_first,
                                           activation, eps, is_causal, fw, fb, feps, packed)


def packed_weights(cache: dict, weights: Sequence[Tensor]) -> Optional[Tuple[Tensor, ...]]:
    """The GEMM weights prepacked for oneDNN (inference), cached in ``cache`` until a weight changes.

    A packed copy is rebuilt when the weight's storage, version counter (in-place updates: an optimizer
    step, ``load_state_dict``), dtype or shape changes; it doubles those weights' memory while cached.
    None where this torch or CPU has no oneDNN linear for the dtype.
    """
    ext = extension()
    if ext is None or not ext.cpu_linear_supported(weights[0].dtype):
        return None
    key = tuple((w.data_ptr(), w._version, w.dtype, tuple(w.shape)) for w in weights)
    hit = cache.get("packed")
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache["packed"] = (key, tuple(ext.cpu_pack_linear_weight(w) for w in weights))
    return hit[1]
