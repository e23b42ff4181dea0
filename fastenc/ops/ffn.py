"""Feed-forward block op: dispatch between the reference and the C++/CUDA extension.

y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual), act in relu / gelu (erf) / gelu_tanh.

The ``"cuda"`` backend is ``fastenc._C`` (``csrc/``): on CUDA tensors its GEMM path comes
from the per-architecture dispatch table in ``csrc/ffn_dispatch.cpp`` (CUTLASS sm90,
cuBLASLt epilogues, or cuBLAS GEMMs + handwritten fused bias-activation-dropout kernels);
on CPU tensors it runs ATen GEMMs and a vectorised fused pass with the same activation
math.  ``FASTENC_FFN_GEMM=auto|unfused|cublaslt|cutlass`` forces a GEMM path (read at
every call), so a GPU session can measure each path and flip the table.

Both passes are ``torch.library`` custom ops (``fastenc::ffn_fwd``, ``fastenc::ffn_bwd``)
with fake kernels and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces through them.  Dropout draws its Philox seed from torch's CPU generator;
:func:`dropout_keep_mask` replays the keep mask of a seed for tests.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import reference
from ..backends import extension, register_op, resolve

Tensor = torch.Tensor

GEMM_PATH_ENV = "FASTENC_FFN_GEMM"
GEMM_PATHS = ("auto", "unfused", "cublaslt", "cutlass")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_available(device, dtype=None, activation="gelu", **_) -> Optional[str]:
    ext = extension()
    if ext is None:
        return "the fastenc._C extension is not built (pip install without FASTENC_SKIP_NATIVE)"
    if activation not in reference.ACTIVATIONS:
        return f"unknown activation {activation!r}"
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float32, float16, bfloat16)"
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"fastenc._C runs on cpu and cuda tensors, not {dev.type}"
    if not ext.has_cuda():
        return "fastenc._C was built without CUDA (FASTENC_FORCE_CPU=1, or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability(dev)
    archs = ext.cuda_archs().split("_")
    # sm_80 cubins run on every 8.x GPU; sm_90a cubins only on 9.0. No PTX is embedded.
    if not ((major == 8 and "80" in archs) or (major == 9 and ({"90", "90a"} & set(archs)))):
        return f"no kernel image for sm_{major}{minor} (built for {archs}; set FASTENC_CUDA_ARCHS and rebuild)"
    return None


register_op("ffn", {"cuda": _cuda_available}, auto_cuda=("cuda",))


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


def draw_dropout_seed() -> Tensor:
    """The Philox seed of one dropout draw: an int64 [1] tensor from torch's CPU generator."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)


def dropout_keep_mask(seed: Tensor, tokens: int, ffn_dim: int, p: float, device="cpu") -> Tensor:
    """Bool keep mask [tokens, ffn_dim] the kernels draw for ``seed`` (for ``reference.ffn(dropout_mask=...)``)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("fastenc._C is not built")
    return ext.ffn_dropout_mask(tokens, ffn_dim, float(p), int(seed.item()), torch.device(device))


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastenc::ffn_fwd", mutates_args=())
def _ffn_fwd(
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
    """(y, h, pre): h = dropout(act(pre)) and pre are kept only when ``save`` (pre not for relu)."""
    y, h, pre = extension().ffn_forward(x, w1, b1, w2, b2, residual, activation, dropout_p, int(seed.item()),
                                        gemm_path, save)
    return y, h, pre


@_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, seed, activation, dropout_p, gemm_path, save):
    tokens = x.numel() // x.shape[-1]
    hidden = (tokens, w1.shape[0])
    h = x.new_empty(hidden if save else (0,))
    pre = x.new_empty(hidden if save and activation != "relu" else (0,))
    return x.new_empty(x.shape), h, pre


@torch.library.custom_op("fastenc::ffn_bwd", mutates_args=())
def _ffn_bwd(
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
    dx, dw1, db1, dw2, db2 = extension().ffn_backward(dy, x, w1, w2, h, pre, activation, dropout_p,
                                                      int(seed.item()), has_b1, has_b2, gemm_path)
    return dx, dw1, db1, dw2, db2


@_ffn_bwd.register_fake
def _(dy, x, w1, w2, h, pre, seed, activation, dropout_p, has_b1, has_b2, gemm_path):
    f, d = w1.shape
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((f,) if has_b1 else (0,)),
            w2.new_empty(w2.shape), w2.new_empty((d,) if has_b2 else (0,)))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, seed, activation, dropout_p, gemm_path, save = inputs
    _, h, pre = output
    ctx.save_for_backward(x, w1, w2, h, pre, seed)
    ctx.mark_non_differentiable(h, pre)
    ctx.config = (activation, dropout_p, b1 is not None, b2 is not None, residual is not None, gemm_path)


def _backward(ctx, dy, _dh, _dpre):
    x, w1, w2, h, pre, seed = ctx.saved_tensors
    activation, dropout_p, has_b1, has_b2, has_residual, gemm_path = ctx.config
    dx, dw1, db1, dw2, db2 = _ffn_bwd(dy, x, w1, w2, h, pre, seed, activation, dropout_p, has_b1, has_b2, gemm_path)
    return (dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, dy if has_residual else None,
            None, None, None, None, None)


torch.library.register_autograd("fastenc::ffn_fwd", _backward, setup_context=_setup_context)


def _validate(x, w1, b1, w2, b2, activation, dropout_p, residual) -> None:
    for name, t in (("x", x), ("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2), ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"fastenc ffn: {name} must be a Tensor, got {type(t).__name__}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"fastenc ffn: unknown activation {activation!r}; expected one of {reference.ACTIVATIONS}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"fastenc ffn: dropout_p must be in [0, 1], got {dropout_p}")


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
    _validate(x, w1, b1, w2, b2, activation, dropout_p, residual)
    b = resolve("ffn", backend, device=x.device, dtype=x.dtype, activation=activation)
    if b == "reference":
        return reference.ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, residual=residual)
    if b == "cuda":
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, residual)
        )
        seed = draw_dropout_seed() if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
        y, _, _ = _ffn_fwd(x, w1, b1, w2, b2, residual, seed, activation, float(dropout_p), _gemm_path(), save)
        return y
    raise AssertionError(b)
