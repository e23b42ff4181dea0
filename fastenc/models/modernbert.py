"""Hugging Face ModernBERT on fastenc's kernels: ``optimize_modernbert(model)`` (also reached through
``fastenc.optimize(model)``).

Every ``ModernBertModel`` inside ``model`` (a bare base model, ``ModernBertForMaskedLM``,
``ModernBertForSequenceClassification`` or any other head, a sentence-transformers pipeline...)
changes class to :class:`FastModernBertModel`, whose ``forward`` runs the same layers through
fastenc's ops; no module, parameter or buffer is replaced, so ``state_dict`` keys, ``save_pretrained``
output and optimizers stay Hugging Face's.  :func:`to_hf` changes the class back.

One layer (pre-norm, no biases by default, ``l`` = 0 skips the first LayerNorm as HF does):
    h = LN_attn(x);  q, k, v = h Wqkvᵀ;  o = attention(rotary(q), rotary(k), v, window)
    (h, x) = LN_mlp(x + dropout(o Woᵀ + bo))             one fused residual + LayerNorm op (prenorm)
    x = x + Wo(dropout(act(a) · g)),  [a, g] = h Wiᵀ    the gated FFN op (geglu / swiglu)
then ``final_norm``.  Local layers (``config.layer_types``) attend within ``config.sliding_window``
tokens on each side (HF's ``|i - j| <= local_attention // 2``), rotary tables use each layer type's
frequencies (``rotary_emb.<type>_inv_freq``: 160k global, 10k local by default) and are rounded to
the activations' dtype, as HF does.

Padding removal: with an ``attention_mask`` whose padding passes ``UNPAD_MIN_PADDING`` (or ``unpad=True``
on the model), the token ids (or ``inputs_embeds``) are packed once before the embeddings, every layer
runs on the real tokens with ``cu_seqlens``, and the output is scattered back once (zeros at padding;
HF computes values there that no real token reads).  Positions count from each sequence's first
token: the same attention as HF's for right and left padding (rotary scores depend on position
differences only), and the window counts real tokens, as HF's flash-attention path does.

Not supported (``optimize`` warns and leaves the model; ``strict=True`` raises ``ValueError``):
hidden activations other than gelu/silu, rope types whose tables depend on the length
(dynamic, longrope), head dims the kernels do not take.  At call time: ``position_ids``,
``output_attentions=True``, 4D attention masks (``ValueError``).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.modernbert.modeling_modernbert import ModernBertModel

from .. import ops, stack
from .._util import convertible, unsupported_hf_kwargs
from ..backend_setting import BackendSetting
from ..backends import BackendSpec, check_spec
from ..layer import LayerSpec, LayerWeights, NormWeights
from ..ops.layer_norm import residual_layer_norm_unchecked
from ..weight_cache import cache_of

Tensor = torch.Tensor

# HF hidden_activation -> the gated FFN's activation (HF ModernBertMLP: act(input) * gate).
_GATED = {"gelu": "geglu", "silu": "swiglu", "swish": "swiglu"}
_STATIC_ROPE = ("default", "linear", "yarn", "llama3")  # tables that do not depend on the sequence length


class FastModernBertModel(BackendSetting, stack.StackOwner, ModernBertModel):
    """``ModernBertModel`` whose forward runs fastenc's ops on the same modules.

    Built by :func:`optimize_modernbert`.  ``backend`` and ``unpad`` as for
    ``fastenc.TransformerEncoder`` (the model's ``unpad`` decides for the whole stack).
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        _check_call(position_ids, output_attentions, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        B, L = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        kpm = _key_padding_mask(attention_mask, B, L)
        info = stack.padding_plan(getattr(self, "unpad", None), None, kpm)
        if info is None:
            x = self._embed(input_ids, inputs_embeds)
        elif input_ids is not None:  # padding removed before the embeddings: only real tokens are embedded
            x = self._embed(input_ids.reshape(-1).index_select(0, info.indices), None)
        else:
            x = self._embed(None, ops.unpad(inputs_embeds, info, backend=self._backend("padding")))
        ckpt = None
        if self.gradient_checkpointing and self.training:
            ckpt = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(checkpoint,
                                                                                            use_reentrant=False)
        out = stack.run(self.stack_layers(), x, setting=self, final_norm=_norm_weights(self.final_norm),
                        key_padding_mask=None if info is not None else kpm, packed=info, unpad_=False,
                        training=self.training, cache=cache_of(self), hidden_states=bool(output_hidden_states),
                        checkpoint=ckpt, quantize=self.quantize, int8_ranges=self.int8_ranges)
        last, states = out.last, out.hidden_states
        if states is not None:
            states = states[:-1] + (last,)  # HF reports the normed output as the last state
        if info is not None:
            pad = functools.partial(ops.pad, info=info, backend=self._backend("padding"))
            last = pad(last)
            states = None if states is None else tuple(pad(s) for s in states)
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return tuple(t for t in (last, states) if t is not None)
        return BaseModelOutput(last_hidden_state=last, hidden_states=states)

    def stack_layers(self) -> List[stack.StackLayer]:
        """Each HF layer as a ``LayerSpec`` and ``LayerWeights`` (its current modules): pre-norm, gated FFN,
        rotary embeddings per layer type, a sliding window on local layers; layer 0 has no attention norm."""
        cfg = self.config
        out = []
        for i, layer in enumerate(self.layers):
            attn, mlp, layer_type = layer.attn, layer.mlp, cfg.layer_types[i]
            first_norm = None if isinstance(layer.attn_norm, nn.Identity) else layer.attn_norm
            spec = LayerSpec(
                cfg.hidden_size, cfg.num_attention_heads, _GATED[cfg.hidden_activation], norm_first=True,
                eps1=(first_norm or layer.mlp_norm).eps, eps2=layer.mlp_norm.eps, attn_norm=first_norm is not None,
                window=(cfg.sliding_window,) * 2 if layer_type == "sliding_attention" else None, rotary=True,
                rotary_scaling=float(getattr(self.rotary_emb, f"{layer_type}_attention_scaling")),
                attn_dropout=attn.attention_dropout, dropout1=attn.attention_dropout, ffn_dropout=mlp.drop.p,
                attn_bias=attn.Wqkv.bias is not None, ffn_bias=mlp.Wi.bias is not None,
                norm_bias=layer.mlp_norm.bias is not None)
            weights = LayerWeights(
                attn.Wqkv.weight, attn.Wqkv.bias, attn.Wo.weight, attn.Wo.bias, mlp.Wi.weight, mlp.Wi.bias,
                mlp.Wo.weight, mlp.Wo.bias, None if first_norm is None else first_norm.weight,
                None if first_norm is None else first_norm.bias, layer.mlp_norm.weight, layer.mlp_norm.bias,
                getattr(self.rotary_emb, f"{layer_type}_inv_freq"))
            out.append(stack.StackLayer(spec, weights, self))
        return out

    def _embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """HF's embeddings (token lookup, LayerNorm, dropout) with the LayerNorm through fastenc."""
        emb = self.embeddings
        x = emb.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        norm = emb.norm
        x = residual_layer_norm_unchecked(x, None, norm.weight, norm.bias, None, norm.eps, 0.0, False,
                                          self._backend("layer_norm"))
        return F.dropout(x, emb.drop.p, self.training) if emb.drop.p > 0 and self.training else x


def _norm_weights(norm: nn.LayerNorm) -> NormWeights:
    return NormWeights(norm.weight, norm.bias, norm.eps)


# save_pretrained records config.architectures from the class name: keep the HF one.
FastModernBertModel.__name__ = ModernBertModel.__name__


def _key_padding_mask(attention_mask: Optional[Tensor], batch: int, seqlen: int) -> Optional[Tensor]:
    """HF ``attention_mask`` [B, S] (1 = token, 0 = padding) -> key padding mask (True = padding)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(f"fastenc: attention_mask should be the tokenizer's 2D [batch, seq] = {(batch, seqlen)} "
                         f"mask, got shape {tuple(attention_mask.shape)} (4D / custom masks are not supported)")
    return attention_mask == 0


def _check_call(position_ids, output_attentions, extra: dict) -> None:
    if position_ids is not None:
        raise ValueError("fastenc: position_ids is not supported (rotary positions are each token's index in its "
                         "sequence); call fastenc.models.to_hf(model) first")
    if output_attentions:
        raise ValueError("fastenc: output_attentions=True is not supported (the flash attention kernels never "
                         "materialise attention probabilities); call fastenc.models.to_hf(model) first")
    bad = unsupported_hf_kwargs(extra)
    if bad:
        raise ValueError(f"fastenc: the optimized ModernBERT does not support the arguments {bad}")


# ----------------------------------------------------------------- conversion


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """None when ``model`` (an exact ``ModernBertModel``) can run on fastenc, else why not."""
    if type(model) is not ModernBertModel:
        return f"{type(model).__name__} is not ModernBertModel"
    config = model.config
    if config.hidden_activation not in _GATED:
        return f"hidden_activation {config.hidden_activation!r} has no gated FFN (gelu -> geglu, silu -> swiglu)"
    for layer_type, rope in model.rotary_emb.rope_type.items():
        if rope not in _STATIC_ROPE:
            return f"rope_type {rope!r} ({layer_type}) is not supported (tables must not depend on the length)"
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        return f"head dim {head_dim} is odd (rotary embeddings need an even one)"
    unknown = set(config.layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        return f"layer types {sorted(unknown)} are not supported"
    return None


def modernbert_models(model: nn.Module) -> List[nn.Module]:
    """Every ``ModernBertModel`` (exact class, not yet converted) inside ``model``."""
    return [m for m in model.modules() if type(m) is ModernBertModel]


def optimize_modernbert(model: nn.Module, *, backend: BackendSpec = None, unpad: Optional[bool] = None,
                        strict: bool = False) -> nn.Module:
    """Run every ``ModernBertModel`` inside ``model`` on fastenc (in place); returns ``model``.

    A model that cannot run is left untouched with a warning, or raises ``ValueError`` when ``strict``.
    """
    check_spec(backend)
    for base in modernbert_models(model):
        if not convertible(base, unsupported_reason(base), strict):
            continue
        base.__class__ = FastModernBertModel
        base.backend = backend
        base.unpad = unpad
    return model


def to_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_modernbert` in place (the modules never changed: only the class)."""
    for m in model.modules():
        if type(m) is FastModernBertModel:
            m.__class__ = ModernBertModel
            for attr in ("_backend_spec", "_op_backend", "unpad", "_weight_cache", "quantize", "int8_ranges"):
                m.__dict__.pop(attr, None)
    return model
