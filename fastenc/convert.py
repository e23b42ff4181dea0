"""``optimize(model)``: swap torch encoder modules for fastenc twins that hold the same tensors.

The walk replaces every ``torch.nn.TransformerEncoder`` and every
``torch.nn.TransformerEncoderLayer`` (exact torch classes, not fastenc's
subclasses) in place and returns the model.  Parameters are shared, not copied:
the converted model's ``state_dict`` has the same keys and the same storage.
``to_torch`` walks back.
"""
from __future__ import annotations

import sys

import torch.nn as nn

from .backends import BackendSpec, check_spec
from .modules import (
    TransformerEncoder,
    TransformerEncoderLayer,
    encoder_from_torch,
    encoder_to_torch,
    layer_from_torch,
    layer_to_torch,
)


def _convert_one(module: nn.Module, backend: BackendSpec):
    if type(module) is nn.TransformerEncoder:
        return encoder_from_torch(module, backend)
    if type(module) is nn.TransformerEncoderLayer:
        return layer_from_torch(module, backend)
    return None


def optimize(model: nn.Module, *, backend: BackendSpec = None) -> nn.Module:
    """Replace torch encoder modules inside ``model`` (in place) and return the model.

    backend: None (follow ``use_backend``/``FASTENC_BACKEND``), a name, or a per-op dict,
    stored on every converted layer.
    """
    check_spec(backend)
    from .models import hf_hook  # Hugging Face BERT-family models (and modules holding them) go to their adapter

    model = hf_hook(model, backend)
    top = _convert_one(model, backend)
    if top is not None:
        return top
    for name, child in list(model.named_children()):
        new = _convert_one(child, backend)
        if new is not None:
            setattr(model, name, new)
        else:
            optimize(child, backend=backend)
    return model


def to_torch(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: fastenc encoder modules back to torch's (and Hugging Face's) classes."""
    if "transformers" in sys.modules:
        from .models import to_hf

        model = to_hf(model)
    if type(model) is TransformerEncoder:
        return encoder_to_torch(model)
    if type(model) is TransformerEncoderLayer:
        return layer_to_torch(model)
    for name, child in list(model.named_children()):
        new = to_torch(child)
        if new is not child:
            setattr(model, name, new)
    return model
