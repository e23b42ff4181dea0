"""Drop-in encoder modules: torch's constructor, forward signature and parameter names.

``TransformerEncoderLayer`` subclasses ``torch.nn.TransformerEncoderLayer`` and keeps
its submodules (``self_attn.in_proj_weight``, ``linear1``, ``norm1``...), so state
dicts load both ways with ``strict=True`` and ``isinstance`` checks keep working.
Only ``forward`` differs: the modules map their parameters onto ``fastenc.layer``'s
``LayerSpec``/``LayerWeights`` and ``fastenc.stack`` runs them (fused on CPU in inference,
op by op otherwise).

Semantics that differ from torch, on purpose:
  * a query whose keys are all masked gets zeros from attention (torch: NaN);
  * ``is_causal=True`` without a mask applies the causal mask (torch raises);
    with a mask, the mask is trusted to be causal, as torch does.
"""
from __future__ import annotations

import copy
import operator
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import stack
from .activations import activation_name, torch_activation
from .backend_setting import BackendSetting
from .backends import BackendSpec
from .layer import LayerSpec, LayerWeights, NormWeights
from .masks import is_causal_mask, merge_masks
from .ops._common import FLOAT_DTYPES, check_dropout
from .ops.layer_norm import residual_layer_norm_unchecked
from .ops.padding import Padding, unpad as unpad_tokens
from .weight_cache import cache_of

Tensor = torch.Tensor


def _param(module: nn.Module, name: str) -> Optional[Tensor]:
    """module.<name>: a registered parameter from its dict (what nn.Module.__getattr__ would return, without its
    cost), anything else (a wrapper's property, a buffer) by attribute."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class TransformerEncoderLayer(BackendSetting, stack.StackOwner, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` computed by fastenc's ops.

    Extra keywords: ``backend`` — None (follow ``fastenc.use_backend`` / ``FASTENC_BACKEND``),
    a backend name for every op, or a dict ``{"attention": ..., "layer_norm": ..., "ffn": ...,
    "padding": ...}``; ``unpad`` — run on real tokens only when a key padding mask is
    given: True, False, or None (auto: when at least ``stack.UNPAD_MIN_PADDING`` of the batch is
    padding).  With padding removed, outputs at padding positions are zeros.
    ``activation`` also takes ``"gelu_tanh"``; another callable runs unfused in PyTorch.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: BackendSpec = None,
        unpad: Optional[bool] = None,
    ) -> None:
        for name, value in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
            if not (hasattr(value, "__index__") and not isinstance(value, bool) and operator.index(value) >= 1):
                raise ValueError(f"TransformerEncoderLayer: {name} must be a positive integer, got {value!r}")
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        check_dropout(dropout, "TransformerEncoderLayer", "dropout")  # torch lets NaN through
        name = activation_name(activation)
        torch_act = torch_activation(activation) if isinstance(activation, str) else activation
        super().__init__(d_model, nhead, dim_feedforward, dropout, torch_act, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        self.activation_name = name
        self.backend = backend
        self.unpad = unpad

    # ----------------------------------------------------------------- the layer as data

    def stack_layer(self) -> stack.StackLayer:
        """This layer's ``LayerSpec`` and ``LayerWeights`` (its current parameters), with its backend setting.

        Read on every call (a reassigned parameter or eps is seen at once), from the modules' own dicts:
        ``nn.Module.__getattr__`` for each of the 33 submodules and parameters cost 24 µs a layer, a sixth of
        a MiniLM call's host time at batch 1."""
        m = self._modules
        a, n1, n2, l1, l2 = m["self_attn"], m["norm1"], m["norm2"], m["linear1"], m["linear2"]
        out = a._modules["out_proj"]
        weights = LayerWeights(
            _param(a, "in_proj_weight"), _param(a, "in_proj_bias"), _param(out, "weight"), _param(out, "bias"),
            _param(l1, "weight"), _param(l1, "bias"), _param(l2, "weight"), _param(l2, "bias"),
            _param(n1, "weight"), _param(n1, "bias"), _param(n2, "weight"), _param(n2, "bias"))
        spec = LayerSpec(
            a.embed_dim, a.num_heads, self.activation_name or self.activation, self.norm_first, n1.eps, n2.eps,
            attn_dropout=a.dropout, dropout1=m["dropout1"].p, ffn_dropout=m["dropout"].p, dropout2=m["dropout2"].p,
            attn_bias=weights.qkv_bias is not None, ffn_bias=weights.ffn1_bias is not None,
            norm_bias=weights.norm1_bias is not None)
        return stack.StackLayer(spec, weights, self)

    # ----------------------------------------------------------------- forward

    def _batch_first(self, src: Tensor, src_mask, src_key_padding_mask, is_causal: bool):
        """Validate; return (x [B, L, d], attn_mask, key_padding_mask, is_causal, restore(out))."""
        if not isinstance(src, torch.Tensor) or src.dtype not in FLOAT_DTYPES:
            raise TypeError(f"src should be a floating-point tensor, got {getattr(src, 'dtype', type(src).__name__)}")
        if src.dim() not in (2, 3) or src.shape[-1] != self.self_attn.embed_dim:
            raise ValueError(
                f"src should be [L, d_model], [B, L, d_model] or [L, B, d_model] with d_model="
                f"{self.self_attn.embed_dim}, got {tuple(src.shape)}"
            )
        w = self.self_attn.in_proj_weight
        if src.device != w.device:
            raise ValueError(f"src is on {src.device} but the layer's parameters are on {w.device}")
        if src.dtype != w.dtype and not torch.is_autocast_enabled(src.device.type):
            raise TypeError(f"src has dtype {src.dtype} but the layer's parameters have {w.dtype} (cast one, or "
                            "run under torch.autocast)")
        kpm = src_key_padding_mask
        if src.dim() == 2:
            x = src.unsqueeze(0)
            kpm = None if kpm is None else kpm.unsqueeze(0)
            restore = lambda out: out.squeeze(0)  # noqa: E731
        elif self.self_attn.batch_first:
            x, restore = src, (lambda out: out)
        else:
            x, restore = src.transpose(0, 1), (lambda out: out.transpose(0, 1))
        B, L, _ = x.shape
        attn_mask, kpm = merge_masks(src_mask, kpm, B, self.self_attn.num_heads, L, L, src.device)
        if is_causal and attn_mask is not None:
            attn_mask = None  # the hint says the mask is causal: the kernel generates it
        return x, attn_mask, kpm, bool(is_causal), restore

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        *,
        unpad: Optional[bool] = None,
    ) -> Tensor:
        """torch's forward.  ``unpad``: remove padding tokens (True), keep them (False), or
        let ``auto`` decide (None; the module's ``unpad`` attribute when set)."""
        x, attn_mask, kpm, is_causal, restore = self._batch_first(src, src_mask, src_key_padding_mask, is_causal)
        unpad = getattr(self, "unpad", None) if unpad is None else unpad
        out = stack.run([self.stack_layer()], x, setting=self, attn_mask=attn_mask, key_padding_mask=kpm,
                        is_causal=is_causal, unpad_=unpad, training=self.training, cache=cache_of(self),
                        quantize=self.quantize, int8_ranges=self.int8_ranges).last
        return restore(out)


def _final_norm(norm: Optional[nn.Module]):
    """The encoder's final norm for the stack: NormWeights of a LayerNorm over the last dimension, the module
    itself otherwise (run in PyTorch), or None."""
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return NormWeights(norm.weight, norm.bias, norm.eps)
    return norm


class TransformerEncoder(BackendSetting, stack.StackOwner, nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` whose layers are fastenc layers.

    Given a torch ``nn.TransformerEncoderLayer``, the clones are converted (same tensors).
    The optional final ``norm`` (a LayerNorm) runs through fastenc's LayerNorm op.
    ``backend`` and ``unpad`` as for ``TransformerEncoderLayer`` (the stack's ``unpad``
    decides for the whole stack: padding is removed once at entry).
    """

    def __init__(
        self,
        encoder_layer: nn.TransformerEncoderLayer,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
        *,
        backend: BackendSpec = None,
        unpad: Optional[bool] = None,
    ) -> None:
        super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor=False, mask_check=mask_check)
        self.enable_nested_tensor = enable_nested_tensor  # accepted for compatibility; fastenc does not use it
        self.backend = backend
        self.unpad = unpad
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, TransformerEncoderLayer):
                self.layers[i] = layer_from_torch(layer)
            if backend is not None:
                self.layers[i].backend = self.backend

    def run(self, x: Tensor, attn_mask: Optional[Tensor], kpm: Optional[Tensor], is_causal: bool, *,
            unpad_: Optional[bool] = None, packed: Optional[Padding] = None, hidden_states: bool = False,
            checkpoint=None) -> stack.StackResult:
        """The layers and the final norm through ``fastenc.stack`` on validated batch-first x [B, L, d] (or
        packed [T, d] with ``packed``)."""
        unpad_ = getattr(self, "unpad", None) if unpad_ is None else unpad_
        return stack.run([layer.stack_layer() for layer in self.layers], x, setting=self,
                         final_norm=_final_norm(self.norm), attn_mask=attn_mask, key_padding_mask=kpm,
                         is_causal=is_causal, packed=packed, unpad_=unpad_, training=self.training,
                         cache=cache_of(self), hidden_states=hidden_states, checkpoint=checkpoint,
                         quantize=self.quantize, int8_ranges=self.int8_ranges)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
        *,
        unpad: Optional[bool] = None,
    ) -> Tensor:
        """torch's forward.  With a bool key padding mask, padding is removed once here, every
        layer runs on the real tokens, and the result is scattered back once (zeros at padding
        positions).  ``unpad`` forces it on/off; None lets ``auto`` decide."""
        first = self.layers[0]
        seq_dim = 1 if (first.self_attn.batch_first and src.dim() == 3) else 0
        if is_causal is None:
            is_causal = is_causal_mask(mask, src.shape[seq_dim])
        if not all(type(layer) is TransformerEncoderLayer for layer in self.layers):
            out = src  # a foreign layer was swapped in: run each layer as a black box
            for layer in self.layers:
                out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
            norm = _final_norm(self.norm)
            if isinstance(norm, NormWeights):
                return residual_layer_norm_unchecked(out, None, norm.weight, norm.bias, None, norm.eps, 0.0, False,
                                                     self._backend("layer_norm"))
            return out if norm is None else norm(out)
        x, attn_mask, kpm, is_causal, restore = first._batch_first(src, mask, src_key_padding_mask, is_causal)
        return restore(self.run(x, attn_mask, kpm, is_causal, unpad_=unpad).last)

    def forward_unpadded(self, src: Tensor, src_key_padding_mask: Tensor, is_causal: bool = False):
        """Run on real tokens only and return them packed: (hidden [T, d], ops.Padding).

        ``Padding.cu_seqlens`` delimits the sequences; ``fastenc.ops.pad(hidden, info)`` restores [B, L, d].
        """
        if not isinstance(src_key_padding_mask, torch.Tensor) or src_key_padding_mask.dtype != torch.bool:
            raise TypeError(f"forward_unpadded needs a bool src_key_padding_mask [B, L] (True = padding), got "
                            f"{getattr(src_key_padding_mask, 'dtype', type(src_key_padding_mask).__name__)}")
        first = self.layers[0]
        x, attn_mask, kpm, is_causal, _ = first._batch_first(src, None, src_key_padding_mask, is_causal)
        info = stack.padding_plan(True, attn_mask, kpm)
        tokens = unpad_tokens(x, info, backend=self._backend("padding"))
        return self.run(tokens, None, None, is_causal, packed=info).last, info


# ----------------------------------------------------------------- conversion between classes


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance holding the same parameters, buffers and submodules (no copy); derived weights
    (the weight cache) are not carried over."""
    new = cls.__new__(cls)
    state = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()
             if k != "_weight_cache"}
    new.__dict__.update(state)
    return new


def layer_from_torch(layer: nn.TransformerEncoderLayer, backend: BackendSpec = None) -> TransformerEncoderLayer:
    """fastenc twin of a torch encoder layer, sharing its tensors."""
    new = _retype(layer, TransformerEncoderLayer)
    new.activation_name = activation_name(layer.activation)
    new.backend = backend
    return new


def layer_to_torch(layer: TransformerEncoderLayer) -> nn.TransformerEncoderLayer:
    new = _retype(layer, nn.TransformerEncoderLayer)
    for attr in ("activation_name", "_backend_spec", "_op_backend", "quantize", "int8_ranges"):
        new.__dict__.pop(attr, None)
    return new


def encoder_from_torch(encoder: nn.TransformerEncoder, backend: BackendSpec = None) -> TransformerEncoder:
    new = _retype(encoder, TransformerEncoder)
    new.layers = nn.ModuleList([layer_from_torch(layer, backend) for layer in encoder.layers])
    new.backend = backend
    return new


def encoder_to_torch(encoder: TransformerEncoder) -> nn.TransformerEncoder:
    new = _retype(encoder, nn.TransformerEncoder)
    for attr in ("_backend_spec", "_op_backend", "quantize", "int8_ranges"):
        new.__dict__.pop(attr, None)
    new.layers = nn.ModuleList([layer_to_torch(layer) for layer in encoder.layers])
    return new
