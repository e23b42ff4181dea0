"""Fine-tuning helpers: find the encoder's parts, freeze the lowest ones, optimizer parameter groups.

They work on fastenc ``EncoderModel`` and the models built on it, on Hugging Face
BERT-family models, optimized or not (found by structure, without importing transformers),
and on a bare torch/fastenc ``TransformerEncoder``.  The fine-tuning application (data,
tokenizer, training loop, CLI) is ``fastenc.apps.finetune``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

_NORMS = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if c is not None)


# ----------------------------------------------------------------- model structure


def encoder_parts(model: nn.Module) -> Tuple[Optional[nn.Module], List[nn.Module]]:
    """(embeddings module or None, encoder layers bottom-up) of the first encoder found in model.

    Recognises fastenc EncoderModel, HF BERT/RoBERTa (``embeddings`` + ``encoder.layer``),
    HF DistilBERT (``embeddings`` + ``transformer.layer``), either optimized by fastenc
    (``.layers``) or not, and a bare fastenc/torch TransformerEncoder.
    """
    for m in model.modules():
        emb = getattr(m, "embeddings", None)
        for stack_attr in ("encoder", "transformer"):
            stack = getattr(m, stack_attr, None)
            layers = getattr(stack, "layers", None) or getattr(stack, "layer", None)
            if isinstance(emb, nn.Module) and isinstance(layers, nn.ModuleList):
                return emb, list(layers)
        if isinstance(m, nn.TransformerEncoder):
            return None, list(m.layers)
    raise ValueError(f"no encoder (embeddings + layer stack, or TransformerEncoder) found in {type(model).__name__}")


def freeze(model: nn.Module, *, embeddings: bool = False, layers: int = 0) -> List[str]:
    """Stop gradients of the embeddings and/or the lowest ``layers`` encoder layers.

    Returns the names of the parameters frozen.  Call before building the optimizer
    (``parameter_groups`` skips frozen parameters).
    """
    emb, stack = encoder_parts(model)
    if not 0 <= layers <= len(stack):
        raise ValueError(f"layers should be between 0 and {len(stack)} (the encoder depth), got {layers}")
    if embeddings and emb is None:
        raise ValueError(f"{type(model).__name__} has no embeddings module to freeze")
    targets = ([emb] if embeddings else []) + stack[:layers]
    frozen = {id(p) for t in targets for p in t.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names


def parameter_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.01,
                     layer_decay: float = 1.0) -> List[Dict]:
    """Optimizer groups with layer-wise learning-rate decay and no decay on biases and norms.

    Depth 0 is the embeddings, depth i+1 encoder layer i, depth n+1 everything else
    (pooler, head, final norm); a parameter at depth k gets ``lr * layer_decay**(n+1-k)``.
    Biases and the parameters of norm modules get weight_decay 0.  Frozen parameters
    are left out.  Each group carries ``lr_scale`` for schedulers.
    """
    if lr <= 0 or not 0 < layer_decay <= 1 or weight_decay < 0:
        raise ValueError(f"need lr > 0, 0 < layer_decay <= 1, weight_decay >= 0; got lr={lr}, "
                         f"layer_decay={layer_decay}, weight_decay={weight_decay}")
    emb, stack = encoder_parts(model)
    top = len(stack) + 1
    depth = {}
    for k, part in enumerate(([emb] if emb is not None else []) + stack):
        for p in part.parameters():
            depth[id(p)] = k if emb is not None else k + 1
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d = depth.get(id(p), top)
        no_decay = name.endswith("bias") or id(p) in norm_params
        key = (d, no_decay)
        if key not in groups:
            scale = layer_decay ** (top - d)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
