"""fastenc ops: one file per op, each the single dispatch point among its backends.

The fused encoder stack (``encoder``) is reached through ``fastenc.stack`` (``fastenc.encoder_stack``), whose
per-op composition is its reference.
"""
from . import encoder, linear_int8
from .embeddings import bert_embeddings
from .attention import attention, attention_varlen
from .ffn import ffn
from .layer_norm import residual_layer_norm
from .linear import linear
from .padding import Padding, pad, padding_info, unpad
from .pooler import bert_pooler

__all__ = ["Padding", "attention", "attention_varlen", "bert_embeddings", "bert_pooler", "encoder", "ffn", "linear", "linear_int8", "pad", "padding_info",
           "residual_layer_norm", "unpad"]
