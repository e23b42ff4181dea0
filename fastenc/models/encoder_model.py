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
from ..backend_setting import BackendSetting
from ..modules import TransformerEncoder, TransformerEncoderLayer
from ..ops._common import check_dropout
from .embeddings import Embeddings

Tensor = torch.Tensor

POOLINGS = ("cls", "mean", "max")


def pool(hidden: Tensor, attention_mask: Optional[Tensor], mode: str = "cls") -> Tensor:
    """[B, L, d] -> [B, d]: first token ("cls"), mean over real tokens, or max over real tokens.

    A sequence with no real token pools to zeros (mean and max), never NaN or -inf.
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling should be one of {POOLINGS}, got {mode!r}")
    if hidden.shape[1] == 0:  # no token at all
        return hidden.new_zeros(hidden.shape[0], hidden.shape[2])
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


def bert_init(model: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT's initialisation in place: weights of Linear / Embedding layers (and the fused
    attention ``in_proj_weight``) ~ N(0, std), their biases 0; norms keep weight 1, bias 0.
    (PyTorch's defaults draw embeddings from N(0, 1): a from-scratch classifier on fastenc's
    review set then reached 0.60-0.62 held-out accuracy against 0.68-0.71 with this init.)"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if isinstance(owner, (nn.Linear, nn.Embedding)) or leaf == "in_proj_weight":
                if leaf.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
            elif leaf == "in_proj_bias":
                p.zero_()
    return model


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


def _padding_mask(attention_mask: Optional[Tensor], input_ids: Tensor) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.is_complex():
        raise TypeError(f"attention_mask should be a bool, integer or float tensor (1 = token, 0 = padding), got "
                        f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape) or attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask should have input_ids' shape {tuple(input_ids.shape)} on {input_ids.device}, "
                         f"got {tuple(attention_mask.shape)} on {attention_mask.device}")
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
            layer.self_attn.dropout = check_dropout(attention_dropout, "EncoderModel", "attention_dropout")
        final_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory) if norm_first else None
        self.encoder = TransformerEncoder(layer, num_layers, final_norm, backend=backend)
        self.pooler = Pooler(pooling)

    @property
    def d_model(self) -> int:
        return self.embeddings.norm.normalized_shape[0]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> EncoderOutput:
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        kpm = _padding_mask(attention_mask, input_ids)
        h = self.encoder(x, src_key_padding_mask=kpm)
        return EncoderOutput(last_hidden_state=h, pooled=self.pooler(h, attention_mask))


IGNORE_INDEX = -100  # F.cross_entropy's default: a label that takes no part in the loss


def _check_labels(labels: Tensor, input_ids: Tensor, num_labels: int) -> None:
    """int64 labels [B] in [0, num_labels) or IGNORE_INDEX (one host sync on a GPU; skipped while torch.compile
    traces)."""
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"labels should be an int64 tensor [batch], got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    B = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() else None
    if tuple(labels.shape) != (B,) or labels.device != input_ids.device:
        raise ValueError(f"labels should have shape ({B},) on {input_ids.device}, got {tuple(labels.shape)} on "
                         f"{labels.device}")
    if torch.compiler.is_compiling() or labels.device.type == "meta":
        return
    if bool((((labels < 0) | (labels >= num_labels)) & (labels != IGNORE_INDEX)).any()):
        raise ValueError(f"labels should be in [0, {num_labels}) (or {IGNORE_INDEX} to ignore one), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")


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
        if labels is not None:
            _check_labels(labels, input_ids, self.num_labels)
        pooled = self.encoder(input_ids, attention_mask, token_type_ids).pooled
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss)
