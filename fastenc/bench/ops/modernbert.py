"""ModernBERT: an HF ``ModernBertModel`` end to end, and its two kernel points (sliding-window attention
with rotary embeddings, the GeGLU FFN).

End to end (op "e2e"), as ``e2e`` does for BERT: a random model of ModernBERT-base size (HF's
``ModernBertConfig`` defaults: hidden 768, 12 heads, GeGLU FFN 768 -> 2x1152 -> 768, no biases,
local layers attending 64 tokens each side (``local_attention=128``), every third layer global,
rotary bases 160k global / 10k local), 22 layers on GPU and 3 on CPU (one global and two local
layers: the model's pattern; named in the row).  Inference ("fwd": token ids and attention mask in,
mean-pooled embeddings out) at about 50% and 0% padding, and a training step ("train": forward +
backward + AdamW) at about 50% padding.  Providers, on the same weights:

* ``fastenc``: ``fastenc.optimize(copy of the model)``, ``auto`` backends (named in the row);
* ``hf-sdpa``: the model as it is (``attn_implementation="sdpa"``);
* ``torch-compile``: ``torch.compile`` of the HF model, inference on GPU sizes only.

Each is checked against the fp32 model with eager attention before any timing: the embeddings,
and in training the gradient of the embedding LayerNorm's weight (the whole backward reaches it).
FLOPs per layer = projections 2·T·4d² + FFN 2·T·3·d·f + attention 4·d·(visible pairs), backward 2x
for the GEMMs and 2.5x for attention; the embedding layer is not counted.

Kernel points, checked against ``fastenc.reference`` as the op suites are:

* "window-attention": B sequences of L tokens packed as varlen rows, window (w, w), rotary
  (local base), head dim 64; fastenc per backend (``reference``, ``cpu``, ``triton`` on CUDA) against
  SDPA with a dense [L, L] window mask (q, k rotated by ``reference.rotary_embed`` in the call).
  FLOPs = 4·H·D·Σ visible (query, key) pairs (only the window counts), 2.5x backward.
* "geglu-ffn": x [T, 768] -> 2x1152 -> 768, no biases; fastenc per backend against
  ``fastenc.reference.ffn(activation="geglu")`` called directly.  FLOPs = 2·T·d·2f + 2·T·f·d, 2x backward.

In the default CPU run the inference rows run with the main job; the training step and the
kernel points are best effort (``--ops modernbert`` runs them all).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops, reference
from ...layer import LayerSpec
from ...layer import shape_classes as layer_shape_classes
from ...ops.attention import attention_varlen_unchecked
from .. import registry as R
from ..model_workload import Goal, ModelSpec, ModelSuite, transformers
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload, by_mode, randn
from .attention import BWD_FACTOR as BWD_ATTENTION
from .ffn import BWD_FACTOR as BWD_MATMUL

LOCAL_ROPE_BASE = 10000.0  # HF's default rotary base of the local (sliding-window) layers
# Check large attention points on a slice (first sequence, fewer heads): the reference materialises [B, H, L, L].
CHECK_MAX_SCORES = 2**25


@dataclasses.dataclass(frozen=True)
class Spec(ModelSpec):
    vocab: int = 50368
    local_attention: int = 128  # the window's width: local layers see local_attention // 2 tokens each side
    max_positions: int = 8192


MODELS = {s.name: s for s in (
    Spec("ModernBERT-base", 768, 12, 22, 1152),
    Spec("tiny-ModernBERT", 64, 2, 3, 96, local_attention=8, vocab=1000, max_positions=64),
)}


def _build(spec: Spec) -> nn.Module:
    """The random (seeded) fp32 ModernBertModel of a spec."""
    tf = transformers()
    cfg = tf.ModernBertConfig(
        vocab_size=spec.vocab, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, local_attention=spec.local_attention,
        global_attn_every_n_layers=3, max_position_embeddings=spec.max_positions, hidden_activation="gelu",
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.ModernBertModel(cfg)


def _probe(model: nn.Module) -> torch.Tensor:
    """The parameter whose gradient the training check compares: the embedding LayerNorm's weight."""
    return model.embeddings.norm.weight


# --------------------------------------------------------------------------- FLOPs


def visible_pairs(length: int, left: int, right: int) -> int:
    """(query, key) pairs of one sequence inside a window (left, right); -1 = unbounded side."""
    i = torch.arange(length)
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp(max=length - 1) if right >= 0 else torch.full_like(i, length - 1)
    return int((hi - lo + 1).sum())


def model_flops(spec: Spec, lengths: List[int], mode: str) -> float:
    """The encoder layers' FLOPs on sequences of these real lengths (global layers: every pair, local: the window)."""
    d, f, w = spec.d_model, spec.d_ff, spec.local_attention // 2
    tokens = sum(lengths)
    gemm = 2.0 * tokens * 4 * d * d + 2.0 * tokens * 3 * d * f
    total = 0.0
    for layer in range(spec.layers):
        local = layer % 3 != 0  # HF: layer i is global when i % global_attn_every_n_layers == 0
        pairs = sum(visible_pairs(n, w, w) if local else n * n for n in lengths)
        total += by_mode(gemm, mode, BWD_MATMUL) + by_mode(4.0 * d * pairs, mode, BWD_ATTENTION)
    return total


# --------------------------------------------------------------------------- workloads


def _shape_classes(spec: Spec) -> Dict[str, tuple]:
    """Each op's shape class in a local layer (what ``fastenc.backends.explain`` passes to its checks)."""
    w = spec.local_attention // 2
    return layer_shape_classes(LayerSpec(spec.d_model, spec.heads, "geglu", norm_first=True, window=(w, w),
                                         rotary=True))


MODERNBERT = ModelSuite(
    "modernbert", MODELS, _build, probe=_probe, probe_name="embedding-norm gradient", flops=model_flops,
    shape_classes=_shape_classes, first_token=3,  # 0-2: pad, bos/cls, eos/sep
    columns=lambda spec: dict(op="e2e", activation="geglu", window=spec.local_attention // 2),
)
hf_model, e2e_workload, reset = MODERNBERT.hf_model, MODERNBERT.workload, MODERNBERT.cache.clear


def attention_workload(mode, sweep, device, dtype, *, batch, seqlen, heads, head_dim, window) -> Workload:
    """B sequences of L tokens, window (window, window), rotary tables of the local layers' base."""
    cos, sin = reference.rotary_tables(reference.rotary_inv_freq(head_dim, LOCAL_ROPE_BASE), seqlen)
    cos, sin = cos.to(device), sin.to(device)

    def make_inputs():
        return tuple(randn((batch, seqlen, heads, head_dim), device, dtype) for _ in range(3)) + (cos, sin)

    def ref(inputs, upcast):
        q, k, v, c, s = inputs
        return reference.attention(q, k, v, window=(window, window), rotary=(c, s), upcast=upcast)

    def check_slice(inputs):
        """The first sequence (and fewer heads) when the reference's scores would be large."""
        if batch * heads * seqlen * seqlen <= CHECK_MAX_SCORES:
            return inputs
        h = max(1, min(heads, CHECK_MAX_SCORES // (seqlen * seqlen)))
        return tuple(t[:1, :, :h].contiguous() for t in inputs[:3]) + inputs[3:]

    return Workload(
        "modernbert", mode, sweep,
        dict(op="window-attention", batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, window=window),
        device, dtype, make_inputs, (0, 1, 2), ref, check_slice=check_slice, tokens=batch * seqlen,
        flops=by_mode(4.0 * heads * head_dim * batch * visible_pairs(seqlen, window, window), mode, BWD_ATTENTION),
    )


def ffn_workload(mode, sweep, device, dtype, *, batch, seqlen, d_model, d_ff) -> Workload:
    """x [B, L, d] -> GeGLU (w1 [2f, d]: activated half, then gate) -> w2 [d, f], no biases (ModernBERT's MLP)."""
    tokens = batch * seqlen

    def make_inputs():
        x = randn((batch, seqlen, d_model), device, dtype)
        w1 = randn((2 * d_ff, d_model), device, dtype, d_model ** -0.5)
        return x, w1, None, randn((d_model, d_ff), device, dtype, d_ff ** -0.5), None

    def ref(inputs, upcast):
        return reference.ffn(*inputs, activation="geglu", upcast=upcast)

    return Workload(
        "modernbert", mode, sweep,
        dict(op="geglu-ffn", batch=batch, seqlen=seqlen, d_model=d_model, d_ff=d_ff, activation="geglu"),
        device, dtype, make_inputs, (0, 1, 3), ref, tokens=tokens,
        flops=by_mode(2.0 * tokens * d_model * 2 * d_ff + 2.0 * tokens * d_ff * d_model, mode, BWD_MATMUL),
    )


# --------------------------------------------------------------------------- kernel-point providers


def _attention(backend: str, w: Workload) -> Impl:
    p = w.params
    R.force("attention", backend, w.device, w.dtype, (p["head_dim"], p["head_dim"], False, True, True))
    L, win = p["seqlen"], (p["window"], p["window"])

    def prepare(inputs):
        """Packed [B·L, H, D] rows and their int32 cu_seqlens (B: the check may run on fewer sequences)."""
        q, k, v, cos, sin = inputs
        B = q.shape[0]
        cu = torch.arange(B + 1, dtype=torch.int32, device=q.device) * L
        return tuple(t.reshape(B * L, *t.shape[2:]) for t in (q, k, v)) + (cu, cos, sin)

    return Impl(lambda i: attention_varlen_unchecked(i[0], i[1], i[2], i[3], i[3], L, L, False, None, 0.0, backend,
                                                     win, (i[4], i[5])),
                prepare=prepare, to_dense=lambda out, inputs: out.reshape(inputs[0].shape[0], L, *out.shape[1:]),
                note="packed rows (cu_seqlens built once), the model's unchecked call")


def _ffn(backend: str, w: Workload) -> Impl:
    R.force("ffn", backend, w.device, w.dtype, ("geglu",))
    return Impl(lambda i: ops.ffn(*i, activation="geglu", backend=backend))


def _fastenc_kernel(backend: str):
    def build(w: Workload) -> Impl:
        op = w.params["op"]
        if op == "window-attention" and backend in ("triton", "cpu", "reference"):
            if backend == "triton" and w.device.type != "cuda":
                raise Unavailable("CUDA only in this suite (on CPU Triton runs its interpreter: tests/ check it)")
            return _attention(backend, w)
        if op == "geglu-ffn" and backend in ("cuda", "cpu", "reference"):
            return _ffn(backend, w)
        raise Unavailable(f"fastenc-{backend} has no {op} point")
    return build


def _sdpa_window(w: Workload) -> Impl:
    if w.params["op"] != "window-attention":
        raise Unavailable("the window-attention points only")
    p = w.params
    allowed = ~reference.window_mask(p["seqlen"], p["seqlen"], (p["window"], p["window"]), w.device)

    def forward(i):
        q, k, v, cos, sin = i
        q, k = reference.rotary_embed(q, cos, sin), reference.rotary_embed(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed)
        return out.transpose(1, 2)
    return Impl(forward, note="dense [L, L] window mask (built once); q, k rotated by fastenc.reference.rotary_embed")


def _torch_eager(w: Workload) -> Impl:
    if w.params["op"] != "geglu-ffn":
        raise Unavailable("the geglu-ffn points only")
    return Impl(lambda i: reference.ffn(*i, activation="geglu"), note="fastenc.reference.ffn called directly")


PROVIDERS = [
    *MODERNBERT.providers(),
    Provider("fastenc-triton", _fastenc_kernel("triton"), False, triton=True),
    Provider("fastenc-cuda", _fastenc_kernel("cuda"), False),
    Provider("fastenc-cpu", _fastenc_kernel("cpu"), False),
    Provider("fastenc-reference", _fastenc_kernel("reference"), False),
    Provider("sdpa-window", _sdpa_window, True),
    Provider("torch-eager", _torch_eager, True),
]
_OP_PROVIDERS = {
    "e2e": ("fastenc", "hf-sdpa", "torch-compile"),
    "window-attention": ("fastenc-triton", "fastenc-cpu", "fastenc-reference", "sdpa-window"),
    "geglu-ffn": ("fastenc-cuda", "fastenc-cpu", "fastenc-reference", "torch-eager"),
}


# --------------------------------------------------------------------------- sizes


NO_COMPILE = {"torch-compile": "GPU sizes only (compile time would dominate on CPU)"}


def _point(make, op: str, mode, sweep, dev, dt, exclude=None, rank=(0,), best_effort=False, **kw) -> R.Entry:
    """An entry of one op of the suite (named in its label), run by that op's providers only."""
    e = R.entry(make, "modernbert", mode, sweep, dev, dt, exclude, rank, **kw)
    suite, mode_, dtype, args = e.label.split(" ", 3)
    return dataclasses.replace(e, label=f"{suite} {mode_} {dtype} {op} {args}", only=_OP_PROVIDERS[op],
                               best_effort=best_effort)


def _points(dev, dt, *, layers: int, batch: int, lengths: tuple, attn_tokens: int, ffn_tokens: int, rank: tuple,
            extra_rank: tuple, best_effort: bool, dense_max: int, exclude=None) -> list:
    """Inference at about 50% padding (lengths spread over [32, 512]) and 0% (half the batch: as many real
    tokens), a training step at about 50%, then the kernel points (attention at each length with
    ``attn_tokens`` in all, the reference only up to ``dense_max``; the FFN at ``ffn_tokens``)."""
    m = dict(model="ModernBERT-base", layers=layers)
    x = dict(exclude or {})
    e = [_point(e2e_workload, "e2e", "fwd", "padding", dev, dt, x, rank, **m, batch=batch, seqlen=512, min_len=32),
         _point(e2e_workload, "e2e", "fwd", "padding", dev, dt, x, rank, **m, batch=batch // 2, seqlen=512)]
    later = dict(rank=extra_rank, best_effort=best_effort)
    e.append(_point(e2e_workload, "e2e", "train", "padding", dev, dt, x, **later, **m, batch=batch, seqlen=512,
                    min_len=32))
    dense = {"fastenc-reference": "dense [L, L] scores: at the shorter lengths only"}
    e += [_point(attention_workload, "window-attention", mode, "seqlen", dev, dt, {} if n <= dense_max else dense,
                 **later, batch=attn_tokens // n, seqlen=n, heads=12, head_dim=64,
                 window=64) for mode in ("fwd", "bwd") for n in lengths]
    e += [_point(ffn_workload, "geglu-ffn", mode, "hidden", dev, dt, None, **later, batch=ffn_tokens // 512,
                 seqlen=512, d_model=768, d_ff=1152) for mode in ("fwd", "bwd")]
    return e


def _tiny(dev, dt, extra):
    t = dict(model="tiny-ModernBERT", layers=3)
    x = NO_COMPILE
    return [
        _point(e2e_workload, "e2e", "fwd", "padding", dev, dt, x, **t, batch=4, seqlen=24, min_len=2),
        _point(e2e_workload, "e2e", "fwd", "padding", dev, dt, x, **t, batch=2, seqlen=24),
        _point(e2e_workload, "e2e", "train", "padding", dev, dt, x, **t, batch=4, seqlen=24, min_len=2),
        *(_point(attention_workload, "window-attention", mode, "seqlen", dev, dt, None, batch=2, seqlen=40, heads=2,
                 head_dim=32, window=8) for mode in ("fwd", "bwd")),
        *(_point(ffn_workload, "geglu-ffn", mode, "hidden", dev, dt, None, batch=2, seqlen=16, d_model=64, d_ff=96)
          for mode in ("fwd", "bwd")),
    ]


def _cpu(dev, dt, extra):
    # 3 of 22 layers, batch 8: each inference row takes a few seconds of calls on 2 cores, so both run with the
    # default CPU run's main job (rank 0); the training step and the kernel points after every op-level point.
    return _points(dev, dt, layers=3, batch=8, lengths=(512, 2048), attn_tokens=4096, ffn_tokens=2048, rank=(0,),
                   extra_rank=(10,), best_effort=True, dense_max=512, exclude=NO_COMPILE)


def _gpu(dev, dt, extra):
    # After every other suite's points (e2e 13, overhead 14): the rest of the GPU plan keeps its order.
    return _points(dev, dt, layers=22, batch=16, lengths=(512, 1024, 2048, 4096, 8192), attn_tokens=R.GPU_TOKENS,
                   ffn_tokens=R.GPU_TOKENS, rank=(15,), extra_rank=(15, 1), best_effort=False, dense_max=2048)


# --------------------------------------------------------------------------- summary: ratios and the goal

GOALS = [Goal("#17", "fwd", "about 50% padding", "fastenc", "hf-sdpa", 1.5)]  # CPU inference, fp32
ORDER = [p.name for p in PROVIDERS]
workload_label = MODERNBERT.label


def summary(rows: List[dict]) -> str:
    """End to end: each provider's time / fastenc's (> 1: fastenc faster), then issue #17's goal."""
    return MODERNBERT.summary([r for r in rows if r["op"] == "e2e"], GOALS, ORDER)


def plots(out_dir: str, rows: List[dict], env) -> List[str]:
    return MODERNBERT.ratio_plots(out_dir, [r for r in rows if r["op"] == "e2e"], env, ORDER)


SUITE = R.register(R.Suite(
    "modernbert", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}, interleaved=True, min_rounds=3, max_rounds=15,
    min_time_s={"tiny": 0.01, "cpu": 2.0, "gpu": 1.0}, pause_s=0.002, summary=summary, plots=plots, reset=reset,
))
