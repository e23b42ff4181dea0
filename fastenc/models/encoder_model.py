"""A whole BERT-style encoder: embeddings + fastenc encoder stack + pooling (+ classifier head).

Masks follow the tokenizer convention: ``attention_mask`` [B, L] with 1 (or True) for
real tokens and 0 for padding.  It reaches the attention op as a [B, L] key padding
mask.  Hidden states at padding positions are unspecified; poolings ignore them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import BackendSpec
from ..modules import BackendSetting, TransformerEncoder, TransformerEncoderLayer
from .embeddings import Embeddings

Tensor = torch.Tensor

POOLINGS = ("cls", "mean", "max")


def pool(hidden: Tensor, attention_mask: Optional[Tensor], mode: str = "cls") -> Tensor:
    """[B, L, d] -> [B, d]: first token ("cls"), mean over real tokens, or max over real tokens.

    A sequence with no real token pools to zeros (mean and max), never NaN or -inf.
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling should be one of {POOLINGS}, got {mode!r}")
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1) if mode == "mean" else hidden.amax(dim=1)
    keep = attention_mask.bool()[..., None]
    if mode == "mean":
        count = keep.sum(dim=1).clamp_min(1).to(hidden.dtype)
        return (hidden * keep).sum(dim=1) / count
    filled = hidden.masked_fill(~keep, float("-inf")).amax(dim=1)
    return torch.where(keep.any(dim=1), filled, torch.zeros_like(filled))


class Pooler(nn.Module):
    """:func:`pool` as a module (no parameters)."""

    def __init__(self, mode: str = "cls") -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling should be one of {POOLINGS}, got {mode!r}")
        self.mode = mode

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return pool(hidden, attention_mask, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: Tensor  # [B, L, d]
    pooled: Tensor  # [B, d]


@dataclasses.dataclass
class ClassifierOutput:
    logits: Tensor  # [B, num_labels]
    loss: Optional[Tensor] = None  # cross-entropy when labels were given


def _padding_mask(attention_mask: Optional[Tensor], shape) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask should have shape {tuple(shape)}, got {tuple(attention_mask.shape)}")
    return ~attention_mask.bool()


class EncoderModel(BackendSetting, nn.Module):
    """Embeddings → ``fastenc.TransformerEncoder`` (batch-first) → pooling.

    Defaults are BERT-base's (post-norm, erf GELU, eps 1e-12).  With ``norm_first`` a
    final LayerNorm closes the stack.  ``attention_dropout`` defaults to ``dropout``.
    """

    def __init__(self, vocab_size: int, d_model: int = 768, nhead: int = 12, num_layers: int = 12,
                 dim_feedforward: int = 3072, *, dropout: float = 0.1, attention_dropout: Optional[float] = None,
                 activation: str = "gelu", layer_norm_eps: float = 1e-12, max_position: int = 512,
                 positional: str = "learned", type_vocab_size: int = 2, pad_token_id: Optional[int] = 0,
                 norm_first: bool = False, pooling: str = "cls", backend: BackendSpec = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers should be at least 1, got {num_layers}")
        factory = dict(device=device, dtype=dtype)
        self.backend = backend
        self.embeddings = Embeddings(vocab_size, d_model, max_position, positional=positional,
                                     type_vocab_size=type_vocab_size, pad_token_id=pad_token_id,
                                     layer_norm_eps=layer_norm_eps, dropout=dropout, backend=backend, **factory)
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                        batch_first=True, norm_first=norm_first, **factory)
        if attention_dropout is not None:
            layer.self_attn.dropout = attention_dropout
        final_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory) if norm_first else None
        self.encoder = TransformerEncoder(layer, num_layers, final_norm, backend=backend)
        self.pooler = Pooler(pooling)

    @property
    def d_model(self) -> int:
        return self.embeddings.norm.normalized_shape[0]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> EncoderOutput:
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        kpm = _padding_mask(attention_mask, input_ids.shape)
        h = self.encoder(x, src_key_padding_mask=kpm)
        return EncoderOutput(last_hidden_state=h, pooled=self.pooler(h, attention_mask))


class SequenceClassifier(nn.Module):
    """EncoderModel + dropout + Linear head; cross-entropy loss when ``labels`` are given.

    Build it from an existing ``encoder=EncoderModel(...)`` or from EncoderModel's
    keyword arguments.  ``classifier_dropout`` defaults to the encoder's dropout.
    """

    def __init__(self, num_labels: int, encoder: Optional[EncoderModel] = None, *,
                 classifier_dropout: Optional[float] = None, **encoder_kwargs) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels should be at least 1, got {num_labels}")
        if encoder is not None and encoder_kwargs:
            raise TypeError(f"pass either encoder= or EncoderModel arguments, not both (got {sorted(encoder_kwargs)})")
        self.encoder = encoder if encoder is not None else EncoderModel(**encoder_kwargs)
        if classifier_dropout is None:
            classifier_dropout = self.encoder.embeddings.dropout.p
        self.num_labels = num_labels
        self.dropout = nn.Dropout(classifier_dropout)
        w = self.encoder.embeddings.norm.weight
        self.classifier = nn.Linear(self.encoder.d_model, num_labels, device=w.device, dtype=w.dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> ClassifierOutput:
        pooled = self.encoder(input_ids, attention_mask, token_type_ids).pooled
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss)
