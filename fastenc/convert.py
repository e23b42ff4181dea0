"""``optimize(model)``: swap torch encoder modules for fastenc twins that hold the same tensors.

The walk replaces every ``torch.nn.TransformerEncoder`` and every
``torch.nn.TransformerEncoderLayer`` (exact torch classes, not fastenc's
subclasses) in place and returns the model.  Parameters are shared, not copied:
the converted model's ``state_dict`` has the same keys and the same storage.
``to_torch`` walks back.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from . import backends
from ._util import warn_once
from .backends import BackendSpec, check_spec
from .modules import (
    TransformerEncoder,
    TransformerEncoderLayer,
    encoder_from_torch,
    encoder_to_torch,
    layer_from_torch,
    layer_to_torch,
)
from .stack import QUANTIZE, StackOwner, explain, recording_ranges
from .weight_cache import cache_of


def _convert_one(module: nn.Module, backend: BackendSpec):
    if type(module) is nn.TransformerEncoder:
        return encoder_from_torch(module, backend)
    if type(module) is nn.TransformerEncoderLayer:
        return layer_from_torch(module, backend)
    return None


def optimize(model: nn.Module, *, backend: BackendSpec = None, quantize: Optional[str] = None) -> nn.Module:
    """Replace torch encoder modules inside ``model`` (in place) and return the model.

    backend: None (follow ``use_backend``/``FASTENC_BACKEND``), a name, or a per-op dict,
    stored on every converted layer.  quantize: None, or ``"int8"`` (:func:`quantize`, calibrated on random
    tokens).
    """
    check_spec(backend)
    _check_quantize(quantize)
    model = _optimize(model, backend)
    return _set_quantize(model, quantize) if quantize is not None else model


def _check_quantize(mode: Optional[str]) -> None:
    if mode not in QUANTIZE:
        raise ValueError(f"fastenc: quantize must be one of {QUANTIZE}, got {mode!r}")


def quantize(model: nn.Module, mode: Optional[str] = "int8", *,
             calibration: Union[str, Iterable[dict], None] = "random") -> nn.Module:
    """Run every fastenc encoder stack inside ``model`` in int8 in inference (``mode="int8"``), or in its float
    dtype again (``mode=None``); in place, returns ``model``.

    int8 (``fastenc.stack``, ``INT8_GEMMS``): weights per output channel, quantized once per weight generation
    (derived data, rebuilt after an optimizer step); QKV, out and FFN1 smoothed by SmoothQuant factors from the
    calibrated input ranges of each GEMM; FFN2 with its widest input channels (by calibrated range) in float;
    activations per token at run time; attention and LayerNorm in the model's dtype.  calibration:
    ``"random"`` runs the model's own embeddings on random token ids (every HF base model and ``EncoderModel``
    inside; a bare encoder stack is not calibrated); an iterable of input dicts runs ``model(**batch)`` on
    each; None: none.  Without calibrated ranges the GEMMs are not smoothed and FFN2 stays in the model's
    dtype.  Training, and calls that need gradients, run the float weights.  Call after :func:`optimize`.
    """
    _check_quantize(mode)
    return _set_quantize(model, mode, calibration)


def _set_quantize(model: nn.Module, mode: Optional[str], calibration="random") -> nn.Module:
    owners = [m for m in model.modules() if isinstance(m, StackOwner)]
    if not owners:
        raise ValueError("fastenc.quantize: the model holds no fastenc encoder stack (call fastenc.optimize first)")
    for m in owners:
        m.quantize, m.int8_ranges = None, None
    ext = backends.extension()
    if mode == "int8" and ext is not None and ext.cpu_int8_kernel() == "fp32_exact":
        warn_once("fastenc: no int8 kernel at this CPU's capability (below AVX2: a CPU without it, a non-x86 build, "
                  "or FASTENC_CPU_CAPABILITY): int8 runs as exact fp32 GEMMs of the int8 values where the build has "
                  "CPU kernels for this capability, else as the PyTorch reference; slower than the float model")
    if mode == "int8" and calibration is not None:
        _calibrate(model, owners, calibration)
    for m in owners:
        m.quantize = mode
    return model


def _calibrate(model: nn.Module, owners, calibration) -> None:
    """Each stack's input ranges per int8 GEMM, from float forwards of the calibration inputs."""
    from .models.calibration import random_token_calls

    if isinstance(calibration, str):
        if calibration != "random":
            raise ValueError(f"fastenc.quantize: calibration must be 'random', an iterable of input dicts or None, "
                             f"got {calibration!r}")
        calls = random_token_calls(model)
    else:
        calls = [lambda b=b: model(**b) for b in calibration]
    training = model.training
    model.eval()
    try:
        with torch.inference_mode(), recording_ranges() as ranges:
            for call in calls:
                call()
    finally:
        model.train(training)
    for m in owners:
        m.int8_ranges = ranges.get(id(cache_of(m)))


def _optimize(model: nn.Module, backend: BackendSpec) -> nn.Module:
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
            _optimize(child, backend)
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


def backend_report(device: Optional[str] = None, dtype: torch.dtype = torch.float16, head_dim: int = 64, *,
                   model: Optional[nn.Module] = None) -> str:
    """Which backend each op takes for a typical call on ``device``, and why (``backends.backend_report``); with
    ``model``, also how each encoder stack inside it ran its last call: the fused C++ stack or op by op, and why
    (the one decision ``fastenc.stack`` makes per call)."""
    report = backends.backend_report(device, dtype, head_dim)
    return report if model is None else f"{report}\nencoder stacks of the model (last call):\n{explain(model)}"
