"""Feed-forward block op: validation, dispatch, autograd.

y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual), act in relu / gelu (erf) / gelu_tanh, or a gated
activation (geglu, swiglu: act(a) · g with [a, g] = (x W1ᵀ + b1).chunk(2, -1), so W1 is [2f, d] and W2
[d, f]; see ``fastenc.constants.GATED_ACTIVATIONS``).

Backends: ``reference`` (``fastenc.reference``) and the C++ extension ``fastenc._C`` (``csrc/``):
``cuda`` on CUDA tensors, whose GEMM path comes from the per-architecture dispatch table in
``csrc/ffn/gemm_paths.cpp`` (CUTLASS sm90, cuBLASLt epilogues, or cuBLAS GEMMs + handwritten fused
bias-activation-dropout kernels); ``cpu`` on CPU tensors: ATen GEMMs and a vectorised fused pass
with the same activation math.  ``FASTENC_FFN_GEMM=auto|unfused|cublaslt|cutlass`` forces a CUDA
GEMM path (read at every call), so a GPU session can measure each path and flip the table.

The kernels run through the custom ops ``fastenc::ffn_fwd`` / ``fastenc::ffn_bwd`` (fake
functions, so ``torch.compile(fullgraph=True)`` traces them) under an ``autograd.Function``;
eagerly the same functions are called without the dispatcher.  The dropout key comes from
``_common.draw_seed`` on the CPU generator (the extension takes it by value);
:func:`dropout_keep_mask` replays the keep mask of a key for tests.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve
from .. import constants
from .._util import either
from ._common import KERNEL_DTYPES, autocast_dtype, check_dropout, compiling, draw_seed, needs_grad

Tensor = torch.Tensor

GEMM_PATH_ENV = "FASTENC_FFN_GEMM"
GEMM_PATHS = ("auto", "unfused", "cublaslt", "cutlass")


def _gated_missing(ext, activation: str) -> Optional[str]:
    """Why the extension cannot run a gated activation (None when it can, or for ungated ones)."""
    if activation in constants.GATED_ACTIVATIONS and activation not in getattr(ext, "FFN_ACTIVATIONS", ()):
        return f"this fastenc._C has no {activation} FFN kernel"
    return None


# shape class: (activation,)
def _cuda_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    ext = extension()
    if ext is None:
        return "the fastenc._C extension is not built (pip install without FASTENC_SKIP_NATIVE)"
    if _gated_missing(ext, shape[0]):
        return _gated_missing(ext, shape[0])
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported ({', '.join(constants.KERNEL_DTYPES)})"
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not {device.type} (the C++ CPU path is backend 'cpu')"
    if not ext.has_cuda():
        return "fastenc._C was built without CUDA (FASTENC_FORCE_CPU=1, or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability(device)
    archs = ext.cuda_archs().split("_")
    # sm_80 cubins run on every 8.x GPU; sm_90a cubins only on 9.0. No PTX is embedded.
    if not ((major == 8 and "80" in archs) or (major == 9 and ({"90", "90a"} & set(archs)))):
        return f"no kernel image for sm_{major}{minor} (built for {archs}; set FASTENC_CUDA_ARCHS and rebuild)"
    return None


def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    return cpu_check(device, dtype) or _gated_missing(extension(), shape[0])


def _describe(device: torch.device, dtype: torch.dtype):
    path, why = gemm_path(device, dtype)
    return [f"gemm path {path} ({why})"]


register_op("ffn", {"cuda": _cuda_available, "cpu": _cpu_available}, auto={"cuda": ("cuda",), "cpu": ("cpu",)},
            example=lambda head_dim: ("gelu",), describe=_describe)


def _gemm_path() -> str:
    path = os.environ.get(GEMM_PATH_ENV, "auto").strip().lower() or "auto"
    if path not in GEMM_PATHS:
        raise ValueError(f"{GEMM_PATH_ENV}={path!r} is not a GEMM path; expected one of {GEMM_PATHS}")
    return path


def gemm_path(
    device="cuda",
    dtype: torch.dtype = torch.float16,
    *,
    d: int = 768,
    f: int = 3072,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    training: bool = False,
    has_bias: bool = True,
) -> Tuple[str, str]:
    """(GEMM path, reason) the dispatch table picks for such a call (for ``backend_report``).

    A path forced by FASTENC_FFN_GEMM that cannot run such a call gives ("error", why): the
    call itself would raise that ValueError.
    """
    ext = extension()
    if ext is None:
        return "none", "fastenc._C is not built"
    dev = torch.device(device)
    cc = 0
    if dev.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(dev)
        cc = 10 * major + minor
    try:
        path, why = ext.ffn_plan(dev.type, cc, str(dtype).replace("torch.", ""), d, f, activation, dropout_p,
                                 training, has_bias, _gemm_path())
    except ValueError as e:
        return "error", str(e)
    return path, why


def dispatch_table() -> str:
    """The per-architecture GEMM-path table compiled into fastenc._C, one row per arch/activation."""
    ext = extension()
    return ext.ffn_dispatch_table() if ext is not None else ""


def dropout_keep_mask(seed: Tensor, tokens: int, ffn_dim: int, p: float, device="cpu") -> Tensor:
    """Bool keep mask [tokens, ffn_dim] the kernels draw for ``seed`` (for ``reference.ffn(dropout_mask=...)``)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("fastenc._C is not built")
    return ext.ffn_dropout_mask(tokens, ffn_dim, float(p), int(seed.item()), torch.device(device))


# ----------------------------------------------------------------------------- kernels: plain functions, custom ops


def _forward(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    residual: Optional[Tensor],
    seed: Tensor,
    activation: str,
    dropout_p: float,
    gemm_path: str,
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, h, pre): h = dropout(act(pre)) (gated: dropout(act(a) · g), [a, g] = pre) and pre are kept only
    when ``save`` (pre not for relu)."""
    return extension().ffn_forward(x, w1, b1, w2, b2, residual, activation, dropout_p, int(seed.item()),
                                   gemm_path, save)


def _backward(
    dy: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    h: Tensor,
    pre: Tensor,
    seed: Tensor,
    activation: str,
    dropout_p: float,
    has_b1: bool,
    has_b2: bool,
    gemm_path: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW1, db1, dW2, db2); a bias gradient is an empty tensor when that bias is absent."""
    return extension().ffn_backward(dy, x, w1, w2, h, pre, activation, dropout_p, int(seed.item()), has_b1, has_b2,
                                    gemm_path)


_forward_op = torch.library.custom_op("fastenc::ffn_fwd", _forward, mutates_args=())
_backward_op = torch.library.custom_op("fastenc::ffn_bwd", _backward, mutates_args=())


@_forward_op.register_fake
def _forward_fake(x, w1, b1, w2, b2, residual, seed, activation, dropout_p, gemm_path, save):
    tokens = x.numel() // x.shape[-1]
    hidden = (tokens, w2.shape[1])  # h; pre is GEMM1's [tokens, w1 rows] (twice h's width when gated)
    h = x.new_empty(hidden if save else (0,))
    pre = x.new_empty((tokens, w1.shape[0]) if save and activation != "relu" else (0,))
    return x.new_empty(x.shape), h, pre


@_backward_op.register_fake
def _backward_fake(dy, x, w1, w2, h, pre, seed, activation, dropout_p, has_b1, has_b2, gemm_path):
    f, d = w1.shape
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((f,) if has_b1 else (0,)),
            w2.new_empty(w2.shape), w2.new_empty((d,) if has_b2 else (0,)))


class _FFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, seed, activation, dropout_p, gemm_path):
        fwd = _forward_op if compiling() else _forward
        y, h, pre = fwd(x, w1, b1, w2, b2, residual, seed, activation, dropout_p, gemm_path, True)
        ctx.save_for_backward(x, w1, w2, h, pre, seed)
        ctx.config = (activation, dropout_p, b1 is not None, b2 is not None, residual is not None, gemm_path)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h, pre, seed = ctx.saved_tensors
        activation, dropout_p, has_b1, has_b2, has_residual, gemm_path = ctx.config
        bwd = _backward_op if compiling() else _backward
        dx, dw1, db1, dw2, db2 = bwd(dy, x, w1, w2, h, pre, seed, activation, dropout_p, has_b1, has_b2, gemm_path)
        return (dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, dy if has_residual else None,
                None, None, None, None)


_NO_SEED = torch.zeros(1, dtype=torch.int64)


def _check_args(x, w1, b1, w2, b2, activation, residual) -> None:
    """Every backend takes the same calls: shapes, one floating dtype, one device."""
    for name, t in (("x", x), ("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2), ("residual", residual)):
        if t is None and name in ("x", "w1", "w2"):
            raise TypeError(f"fastenc ffn: {name} must be a Tensor, got None")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"fastenc ffn: {name} must be a Tensor, got {type(t).__name__}")
    known = constants.ACTIVATIONS + constants.GATED_ACTIVATIONS
    if activation not in known:
        raise ValueError(f"fastenc ffn: unknown activation {activation!r}; expected one of {known}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fastenc ffn: x must be {either(constants.KERNEL_DTYPES)}, got {x.dtype}")
    if x.dim() < 1 or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"fastenc ffn: x must be [..., d], w1 [f, d], w2 [d, f]; got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    f, d = w1.shape
    if f < 1 or d < 1:
        raise ValueError(f"fastenc ffn: w1 must be [f, d] with f, d >= 1, got shape {list(w1.shape)}")
    hidden = f // 2 if activation in constants.GATED_ACTIVATIONS else f  # gated: w1 stacks [activated; gate]
    if activation in constants.GATED_ACTIVATIONS and f % 2:
        raise ValueError(f"fastenc ffn: a gated activation ({activation}) needs w1 [2f, d] with an even row count, "
                         f"got {list(w1.shape)}")
    expected = {"x": (x, (*x.shape[:-1], d)), "w2": (w2, (d, hidden)), "b1": (b1, (f,)), "b2": (b2, (d,)),
                "residual": (residual, tuple(x.shape))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"fastenc ffn: {name} must have shape {list(shape)} (w1 is [f, d] = {[f, d]}), "
                             f"got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"fastenc ffn: {name} has dtype {t.dtype} but x has {x.dtype}; all operands share one")
        if t.device != x.device:
            raise ValueError(f"fastenc ffn: {name} is on {t.device} but x is on {x.device}")
    if w1.dtype != x.dtype or w1.device != x.device:
        raise TypeError(f"fastenc ffn: w1 ({w1.dtype}, {w1.device}) must match x ({x.dtype}, {x.device})")


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
    """x [..., d] -> [..., d] through Linear(d, f) -> act -> dropout -> Linear(f, d) (+ residual).

    dropout_p is applied as given (pass 0.0 in eval mode).
    """
    _check_args(x, w1, b1, w2, b2, activation, residual)
    dropout_p = check_dropout(dropout_p, "fastenc ffn")
    return ffn_unchecked(x, w1, b1, w2, b2, activation, dropout_p, residual, backend)


def ffn_unchecked(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str,
                  dropout_p: float, residual: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """:func:`ffn` on arguments already validated (a module's own weights): for fastenc's modules."""
    b = resolve("ffn", backend, x.device, x.dtype, (activation,))
    if b == "reference":
        return reference.ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, residual=residual)
    low = autocast_dtype(x.device)
    if low is not None:  # under autocast the GEMMs run in its dtype, as nn.Linear's would
        x, w1, b1, w2, b2, residual = (t.to(low) if t is not None else None for t in (x, w1, b1, w2, b2, residual))
    seed = draw_seed(torch.device("cpu")) if dropout_p > 0.0 else _NO_SEED
    path = _gemm_path()
    if needs_grad(x, w1, b1, w2, b2, residual):
        return _FFN.apply(x, w1, b1, w2, b2, residual, seed, activation, dropout_p, path)
    return (_forward_op if compiling() else _forward)(x, w1, b1, w2, b2, residual, seed, activation, dropout_p,
                                                       path, False)[0]
