"""Linear op: y = x Wᵀ + b (``nn.Linear``), the attention projections of fastenc's layers.

Backends: ``reference`` (``fastenc.reference.linear``: torch's GEMM) and ``cpu``: oneDNN inner
products (the extension's ``cpu_linear``, ``csrc/linear/linear.cpp``) for the forward (bias in the
epilogue) and, in fp32, the backward's dx = dy W and dW = dyᵀ x.  Why: torch's default fp32 CPU GEMM
is MKL's sgemm, which on the AMD build machine runs about half oneDNN's rate (benchmarks/README.md,
"CPU GEMMs"); in bf16 torch's mm is oneDNN's matmul already, so the backward keeps it.  Below 2²¹
multiply-adds per GEMM, or for a dtype oneDNN lacks on this CPU, the ``cpu`` backend runs ATen's GEMM
(oneDNN's ~20 µs per call outweighs its faster kernel there), as the FFN's CPU path does.
The kernels run through the custom ops ``fastenc::linear_fwd`` / ``fastenc::linear_bwd`` (fakes, so
``torch.compile(fullgraph=True)`` traces them) under an ``autograd.Function``; eagerly the same
functions are called without the dispatcher.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve
from ..constants import ONEDNN_MIN_MACS  # multiply-adds per GEMM from which oneDNN beats ATen's GEMM
from ._common import autocast_dtype, check_float, compiling, needs_grad

Tensor = torch.Tensor



def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    return cpu_check(device, dtype)


register_op("linear", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)})


@functools.lru_cache(maxsize=None)
def _onednn_dtype(dtype: torch.dtype) -> bool:
    """oneDNN runs dtype here and beats ATen's GEMM on unpacked weights (with AVX-512: csrc/linear/linear.h)."""
    return extension().cpu_linear_preferred(dtype)


def _onednn(x: Tensor, n: int) -> bool:
    """Whether the GEMMs of x [..., k] by an [n, k] weight run oneDNN."""
    return x.numel() * n >= ONEDNN_MIN_MACS and x.numel() > 0 and _onednn_dtype(x.dtype)


# --------------------------------------------------------------------------- kernels: plain functions, custom ops


def _forward(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """The cpu backend's y = x wᵀ + b."""
    if _onednn(x, w.shape[0]):
        return extension().cpu_linear(x, w, b)
    return F.linear(x, w, b)


def _backward(dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool,
              has_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of the cpu backend; one not needed is an empty tensor."""
    (n, k), rows = w.shape, math.prod(x.shape[:-1])
    dy2, x2 = dy.reshape(rows, n), x.reshape(rows, k)
    onednn = x.dtype == torch.float32 and _onednn(x, n)
    ext = extension()
    # a · b as oneDNN's x wᵀ with w = bᵀ (read through its strides), else ATen's mm.
    mm = (lambda a, b_: ext.cpu_linear(a, b_.t())) if onednn else torch.mm  # noqa: E731
    dx = mm(dy2, w).view(x.shape) if need_dx else dy.new_empty(0)
    dw = mm(dy2.t(), x2) if need_dw else dy.new_empty(0)
    db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if has_b else dy.new_empty(0)
    return dx, dw, db


_forward_op = torch.library.custom_op("fastenc::linear_fwd", _forward, mutates_args=())
_backward_op = torch.library.custom_op("fastenc::linear_bwd", _backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@_backward_op.register_fake
def _backward_fake(dy, x, w, need_dx, need_dw, has_b):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty(0), w.new_empty(w.shape) if need_dw else dy.new_empty(0),
            dy.new_empty(w.shape[0]) if has_b else dy.new_empty(0))


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return (_forward_op if compiling() else _forward)(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        bwd = _backward_op if compiling() else _backward
        dx, dw, db = bwd(dy, x, w, need[0], need[1], ctx.has_b and need[2])
        return dx if need[0] else None, dw if need[1] else None, db if ctx.has_b and need[2] else None


# --------------------------------------------------------------------------- public entry point


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``F.linear``: x [..., k], weight [n, k], bias [n] or None -> [..., n]; one floating dtype (under
    ``torch.autocast`` any, cast to its dtype) and one device."""
    where = "fastenc linear"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        check_float(t, name, where, optional=name == "bias")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: x must be [..., k] and weight [n, k], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    mixed_ok = autocast_dtype(x.device) is not None  # autocast casts every operand, as for F.linear
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and ((t.dtype != x.dtype and not mixed_ok) or t.device != x.device):
            raise TypeError(f"{where}: {name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")
    return linear_unchecked(x, weight, bias, backend)


def linear_unchecked(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """:func:`linear` on arguments already validated (a module's own weights): for fastenc's modules."""
    if resolve("linear", backend, x.device, x.dtype) == "reference":
        return reference.linear(x, weight, bias)
    low = autocast_dtype(x.device)
    if low is not None:  # under autocast the GEMM runs in its dtype, as F.linear's would
        x, weight, bias = (t.to(low) if t is not None else None for t in (x, weight, bias))
    if needs_grad(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return (_forward_op if compiling() else _forward)(x, weight, bias)
