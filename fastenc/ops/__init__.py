"""fastenc ops: one file per op, each the single dispatch point among its backends."""
from .attention import attention, attention_varlen
from .encoder import encoder_stack
from .ffn import ffn
from .layer_norm import residual_layer_norm
from .linear import linear
from .padding import Padding, pad, padding_info, unpad

__all__ = ["Padding", "attention", "attention_varlen", "encoder_stack", "ffn", "linear", "pad", "padding_info", "residual_layer_norm", "unpad"]
