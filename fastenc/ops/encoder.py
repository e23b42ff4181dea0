"""Encoder-stack op: the fused C++ stack of whole encoder layers, inference on CPU.

Backend ``cpu`` only: ``fastenc._C.encoder_forward_cpu`` runs every layer (QKV projection, attention with
window and rotary, out projection, residual + LayerNorm, FFN, ungated or gated) in one C++ call on packed
tokens (``csrc/cpu/encoder.cpp``), so a layer costs a few ATen calls of host time instead of a Python frame
per op.  It records no autograd graph.  Its reference is the per-op composition of the same
``LayerSpec``/``LayerWeights`` (``fastenc.stack``), which also decides, once per call, whether a stack runs
fused (``fastenc.stack.fused_blocker``).

The C++ layers (``fastenc._C.EncoderLayer``: checked, GEMM weights packed for the panel GEMM or oneDNN) are built
once per weight generation and kept in the owner's ``WeightCache`` (:func:`layers_for`).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from .. import constants
from ..backends import cpu_inference_check, extension, register_op
from ..weight_cache import WeightCache

Tensor = torch.Tensor

# A large batch runs in chunks of whole sequences of at most this many elements in the widest intermediate
# (constants.ENCODER_CHUNK_ELEMENTS says why); 0 runs it at once (tests set small values to cut test batches).
CHUNK_ELEMENTS = constants.ENCODER_CHUNK_ELEMENTS


def shape_class(needs_grad: bool) -> tuple:
    """The registry's shape class of a stack call: what the cpu backend's check reads."""
    return (needs_grad,)


_cpu_available = cpu_inference_check("the fused encoder stack runs inference only (no autograd); training runs per op")


def _describe(device: torch.device, dtype: torch.dtype) -> List[str]:
    return ["fused when: inference (eval, no grad), CPU tensors, packed tokens (a bool key padding mask with "
            "padding removal, or no mask), kernel activations, no op forced off 'cpu', no autocast; "
            "otherwise per op; fastenc.stack.explain(model) tells how a model's last call ran and why"]


register_op("encoder", {"cpu": _cpu_available}, auto={"cpu": ("cpu",)}, example=lambda head_dim: shape_class(False),
            describe=_describe)


@functools.lru_cache(maxsize=64)
def uniform_cu(batch: int, length: int) -> Tensor:
    """int32 [batch + 1] offsets of batch sequences of one length (never written: cached)."""
    return torch.arange(batch + 1, dtype=torch.int32) * length


def layers_for(cache: WeightCache, layers: Sequence[Tuple[object, object, object]], dtype: torch.dtype,
               weights_key: Tuple) -> list:
    """The ``fastenc._C.EncoderLayer`` of each (LayerSpec, LayerWeights, Int8Layer or None), built when a spec or
    ``weights_key`` changed: what the weights and int8 weights are a function of (``fastenc.stack.run`` computes
    it once per call: the layers' weights' ``tensor_key`` and, for int8, the calibration's)."""
    key = (tuple(spec for spec, _, _ in layers), weights_key)
    ext = extension()

    def build():
        with torch.no_grad():
            return [ext.EncoderLayer(spec, w, f"layers[{i}].",
                                     {} if q8 is None else {k: q.packed for k, q in q8._asdict().items() if q})
                    for i, (spec, w, q8) in enumerate(layers)]
    return cache.get(("fused", dtype, any(q8 is not None for _, _, q8 in layers)), key, build)


def forward(x: Tensor, cu_seqlens: Tensor, max_seqlen: int, layers: list, final_norm, is_causal: bool,
            rotary: Sequence[Optional[Tuple[Tensor, Tensor]]]) -> Tensor:
    """The fused stack on packed rows x [T, d]; final_norm a ``NormWeights`` or None; rotary: per layer the
    (cos, sin) tables [P, D/2] of a rotary layer (any float dtype; the kernel reads fp32), else None."""
    fp32 = {}  # layers of one rotary base share their tables: convert each once
    for r in rotary:
        if r is not None and id(r[0]) not in fp32:
            fp32[id(r[0])] = (r[0].float().contiguous(), r[1].float().contiguous())
    cos = [None if r is None else fp32[id(r[0])][0] for r in rotary]
    sin = [None if r is None else fp32[id(r[0])][1] for r in rotary]
    fw, fb, feps = final_norm if final_norm is not None else (None, None, None)
    return extension().encoder_forward_cpu(x.contiguous(), cu_seqlens, max_seqlen, layers, is_causal, fw, fb, feps,
                                           cos, sin, CHUNK_ELEMENTS)
