"""Input embeddings of a BERT-style encoder.

x = LayerNorm(word[ids] + position[pos] + token_type[types]) then dropout, the
LayerNorm computed by fastenc's fused residual+LayerNorm op (the token-type term is
its "branch").  Positions are learned (an ``nn.Embedding``) or the fixed sinusoidal
table of "Attention Is All You Need" (a non-persistent buffer).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import BackendSpec
from ..backend_setting import BackendSetting
from ..ops.layer_norm import residual_layer_norm_unchecked

Tensor = torch.Tensor

POSITIONAL = ("learned", "sinusoidal")


def sinusoidal_positions(num_positions: int, dim: int) -> Tensor:
    """[num_positions, dim] table: pe[p, 2i] = sin(p / 10000^(2i/dim)), pe[p, 2i+1] = cos(same angle)."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table.float()


class Embeddings(BackendSetting, nn.Module):
    """Token + position (+ token-type) embeddings, LayerNorm, dropout.

    type_vocab_size=0 means no token-type (segment) embeddings.  ``pad_token_id`` rows
    of the word table start at zero and get no gradient (``nn.Embedding``'s padding_idx).
    """

    def __init__(self, vocab_size: int, d_model: int, max_position: int = 512, *, positional: str = "learned",
                 type_vocab_size: int = 2, pad_token_id: Optional[int] = 0, layer_norm_eps: float = 1e-12,
                 dropout: float = 0.1, backend: BackendSpec = None, device=None, dtype=None) -> None:
        super().__init__()
        if positional not in POSITIONAL:
            raise ValueError(f"positional should be one of {POSITIONAL}, got {positional!r}")
        if vocab_size < 1 or d_model < 1 or max_position < 1 or type_vocab_size < 0:
            raise ValueError(f"embedding sizes should be positive, got vocab_size={vocab_size}, d_model={d_model}, "
                             f"max_position={max_position}, type_vocab_size={type_vocab_size}")
        factory = dict(device=device, dtype=dtype)
        self.positional = positional
        self.max_position = max_position
        self.word_embeddings = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id, **factory)
        if positional == "learned":
            self.position_embeddings = nn.Embedding(max_position, d_model, **factory)
        else:
            self.register_buffer("position_table", sinusoidal_positions(max_position, d_model).to(**factory),
                                 persistent=False)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, d_model, **factory) if type_vocab_size else None
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.dropout = nn.Dropout(dropout)
        self.backend = backend

    def _check_ids(self, input_ids, token_type_ids, position_ids) -> None:
        """Types, shapes, and values in [0, table size) of every id tensor (one host sync for all)."""
        tables = [("input_ids", input_ids, self.word_embeddings.num_embeddings),
                  ("token_type_ids", token_type_ids, getattr(self.token_type_embeddings, "num_embeddings", 0)),
                  ("position_ids", position_ids, self.max_position)]
        for name, ids, _ in tables:
            if (ids is not None or name == "input_ids") and (not isinstance(ids, Tensor)
                                                             or ids.dtype not in (torch.int32, torch.int64)):
                got = getattr(ids, "dtype", type(ids).__name__)
                raise TypeError(f"{name} should be an integer (int32/int64) tensor, got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids should be 2D [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.word_embeddings.weight.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the embeddings on "
                             f"{self.word_embeddings.weight.device}")
        B, L = input_ids.shape
        if L > self.max_position and position_ids is None:
            raise ValueError(f"sequence length {L} exceeds max_position={self.max_position}")
        if token_type_ids is not None and self.token_type_embeddings is None:
            raise ValueError("token_type_ids given but the embeddings were built with type_vocab_size=0")
        tables = [t for t in tables if t[1] is not None]
        for name, ids, _ in tables[1:]:
            if ids.device != input_ids.device or ids.dim() > 2 or any(n not in (1, m) for n, m in
                                                                      zip(ids.shape[::-1], (L, B))):
                raise ValueError(f"{name} should broadcast to input_ids' shape {(B, L)} on {input_ids.device}, got "
                                 f"{tuple(ids.shape)} on {ids.device}")
        if torch.compiler.is_compiling() or input_ids.device.type == "meta":
            return
        bad = torch.stack([((ids < 0) | (ids >= size)).any() for _, ids, size in tables]).tolist()
        for (name, ids, size), b in zip(tables, bad):
            if b:
                raise ValueError(f"{name} should be in [0, {size}) (its table's size), got values from "
                                 f"{int(ids.min())} to {int(ids.max())}")

    def _positions(self, position_ids: Tensor) -> Tensor:
        if self.positional == "learned":
            return self.position_embeddings(position_ids)
        return self.position_table[position_ids]

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids [B, L] (int) -> [B, L, d_model]; positions default to 0..L-1.

        Ids index tables: their values are checked (one host sync on a GPU; skipped while torch.compile traces)."""
        self._check_ids(input_ids, token_type_ids, position_ids)
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)[None, :]
        x = self.word_embeddings(input_ids) + self._positions(position_ids)
        branch = None
        if self.token_type_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.expand(B, L)
            branch = self.token_type_embeddings(types)
        x = residual_layer_norm_unchecked(x, branch, self.norm.weight, self.norm.bias, None, self.norm.eps, 0.0,
                                          False, self._backend("layer_norm"))
        return F.dropout(x, self.dropout.p, self.training)
