"""Task heads on an ``EncoderModel``: masked-language modelling (pretraining) and extractive QA spans.

``MaskedLM`` is BERT's head: h -> Linear -> GELU (erf) -> LayerNorm -> logits over the
vocabulary with the decoder weight tied to the input word embeddings (one parameter for
both) plus an output bias.  With ``labels`` (-100 = not scored) it scores only the labeled
positions: the vocabulary projection (V x d per token) is the costliest matmul of a small
encoder, and pretraining labels 15% of the tokens.

``QuestionAnswering`` is a Linear(d, 2) on every token: start and end logits of the
answer span; padding positions get the dtype's lowest value, so they are never chosen.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .encoder_model import EncoderModel

Tensor = torch.Tensor

IGNORE_INDEX = -100  # label of a position that no loss reads (torch's cross_entropy default)


@dataclasses.dataclass
class MaskedLMOutput:
    logits: Tensor  # [B, L, V]; with labels: [M, V] at the M labeled positions (row-major order)
    loss: Optional[Tensor] = None  # mean cross-entropy over the labeled positions (0 when there are none)
    labels: Optional[Tensor] = None  # [M] the targets of those logits


@dataclasses.dataclass
class SpanOutput:
    start_logits: Tensor  # [B, L]
    end_logits: Tensor  # [B, L]
    loss: Optional[Tensor] = None  # (CE(start) + CE(end)) / 2 when positions were given


def _encoder(encoder: Optional[EncoderModel], encoder_kwargs: dict) -> EncoderModel:
    if encoder is not None and encoder_kwargs:
        raise TypeError(f"pass either encoder= or EncoderModel arguments, not both (got {sorted(encoder_kwargs)})")
    return encoder if encoder is not None else EncoderModel(**encoder_kwargs)


class MaskedLM(nn.Module):
    """EncoderModel + BERT's masked-LM head, decoder tied to ``encoder.embeddings.word_embeddings``."""

    def __init__(self, encoder: Optional[EncoderModel] = None, **encoder_kwargs) -> None:
        super().__init__()
        self.encoder = _encoder(encoder, encoder_kwargs)
        emb = self.encoder.embeddings
        w = emb.word_embeddings.weight
        d, eps = self.encoder.d_model, emb.norm.eps
        self.transform = nn.Linear(d, d, device=w.device, dtype=w.dtype)
        self.norm = nn.LayerNorm(d, eps=eps, device=w.device, dtype=w.dtype)
        self.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> MaskedLMOutput:
        h = self.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
        target = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels should have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            scored = labels != IGNORE_INDEX
            h, target = h[scored], labels[scored]
        x = F.gelu(self.transform(h))
        x = ops.residual_layer_norm(x, None, self.norm.weight, self.norm.bias, eps=self.norm.eps,
                                    backend=_op_backend(self.encoder, "layer_norm"))
        logits = F.linear(x, self.encoder.embeddings.word_embeddings.weight, self.bias)
        if target is None:
            return MaskedLMOutput(logits=logits)
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / max(target.numel(), 1)
        return MaskedLMOutput(logits=logits, loss=loss, labels=target)


class QuestionAnswering(nn.Module):
    """EncoderModel + a span head: start and end logits per token."""

    def __init__(self, encoder: Optional[EncoderModel] = None, **encoder_kwargs) -> None:
        super().__init__()
        self.encoder = _encoder(encoder, encoder_kwargs)
        w = self.encoder.embeddings.norm.weight
        self.qa_outputs = nn.Linear(self.encoder.d_model, 2, device=w.device, dtype=w.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, start_positions: Optional[Tensor] = None,
                end_positions: Optional[Tensor] = None) -> SpanOutput:
        h = self.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state
        start, end = self.qa_outputs(h).unbind(-1)
        if attention_mask is not None:
            pad = attention_mask == 0
            lowest = torch.finfo(start.dtype).min
            start, end = start.masked_fill(pad, lowest), end.masked_fill(pad, lowest)
        if (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        loss = None
        if start_positions is not None:
            loss = (F.cross_entropy(start.float(), start_positions) + F.cross_entropy(end.float(), end_positions)) / 2
        return SpanOutput(start_logits=start, end_logits=end, loss=loss)


def _op_backend(encoder: EncoderModel, op: str):
    b = encoder.backend
    return b.get(op) if isinstance(b, dict) else b
