"""Random encoder layers as (LayerSpec, LayerWeights) pairs, for the stack and fused-encoder tests."""
import torch

from fastenc import LayerSpec, LayerWeights
from fastenc.reference import rotary_inv_freq


def random_layer(d, nhead, f, dtype=torch.float32, *, activation="gelu", norm_first=False, bias=True,
                 norm_bias=True, attn_norm=True, window=None, rotary=False, generator=None, eps=1e-5):
    """A layer with weights scaled as a trained model's (unit-variance activations) and non-trivial norms."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    gated = activation in ("geglu", "swiglu")

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def b(n):
        return r(n, scale=0.1) if bias else None

    f1 = 2 * f if gated else f
    has_norm1 = attn_norm or not norm_first
    spec = LayerSpec(d, nhead, activation, norm_first, eps, eps, attn_norm=attn_norm, window=window, rotary=rotary,
                     attn_bias=bias, ffn_bias=bias, norm_bias=norm_bias)
    weights = LayerWeights(
        r(3 * d, d, scale=d ** -0.5), b(3 * d), r(d, d, scale=d ** -0.5), b(d), r(f1, d, scale=d ** -0.5), b(f1),
        r(d, f, scale=f ** -0.5), b(d),
        (1 + r(d, scale=0.1)) if has_norm1 else None, r(d, scale=0.1) if (has_norm1 and norm_bias) else None,
        1 + r(d, scale=0.1), r(d, scale=0.1) if norm_bias else None,
        rotary_inv_freq(d // nhead, 10000.0) if rotary else None)
    return spec, weights


def cu_seqlens(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0)), dtype=torch.int32)


def to_dtype(layers, dtype):
    """The same layers with every float weight cast (rotary frequencies stay fp32)."""
    out = []
    for spec, w in layers:
        fields = {name: (None if t is None else (t if name == "rotary_inv_freq" else t.to(dtype)))
                  for name, t in zip(LayerWeights.__dataclass_fields__, w.tensors())}
        out.append((spec, LayerWeights(**fields)))
    return out
