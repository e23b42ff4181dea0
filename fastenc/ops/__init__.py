"""fastenc ops: one file per op, each the single dispatch point among its backends."""
from .attention import attention, attention_varlen
from .ffn import ffn
from .layer_norm import residual_layer_norm

__all__ = ["attention", "attention_varlen", "ffn", "residual_layer_norm"]
