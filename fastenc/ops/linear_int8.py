"""Int8 linear op (inference): y = (q_x q_wᵀ) · s_x s_wᵀ + bias (+ residual).

Weights are int8 per output channel (:func:`quantize_weight`, once); activations are quantized per token at
run time, after ``act_in`` (the previous GEMM's activation, so an FFN's hidden is activated and quantized
in one pass); products accumulate in int32.  The math, rounding included, is ``reference.linear_int8``.

Backends: ``reference`` (that function) and ``cpu``: the extension's int8 GEMM (``csrc/linear/int8_linear.cpp``),
an AVX512-VNNI kernel, an AVX2 one (vpmaddwd on the values widened to 16 bits) on CPUs without VNNI, or exact fp32
GEMMs of the int8 values below AVX2.  No autograd: a quantized model trains on its float weights (``fastenc.stack``
runs int8 in inference only).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import reference
from ..backends import cpu_check, extension, register_op, resolve

Tensor = torch.Tensor

# Where the int8 GEMM keeps its inputs and outputs: float32 or bfloat16 activations (the model's dtype).
DTYPES = (torch.float32, torch.bfloat16)


def _cpu_available(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
    reason = cpu_check(device, dtype)
    if reason is not None:
        return reason
    if dtype not in DTYPES:
        return f"the int8 kernels take float32 or bfloat16 activations, not {dtype}"
    if not hasattr(extension(), "cpu_int8_linear"):
        return "this fastenc._C has no int8 kernels"
    return None


def _describe(device: torch.device, dtype: torch.dtype):
    ext = extension()
    if ext is None or not hasattr(ext, "cpu_int8_kernel"):
        return []
    return ["int8 GEMM: " + _KERNELS[ext.cpu_int8_kernel()]]


_KERNELS = {"avx512_vnni": "AVX512-VNNI kernel",
            "avx2": "AVX2 kernel (vpmaddwd on 16-bit operands; no VNNI at this capability)",
            "fp32_exact": "exact fp32 GEMMs of the int8 values (below the avx2 capability: no int8 kernel)"}


register_op("linear_int8", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)}, describe=_describe)


class QuantWeight(NamedTuple):
    """A weight [n, k] in int8: q int8 [n, k], scale fp32 [n], the 1/s of its smoothing (fp32 [k]) or None,
    the cpu backend's packed copy (or None), and the input channels kept in float (int64 [f]) with their
    columns of the weight ([n, f], the weight's dtype), or None."""

    q: Tensor
    scale: Tensor
    smooth: Optional[Tensor] = None
    packed: object = None
    float_channels: Optional[Tensor] = None
    float_weight: Optional[Tensor] = None


def quantize_weight(weight: Tensor, smoothing: Optional[Tensor] = None,
                    float_channels: Optional[Tensor] = None) -> QuantWeight:
    """Per output channel, symmetric (``reference.quantize_int8``), of ``weight · diag(smoothing)`` when given
    (``reference.smoothing``: its activations are then quantized as ``x / smoothing``); packed for the cpu
    kernel when this build has it (on CPU tensors).  float_channels (int64, distinct input channels): those
    columns stay in float, a GEMM of their own added to the int8 one; the int8 weight and the activations'
    multipliers are 0 there, so their outliers set neither the weight's nor the tokens' scales."""
    with torch.no_grad():
        w = weight.detach().float()
        smooth = None
        if smoothing is not None:
            w = w * smoothing[None, :]
            smooth = (1.0 / smoothing).float().contiguous()
        float_weight = None
        if float_channels is not None:
            float_channels = float_channels.to(torch.int64).contiguous()
            float_weight = weight.detach()[:, float_channels].contiguous()
            w = w.clone() if w.data_ptr() == weight.data_ptr() else w  # .float() of an fp32 weight is itself
            w[:, float_channels] = 0.0
            smooth = torch.ones(w.shape[1], device=w.device) if smooth is None else smooth.clone()
            smooth[float_channels] = 0.0
        q, scale = reference.quantize_int8(w)
    ext = extension()
    usable = ext is not None and hasattr(ext, "Int8Weight") and q.device.type == "cpu"
    packed = ext.Int8Weight(q, scale, smooth, float_channels, float_weight) if usable else None
    return QuantWeight(q, scale, smooth, packed, float_channels, float_weight)


def linear_int8(x: Tensor, weight: QuantWeight, bias: Optional[Tensor] = None, *, act_in: Optional[str] = None,
                residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """x [..., k] (or [..., 2k] with a gated ``act_in``), float32 or bfloat16 -> [..., n] in x's dtype."""
    where = "fastenc linear_int8"
    if not isinstance(x, Tensor) or x.dtype not in DTYPES + (torch.float64,):
        raise TypeError(f"{where}: x must be a float32 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if not isinstance(weight, QuantWeight):
        raise TypeError(f"{where}: weight must be a QuantWeight (fastenc.ops.linear_int8.quantize_weight)")
    if act_in is not None and act_in not in reference.ACTIVATIONS + reference.GATED_ACTIVATIONS:
        raise ValueError(f"{where}: act_in must be None or one of "
                         f"{reference.ACTIVATIONS + reference.GATED_ACTIVATIONS}, got {act_in!r}")
    n, k = weight.q.shape
    k_in = 2 * k if act_in in reference.GATED_ACTIVATIONS else k
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"{where}: x must be [..., {k_in}] for a [{n}, {k}] weight, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"{where}: residual must have shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, residual)):
        raise RuntimeError(f"{where}: inference only (no autograd); run under torch.no_grad() or inference_mode")
    return linear_int8_unchecked(x, weight, bias, act_in, residual, backend)


def linear_int8_unchecked(x: Tensor, weight: QuantWeight, bias: Optional[Tensor], act_in: Optional[str],
                          residual: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """:func:`linear_int8` on arguments already validated (the stack's own weights)."""
    if resolve("linear_int8", backend, x.device, x.dtype) == "reference":
        return reference.linear_int8(x, weight.q, weight.scale, bias, act_in=act_in, residual=residual,
                                     smooth=weight.smooth, float_channels=weight.float_channels,
                                     float_weight=weight.float_weight)
    lead = x.shape[:-1]
    y = extension().cpu_int8_linear(x.reshape(-1, x.shape[-1]), weight.packed, bias, act_in or "none",
                                    None if residual is None else residual.reshape(-1, residual.shape[-1]))
    return y.view(*lead, y.shape[-1])
