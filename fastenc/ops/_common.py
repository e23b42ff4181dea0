"""Plumbing every op shares: argument checks, dropout seeds and probabilities, the eager/compiled switch.

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

import math
import operator

import torch

from .. import constants
from .._util import either

Tensor = torch.Tensor

SEED_BOUND = 2**62

# The floating dtypes of the fast kernels (constants.KERNEL_DTYPES), and those every backend of every op accepts:
# those and float64 (the reference computes in them; fast kernels that lack one report it as unavailable).
# float8 and complex are rejected by validation.
KERNEL_DTYPES = tuple(getattr(torch, name) for name in constants.KERNEL_DTYPES)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def draw_seed(device: torch.device) -> Tensor:
    """A Philox key: int64 [1] on ``device``, from that device's generator."""
    return torch.randint(0, SEED_BOUND, (1,), device=device, dtype=torch.int64)


def check_dropout(p: object, where: str, name: str = "dropout_p") -> float:
    """A dropout probability as a float in [0, 1], else a TypeError/ValueError naming ``where`` and ``name``."""
    if isinstance(p, (str, bytes)):
        raise TypeError(f"{where}: {name} must be a number in [0, 1], got {type(p).__name__} {p!r}")
    try:
        value = float(p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a number in [0, 1], got {type(p).__name__}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{where}: {name} must be in [0, 1], got {p}")
    return value


def check_float(t: object, name: str, where: str, *, optional: bool = False) -> None:
    """``t`` is a tensor of one of FLOAT_DTYPES (None allowed when ``optional``), else a TypeError naming it."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be a floating-point tensor "
                        f"({either(str(d).replace('torch.', '') for d in FLOAT_DTYPES)}), got {t.dtype}")


def check_number(value: object, name: str, where: str, *, positive: bool = False) -> float:
    """A finite real number (a 1-element tensor too) as a float, else TypeError/ValueError naming ``name``."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{where}: {name} must be a finite number, got {type(value).__name__} {value!r}")
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: {name} must be a finite number, got {type(value).__name__}") from None
    if not math.isfinite(x) or (positive and x <= 0.0):
        raise ValueError(f"{where}: {name} must be {'positive and finite' if positive else 'finite'}, got {value}")
    return x


def check_count(value: object, name: str, where: str) -> int:
    """A non-negative integer (no float, no bool), else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an integer, got bool")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{where}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
    if n < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {n}")
    return n


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
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None  # (torch has no autocast state for meta tensors: asking raises)
    return torch.get_autocast_dtype(device.type)
