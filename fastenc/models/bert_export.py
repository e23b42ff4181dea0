"""fastenc's own encoder models as Hugging Face BERT models: ``to_bert(model)``.

An ``EncoderModel`` with learned positions and post-norm layers is BERT's encoder under other
names: LayerNorm(word + position + token type) then dropout, then post-norm layers (fused QKV
here, query/key/value there).  ``to_bert`` builds the transformers model of the same
configuration and copies the weights into it (HF names: ``fastenc.models.hf.rename_to_hf``):

* ``EncoderModel`` -> ``BertModel`` without a pooler (EncoderModel's pooling has no parameters;
  BERT's pooler is a trained dense + tanh on [CLS]): the same ``last_hidden_state`` on real tokens;
* ``MaskedLM`` -> ``BertForMaskedLM`` (the same head: dense, GELU, LayerNorm, decoder tied to the
  word embeddings plus a bias): the same logits at every position.

``save_pretrained`` on the result writes a folder that transformers loads on its own.  Without
token types (``type_vocab_size=0``) the BERT model gets a 2-row table of zeros (adding it changes
nothing).  Not expressible in BERT's config (``ValueError`` naming it): sinusoidal positions, pre-norm
layers or a final norm, layers without biases or of different shapes, activations other than
gelu / relu / gelu_tanh, and a ``MaskedLM`` whose encoder does not use erf GELU (BERT's head uses the
layers' activation).  ``SequenceClassifier`` has no BERT twin: its head pools the tokens (mean, max,
or [CLS] without BERT's dense + tanh), which ``BertForSequenceClassification`` cannot express; export
its ``encoder`` (the fine-tuning application writes the whole classifier as a sentence-transformers
folder: ``fastenc.apps.finetune``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .encoder_model import EncoderModel
from .heads import MaskedLM
from .hf import rename_to_hf

Tensor = torch.Tensor

# fastenc activation -> transformers' hidden_act of the same function
_HIDDEN_ACT = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh"}
NO_TOKEN_TYPES = 2  # rows of the zero token-type table written for an EncoderModel without one


def bert_config(encoder: EncoderModel, **extra):
    """The ``transformers.BertConfig`` of ``encoder`` (``extra``: more config fields, e.g. ``num_labels``)."""
    from transformers import BertConfig

    if not isinstance(encoder, EncoderModel):
        raise TypeError(f"encoder should be a fastenc EncoderModel, got {type(encoder).__name__}")
    emb, stack = encoder.embeddings, encoder.encoder
    if emb.positional != "learned":
        raise ValueError(f"encoder: {emb.positional!r} positions have no BERT equivalent (BERT learns them)")
    if stack.norm is not None:
        raise ValueError("encoder: a final norm after the layers (norm_first stacks) has no BERT equivalent")
    first = stack.layers[0]
    shape = lambda layer: (layer.self_attn.embed_dim, layer.self_attn.num_heads,  # noqa: E731
                           layer.linear1.out_features, layer.norm1.eps, layer.norm2.eps, layer.activation_name,
                           layer.norm_first, layer.self_attn.dropout)
    for i, layer in enumerate(stack.layers):
        if layer.norm_first:
            raise ValueError(f"encoder: layer {i} is pre-norm (norm_first); BERT's layers are post-norm")
        if layer.activation_name not in _HIDDEN_ACT:
            raise ValueError(f"encoder: layer {i}'s activation {layer.activation!r} is not one of {sorted(_HIDDEN_ACT)}")
        if any(b is None for b in (layer.self_attn.in_proj_bias, layer.self_attn.out_proj.bias, layer.linear1.bias,
                                   layer.linear2.bias, layer.norm1.bias, layer.norm2.bias)):
            raise ValueError(f"encoder: layer {i} has no biases (bias=False); BERT's layers have them")
        if shape(layer) != shape(first):
            raise ValueError(f"encoder: layer {i} differs from layer 0 (size, heads, eps, activation or dropout); "
                             "a BERT config describes uniform layers")
    if first.norm1.eps != emb.norm.eps:
        raise ValueError(f"encoder: the embeddings' LayerNorm eps {emb.norm.eps} differs from the layers' "
                         f"{first.norm1.eps}; BERT has one layer_norm_eps")
    types = emb.token_type_embeddings
    return BertConfig(
        vocab_size=emb.word_embeddings.num_embeddings, hidden_size=first.self_attn.embed_dim,
        num_hidden_layers=len(stack.layers), num_attention_heads=first.self_attn.num_heads,
        intermediate_size=first.linear1.out_features, hidden_act=_HIDDEN_ACT[first.activation_name],
        hidden_dropout_prob=emb.dropout.p, attention_probs_dropout_prob=first.self_attn.dropout,
        max_position_embeddings=emb.max_position,
        type_vocab_size=types.num_embeddings if types is not None else NO_TOKEN_TYPES,
        layer_norm_eps=emb.norm.eps, pad_token_id=emb.word_embeddings.padding_idx,
        position_embedding_type="absolute", **extra)


def bert_state_dict(encoder: EncoderModel, prefix: str = "") -> Dict[str, Tensor]:
    """``encoder``'s weights under ``BertModel``'s names (no pooler), each name after ``prefix``."""
    emb = encoder.embeddings
    types = emb.token_type_embeddings
    w = emb.word_embeddings.weight
    sd = {"embeddings.word_embeddings.weight": w,
          "embeddings.position_embeddings.weight": emb.position_embeddings.weight,
          "embeddings.token_type_embeddings.weight": types.weight if types is not None else
          w.new_zeros(NO_TOKEN_TYPES, w.shape[1]),
          "embeddings.LayerNorm.weight": emb.norm.weight, "embeddings.LayerNorm.bias": emb.norm.bias}
    layers = encoder.encoder.state_dict()
    rename_to_hf(layers, "", "bert")
    sd.update({f"encoder.{k}": v for k, v in layers.items()})
    return {prefix + k: v.detach() for k, v in sd.items()}


def _load(target: nn.Module, state: Dict[str, Tensor], source: nn.Module) -> nn.Module:
    """Copy ``state`` into every parameter and buffer of ``target`` that ``state`` names (strictly: a
    name of ``state`` that ``target`` lacks, or a parameter of ``target`` left out, is a bug here)."""
    missing, unexpected = target.load_state_dict(state, strict=False)
    left = [k for k in missing if k in dict(target.named_parameters())]
    if left or unexpected:
        raise RuntimeError(f"to_bert: parameters not written {left}, names not in {type(target).__name__} "
                           f"{unexpected}")
    w = next(source.parameters())
    return target.to(device=w.device, dtype=w.dtype).train(source.training)


def to_bert(model: nn.Module) -> nn.Module:
    """A transformers ``BertModel`` (from an ``EncoderModel``) or ``BertForMaskedLM`` (from a ``MaskedLM``)
    with ``model``'s configuration and a copy of its weights, on its device, dtype and train/eval mode."""
    from transformers import BertForMaskedLM, BertModel

    if isinstance(model, MaskedLM):
        enc = model.encoder
        config = bert_config(enc, architectures=["BertForMaskedLM"])
        if config.hidden_act != "gelu":
            raise ValueError(f"model: BertForMaskedLM's head applies the layers' activation ({config.hidden_act}); "
                             "MaskedLM's applies erf GELU")
        if model.norm.eps != config.layer_norm_eps:
            raise ValueError(f"model: the head's LayerNorm eps {model.norm.eps} differs from the encoder's "
                             f"{config.layer_norm_eps}")
        state = bert_state_dict(enc, "bert.")
        head = {"cls.predictions.transform.dense.weight": model.transform.weight,
                "cls.predictions.transform.dense.bias": model.transform.bias,
                "cls.predictions.transform.LayerNorm.weight": model.norm.weight,
                "cls.predictions.transform.LayerNorm.bias": model.norm.bias,
                "cls.predictions.bias": model.bias, "cls.predictions.decoder.bias": model.bias,
                "cls.predictions.decoder.weight": enc.embeddings.word_embeddings.weight}
        state.update({k: v.detach() for k, v in head.items()})
        return _load(BertForMaskedLM(config), state, model)
    if isinstance(model, EncoderModel):
        config = bert_config(model, architectures=["BertModel"])
        return _load(BertModel(config, add_pooling_layer=False), bert_state_dict(model), model)
    raise TypeError(f"to_bert takes a fastenc EncoderModel or MaskedLM, got {type(model).__name__} "
                    "(a SequenceClassifier's pooled head has no BERT twin: export its .encoder)")
