"""Benchmark workloads: one sweep point of one suite (inputs, reference, FLOP/byte count).

A workload is shared by every provider that runs it (``providers.py``); its
reference is ``fastenc.reference`` (an fp32 run and a same-dtype run, for the
parity rule of ``fastenc.testing``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import reference
from . import formulas

Tensor = torch.Tensor
SUITES = ("attention", "layer_norm", "ffn", "layer", "encoder", "train")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Workload:
    suite: str
    mode: str  # "fwd" | "bwd" (backward alone) | "train" (forward + backward + optimizer step)
    # which parameter this point varies: "seqlen" | "batch" | "headdim" | "dtype" | "padding" | "hidden" |
    # "activation" | "dropout"
    sweep: str
    params: Dict[str, object]  # row columns: batch, seqlen, heads, head_dim, d_model, d_ff, activation, layers,
    # padding, dropout
    device: torch.device
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]  # one fresh random input copy
    grad_inputs: Tuple[int, ...]  # inputs differentiated in "bwd"/"train" (the first one is checked)
    reference: Callable[[tuple, bool], Tensor]  # (inputs, upcast) -> output
    valid: Optional[Callable[[tuple], Tensor]] = None  # bool mask (broadcastable) of output positions to compare
    flops: Optional[float] = None
    bytes: Optional[float] = None
    tokens: int = 0  # real (non-padding) tokens per call
    model: Optional[dict] = None  # layer/encoder: constructor args and the shared state_dict

    @property
    def key(self) -> tuple:
        return (self.suite, self.mode, self.sweep, str(self.dtype), tuple(sorted(self.params.items())))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def padded_lengths(batch: int, seqlen: int, padding: float) -> List[int]:
    """Per-sequence lengths whose mean padding ratio is ``padding``, spread evenly around it, each >= 1."""
    if not 0.0 <= padding < 1.0:
        raise ValueError(f"padding ratio must be in [0, 1), got {padding}")
    spread = min(padding, 1.0 - padding)
    out = []
    for b in range(batch):
        frac = padding + spread * ((b + 0.5) / batch * 2 - 1) if batch > 1 else padding
        out.append(max(1, seqlen - round(frac * seqlen)))
    return out


def key_padding_mask(lengths: Sequence[int], seqlen: int, device) -> Optional[Tensor]:
    """bool [B, L], True = padding (torch.nn's convention); None when nothing is padded."""
    if all(n == seqlen for n in lengths):
        return None
    pos = torch.arange(seqlen, device=device)
    return pos[None, :] >= torch.tensor(list(lengths), device=device)[:, None]


def _randn(shape, device, dtype, scale=1.0) -> Tensor:
    return torch.randn(shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def _valid_tokens(inputs: tuple, mask_index: int, trailing: int) -> Optional[Tensor]:
    kpm = inputs[mask_index]
    if kpm is None:
        return None
    return (~kpm).reshape(*kpm.shape, *([1] * trailing))


# --------------------------------------------------------------------------- op workloads


def attention(mode, sweep, device, dtype, *, batch, seqlen, heads, head_dim, padding=0.0, causal=False) -> Workload:
    lengths = padded_lengths(batch, seqlen, padding)

    def make_inputs():
        q, k, v = (_randn((batch, seqlen, heads, head_dim), device, dtype) for _ in range(3))
        return q, k, v, key_padding_mask(lengths, seqlen, device)

    def ref(inputs, upcast):
        q, k, v, kpm = inputs
        return reference.attention(q, k, v, key_padding_mask=kpm, is_causal=causal, upcast=upcast)

    return Workload(
        "attention", mode, sweep,
        dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, padding=padding, causal=causal),
        device, dtype, make_inputs, (0, 1, 2), ref, valid=lambda inp: _valid_tokens(inp, 3, 2),
        flops=formulas.attention_flops(lengths, lengths, heads, head_dim, causal=causal, mode=mode),
        tokens=sum(lengths),
    )


def layer_norm(mode, sweep, device, dtype, *, batch, seqlen, d_model, eps=1e-5) -> Workload:
    tokens = batch * seqlen

    def make_inputs():
        x = _randn((tokens, d_model), device, dtype)
        branch = _randn((tokens, d_model), device, dtype)
        w = (1 + 0.1 * torch.randn(d_model, device=device)).to(dtype)
        b = (0.1 * torch.randn(d_model, device=device)).to(dtype)
        bb = (0.1 * torch.randn(d_model, device=device)).to(dtype)
        return x, branch, w, b, bb

    def ref(inputs, upcast):
        x, branch, w, b, bb = inputs
        return reference.residual_layer_norm(x, branch, w, b, branch_bias=bb, eps=eps, upcast=upcast)

    elt = torch.tensor([], dtype=dtype).element_size()
    return Workload(
        "layer_norm", mode, sweep, dict(batch=batch, seqlen=seqlen, d_model=d_model), device, dtype, make_inputs,
        (0, 1, 2, 3, 4), ref, bytes=formulas.layer_norm_bytes(tokens, d_model, elt, mode=mode), tokens=tokens,
    )


def ffn(mode, sweep, device, dtype, *, batch, seqlen, d_model, d_ff, activation="gelu") -> Workload:
    tokens = batch * seqlen

    def make_inputs():
        x = _randn((batch, seqlen, d_model), device, dtype)
        w1 = _randn((d_ff, d_model), device, dtype, d_model ** -0.5)
        w2 = _randn((d_model, d_ff), device, dtype, d_ff ** -0.5)
        b1, b2 = _randn((d_ff,), device, dtype, 0.1), _randn((d_model,), device, dtype, 0.1)
        return x, w1, b1, w2, b2

    def ref(inputs, upcast):
        x, w1, b1, w2, b2 = inputs
        return reference.ffn(x, w1, b1, w2, b2, activation=activation, upcast=upcast)

    return Workload(
        "ffn", mode, sweep, dict(batch=batch, seqlen=seqlen, d_model=d_model, d_ff=d_ff, activation=activation),
        device, dtype,
        make_inputs, (0, 1, 2, 3, 4), ref, flops=formulas.ffn_flops(tokens, d_model, d_ff, mode=mode), tokens=tokens,
    )


# --------------------------------------------------------------------------- layer / encoder workloads

LAYER_ACTIVATION = "gelu"


def _torch_encoder(d_model, nhead, d_ff, layers, device, dtype) -> nn.Module:
    """The model every layer/encoder provider copies its weights from (post-norm, GELU, no dropout)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, d_ff, dropout=0.0, activation=LAYER_ACTIVATION,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device=device, dtype=dtype)


def model_workload(suite, mode, sweep, device, dtype, *, batch, seqlen, d_model, nhead, d_ff, layers,
                   padding=0.0, dropout=0.0) -> Workload:
    """One encoder layer (suite "layer", layers=1) or a stack ("encoder", "train").

    dropout: every provider's dropout probability (attention, residual and feed-forward), as
    fine-tuning runs; with dropout > 0 outputs are random, so the runner checks them for
    finiteness only (tests/ check the kernels' masks against the reference).
    """
    lengths = padded_lengths(batch, seqlen, padding)
    enc = _torch_encoder(d_model, nhead, d_ff, layers, device, dtype)
    state = {k: v.detach() for k, v in enc.state_dict().items()}
    per_layer = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
                 for i in range(layers)]

    def make_inputs():
        return _randn((batch, seqlen, d_model), device, dtype), key_padding_mask(lengths, seqlen, device)

    def ref(inputs, upcast):
        x, kpm = inputs
        for params in per_layer:
            x = reference.encoder_layer(x, params, nhead=nhead, activation=LAYER_ACTIVATION, batch_first=True,
                                        key_padding_mask=kpm, upcast=upcast)
        return x

    return Workload(
        suite, mode, sweep,
        dict(batch=batch, seqlen=seqlen, heads=nhead, head_dim=d_model // nhead, d_model=d_model, d_ff=d_ff,
             layers=layers, padding=padding, **({"dropout": dropout} if dropout else {})),
        device, dtype, make_inputs, (0,), ref, valid=lambda inp: _valid_tokens(inp, 1, 1),
        flops=layers * formulas.encoder_layer_flops(lengths, d_model, nhead, d_ff, mode=mode),
        tokens=sum(lengths),
        model=dict(d_model=d_model, nhead=nhead, d_ff=d_ff, layers=layers, state=state, activation=LAYER_ACTIVATION,
                   dropout=dropout),
    )
