"""What the layer, encoder and train suites share: a stack of post-norm GELU encoder layers with torch.nn's
weights, its workload (hidden states in, hidden states out) and its providers.

Encoder layer FLOPs = projections 2·T·(3d² + d²) + FFN 2·T·d·f·2 + attention 4·d·Σ L_b²
(T = real tokens); backward 2x for the GEMMs, 2.5x for attention; "train" counts both.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import torch
from torch import nn

from ... import backends
from ...layer import LayerSpec
from ...layer import shape_classes as layer_shape_classes
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload, key_padding_mask, padded_lengths, randn, valid_tokens
from .attention import BWD_FACTOR as BWD_ATTENTION
from .ffn import BWD_FACTOR as BWD_MATMUL

ACTIVATION = "gelu"


def flops(lengths, d_model: int, nhead: int, d_ff: int, *, mode: str = "fwd") -> float:
    """One layer's FLOPs on sequences of these real lengths."""
    tokens = sum(lengths)
    gemm = 2.0 * tokens * 4 * d_model * d_model + 2.0 * tokens * d_model * d_ff * 2
    attn = 4.0 * d_model * sum(n * n for n in lengths)
    if mode == "fwd":
        return gemm + attn
    if mode == "bwd":
        return BWD_MATMUL * gemm + BWD_ATTENTION * attn
    if mode in ("fwd+bwd", "train"):
        return (1 + BWD_MATMUL) * gemm + (1 + BWD_ATTENTION) * attn
    raise ValueError(f"unknown mode {mode!r}")


def _torch_encoder(d_model, nhead, d_ff, layers, device, dtype) -> nn.Module:
    """The model every provider copies its weights from (post-norm, GELU, no dropout)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, d_ff, dropout=0.0, activation=ACTIVATION, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device=device, dtype=dtype)


def workload(suite, mode, sweep, device, dtype, *, batch, seqlen, d_model, nhead, d_ff, layers,
             padding=0.0, dropout=0.0) -> Workload:
    """One encoder layer (suite "layer", layers=1) or a stack ("encoder", "train").

    dropout: every provider's dropout probability (attention, residual and feed-forward), as
    fine-tuning runs; with dropout > 0 outputs are random, so the runner checks them for
    finiteness only (tests/ check the kernels' masks against the reference).
    """
    lengths = padded_lengths(batch, seqlen, padding)
    enc = _torch_encoder(d_model, nhead, d_ff, layers, device, dtype)
    state = {k: v.detach() for k, v in enc.state_dict().items()}

    def make_inputs():
        return randn((batch, seqlen, d_model), device, dtype), key_padding_mask(lengths, seqlen, device)

    refs: Dict[torch.dtype, nn.Module] = {}

    def ref(inputs, upcast):
        """The stack's reference: fastenc's per-op composition with every op on "reference"."""
        import fastenc

        x, kpm = inputs
        dt = torch.float32 if upcast else dtype
        if dt not in refs:
            refs[dt] = fastenc.optimize(_torch_encoder(d_model, nhead, d_ff, layers, device, dt))
            refs[dt].load_state_dict(state)
            refs[dt].eval()
        with fastenc.use_backend("reference"):
            return refs[dt](x.to(dt), src_key_padding_mask=kpm)

    return Workload(
        suite, mode, sweep,
        dict(batch=batch, seqlen=seqlen, heads=nhead, head_dim=d_model // nhead, d_model=d_model, d_ff=d_ff,
             layers=layers, padding=padding, **({"dropout": dropout} if dropout else {})),
        device, dtype, make_inputs, (0,), ref, valid=lambda inp: valid_tokens(inp, 1, 1),
        flops=layers * flops(lengths, d_model, nhead, d_ff, mode=mode), tokens=sum(lengths),
        model=dict(d_model=d_model, nhead=nhead, d_ff=d_ff, layers=layers, state=state, activation=ACTIVATION,
                   dropout=dropout),
    )


def workload_of(suite: str):
    return functools.partial(workload, suite)


# --------------------------------------------------------------------------- providers


def _torch_layer(w: Workload) -> nn.TransformerEncoderLayer:
    m = w.model
    return nn.TransformerEncoderLayer(m["d_model"], m["nhead"], m["d_ff"], dropout=m["dropout"],
                                      activation=m["activation"], batch_first=True)


def _load_torch(w: Workload, *, train: bool, nested: bool = False) -> nn.Module:
    model = nn.TransformerEncoder(_torch_layer(w), w.model["layers"], enable_nested_tensor=nested)
    model.load_state_dict(w.model["state"])
    return model.to(device=w.device, dtype=w.dtype).train(train)


def _torch_eager(w: Workload) -> Impl:
    model = _load_torch(w, train=True)
    return Impl(lambda i: model(i[0], src_key_padding_mask=i[1]), params=list(model.parameters()),
                note="nn.TransformerEncoder in training mode (no fast path)")


def _torch_fastpath(w: Workload) -> Impl:
    """nn.TransformerEncoder's inference fast path: eval, no grad, nested tensors for the padding mask."""
    if w.mode != "fwd":
        raise Unavailable("the nn.TransformerEncoder fast path is inference only (eval, no grad)")
    model = _load_torch(w, train=False, nested=True)

    def forward(i):
        if torch.is_grad_enabled():
            raise Unavailable("the fast path needs torch.no_grad()")
        out = model(i[0], src_key_padding_mask=i[1])
        return out.to_padded_tensor(0.0, i[0].shape) if out.is_nested else out

    nested = w.params["padding"] > 0
    return Impl(forward, inference_only=True,
                note="eval + no_grad fast path" + (", nested tensors" if nested else ", no mask"))


def _torch_compile(w: Workload) -> Impl:
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    torch._dynamo.reset()  # a fresh cache per workload: never a silent eager fallback at the recompile limit
    model = _load_torch(w, train=True)
    compiled = torch.compile(model, dynamic=False)
    return Impl(lambda i: compiled(i[0], src_key_padding_mask=i[1]), params=list(model.parameters()),
                note="torch.compile(nn.TransformerEncoder), training mode")


def shape_classes(d_model: int, nhead: int, activation: str) -> Dict[str, tuple]:
    """Each op's shape class in such a layer (what ``fastenc.backends.explain`` passes to its checks)."""
    return layer_shape_classes(LayerSpec(d_model, nhead, activation))


def _fastenc(backend: str):
    def build(w: Workload) -> Impl:
        import fastenc

        m = w.model
        notes = []
        if backend != "reference":
            for op, shape in shape_classes(m["d_model"], m["nhead"], m["activation"]).items():
                try:
                    notes.append(f"{op}={backends.explain(op, backend, w.device, w.dtype, shape)[0]}")
                except backends.BackendUnavailableError as e:
                    raise Unavailable(str(e)) from None
        layer = fastenc.TransformerEncoderLayer(m["d_model"], m["nhead"], m["d_ff"], dropout=m["dropout"],
                                                activation=m["activation"], batch_first=True, backend=backend)
        model = fastenc.TransformerEncoder(layer, m["layers"], enable_nested_tensor=False, backend=backend)
        model.load_state_dict(w.model["state"])
        model = model.to(device=w.device, dtype=w.dtype).train(w.mode == "train")
        return Impl(lambda i: model(i[0], src_key_padding_mask=i[1]), params=list(model.parameters()),
                    note=", ".join(notes) or "reference ops")
    return build


def _hf_bert(fastenc_backend: Optional[str] = None):
    """HF BertModel with SDPA attention, built from a BertConfig (random weights, nothing downloaded).

    With ``fastenc_backend``, the same model after ``fastenc.optimize(model, backend=...)``.
    Parity is checked against the same BertModel with eager attention (fp32 and same dtype):
    BERT's embeddings make it a different function from the torch encoder.
    """
    return functools.partial(_build_hf_bert, fastenc_backend=fastenc_backend)


def _build_hf_bert(w: Workload, fastenc_backend: Optional[str]) -> Impl:
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        raise Unavailable("transformers is not installed (pip install transformers)") from None
    m = w.model
    cfg = dict(vocab_size=128, hidden_size=m["d_model"], num_hidden_layers=m["layers"],
               num_attention_heads=m["nhead"], intermediate_size=m["d_ff"], hidden_act="gelu",
               hidden_dropout_prob=m["dropout"], attention_probs_dropout_prob=m["dropout"],
               max_position_embeddings=max(512, w.params["seqlen"]))

    def make(impl: str, dtype) -> nn.Module:
        torch.manual_seed(0)  # the same random weights for every copy
        model = BertModel(BertConfig(**cfg, attn_implementation=impl), add_pooling_layer=False)
        return model.to(device=w.device, dtype=dtype).train(w.mode == "train")

    model = make("sdpa", w.dtype)
    note = "BertModel(inputs_embeds=x), checked against its eager attention"
    if fastenc_backend is not None:
        from ... import convert

        model = convert.optimize(model, backend=fastenc_backend).train(w.mode == "train")
        note = f"fastenc.optimize(BertModel, backend={fastenc_backend!r}); " + note
    refs: Dict[bool, nn.Module] = {}

    def run(mod, i):
        mask = None if i[1] is None else (~i[1]).long()
        return mod(inputs_embeds=i[0], attention_mask=mask).last_hidden_state

    def ref(i, upcast):
        if upcast not in refs:
            refs[upcast] = make("eager", torch.float32 if upcast else w.dtype)
        x = i[0].float() if upcast else i[0]
        return run(refs[upcast], (x, i[1]))

    return Impl(lambda i: run(model, i), params=list(model.parameters()), reference=ref, note=note)


FASTENC_AUTO = Provider("fastenc-auto", _fastenc("auto"), False)
FASTENC_REFERENCE = Provider("fastenc-reference", _fastenc("reference"), False)
TORCH_EAGER = Provider("torch-eager", _torch_eager, True)
TORCH_FASTPATH = Provider("torch-fastpath", _torch_fastpath, True)
TORCH_COMPILE = Provider("torch-compile", _torch_compile, True)
HF_BERT_SDPA = Provider("hf-bert-sdpa", _hf_bert(), True)
HF_BERT_FASTENC = Provider("hf-bert-fastenc", _hf_bert("auto"), False)
