"""BERT's masking for masked-language-model pretraining (Devlin et al. 2019, section 3.1).

Each real, non-special token is chosen with probability ``probability`` (15%); a chosen
token becomes ``[MASK]`` with probability 0.8, a random non-special token with 0.1, and
stays itself with 0.1.  Labels hold the original id at chosen positions and -100 (ignored
by the loss) elsewhere.  Draws come from ``generator`` (or torch's default one).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from .heads import IGNORE_INDEX

Tensor = torch.Tensor


def mask_tokens(input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, mask_token_id: int,
                vocab_size: int, special_ids: Iterable[int] = (), probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """(masked input_ids, labels) for input_ids [B, L]; attention_mask [B, L] (1 = token) or None."""
    if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.dim() != 2:
        raise TypeError(f"input_ids should be a 2D integer tensor, got {input_ids.dtype} of shape "
                        f"{tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask should have shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"probability should be in (0, 1], got {probability}")
    special = sorted(set(int(i) for i in special_ids) | {mask_token_id})
    if not 0 <= mask_token_id < vocab_size or any(not 0 <= i < vocab_size for i in special):
        raise ValueError(f"mask_token_id and special_ids should be in [0, vocab_size={vocab_size}), got "
                         f"mask_token_id={mask_token_id}, special_ids={special}")
    device = input_ids.device
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special] = False
    ordinary = allowed.nonzero().squeeze(1).to(device)  # ids a random replacement may take
    if ordinary.numel() == 0:
        raise ValueError("the vocabulary has no ordinary (non-special) token to sample replacements from")

    def uniform():
        return torch.rand(input_ids.shape, generator=generator).to(device)

    candidate = ~torch.isin(input_ids, torch.tensor(special, device=device))
    if attention_mask is not None:
        candidate &= attention_mask.bool()
    chosen = candidate & (uniform() < probability)
    how = uniform()
    to_mask = chosen & (how < 0.8)
    to_random = chosen & (how >= 0.8) & (how < 0.9)
    pick = torch.randint(ordinary.numel(), input_ids.shape, generator=generator).to(device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, ordinary[pick].to(input_ids.dtype), masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels
