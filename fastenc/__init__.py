"""fastenc: fast Transformer encoders for PyTorch (Triton attention and LayerNorm, CUDA FFN).

Drop-in: replace ``torch.nn.TransformerEncoderLayer`` / ``TransformerEncoder`` by
``fastenc.TransformerEncoderLayer`` / ``fastenc.TransformerEncoder``, or call
``fastenc.optimize(model)`` on an existing model.
"""
from . import ops, reference
from .backends import BACKENDS, BackendUnavailableError, backend_report, use_backend

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "backend_report", "ops", "reference", "use_backend"]
