"""fastenc: fast Transformer encoders for PyTorch (Triton attention and LayerNorm, CUDA FFN).

Drop-in: replace ``torch.nn.TransformerEncoderLayer`` / ``TransformerEncoder`` by
``fastenc.TransformerEncoderLayer`` / ``fastenc.TransformerEncoder``, or call
``fastenc.optimize(model)`` on an existing model.
"""
from . import models, ops, reference
from .backends import BACKENDS, BackendUnavailableError, backend_report, use_backend
from .convert import optimize, to_torch
from .models import EncoderModel, Embeddings, SequenceClassifier
from .modules import TransformerEncoder, TransformerEncoderLayer

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Embeddings",
    "EncoderModel",
    "SequenceClassifier",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "backend_report",
    "models",
    "ops",
    "optimize",
    "reference",
    "to_torch",
    "use_backend",
]
