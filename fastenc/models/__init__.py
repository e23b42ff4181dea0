"""Encoder models (embeddings + fastenc encoder + pooling), task heads, masking, fine-tuning helpers,
Hugging Face adapters.

The Hugging Face adapter (``fastenc.models.hf``) imports transformers, so it is loaded
only on first use of one of its names.
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

_HF_NAMES = ("HFEncoder", "optimize_hf", "to_hf", "unsupported_reason")

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
    *_HF_NAMES,
]


def __getattr__(name):
    if name in _HF_NAMES:
        return getattr(importlib.import_module(".hf", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hf_hook(model, backend=None):
    """``fastenc.optimize``'s hook: convert the HF BERT-family models inside ``model`` (if transformers is in use)."""
    if "transformers" not in sys.modules:  # no transformers import: model cannot hold an HF model
        return model
    from .hf import optimize_hf

    return optimize_hf(model, backend=backend)
