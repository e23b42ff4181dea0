"""Drop-in encoder modules: torch's constructor, forward signature and parameter names.

``TransformerEncoderLayer`` subclasses ``torch.nn.TransformerEncoderLayer`` and keeps
its submodules (``self_attn.in_proj_weight``, ``linear1``, ``norm1``...), so state
dicts load both ways with ``strict=True`` and ``isinstance`` checks keep working.
Only ``forward`` differs: it calls fastenc's ops, one dispatch point each.

Data flow (post-norm): x → QKV projection → attention → out projection (its bias
fused into the next op) → residual + LayerNorm → FFN → residual + LayerNorm.
Pre-norm keeps the residual stream that the fused residual+LayerNorm op returns.

Semantics that differ from torch, on purpose:
  * a query whose keys are all masked gets zeros from attention (torch: NaN);
  * ``is_causal=True`` without a mask applies the causal mask (torch raises);
    with a mask, the mask is trusted to be causal, as torch does.
"""
from __future__ import annotations

import copy
import functools
import operator
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._util import warn_once
from .backends import BackendSpec, BackendUnavailableError, check_spec, op_backends, requested_backend, resolve
from .ops._common import FLOAT_DTYPES, check_dropout
from .ops.attention import attention_unchecked, attention_varlen_unchecked
from .ops.encoder import encoder_stack_unchecked, packed_weights
from .ops.ffn import ffn_unchecked
from .ops.layer_norm import residual_layer_norm_unchecked
from .ops.linear import linear_unchecked

Tensor = torch.Tensor

_ACT_FROM_STR = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}


def activation_name(activation) -> Optional[str]:
    """'relu' | 'gelu' | 'gelu_tanh' for the activations the fused FFN supports, else None."""
    if isinstance(activation, str):
        if activation not in _ACT_FROM_STR:
            raise ValueError(f"activation should be relu/gelu/gelu_tanh, not {activation!r}")
        return activation
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    if isinstance(activation, functools.partial) and activation.func is F.gelu and not activation.args:
        return "gelu_tanh" if activation.keywords.get("approximate", "none") == "tanh" else "gelu"
    return None


def _torch_activation(name: str) -> Union[str, Callable]:
    return functools.partial(F.gelu, approximate="tanh") if name == "gelu_tanh" else name


class BackendSetting:
    """The ``backend`` attribute of fastenc modules: None (follow ``use_backend`` / ``FASTENC_BACKEND``),
    a backend name for every op, or ``{op: backend}``; validated when set and resolved per op once."""

    @property
    def backend(self) -> BackendSpec:
        return self.__dict__.get("_backend_spec")

    @backend.setter
    def backend(self, spec: BackendSpec) -> None:
        spec = check_spec(spec)
        self.__dict__["_backend_spec"] = spec
        self.__dict__["_op_backend"] = op_backends(spec)

    def _backend(self, op: str) -> Optional[str]:
        """The ``backend=`` argument this module passes to ``op``."""
        table = self.__dict__.get("_op_backend")
        return None if table is None else table.get(op)

    def _requested(self, op: str):
        """(backend, named for op) this module asks of ``op``: its own setting (a dict names ops, a string
        is a default for every op), else the context's."""
        spec = self.__dict__.get("_backend_spec")
        if spec is None or (isinstance(spec, dict) and op not in spec):
            return requested_backend(op, None)
        return self._backend(op), isinstance(spec, dict)


def merge_masks(
    src_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int, nhead: int, L: int, S: int,
    device: torch.device,
):
    """Validate torch-style masks; src_mask [L,S] or [B*nhead,L,S] → a [B,H,L,S] view (no copy).

    The key padding mask stays [B, S] (the attention op skips padded key blocks).
    """
    for name, m in (("src_key_padding_mask", key_padding_mask), ("src_mask", src_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} should be a tensor or None, got {type(m).__name__}")
        if not (m.dtype == torch.bool or m.dtype in FLOAT_DTYPES):
            raise TypeError(f"{name} should be bool or float, got {m.dtype}")
        if m.device != device:
            raise ValueError(f"{name} is on {m.device} but src is on {device}")
    if key_padding_mask is not None and key_padding_mask.shape != (batch, S):
        raise ValueError(f"src_key_padding_mask should have shape {(batch, S)}, got {tuple(key_padding_mask.shape)}")
    if src_mask is not None:
        if src_mask.dim() == 2:
            if src_mask.shape != (L, S):
                raise ValueError(f"2D src_mask should have shape {(L, S)}, got {tuple(src_mask.shape)}")
            src_mask = src_mask.expand(batch, nhead, L, S)
        elif src_mask.dim() == 3:
            if src_mask.shape != (batch * nhead, L, S):
                raise ValueError(
                    f"3D src_mask should have shape {(batch * nhead, L, S)}, got {tuple(src_mask.shape)}"
                )
            src_mask = src_mask.view(batch, nhead, L, S)
        else:
            raise ValueError(f"src_mask should be 2D or 3D, got {src_mask.dim()}D")
    return src_mask, key_padding_mask


class TransformerEncoderLayer(BackendSetting, nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` computed by fastenc's ops.

    Extra keywords: ``backend`` — None (follow ``fastenc.use_backend`` / ``FASTENC_BACKEND``),
    a backend name for every op, or a dict ``{"attention": ..., "layer_norm": ..., "ffn": ...,
    "padding": ...}``; ``unpad`` — run on real tokens only when a key padding mask is
    given: True, False, or None (auto: when at least ``UNPAD_MIN_PADDING`` of the batch is
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
        torch_act = _torch_activation(activation) if isinstance(activation, str) else activation
        super().__init__(d_model, nhead, dim_feedforward, dropout, torch_act, layer_norm_eps, batch_first,
                         norm_first, bias, device, dtype)
        self.activation_name = name
        self.backend = backend
        self.unpad = unpad

    # ----------------------------------------------------------------- helpers

    def _p(self, p: float) -> float:
        return p if self.training else 0.0

    def _self_attention(self, x: Tensor, attn_mask, key_padding_mask, is_causal: bool,
                        packed: Optional[ops.Padding]) -> Tensor:
        """Attention without the output-projection bias (fused into the residual+LN op).

        x is [B, L, d], or the packed real tokens [T, d] when ``packed`` is given.
        """
        d = x.shape[-1]
        H = self.self_attn.num_heads
        qkv = linear_unchecked(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias, self._backend("linear"))
        q, k, v = qkv.view(*x.shape[:-1], 3, H, d // H).unbind(-3)
        p = self._p(self.self_attn.dropout)
        if packed is not None:
            cu, mx = packed.cu_seqlens, packed.max_seqlen
            o = attention_varlen_unchecked(q, k, v, cu, cu, mx, mx, is_causal, None, p, self._backend("attention"))
        else:
            o = attention_unchecked(q, k, v, attn_mask, key_padding_mask, is_causal, None, p,
                                    self._backend("attention"))
        return linear_unchecked(o.reshape(x.shape), self.self_attn.out_proj.weight, None, self._backend("linear"))

    def _feed_forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.activation_name is None:
            warn_once(f"fastenc: activation {self.activation!r} has no fused FFN kernel; running it in PyTorch")
            y = self.linear2(self.dropout(self.activation(self.linear1(x))))
            return y if residual is None else residual + y
        return ffn_unchecked(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                             self.activation_name, self._p(self.dropout.p), residual, self._backend("ffn"))

    def _norm(self, norm: nn.LayerNorm, x: Tensor, branch: Optional[Tensor], branch_bias: Optional[Tensor],
              dropout_p: float, prenorm: bool = False):
        return residual_layer_norm_unchecked(x, branch, norm.weight, norm.bias, branch_bias, norm.eps,
                                             self._p(dropout_p), prenorm, self._backend("layer_norm"))

    def _layer(self, x: Tensor, attn_mask, key_padding_mask, is_causal: bool,
               packed: Optional[ops.Padding] = None) -> Tensor:
        """The layer on batch-first x [B, L, d] with validated masks, or on packed tokens [T, d]."""
        out_bias = self.self_attn.out_proj.bias
        if self.norm_first:
            h = self._norm(self.norm1, x, None, None, 0.0)
            sa = self._self_attention(h, attn_mask, key_padding_mask, is_causal, packed)
            h, x = self._norm(self.norm2, x, sa, out_bias, self.dropout1.p, prenorm=True)
            if self._p(self.dropout2.p) > 0:
                return x + F.dropout(self._feed_forward(h), self.dropout2.p, training=True)
            return self._feed_forward(h, residual=x)
        sa = self._self_attention(x, attn_mask, key_padding_mask, is_causal, packed)
        x = self._norm(self.norm1, x, sa, out_bias, self.dropout1.p)
        return self._norm(self.norm2, x, self._feed_forward(x), None, self.dropout2.p)

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
        unpad = self._unpad_setting(unpad)
        weights = fused_stack_weights(self, (self,), None, x, attn_mask, kpm, unpad)
        if weights is not None:
            return restore(run_fused_stack((self,), None, x, kpm, is_causal, weights, self._backend("encoder")))
        info = padding_plan(unpad, attn_mask, kpm)
        if info is None:
            return restore(self._layer(x, attn_mask, kpm, is_causal))
        out = self._layer(ops.unpad(x, info, backend=self._backend("padding")), None, None, is_causal, info)
        return restore(ops.pad(out, info, backend=self._backend("padding")))

    def _unpad_setting(self, unpad: Optional[bool]) -> Optional[bool]:
        return getattr(self, "unpad", None) if unpad is None else unpad


# Padding removal pays when enough of the batch is padding: gathering and scattering
# the rows costs about one extra LayerNorm pass, removing them saves their share of
# every GEMM, LayerNorm and attention block.  Measured on CPU (see README): a win
# from ~10% padding on; re-measure on each GPU with `python -m fastenc bench --ops pad`.
UNPAD_MIN_PADDING = 0.1


def padding_plan(unpad: Optional[bool], attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]):
    """The Padding maps when the layer stack should run on real tokens only, else None.

    Padding can be removed for a bool key padding mask without a dense attn_mask (a
    causal hint is fine: causality within each sequence is preserved by packing).
    """
    if unpad is False or key_padding_mask is None:
        return None
    if unpad is None and (torch.compiler.is_compiling() or key_padding_mask.device.type == "meta"):
        return None  # auto decides from the data (a host sync): keep the padded path inside torch.compile / on meta
    possible = key_padding_mask.dtype == torch.bool and attn_mask is None
    if not possible:
        if unpad:
            raise ValueError(
                "unpad=True needs a bool src_key_padding_mask and no src_mask (a dense mask is indexed by "
                "padded positions); pass unpad=None to fall back automatically"
            )
        return None
    info = ops.padding_info(key_padding_mask)
    if unpad is None and info.padding_ratio < UNPAD_MIN_PADDING:
        return None
    return info


# Ops a forced per-op backend would take away from the fused stack (it runs all of them in C++).
_FUSED_OPS = ("attention", "layer_norm", "ffn")


def _plain_norm(norm) -> bool:
    return norm is None or (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1)


def fused_stack_weights(module, layers, final_norm, x: Tensor, attn_mask, kpm, unpad: Optional[bool]):
    """The layers' weights for one ``encoder`` op call, or None when they run layer by layer.

    The fused stack (``fastenc.ops.encoder_stack``) runs inference only, on packed tokens, for uniform
    layers with a fused activation and no dense mask, unless an op is forced to another backend.
    Under ``auto`` or a default for every op an ineligible call runs layer by layer; ``"reference"`` always
    does (the layer-by-layer path is the stack's reference composition); ``"cpu"`` named for the encoder op
    raises when it cannot run.  final_norm: None, a LayerNorm, or False (a final norm the stack cannot run).
    """
    want, named = module._requested("encoder")
    if want == "reference":
        return None
    why = _unfusable(layers, final_norm, module.training, x, attn_mask, kpm, unpad)
    if why is not None:
        if want == "cpu" and named:
            raise BackendUnavailableError(f"fastenc encoder: backend 'cpu' is unavailable: {why}")
        return None
    weights = []
    for layer in layers:
        a = layer.self_attn
        weights.append((a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, layer.linear1.weight,
                        layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, layer.norm1.weight,
                        layer.norm1.bias, layer.norm2.weight, layer.norm2.bias))
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for w in weights for t in w))
    if grad and not (want == "cpu" and named):
        return None  # autograd needs the per-op path (a named "cpu" raises in resolve instead)
    if resolve("encoder", want if named else None, x.device, x.dtype, (grad,)) != "cpu":
        return None
    return weights


def _unfusable(layers, final_norm, training: bool, x: Tensor, attn_mask, kpm, unpad: Optional[bool]) -> Optional[str]:
    """Why these layers cannot run as one fused stack call, or None."""
    if training:
        return "the module is in training mode (the fused stack has no dropout and no autograd)"
    if x.device.type != "cpu":
        return f"it runs on CPU tensors, not {x.device.type}"
    if attn_mask is not None:
        return "a dense src_mask is indexed by padded positions; the stack runs on packed tokens"
    if kpm is not None and (kpm.dtype != torch.bool or unpad is False):
        return "it needs a bool key padding mask and padding removal (not unpad=False)"
    if final_norm is False:
        return "the final norm is not a LayerNorm over the last dimension"
    first = layers[0]
    for layer in layers:
        if (layer.activation_name != first.activation_name or first.activation_name is None
                or layer.norm_first != first.norm_first or layer.self_attn.num_heads != first.self_attn.num_heads
                or not layer.norm1.eps == layer.norm2.eps == first.norm1.eps):
            return "the layers differ in activation, norm placement, heads or eps, or the activation has no kernel"
        for op in _FUSED_OPS:
            forced = requested_backend(op, layer._backend(op))[0]
            if forced not in ("auto", "cpu"):
                return f"{op} is set to {forced!r}"
    return None


def run_fused_stack(layers, final_norm, x: Tensor, kpm: Optional[Tensor], is_causal: bool, weights,
                    backend: Optional[str]) -> Tensor:
    """The layers in one ``encoder`` op call on the packed real tokens of x [B, L, d]; zeros at padding."""
    first = layers[0]
    B, L, d = x.shape
    final = None if final_norm is None else (final_norm.weight, final_norm.bias, final_norm.eps)
    if kpm is not None:
        info = ops.padding_info(kpm)
        packed, cu, max_len = ops.unpad(x, info, backend=first._backend("padding")), info.cu_seqlens, info.max_seqlen
    else:
        packed, cu, max_len = x.reshape(B * L, d), torch.arange(B + 1, dtype=torch.int32) * L, L
    prepacked = [packed_weights(layer.__dict__.setdefault("_onednn_cache", {}),
                                (w[0], w[2], w[4], w[6])) for layer, w in zip(layers, weights)]
    out = encoder_stack_unchecked(packed, cu, max_len, weights, first.self_attn.num_heads, first.norm_first,
                                  first.activation_name, first.norm1.eps, final, is_causal, backend,
                                  None if None in prepacked else prepacked)
    return ops.pad(out, info, backend=first._backend("padding")) if kpm is not None else out.view(B, L, d)


def _is_causal_mask(mask: Optional[Tensor], L: int) -> bool:
    """True when mask is exactly the [L, L] causal mask (bool True above the diagonal, or float -inf)."""
    if mask is None or mask.dim() != 2 or mask.shape != (L, L):
        return False
    upper = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.all(torch.where(upper, mask == float("-inf"), mask == 0)))


class TransformerEncoder(BackendSetting, nn.TransformerEncoder):
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

    def _final_norm(self, x: Tensor) -> Tensor:
        if self.norm is None:
            return x
        if isinstance(self.norm, nn.LayerNorm) and len(self.norm.normalized_shape) == 1:
            return residual_layer_norm_unchecked(x, None, self.norm.weight, self.norm.bias, None, self.norm.eps, 0.0,
                                                 False, self._backend("layer_norm"))
        return self.norm(x)

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
        layer runs on the real tokens, and the result is scattered back once (zeros at
        padding positions).  ``unpad`` forces it on/off; None lets ``auto`` decide."""
        first = self.layers[0]
        seq_dim = 1 if (first.self_attn.batch_first and src.dim() == 3) else 0
        if is_causal is None:
            is_causal = _is_causal_mask(mask, src.shape[seq_dim])
        if not all(type(layer) is TransformerEncoderLayer for layer in self.layers):
            out = src  # a foreign layer was swapped in: run each layer as a black box
            for layer in self.layers:
                out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
            return self._final_norm(out)
        x, attn_mask, kpm, is_causal, restore = first._batch_first(src, mask, src_key_padding_mask, is_causal)
        unpad = getattr(self, "unpad", None) if unpad is None else unpad
        final = self.norm if _plain_norm(self.norm) else False
        weights = fused_stack_weights(self, self.layers, final, x, attn_mask, kpm, unpad)
        if weights is not None:
            return restore(run_fused_stack(self.layers, final, x, kpm, is_causal, weights, self._backend("encoder")))
        info = padding_plan(unpad, attn_mask, kpm)
        if info is None:
            for layer in self.layers:
                x = layer._layer(x, attn_mask, kpm, is_causal)
            return restore(self._final_norm(x))
        h = self._packed(ops.unpad(x, info, backend=first._backend("padding")), info, is_causal)
        return restore(ops.pad(h, info, backend=first._backend("padding")))

    def _packed(self, h: Tensor, info: ops.Padding, is_causal: bool) -> Tensor:
        for layer in self.layers:
            h = layer._layer(h, None, None, is_causal, info)
        return self._final_norm(h)

    def forward_unpadded(self, src: Tensor, src_key_padding_mask: Tensor, is_causal: bool = False):
        """Run on real tokens only and return them packed: (hidden [T, d], ops.Padding).

        ``Padding.cu_seqlens`` delimits the sequences; ``fastenc.ops.pad(hidden, info)`` restores [B, L, d].
        """
        if not isinstance(src_key_padding_mask, torch.Tensor) or src_key_padding_mask.dtype != torch.bool:
            raise TypeError(f"forward_unpadded needs a bool src_key_padding_mask [B, L] (True = padding), got "
                            f"{getattr(src_key_padding_mask, 'dtype', type(src_key_padding_mask).__name__)}")
        first = self.layers[0]
        x, attn_mask, kpm, is_causal, _ = first._batch_first(src, None, src_key_padding_mask, is_causal)
        info = padding_plan(True, attn_mask, kpm)
        return self._packed(ops.unpad(x, info, backend=first._backend("padding")), info, is_causal), info


# ----------------------------------------------------------------- conversion between classes


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance holding the same parameters, buffers and submodules (no copy)."""
    new = cls.__new__(cls)
    state = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
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
    for attr in ("activation_name", "_backend_spec", "_op_backend", "_onednn_cache"):
        new.__dict__.pop(attr, None)
    return new


def encoder_from_torch(encoder: nn.TransformerEncoder, backend: BackendSpec = None) -> TransformerEncoder:
    new = _retype(encoder, TransformerEncoder)
    new.layers = nn.ModuleList([layer_from_torch(layer, backend) for layer in encoder.layers])
    new.backend = backend
    return new


def encoder_to_torch(encoder: TransformerEncoder) -> nn.TransformerEncoder:
    new = _retype(encoder, nn.TransformerEncoder)
    for attr in ("_backend_spec", "_op_backend"):
        new.__dict__.pop(attr, None)
    new.layers = nn.ModuleList([layer_to_torch(layer) for layer in encoder.layers])
    return new
