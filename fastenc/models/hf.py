"""Hugging Face BERT-family drop-in: run ``BertModel``, ``RobertaModel``, ``XLMRobertaModel``,
``CamembertModel``, ``ElectraModel`` and ``DistilBertModel`` on fastenc layers.

``optimize_hf(model)`` (also reached through ``fastenc.optimize(model)``) finds every
base model of those exact classes inside ``model`` (a bare base model, a task model
such as ``BertForSequenceClassification`` or ``ElectraForMaskedLM``, a sentence-transformers
``SentenceTransformer`` or ``CrossEncoder``...) and:

* replaces its encoder stack (``model.encoder`` / ``model.transformer``) by an
  :class:`HFEncoder`, a ``fastenc.TransformerEncoder`` whose layers are
  ``fastenc.TransformerEncoderLayer`` built on the HF weights: Q/K/V are fused into
  one ``in_proj_weight`` [3d, d] (a new parameter); every other parameter is the HF
  parameter object itself (the HF ``nn.Linear`` / ``nn.LayerNorm`` modules are reused);
* changes the base model's class to a subclass whose ``forward`` runs HF's embeddings
  (BERT's in inference as fastenc ops: :func:`bert_embeddings`; ELECTRA's
  ``embeddings_project`` when its embedding size differs from the hidden size), the fastenc encoder with the tokenizer's ``attention_mask`` as a [B, S] key padding
  mask (never a dense [B, 1, L, S] bias), then HF's pooler (when the model has one).

Checkpoints stay Hugging Face checkpoints: the encoder's ``state_dict()`` is written
with the HF parameter names (the fused QKV split back into query/key/value), and
``load_state_dict`` accepts HF names or fastenc names, so ``save_pretrained`` output
loads into an unmodified transformers model.  ``named_parameters()`` shows the fastenc
names (``encoder.layers.0.self_attn.in_proj_weight``...): create optimizers after
``optimize``.  :func:`to_hf` restores the original HF classes.

Supported: absolute position embeddings, encoder-only configs, activations gelu (erf),
gelu_new / gelu_fast / gelu_pytorch_tanh (tanh GELU) and relu, any ``layer_norm_eps``,
dropout in train mode, ``head_mask=None``, ``output_hidden_states``, gradient checkpointing
(``model.gradient_checkpointing_enable()``).  Not supported: relative position
embeddings, decoders / cross-attention / KV caches, other activations, pruned heads, and
other encoder families (DeBERTa's disentangled attention, MPNet's and T5's relative position
buckets, rotary or sparse attention: :data:`UNSUPPORTED_FAMILIES`) (``optimize`` leaves such
models untouched with a warning; ``strict=True`` raises ``ValueError``), and at call time ``output_attentions=True``, a ``head_mask``, or a
4D attention mask (``ValueError``).  Hidden states at padding positions are
unspecified (HF computes values there that no real token reads).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules import module as _module
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEmbeddings, BertModel, BertPooler
from transformers.models.camembert.modeling_camembert import CamembertModel, CamembertPooler
from transformers.models.distilbert.modeling_distilbert import DistilBertModel
from transformers.models.electra.modeling_electra import ElectraModel
from transformers.models.roberta.modeling_roberta import RobertaModel, RobertaPooler
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaModel, XLMRobertaPooler

from .._util import convertible, unsupported_hf_kwargs
from ..backends import BackendSpec, check_spec
from ..activations import activation_name
from ..modules import TransformerEncoder, TransformerEncoderLayer
from ..ops.embeddings import bert_embeddings as ops_bert_embeddings
from ..ops.pooler import bert_pooler as ops_bert_pooler
from ..weight_cache import cache_of

Tensor = torch.Tensor

# HF activation names -> the fused FFN's activations ("gelu_new"/"gelu_fast" are the tanh formula).
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


@dataclasses.dataclass(frozen=True)
class _Family:
    """Where a model family keeps its layer weights, as HF names relative to one layer."""

    encoder_attr: str  # attribute of the base model holding the encoder stack
    qkv: Tuple[str, str, str]  # query, key, value Linear modules
    out_proj: str  # attention output projection (Linear)
    norm1: str  # LayerNorm after attention
    linear1: str
    linear2: str
    norm2: str  # LayerNorm after the FFN
    attn_dropout: str  # Dropout on attention probabilities
    dropout1: Optional[str]  # Dropout on the attention branch (None: the family has none)
    dropout2: str  # Dropout on the FFN branch

    def hf_names(self) -> Dict[str, Tuple[str, ...]]:
        """fastenc parameter name (relative to one layer) -> the HF name(s) it is made of."""
        names = {}
        for w in ("weight", "bias"):
            names[f"self_attn.in_proj_{w}"] = tuple(f"{m}.{w}" for m in self.qkv)
            for ours, theirs in (("self_attn.out_proj", self.out_proj), ("norm1", self.norm1),
                                 ("linear1", self.linear1), ("linear2", self.linear2), ("norm2", self.norm2)):
                names[f"{ours}.{w}"] = (f"{theirs}.{w}",)
        return names


_BERT = _Family(
    encoder_attr="encoder",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    out_proj="attention.output.dense",
    norm1="attention.output.LayerNorm",
    linear1="intermediate.dense",
    linear2="output.dense",
    norm2="output.LayerNorm",
    attn_dropout="attention.self.dropout",
    dropout1="attention.output.dropout",
    dropout2="output.dropout",
)
_DISTILBERT = _Family(
    encoder_attr="transformer",
    qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    out_proj="attention.out_lin",
    norm1="sa_layer_norm",
    linear1="ffn.lin1",
    linear2="ffn.lin2",
    norm2="output_layer_norm",
    attn_dropout="attention.dropout",
    dropout1=None,
    dropout2="ffn.dropout",
)
# XLM-RoBERTa, CamemBERT and ELECTRA layers are BERT's layers under the same names.
_FAMILIES = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "camembert": _BERT, "electra": _BERT,
             "distilbert": _DISTILBERT}

# Encoder families whose attention or positions fastenc's layer cannot express: left unchanged with
# a warning (matched by class name, so that none of their modules is imported).  ModernBERT has its
# own adapter (fastenc.models.modernbert).
UNSUPPORTED_FAMILIES = {
    "DebertaModel": "disentangled attention (content-to-position terms) is not supported",
    "DebertaV2Model": "disentangled attention (content-to-position terms) is not supported",
    "MPNetModel": "relative position buckets (an attention bias) are not supported",
    "T5EncoderModel": "relative position buckets (an attention bias) are not supported",
    "RoFormerModel": "rotary position embeddings are not supported",
    "AlbertModel": "layers shared across depth and factorized embeddings are not supported",
    "LongformerModel": "sliding-window attention is not supported",
    "BigBirdModel": "block-sparse attention is not supported",
}


def _get(module: nn.Module, path: str) -> nn.Module:
    return functools.reduce(getattr, path.split("."), module)


# ----------------------------------------------------------------- the encoder stack


class HFEncoder(TransformerEncoder):
    """fastenc encoder stack inside an HF base model; ``state_dict`` keys use the HF names.

    Built by :func:`optimize_hf`, not by hand.  ``gradient_checkpointing`` is the flag
    that HF's ``gradient_checkpointing_enable()`` sets.
    """

    def _init_hf(self, family: str, hf_class: type, backend: BackendSpec) -> None:
        self.family = family
        self.hf_class = hf_class  # the HF encoder class, for to_hf
        self.backend = backend
        self.gradient_checkpointing = False
        self.register_state_dict_post_hook(_state_dict_to_hf)
        self.register_load_state_dict_pre_hook(_load_state_dict_from_hf)

    def encode(self, x: Tensor, key_padding_mask: Optional[Tensor], output_hidden_states: bool = False):
        """(last hidden state, all hidden states or None) for x [B, L, d], padding mask [B, L] (True = pad)."""
        ckpt = None
        if self.gradient_checkpointing and self.training:
            ckpt = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(checkpoint,
                                                                                            use_reentrant=False)
        x, _, kpm, _, _ = self.layers[0]._batch_first(x, None, key_padding_mask, False)
        out = self.run(x, None, kpm, False, hidden_states=output_hidden_states, checkpoint=ckpt)
        return out.last, out.hidden_states


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^layer\.(\d+)\.(.+)$")


def _state_dict_to_hf(module: HFEncoder, state_dict, prefix: str, local_metadata) -> None:
    rename_to_hf(state_dict, prefix, module.family)


def rename_to_hf(state_dict, prefix: str, family: str) -> None:
    """Rewrite (in place) the entries under ``prefix`` of a fastenc encoder stack's state dict
    (``layers.{i}.self_attn.in_proj_weight``...) with the HF names of ``family``
    (``layer.{i}.attention.self.query.weight``...); the fused QKV is split (copies, so
    safetensors sees no shared storage)."""
    names = _FAMILIES[family].hf_names()
    ours = [k for k in state_dict if k.startswith(prefix)]
    items = [(k[len(prefix):], state_dict.pop(k)) for k in ours]
    for key, value in items:
        m = _LAYER_KEY.match(key)
        if m is None or m.group(2) not in names:
            state_dict[prefix + key] = value
            continue
        hf = names[m.group(2)]
        parts = value.chunk(3) if len(hf) == 3 else (value,)
        for name, part in zip(hf, parts):
            state_dict[f"{prefix}layer.{m.group(1)}.{name}"] = part.clone() if len(hf) == 3 else part


def _load_state_dict_from_hf(module: HFEncoder, state_dict, prefix: str, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """Accept HF names: gather query/key/value into the fused projection, rename the rest."""
    names = _FAMILIES[module.family].hf_names()
    by_hf = {hf[0]: ours for ours, hf in names.items()}
    fused = {hf: ours for ours, hf in names.items() if len(hf) == 3}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _HF_LAYER_KEY.match(key[len(prefix):])
        if m is None or m.group(2) not in by_hf:
            continue
        i, name = m.groups()
        ours = by_hf[name]
        if ours.startswith("self_attn.in_proj_"):
            hf = names[ours]
            keys = [f"{prefix}layer.{i}.{n}" for n in hf]
            if not all(k in state_dict for k in keys):
                continue  # incomplete triple: left for load_state_dict to report as unexpected
            state_dict[f"{prefix}layers.{i}.{fused[hf]}"] = torch.cat([state_dict.pop(k) for k in keys])
        else:
            state_dict[f"{prefix}layers.{i}.{ours}"] = state_dict.pop(key)


# ----------------------------------------------------------------- base-model forward


def key_padding_mask(attention_mask: Optional[Tensor], batch: int, seqlen: int) -> Optional[Tensor]:
    """HF ``attention_mask`` [B, S] (1 = token, 0 = padding) -> fastenc key padding mask (True = padding)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"fastenc: attention_mask should be a tensor (the tokenizer's [batch, seq] mask), got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"fastenc: attention_mask should be the tokenizer's 2D [batch, seq] = {(batch, seqlen)} mask, got shape "
            f"{tuple(attention_mask.shape)} (4D / custom masks are not supported)"
        )
    return attention_mask == 0


def _check_call(head_mask, output_attentions, extra: dict) -> None:
    if head_mask is not None:
        raise ValueError("fastenc: head_mask is not supported (pass head_mask=None)")
    if output_attentions:
        raise ValueError("fastenc: output_attentions=True is not supported (the flash attention kernels never "
                         "materialise attention probabilities); call fastenc.models.to_hf(model) first")
    bad = unsupported_hf_kwargs(extra)
    if bad:
        raise ValueError(f"fastenc: the optimized encoder does not support the arguments {bad} "
                         "(decoder, cache and cross-attention inputs)")


def _return_dict(config, return_dict: Optional[bool]) -> bool:
    if return_dict is not None:
        return return_dict
    return getattr(config, "return_dict", True)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module would run hooks (the test nn.Module makes before its fast path)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def bert_embeddings(emb: nn.Module, input_ids: Optional[Tensor], token_type_ids: Optional[Tensor],
                    position_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                    backend: Optional[str] = None) -> Optional[Tensor]:
    """HF ``BertEmbeddings`` in eval mode as fastenc's embeddings op (``fastenc.ops.bert_embeddings``: one C++
    call on CPU), or None where HF's module must run.  At batch 1 HF's module (six submodule calls, seven ATen
    ops) costs a MiniLM call 60 µs of host time warm, 150 µs with caches cold after the encoder stack.  HF's
    module runs instead in training, for another embeddings or norm class, with hooks on
    the module or its submodules (attribution and adversarial-training tools hook them), ``max_norm`` tables
    (their forward renormalises the table), ``inputs_embeds``, under autocast or torch.compile (which traces
    HF's module), where gradients are on (eval mode outside ``torch.no_grad``: the op runs inference only), and
    for more positions than the table has (HF raises)."""
    if (emb.training or type(emb) is not BertEmbeddings or input_ids is None or inputs_embeds is not None
            or input_ids.dim() != 2 or torch.is_autocast_enabled(input_ids.device.type)
            or torch.compiler.is_compiling()):
        return None
    m = emb._modules
    tables, norm = (m["word_embeddings"], m["token_type_embeddings"], m["position_embeddings"]), m["LayerNorm"]
    if (type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1
            or any(type(t) is not nn.Embedding or t.max_norm is not None for t in tables)
            or any(_hooked(mod) for mod in (emb, norm, *tables))):
        return None
    word, types, pos = (t.weight for t in tables)
    if ((position_ids is None and input_ids.shape[1] > pos.shape[0])
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (word, types, pos)))):
        return None
    return ops_bert_embeddings(input_ids, token_type_ids, position_ids, word, types, pos, norm.weight, norm.bias,
                               norm.eps, backend)


# HF's poolers of the families fastenc converts: the same code, tanh(dense(h[:, 0])) (tests/test_pooler.py checks it).
POOLERS = (BertPooler, RobertaPooler, XLMRobertaPooler, CamembertPooler)


def bert_pooler(model: nn.Module, last: Tensor, backend: Optional[str] = None) -> Optional[Tensor]:
    """The model's pooler on the last hidden state: fastenc's pooler op (``fastenc.ops.bert_pooler``: the panel GEMM
    on CPU, its packed weight kept in the model's ``WeightCache``) for HF's own pooler in eval mode without hooks,
    in inference (no gradients, no autocast, no torch.compile); the module itself otherwise; None without one."""
    pooler = getattr(model, "pooler", None)
    if pooler is None:
        return None
    dense, act = pooler._modules.get("dense"), pooler._modules.get("activation")
    if (pooler.training or type(pooler) not in POOLERS or type(dense) is not nn.Linear or type(act) is not nn.Tanh
            or last.device.type != "cpu" or dense.weight.dtype != last.dtype or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling() or any(_hooked(m) for m in (pooler, dense, act))
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (last, dense.weight, dense.bias)))):
        return pooler(last)
    return ops_bert_pooler(last, dense.weight, dense.bias, cache=cache_of(model), backend=backend)


class _FastBertLike:
    """forward of BertModel / RobertaModel / XLMRobertaModel / CamembertModel / ElectraModel on the fastenc
    encoder (ELECTRA: ``embeddings_project`` after the embeddings when it has one, and no pooler)."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, head_mask=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        _check_call(head_mask, output_attentions, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x = bert_embeddings(self.embeddings, input_ids, token_type_ids, position_ids, inputs_embeds,
                            self.encoder._backend("embeddings"))
        if x is None:
            x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                inputs_embeds=inputs_embeds)
        project = getattr(self, "embeddings_project", None)
        if project is not None:
            x = project(x)
        kpm = key_padding_mask(attention_mask, x.shape[0], x.shape[1])
        last, states = self.encoder.encode(x, kpm, bool(output_hidden_states))
        pooled = bert_pooler(self, last, self.encoder._backend("pooler"))
        if not _return_dict(self.config, return_dict):
            return tuple(t for t in (last, pooled, states) if t is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, pooler_output=pooled,
                                                            hidden_states=states)


class _FastDistilBert:
    """forward of DistilBertModel on the fastenc encoder."""

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None, position_ids=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        _check_call(head_mask, output_attentions, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        emb_args = (input_ids, inputs_embeds) + (() if position_ids is None else (position_ids,))
        x = self.embeddings(*emb_args)
        kpm = key_padding_mask(attention_mask, x.shape[0], x.shape[1])
        last, states = self.transformer.encode(x, kpm, bool(output_hidden_states))
        if not _return_dict(self.config, return_dict):
            return tuple(t for t in (last, states) if t is not None)
        return BaseModelOutput(last_hidden_state=last, hidden_states=states)


class FastBertModel(_FastBertLike, BertModel):
    pass


class FastRobertaModel(_FastBertLike, RobertaModel):
    pass


class FastXLMRobertaModel(_FastBertLike, XLMRobertaModel):
    pass


class FastCamembertModel(_FastBertLike, CamembertModel):
    pass


class FastElectraModel(_FastBertLike, ElectraModel):
    pass


class FastDistilBertModel(_FastDistilBert, DistilBertModel):
    pass


# save_pretrained records config.architectures from the class name: keep the HF one.
for _cls in (FastBertModel, FastRobertaModel, FastXLMRobertaModel, FastCamembertModel, FastElectraModel,
             FastDistilBertModel):
    _cls.__name__ = _cls.__mro__[2].__name__

_FAST = {BertModel: (FastBertModel, "bert"), RobertaModel: (FastRobertaModel, "roberta"),
         XLMRobertaModel: (FastXLMRobertaModel, "xlm-roberta"), CamembertModel: (FastCamembertModel, "camembert"),
         ElectraModel: (FastElectraModel, "electra"), DistilBertModel: (FastDistilBertModel, "distilbert")}
_ORIGINAL = {fast: orig for orig, (fast, _) in _FAST.items()}


# ----------------------------------------------------------------- conversion


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """None when ``model`` (an exact base model of a supported family) can be converted, else why not."""
    name = type(model).__name__
    if name in UNSUPPORTED_FAMILIES and type(model).__module__.startswith("transformers."):
        return UNSUPPORTED_FAMILIES[name]
    if type(model) not in _FAST:
        return f"{type(model).__name__} is not one of {[c.__name__ for c in _FAST]}"
    config = model.config
    if getattr(config, "is_decoder", False):
        return "decoder (causal) configurations are not supported"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention is not supported"
    pos = getattr(config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        return f"position_embedding_type={pos!r} is not supported (only absolute position embeddings)"
    if _activation(model) is None:
        return f"activation {getattr(config, 'hidden_act', getattr(config, 'activation', None))!r} has no fused FFN"
    family = _FAMILIES[_FAST[type(model)][1]]
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
    for i, layer in enumerate(_get(model, family.encoder_attr).layer):
        try:
            shapes = [_get(layer, p).weight.shape for p in family.qkv]
        except AttributeError as e:
            return f"layer {i} does not have the standard {type(layer).__name__} structure ({e})"
        if any(s != (d, d) for s in shapes):
            return f"layer {i} has pruned attention heads (Q/K/V weights {[tuple(s) for s in shapes]})"
    return None


def _activation(model: nn.Module) -> Optional[str]:
    act = getattr(model.config, "hidden_act", getattr(model.config, "activation", None))
    if isinstance(act, str):
        return _HF_ACTIVATIONS.get(act)
    try:
        return activation_name(act)
    except ValueError:
        return None


def _fast_layer(hf_layer: nn.Module, family: _Family, nhead: int, activation: str,
                backend: BackendSpec) -> TransformerEncoderLayer:
    """A fastenc post-norm layer sharing hf_layer's modules; Q/K/V concatenated into one new parameter."""
    q, k, v = (_get(hf_layer, p) for p in family.qkv)
    d = q.weight.shape[1]
    ffn_dim = _get(hf_layer, family.linear1).weight.shape[0]
    norm1 = _get(hf_layer, family.norm1)
    layer = TransformerEncoderLayer(d, nhead, ffn_dim, dropout=0.0, activation=activation,
                                    layer_norm_eps=norm1.eps, batch_first=True, norm_first=False,
                                    device="meta", backend=backend)
    attn = layer.self_attn
    with torch.no_grad():
        w = torch.cat([q.weight, k.weight, v.weight])
        b = torch.cat([q.bias, k.bias, v.bias])
    attn.in_proj_weight = nn.Parameter(w, requires_grad=q.weight.requires_grad)
    attn.in_proj_bias = nn.Parameter(b, requires_grad=q.bias.requires_grad)
    attn.out_proj = _get(hf_layer, family.out_proj)
    attn.dropout = _get(hf_layer, family.attn_dropout).p
    layer.norm1 = norm1
    layer.linear1 = _get(hf_layer, family.linear1)
    layer.linear2 = _get(hf_layer, family.linear2)
    layer.norm2 = _get(hf_layer, family.norm2)
    layer.dropout = nn.Dropout(0.0)  # HF has no dropout between the two FFN linears
    layer.dropout1 = nn.Dropout(_get(hf_layer, family.dropout1).p if family.dropout1 else 0.0)
    layer.dropout2 = nn.Dropout(_get(hf_layer, family.dropout2).p)
    layer.train(hf_layer.training)
    return layer


def _build_encoder(layers: Sequence[TransformerEncoderLayer], family: str, hf_class: type,
                   backend: BackendSpec) -> HFEncoder:
    # TransformerEncoder deep-copies its template layer: give it a tiny one, then install the real layers.
    template = nn.TransformerEncoderLayer(1, 1, 1, batch_first=True, device="meta")
    enc = HFEncoder(template, 1, backend=backend)
    enc.layers = nn.ModuleList(layers)
    enc.num_layers = len(layers)
    enc._init_hf(family, hf_class, backend)
    return enc


def _convert(model: nn.Module, backend: BackendSpec) -> None:
    fast_cls, family_name = _FAST[type(model)]
    family = _FAMILIES[family_name]
    config = model.config
    nhead = getattr(config, "num_attention_heads", getattr(config, "n_heads", None))
    hf_encoder = _get(model, family.encoder_attr)
    layers = [_fast_layer(layer, family, nhead, _activation(model), backend) for layer in hf_encoder.layer]
    enc = _build_encoder(layers, family_name, type(hf_encoder), backend)
    enc.train(hf_encoder.training)
    setattr(model, family.encoder_attr, enc)
    model.__class__ = fast_cls


def hf_base_models(model: nn.Module) -> List[nn.Module]:
    """Every base model of a supported family (exact class, not yet converted) or of an unsupported
    one (:data:`UNSUPPORTED_FAMILIES`) inside model."""
    return [m for m in model.modules() if type(m) in _FAST or (
        type(m).__name__ in UNSUPPORTED_FAMILIES and type(m).__module__.startswith("transformers."))]


def optimize_hf(model: nn.Module, *, backend: BackendSpec = None, strict: bool = False) -> nn.Module:
    """Convert every supported HF BERT-family base model inside ``model`` in place; returns ``model``.

    A model that cannot be converted is left untouched with a warning, or raises
    ``ValueError`` when ``strict``.
    """
    check_spec(backend)
    for base in hf_base_models(model):
        if not convertible(base, unsupported_reason(base), strict):
            continue
        _convert(base, backend)
    return model


def to_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_hf` in place: original HF classes and encoder modules, same values.

    Q/K/V become new tensors (split from the fused one), the rest keep their storage;
    every parameter of the restored encoders has ``requires_grad=True``.
    """
    for m in list(model.modules()):
        if type(m) not in _ORIGINAL:
            continue
        family = _FAMILIES[_FAST[_ORIGINAL[type(m)]][1]]
        enc: HFEncoder = _get(m, family.encoder_attr)
        with torch.device("meta"):
            hf_enc = enc.hf_class(m.config)
        hf_enc.load_state_dict(enc.state_dict(), strict=True, assign=True)
        hf_enc.train(enc.training)
        setattr(m, family.encoder_attr, hf_enc)
        m.__class__ = _ORIGINAL[type(m)]
    return model
