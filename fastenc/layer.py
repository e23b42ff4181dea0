"""One encoder layer as data: what it computes (:class:`LayerSpec`) and its tensors (:class:`LayerWeights`).

Every front end (the torch twins in ``fastenc.modules``, the BERT-family adapters, ModernBERT,
``EncoderModel``) maps its modules onto these two types, and one executor (``fastenc.stack``) runs
them, op by op or as the fused C++ stack.  A layer, post-norm::

    x = LN1(x + dropout1(attention(x Wqkvᵀ + bqkv) Woutᵀ + bout))
    x = LN2(x + dropout2(FFN(x)))

pre-norm (``norm_first``)::

    s = x + dropout1(attention(LN1(x) Wqkvᵀ + bqkv) Woutᵀ + bout)      (LN1 skipped without ``attn_norm``)
    x = s + dropout2(FFN(LN2(s)))

with ``FFN(h) = dropout_ffn(act(h W1ᵀ + b1)) W2ᵀ + b2``; a gated activation (geglu, swiglu) splits
``h W1ᵀ + b1`` into halves [a, g] and takes ``act(a) · g``.  Attention is softmax(q kᵀ / √D) v per head,
optionally within a sliding ``window`` and with rotary embeddings on q and k.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from .ops.attention import shape_class as attention_shape_class
from .reference import ACTIVATIONS, GATED_ACTIVATIONS

Tensor = torch.Tensor

# An activation the kernels fuse (ACTIVATIONS + GATED_ACTIVATIONS), or any callable, which runs in PyTorch
# on the per-op path (the fused stack refuses it).
Activation = Union[str, Callable[[Tensor], Tensor]]


class LayerSpec(NamedTuple):
    """What one layer computes, all but its tensors (immutable, hashable: it keys caches)."""

    d_model: int
    nhead: int
    activation: Activation  # relu | gelu | gelu_tanh | geglu | swiglu, or a callable (per-op path only)
    norm_first: bool = False
    eps1: float = 1e-5  # the attention block's LayerNorm
    eps2: float = 1e-5  # the FFN block's LayerNorm
    attn_norm: bool = True  # pre-norm: False runs attention on x itself (ModernBERT's first layer)
    window: Optional[Tuple[int, int]] = None  # query i sees keys i - left .. i + right (-1: unbounded side)
    rotary: bool = False  # rotary embeddings on q, k: frequencies in LayerWeights.rotary_inv_freq
    rotary_scaling: float = 1.0  # multiplies the cos/sin tables (HF's attention_scaling)
    attn_dropout: float = 0.0  # on attention probabilities (training)
    dropout1: float = 0.0  # on the attention branch, before the residual add
    ffn_dropout: float = 0.0  # between the FFN's GEMMs
    dropout2: float = 0.0  # on the FFN branch, before the residual add
    attn_bias: bool = True  # Wqkv and Wout have biases
    ffn_bias: bool = True  # W1 and W2 have biases
    norm_bias: bool = True  # the LayerNorms have biases

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def fused_activation(self) -> bool:
        """The activation is one the kernels fuse (not a callable run in PyTorch)."""
        return isinstance(self.activation, str)

    def with_dropout(self, training: bool) -> "LayerSpec":
        """This spec in eval mode (no dropout) unless ``training``."""
        if training or not (self.attn_dropout or self.dropout1 or self.ffn_dropout or self.dropout2):
            return self
        return _eval_spec(self)


@functools.lru_cache(maxsize=256)
def _eval_spec(spec: LayerSpec) -> LayerSpec:
    """spec without dropout, one object per spec: every inference call asks (a model's layers share theirs), and
    the fused stack's cache compares the specs it was built for (an identical object compares at once)."""
    return spec._replace(attn_dropout=0.0, dropout1=0.0, ffn_dropout=0.0, dropout2=0.0)


@dataclasses.dataclass(slots=True)
class LayerWeights:
    """One layer's tensors, nn.Linear layouts ([out, in]); None = absent (a bias-free layer, a norm it skips).

    The fused Q/K/V projection holds the q rows, then k, then v.  Gated FFNs: ffn1_weight is [2f, d],
    rows :f make the activated half, rows f: the gate; ffn2_weight is [d, f].
    """

    qkv_weight: Tensor  # [3d, d]
    qkv_bias: Optional[Tensor]  # [3d]
    out_weight: Tensor  # [d, d]
    out_bias: Optional[Tensor]  # [d]
    ffn1_weight: Tensor  # [f, d] or [2f, d] (gated)
    ffn1_bias: Optional[Tensor]
    ffn2_weight: Tensor  # [d, f]
    ffn2_bias: Optional[Tensor]  # [d]
    norm1_weight: Optional[Tensor]  # [d]: the attention block's LayerNorm
    norm1_bias: Optional[Tensor]
    norm2_weight: Optional[Tensor]  # [d]: the FFN block's LayerNorm
    norm2_bias: Optional[Tensor]
    rotary_inv_freq: Optional[Tensor] = None  # fp32 [head_dim / 2] when the spec has rotary

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        """Every field, in declaration order (the identity of a layer's weights, for caches)."""
        return _FIELDS(self)


_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(LayerWeights)))  # a tuple of them, in C


class NormWeights(NamedTuple):
    """A LayerNorm over the last dimension: an encoder's final norm."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float


def check_layer(spec: LayerSpec, w: LayerWeights, where: str) -> None:
    """Shapes, devices and presence of ``w`` against ``spec``: ValueError naming the field.

    Run when a front end maps a model (and by the fused stack's cache when it builds), not per call.
    """
    d, f = spec.d_model, w.ffn1_weight.shape[0] // (2 if spec.gated else 1)
    if spec.nhead < 1 or d % spec.nhead:
        raise ValueError(f"{where}: nhead {spec.nhead} must divide d_model {d}")
    if isinstance(spec.activation, str) and spec.activation not in ACTIVATIONS + GATED_ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {ACTIVATIONS + GATED_ACTIVATIONS} or a callable, "
                         f"got {spec.activation!r}")
    expect = {
        "qkv_weight": (3 * d, d), "qkv_bias": (3 * d,) if spec.attn_bias else None,
        "out_weight": (d, d), "out_bias": (d,) if spec.attn_bias else None,
        "ffn1_weight": (w.ffn1_weight.shape[0], d), "ffn1_bias": (w.ffn1_weight.shape[0],) if spec.ffn_bias else None,
        "ffn2_weight": (d, f), "ffn2_bias": (d,) if spec.ffn_bias else None,
        "norm1_weight": (d,) if (spec.attn_norm or not spec.norm_first) else None,
        "norm1_bias": (d,) if spec.norm_bias and (spec.attn_norm or not spec.norm_first) else None,
        "norm2_weight": (d,), "norm2_bias": (d,) if spec.norm_bias else None,
        "rotary_inv_freq": (spec.head_dim // 2,) if spec.rotary else None,
    }
    device = w.qkv_weight.device
    for name, shape in expect.items():
        t = getattr(w, name)
        if shape is None:
            if t is not None and not name.startswith("norm"):
                raise ValueError(f"{where}: {name} is given but the spec says the layer has none")
            continue
        if t is None:
            if name.startswith("norm"):  # a LayerNorm without elementwise affine
                continue
            raise ValueError(f"{where}: {name} is missing")
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{where}: {name} is on {t.device} but qkv_weight is on {device}")
    if spec.gated and w.ffn1_weight.shape[0] % 2:
        raise ValueError(f"{where}: a gated FFN needs an even ffn1_weight row count, got {w.ffn1_weight.shape[0]}")
    if spec.rotary and spec.head_dim % 2:
        raise ValueError(f"{where}: rotary embeddings need an even head dim, got {spec.head_dim}")


@functools.lru_cache(maxsize=256)
def shape_classes(spec: LayerSpec) -> dict:
    """The backend registry's shape class of each op a layer of ``spec`` calls (what its checks read)."""
    out = {"attention": attention_shape_class(spec.head_dim, spec.head_dim, False, spec.window is not None,
                                              spec.rotary),
           "layer_norm": (spec.d_model,), "linear": ()}
    if spec.fused_activation:
        out["ffn"] = (spec.activation,)
    return out
