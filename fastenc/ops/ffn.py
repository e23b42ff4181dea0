"""Feed-forward block op: dispatch between the reference and the CUDA C++ extension.

y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual), act in relu / gelu (erf) / gelu_tanh.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import extension, register_op, resolve

Tensor = torch.Tensor


def _cuda_available(device, dtype=None, **_) -> Optional[str]:
    if extension() is None:
        return "the fastenc._C extension is not built (pip install without FASTENC_SKIP_NATIVE)"
    return None


register_op("ffn", {"cuda": _cuda_available}, auto_cuda=("cuda",))


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """x [..., d] -> [..., d] through Linear(d, f) -> act -> dropout -> Linear(f, d)."""
    b = resolve("ffn", backend, device=x.device, dtype=x.dtype, activation=activation)
    if b == "reference":
        return reference.ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, residual=residual)
    raise AssertionError(b)
