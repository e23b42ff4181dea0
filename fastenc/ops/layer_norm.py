"""Fused residual-add + LayerNorm op: validation, dispatch, autograd.

y = LayerNorm(x + dropout(branch + branch_bias)) · weight + bias; with ``prenorm`` the
un-normalised sum is returned too, as the new residual stream.

Backends: ``reference`` (``fastenc.reference``), ``triton`` (``fastenc.triton_kernels.layer_norm``),
``cpu`` (the extension's C++ kernel, ``csrc/layer_norm/cpu/layer_norm.cpp``).
The fast kernels run through the custom ops ``fastenc::residual_layer_norm_fwd`` / ``..._bwd``
(fake functions, so ``torch.compile(fullgraph=True)`` traces them) under an ``autograd.Function``;
eagerly the same functions are called without the dispatcher.  The dropout key comes from
``_common.draw_seed`` and is saved for the backward, which regenerates the mask.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve, triton_check
from .. import constants
from .._util import either
from ._common import KERNEL_DTYPES, check_dropout, check_float, check_number, compiling, draw_seed, needs_grad

Tensor = torch.Tensor


def _triton_kernels():
    from ..triton_kernels import layer_norm as kernels  # imported on first use: triton is optional

    return kernels


# shape class: (hidden size,)
def _triton_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = triton_check(device, dtype)
    if reason is not None:
        return reason
    if dtype not in KERNEL_DTYPES:
        return f"the Triton LayerNorm takes {either(constants.KERNEL_DTYPES)}, not {dtype}"
    from ..triton_kernels.layer_norm_config import MAX_HIDDEN

    (hidden,) = shape
    if not 1 <= hidden <= MAX_HIDDEN:
        return f"hidden size {hidden} is outside the Triton kernel's range 1..{MAX_HIDDEN}"
    return None


def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = cpu_check(device, dtype)
    if reason is None and shape[0] < 1:
        return f"hidden size {shape[0]}: the C++ kernel normalises rows of at least one column"
    return reason


register_op("layer_norm", {"triton": _triton_available, "cpu": _cpu_available},
            auto={"cuda": ("triton",), "cpu": ("cpu",)}, example=lambda head_dim: (768,))


def _check_inputs(x, branch, weight, bias, branch_bias, eps) -> float:
    """Clear errors for bad input, before any backend runs; returns eps as a float."""
    where = "residual_layer_norm"
    check_float(x, "x", where)
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have at least one dimension (the hidden size), got a 0-d tensor")
    n = x.shape[-1]
    check_float(branch, "branch", where, optional=True)
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"{where}: branch has shape {tuple(branch.shape)} but x has shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        check_float(t, name, where, optional=True)
        if t is None:
            continue
        if t.shape != (n,):
            raise ValueError(f"{where}: {name} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{where}: {name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    if branch_bias is not None and branch is None:
        raise ValueError(f"{where}: branch_bias is given but branch is None")
    for name, t in (("branch", branch), ("weight", weight), ("bias", bias), ("branch_bias", branch_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}")
    return check_number(eps, "eps", where, positive=True)


# --------------------------------------------------------------------------- kernels: plain functions, custom ops


def _forward(
    x: Tensor,
    branch: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    branch_bias: Optional[Tensor],
    seed: Optional[Tensor],
    eps: float,
    dropout_p: float,
    store_residual: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s or an empty tensor, mean, rstd) of one backend's forward kernel."""
    if backend == "cpu":
        y, s, mean, rstd = extension().residual_layer_norm_fwd(x, branch, weight, bias, branch_bias, eps, dropout_p,
                                                               int(seed) if seed is not None else 0, store_residual)
        return y, s, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
    y, s, mean, rstd = _triton_kernels().residual_layer_norm_fwd(
        x, branch, weight, bias, branch_bias, eps, dropout_p, seed, store_residual
    )
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


def _backward(
    dy: Tensor,
    dresid: Optional[Tensor],
    x: Optional[Tensor],
    branch: Optional[Tensor],
    resid: Optional[Tensor],
    weight: Optional[Tensor],
    branch_bias: Optional[Tensor],
    seed: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    has_branch: bool,
    branch_dtype: torch.dtype,
    dropout_p: float,
    need_dweight: bool,
    need_dbias: bool,
    bias_dtype: torch.dtype,
    need_dbranch_bias: bool,
    branch_bias_dtype: torch.dtype,
    backend: str,
) -> List[Tensor]:
    """[dx, dbranch, dweight, dbias, dbranch_bias] of one backend's backward; absent ones are empty tensors."""
    if backend == "cpu":
        n = dy.shape[-1]
        # The C++ backward reads bias for its dtype and branch_bias for its dtype (and, to recompute s
        # when resid is absent, its values, which the post-norm path saves).
        bias = dy.new_empty(n, dtype=bias_dtype) if need_dbias else None
        if branch_bias is None and need_dbranch_bias:
            branch_bias = dy.new_empty(n, dtype=branch_bias_dtype)
        dx, dbranch, dweight, dbias, dbranch_bias = extension().residual_layer_norm_bwd(
            dy, dresid, x, branch, resid, weight, bias,
            branch_bias if has_branch else None, mean.reshape(-1), rstd.reshape(-1), has_branch, dropout_p,
            int(seed) if seed is not None else 0)
        if not need_dweight:
            dweight = dy.new_empty(0)
        return [dx, dbranch if has_branch and (dropout_p > 0.0 or branch_dtype != dx.dtype) else dy.new_empty(0),
                dweight, dbias, dbranch_bias]
    grads = _triton_kernels().residual_layer_norm_bwd(
        dy, dresid, x, branch, resid, weight, branch_bias, mean, rstd,
        has_branch=has_branch, branch_dtype=branch_dtype, dropout_p=dropout_p, seed=seed,
        need_dweight=need_dweight, need_dbias=need_dbias, bias_dtype=bias_dtype,
        need_dbranch_bias=need_dbranch_bias, branch_bias_dtype=branch_bias_dtype,
    )
    return [g if g is not None else dy.new_empty(0) for g in grads]


_forward_op = torch.library.custom_op("fastenc::residual_layer_norm_fwd", _forward, mutates_args=())
_backward_op = torch.library.custom_op("fastenc::residual_layer_norm_bwd", _backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, branch, weight, bias, branch_bias, seed, eps, dropout_p, store_residual, backend):
    s = x.new_empty(x.shape) if store_residual else x.new_empty(0)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), s, stats, stats.new_empty(stats.shape)


@_backward_op.register_fake
def _backward_fake(dy, dresid, x, branch, resid, weight, branch_bias, seed, mean, rstd, has_branch, branch_dtype,
                   dropout_p, need_dweight, need_dbias, bias_dtype, need_dbranch_bias, branch_bias_dtype, backend):
    ref = resid if resid is not None else x
    n = dy.shape[-1]
    separate_dbranch = has_branch and (dropout_p > 0.0 or branch_dtype != ref.dtype)
    return [
        dy.new_empty(dy.shape, dtype=ref.dtype),
        dy.new_empty(dy.shape, dtype=branch_dtype) if separate_dbranch else dy.new_empty(0),
        dy.new_empty(n, dtype=weight.dtype) if (need_dweight and weight is not None) else dy.new_empty(0),
        dy.new_empty(n, dtype=bias_dtype) if need_dbias else dy.new_empty(0),
        dy.new_empty(n, dtype=branch_bias_dtype) if (need_dbranch_bias and has_branch) else dy.new_empty(0),
    ]


class _ResidualLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, bias, branch_bias, seed, eps, dropout_p, store_residual, backend):
        fwd = _forward_op if compiling() else _forward
        y, s, mean, rstd = fwd(x, branch, weight, bias, branch_bias, seed, eps, dropout_p, store_residual, backend)
        # Prenorm: s is an output, read it back; post-norm: recompute s from x and branch.
        if store_residual:
            ctx.save_for_backward(None, None, s, weight, None, seed, mean, rstd)
        else:
            ctx.save_for_backward(x, branch, None, weight, branch_bias, seed, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has_branch = branch is not None
        ctx.dtypes = (x.dtype, branch.dtype if branch is not None else x.dtype,
                      bias.dtype if bias is not None else x.dtype,
                      branch_bias.dtype if branch_bias is not None else x.dtype)
        ctx.has = (bias is not None, branch_bias is not None)
        ctx.dropout_p, ctx.store_residual, ctx.backend = dropout_p, store_residual, backend
        return y, s, mean, rstd

    @staticmethod
    def backward(ctx, dy, dresid, _dmean, _drstd):
        x, branch, s, weight, branch_bias, seed, mean, rstd = ctx.saved_tensors
        x_dtype, branch_dtype, bias_dtype, branch_bias_dtype = ctx.dtypes
        has_bias, has_branch_bias = ctx.has
        if dy is None:  # only the prenorm residual output was used
            dy = torch.zeros_like(s if s is not None else x)
        need = ctx.needs_input_grad
        bwd = _backward_op if compiling() else _backward
        dx, dbranch, dweight, dbias, dbranch_bias = bwd(
            dy, dresid if ctx.store_residual else None, x, branch, s, weight, branch_bias, seed, mean, rstd,
            ctx.has_branch, branch_dtype, ctx.dropout_p, need[2], need[3] and has_bias, bias_dtype,
            need[4] and has_branch_bias, branch_bias_dtype, ctx.backend,
        )
        if ctx.has_branch:
            # Without dropout (and with equal dtypes) the kernel writes one tensor: dbranch = dx.
            separate = ctx.dropout_p > 0.0 or branch_dtype != x_dtype
            dbranch = dbranch if separate else dx
        else:
            dbranch = None
        pick = lambda g, needed: g if needed and g.numel() else None  # noqa: E731
        return (dx, dbranch, pick(dweight, need[2]), pick(dbias, need[3]), pick(dbranch_bias, need[4]),
                None, None, None, None, None)


def _run(backend, x, branch, weight, bias, branch_bias, eps, dropout_p, prenorm):
    if backend == "cpu" and branch is not None and branch.dtype != x.dtype:
        # The C++ kernel adds rows of one dtype: add in the promoted one, as torch (and the reference) would
        # (torch.autocast mixes an fp32 residual with bf16 branches); outputs come back in x's dtype.
        wide = torch.promote_types(x.dtype, branch.dtype)
        weight, bias, branch_bias = (t.to(wide) if t is not None and t.dtype not in (wide, torch.float32) else t
                                     for t in (weight, bias, branch_bias))
        out = _run(backend, x.to(wide), branch.to(wide), weight, bias, branch_bias, eps, dropout_p, prenorm)
        return tuple(t.to(x.dtype) for t in out) if prenorm else out.to(x.dtype)
    has_dropout = branch is not None and dropout_p > 0.0
    seed = draw_seed(x.device) if has_dropout else None
    store = prenorm and branch is not None
    args = (x, branch, weight, bias, branch_bias, seed, float(eps), dropout_p if has_dropout else 0.0, store, backend)
    if needs_grad(x, branch, weight, bias, branch_bias):
        y, s, _, _ = _ResidualLayerNorm.apply(*args)
    elif compiling():
        y, s, _, _ = _forward_op(*args)
    elif backend == "cpu":  # inference: the statistics are not kept, no reshaping them
        y, s, _, _ = extension().residual_layer_norm_fwd(x, branch, weight, bias, branch_bias, args[6], args[7],
                                                         int(seed) if seed is not None else 0, store)
    else:
        y, s, _, _ = _forward(*args)
    if prenorm:
        return y, (s if branch is not None else x)
    return y


# --------------------------------------------------------------------------- public entry point


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
    """Returns y, or (y, residual) when ``prenorm``.  dropout_p is applied as given.

    x, branch: [..., N] in any layout and any of float16/bfloat16/float32/float64 (the sum is
    taken in their promoted dtype); weight, bias, branch_bias: [N] or None, in x's dtype or
    float32.  Outputs are in x's dtype.
    """
    dropout_p = check_dropout(dropout_p, "residual_layer_norm")
    eps = _check_inputs(x, branch, weight, bias, branch_bias, eps)
    return residual_layer_norm_unchecked(x, branch, weight, bias, branch_bias, eps, dropout_p, prenorm, backend)


def residual_layer_norm_unchecked(x: Tensor, branch: Optional[Tensor], weight: Optional[Tensor],
                                  bias: Optional[Tensor], branch_bias: Optional[Tensor], eps: float,
                                  dropout_p: float, prenorm: bool, backend: Optional[str]):
    """:func:`residual_layer_norm` on arguments already validated: for fastenc's modules."""
    b = resolve("layer_norm", backend, x.device, x.dtype, (x.shape[-1],))
    if b == "reference":
        return reference.residual_layer_norm(
            x, branch, weight, bias, branch_bias=branch_bias, eps=eps, dropout_p=dropout_p, prenorm=prenorm
        )
    return _run(b, x, branch, weight, bias, branch_bias, eps, dropout_p, prenorm)
