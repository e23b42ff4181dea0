"""Activation names of the fused FFN kernels, from what torch and its users pass as an activation."""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference import ACTIVATIONS

Tensor = torch.Tensor


def activation_name(activation) -> Optional[str]:
    """'relu' | 'gelu' | 'gelu_tanh' for the activations the fused FFN supports, else None (a callable the
    layer runs in PyTorch).  A string must be one of those names."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation should be relu/gelu/gelu_tanh, not {activation!r}")
        return activation
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if isinstance(activation, functools.partial) and activation.func is F.gelu and not activation.args:
        return "gelu_tanh" if activation.keywords.get("approximate", "none") == "tanh" else "gelu"
    return None


def torch_activation(name: str) -> Union[str, Callable[[Tensor], Tensor]]:
    """What torch's layer takes for a fused activation name (torch has no "gelu_tanh" string)."""
    return functools.partial(F.gelu, approximate="tanh") if name == "gelu_tanh" else name
