"""Encoder models (embeddings + fastenc encoder + pooling), task heads, masking, fine-tuning helpers,
Hugging Face adapters.

The Hugging Face adapters (``fastenc.models.hf`` for the BERT family, ``fastenc.models.modernbert``)
and the export of fastenc's own models to BERT (``fastenc.models.bert_export``) import transformers,
so they are loaded only on first use of one of their names.
"""
import importlib
import sys

from .embeddings import Embeddings, sinusoidal_positions
from .encoder_model import (
    ClassifierOutput,
    EncoderModel,
    EncoderOutput,
    Pooler,
    SequenceClassifier,
    bert_init,
    pool,
)
from .finetuning import encoder_parts, freeze, parameter_groups
from .heads import IGNORE_INDEX, MaskedLM, MaskedLMOutput, QuestionAnswering, SpanOutput
from .masking import mask_tokens

_HF_NAMES = ("HFEncoder", "optimize_hf", "unsupported_reason")
_MODERNBERT_NAMES = ("FastModernBertModel", "optimize_modernbert")
_BERT_EXPORT_NAMES = ("bert_config", "to_bert")

__all__ = [
    "ClassifierOutput",
    "Embeddings",
    "EncoderModel",
    "EncoderOutput",
    "IGNORE_INDEX",
    "MaskedLM",
    "MaskedLMOutput",
    "Pooler",
    "QuestionAnswering",
    "SequenceClassifier",
    "SpanOutput",
    "bert_init",
    "encoder_parts",
    "freeze",
    "hf_hook",
    "mask_tokens",
    "parameter_groups",
    "pool",
    "sinusoidal_positions",
    "to_hf",
    *_HF_NAMES,
    *_MODERNBERT_NAMES,
    *_BERT_EXPORT_NAMES,
]


def __getattr__(name):
    if name in _HF_NAMES:
        return getattr(importlib.import_module(".hf", __name__), name)
    if name in _MODERNBERT_NAMES:
        return getattr(importlib.import_module(".modernbert", __name__), name)
    if name in _BERT_EXPORT_NAMES:
        return getattr(importlib.import_module(".bert_export", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hf_hook(model, backend=None):
    """``fastenc.optimize``'s hook: convert the HF BERT-family models inside ``model`` (if transformers is in use)."""
    if "transformers" not in sys.modules:  # no transformers import: model cannot hold an HF model
        return model
    from .hf import optimize_hf
    from .modernbert import optimize_modernbert

    return optimize_modernbert(optimize_hf(model, backend=backend), backend=backend)


def to_hf(model):
    """Undo ``fastenc.optimize`` on the Hugging Face models inside ``model`` (BERT family, ModernBERT)."""
    from .hf import to_hf as bert_to_hf
    from .modernbert import to_hf as modernbert_to_hf

    return modernbert_to_hf(bert_to_hf(model))
