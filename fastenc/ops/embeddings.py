"""BERT's embeddings op (HF's ``BertEmbeddings`` in eval mode): ``LN(round(word[ids] + types[token types]) +
pos[positions]) · weight + bias``, both sums rounded to the tables' dtype as HF's adds are.

Backends: ``reference`` (``fastenc.reference.bert_embeddings``: HF's ops) and ``cpu``, inference only: the
extension's ``bert_embeddings_cpu`` (``csrc/embeddings/``), one C++ call for the gathers, the sums and the
LayerNorm.  Why: at batch 1 the embeddings run between two fused-stack calls with caches cold, where each of
the reference's seven ATen calls costs 20-40 µs; the kernel's arithmetic is 12 k elements for a MiniLM request.
A call that needs gradients runs the reference (auto, with the registry's warning), or raises (``cpu`` named);
int32 ids are widened to int64 for the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import cpu_inference_check, extension, register_op, resolve

Tensor = torch.Tensor


_cpu_available = cpu_inference_check("the CPU embeddings run inference only (no autograd)")


register_op("embeddings", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)}, example=lambda head_dim: (False,))


def bert_embeddings(input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Optional[Tensor],
                    word: Tensor, types: Tensor, pos: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, backend: Optional[str] = None) -> Tensor:
    """[B, L, d] embeddings of input_ids [B, L] (int64); token types 0 and positions 0..L-1 where None,
    position_ids [1 or B, L]; tables [rows, d] in one float dtype; weight, bias [d] or None."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (word, types, pos, weight, bias))
    if resolve("embeddings", backend, word.device, word.dtype, (grad,)) == "cpu":  # shape class: needs_grad
        # int32 ids (nn.Embedding takes them) widened for the kernel, which reads int64 (and names any other dtype)
        ids = [t.long() if t is not None and t.dtype == torch.int32 else t
               for t in (input_ids, token_type_ids, position_ids)]
        return extension().bert_embeddings_cpu(*ids, word, types, pos, weight, bias, eps)
    return reference.bert_embeddings(input_ids, token_type_ids, position_ids, word, types, pos, weight, bias, eps)
