"""Fused residual-add + LayerNorm op: dispatch between the reference and the Triton kernel.

y = LayerNorm(x + dropout(branch + branch_bias)) · weight + bias; with ``prenorm`` the
un-normalised sum is returned too, as the new residual stream.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import register_op, resolve, triton_check

Tensor = torch.Tensor


def _triton_available(device, dtype=None, **_) -> Optional[str]:
    return triton_check(device, dtype)


register_op("layer_norm", {"triton": _triton_available}, auto_cuda=("triton",))


def residual_layer_norm(
    x: Tensor,
    branch: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    branch_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    backend: Optional[str] = None,
):
    """Returns y, or (y, residual) when ``prenorm``.  dropout_p is applied as given."""
    b = resolve("layer_norm", backend, device=x.device, dtype=x.dtype, hidden=x.shape[-1])
    if b == "reference":
        return reference.residual_layer_norm(
            x, branch, weight, bias, branch_bias=branch_bias, eps=eps, dropout_p=dropout_p, prenorm=prenorm
        )
    raise AssertionError(b)
