"""BERT's pooler op (HF's ``BertPooler`` and its RoBERTa / XLM-R / CamemBERT copies): ``tanh(h[:, 0] Wᵀ + b)``,
each sequence's first token through a dense layer.

Backends: ``reference`` (``fastenc.reference.bert_pooler``: HF's ops) and ``cpu``, inference only: the panel GEMM
(``csrc/linear/panel_gemm.cpp``, fp32 and bf16 on AVX-512 CPUs) on the weight packed once per weight generation
(kept in the caller's ``WeightCache``), then tanh; ATen's GEMM where the panel GEMM has no kernel (fp16, CPUs
without AVX-512).  Why: HF's pooler runs after the encoder stack, whose weights have pushed everything else out of
the caches; at batch 1 its three module calls and torch's GEMM cost a MiniLM request 150-270 µs there (bf16: oneDNN's
matmul at one row), the panel GEMM 70-90 µs (``benchmarks/README.md``, "CPU host time at batch 1").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import cpu_inference_check, extension, register_op, resolve
from ..weight_cache import WeightCache, tensor_key
from ._common import check_float

Tensor = torch.Tensor

_cpu_available = cpu_inference_check("the CPU pooler runs inference only (no autograd)")

register_op("pooler", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)}, example=lambda head_dim: (False,))


def bert_pooler(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                cache: Optional[WeightCache] = None, backend: Optional[str] = None) -> Tensor:
    """tanh(hidden[:, 0] weightᵀ + bias): hidden [B, L, d] (L >= 1), weight [n, d], bias [n] or None, one float
    dtype and device -> [B, n].  cache: where the cpu backend keeps its packed weight between calls (None: packed
    on every call)."""
    where = "fastenc pooler"
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        check_float(t, name, where, optional=name == "bias")
    if hidden.dim() != 3 or hidden.shape[1] < 1 or weight.dim() != 2 or hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"{where}: hidden must be [B, L >= 1, d] and weight [n, d], got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"{where}: {name} ({t.dtype}, {t.device}) must match hidden ({hidden.dtype}, "
                            f"{hidden.device})")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if resolve("pooler", backend, hidden.device, hidden.dtype, (grad,)) == "reference":
        return reference.bert_pooler(hidden, weight, bias)
    first = hidden[:, 0]
    ext = extension()
    if 0 in (hidden.shape[0], *weight.shape) or not ext.cpu_panel_gemm_supported(hidden.dtype):
        return F.linear(first, weight, bias).tanh_()
    if first.stride(-1) != 1:
        first = first.contiguous()

    def pack():
        return ext.PanelWeight(weight)
    packed = pack() if cache is None else cache.get(("pooler", hidden.dtype), tensor_key((weight,)), pack)
    return ext.cpu_panel_gemm(first, packed, bias).tanh_()
