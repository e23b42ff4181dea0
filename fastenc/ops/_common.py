"""Plumbing every op shares: dropout seeds and probabilities, the eager/compiled switch.

Seed policy (one for every op): a dropout call draws one Philox key, an int64 in [0, 2^62), from torch's
generator of the device whose kernel reads it, so ``torch.manual_seed`` reproduces a run.  Triton kernels
read the key from a tensor on their device (no host sync); the C++ extension takes it by value, so its key
is drawn on the CPU generator even for CUDA tensors (drawing on the GPU would cost a sync per call).  The
kernels replay the mask from the key in the backward: no mask is stored.

Eager vs compiled: each op registers its kernels as ``torch.library`` custom ops (with fake functions), so
``torch.compile(fullgraph=True)`` traces them; in eager mode the ops call the same Python functions
directly, skipping the dispatcher (tens of microseconds per call), as QuACK and flash-attention do.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

SEED_BOUND = 2**62


def draw_seed(device: torch.device) -> Tensor:
    """A Philox key: int64 [1] on ``device``, from that device's generator."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def check_dropout(p: object, where: str) -> float:
    """dropout_p as a float in [0, 1], else a ValueError naming ``where``."""
    try:
        value = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{where}: dropout_p must be a number in [0, 1], got {type(p).__name__}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{where}: dropout_p must be in [0, 1], got {p}")
    return value


def dropout_scale(p: float) -> float:
    """1 / (1 - p), the survivors' scale (0 when everything is dropped)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def compiling() -> bool:
    """True while torch.compile traces: call the registered custom ops, not the plain functions."""
    return torch.compiler.is_compiling()


def needs_grad(*tensors) -> bool:
    """Whether autograd must record this call (some input requires grad and grad mode is on)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_dtype(device: torch.device):
    """The lower precision torch.autocast runs matmul-like ops in on ``device``, or None when it is off.

    Fast kernels are not seen by autocast (they are not ATen ops, or they call ATen below autocast's
    casts), so a GEMM-like op casts its floating inputs itself, as ``F.linear`` would be cast.
    """
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)
