"""Inputs that calibrate int8 (``fastenc.quantize``) without data: random token ids for every model inside
``model`` whose vocabulary fastenc knows (an HF base model, an ``EncoderModel``).

A model's outlier channels are structural: random tokens put the same channels at the top of each GEMM's
input ranges as real text does (all-MiniLM-L6-v2: embeddings' min cosine against fp32 0.99941 calibrated on
random tokens, 0.99947 on real sentences; README, "int8 inference").
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn

from .encoder_model import EncoderModel

BATCH, LENGTH = 8, 128
FIRST_ID = 5  # below it: the special tokens of BERT-family vocabularies ([PAD], [UNK], [CLS], [SEP], [MASK])


def random_token_calls(model: nn.Module, seed: int = 0) -> List[Callable[[], object]]:
    """One call per calibratable model inside ``model``: its forward on random ids (all real tokens)."""
    calls = []
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        vocab = length = None
        if isinstance(m, EncoderModel):
            vocab, length = m.embeddings.word_embeddings.num_embeddings, m.embeddings.max_position
        elif type(m).__module__.startswith("fastenc.models.") and hasattr(m, "config") and hasattr(m, "embeddings"):
            cfg = m.config  # an HF base model fastenc converted (its class lives in fastenc.models)
            vocab, length = cfg.vocab_size, getattr(cfg, "max_position_embeddings", LENGTH)
        if vocab is None or vocab <= FIRST_ID:
            continue
        device = next(m.parameters()).device
        ids = torch.randint(FIRST_ID, vocab, (BATCH, min(LENGTH, length)), generator=g).to(device)
        mask = torch.ones_like(ids)
        if isinstance(m, EncoderModel):
            calls.append(lambda m=m, ids=ids, mask=mask: m(ids, mask))
        else:
            calls.append(lambda m=m, ids=ids, mask=mask: m(input_ids=ids, attention_mask=mask))
    return calls
