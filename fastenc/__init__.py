"""fastenc: fast Transformer encoders for PyTorch (Triton attention and LayerNorm, CUDA FFN).

Drop-in: replace ``torch.nn.TransformerEncoderLayer`` / ``TransformerEncoder`` by
``fastenc.TransformerEncoderLayer`` / ``fastenc.TransformerEncoder``, or call
``fastenc.optimize(model)`` on an existing model.
"""
from . import models, ops, reference, stack
from .backends import BACKENDS, BackendUnavailableError, use_backend
from .convert import backend_report, optimize, quantize, to_torch
from .models import EncoderModel, Embeddings, SequenceClassifier
from .layer import LayerSpec, LayerWeights, NormWeights
from .modules import TransformerEncoder, TransformerEncoderLayer
from .stack import encoder_stack
from .weight_cache import clear_caches

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Embeddings",
    "EncoderModel",
    "LayerSpec",
    "LayerWeights",
    "NormWeights",
    "SequenceClassifier",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "backend_report",
    "clear_caches",
    "encoder_stack",
    "models",
    "ops",
    "optimize",
    "quantize",
    "reference",
    "stack",
    "to_torch",
    "use_backend",
]
