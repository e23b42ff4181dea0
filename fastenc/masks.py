"""torch-style attention masks of the encoder modules: validation and the views the attention op takes."""
from __future__ import annotations

from typing import Optional

import torch

from .ops._common import FLOAT_DTYPES

Tensor = torch.Tensor


def merge_masks(src_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, nhead: int, L: int,
                S: int, device: torch.device):
    """Validate torch-style masks; src_mask [L,S] or [B*nhead,L,S] → a [B,H,L,S] view (no copy).

    The key padding mask stays [B, S] (the attention op skips padded key blocks).
    """
    for name, m in (("src_key_padding_mask", key_padding_mask), ("src_mask", src_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} should be a tensor or None, got {type(m).__name__}")
        if not (m.dtype == torch.bool or m.dtype in FLOAT_DTYPES):
            raise TypeError(f"{name} should be bool or float, got {m.dtype}")
        if m.device != device:
            raise ValueError(f"{name} is on {m.device} but src is on {device}")
    if key_padding_mask is not None and key_padding_mask.shape != (batch, S):
        raise ValueError(f"src_key_padding_mask should have shape {(batch, S)}, got {tuple(key_padding_mask.shape)}")
    if src_mask is not None:
        if src_mask.dim() == 2:
            if src_mask.shape != (L, S):
                raise ValueError(f"2D src_mask should have shape {(L, S)}, got {tuple(src_mask.shape)}")
            src_mask = src_mask.expand(batch, nhead, L, S)
        elif src_mask.dim() == 3:
            if src_mask.shape != (batch * nhead, L, S):
                raise ValueError(
                    f"3D src_mask should have shape {(batch * nhead, L, S)}, got {tuple(src_mask.shape)}"
                )
            src_mask = src_mask.view(batch, nhead, L, S)
        else:
            raise ValueError(f"src_mask should be 2D or 3D, got {src_mask.dim()}D")
    return src_mask, key_padding_mask


def is_causal_mask(mask: Optional[Tensor], L: int) -> bool:
    """True when mask is exactly the [L, L] causal mask (bool True above the diagonal, or float -inf)."""
    if mask is None or mask.dim() != 2 or mask.shape != (L, L):
        return False
    upper = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.all(torch.where(upper, mask == float("-inf"), mask == 0)))
