"""Providers: the implementations compared side by side on each workload.

A provider's ``build(workload)`` returns an :class:`Impl` or raises
:class:`Unavailable` with the reason (no GPU, extension not built, backend missing
in this torch...).  Nothing falls back silently: a fastenc backend is forced and
checked with ``fastenc.backends.explain``; an SDPA backend is forced with
``sdpa_kernel`` and raises when it cannot run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends, ops, reference
from .workloads import Workload

Tensor = torch.Tensor


class Unavailable(Exception):
    """This provider cannot run this workload here; the message says why."""


@dataclasses.dataclass
class Impl:
    forward: Callable[[tuple], Tensor]  # the timed call on one (prepared) input copy
    prepare: Callable[[tuple], tuple] = lambda inputs: inputs  # untimed conversion (e.g. unpadding)
    to_dense: Callable[[Tensor, tuple], Tensor] = lambda out, inputs: out  # back to the reference layout
    params: Sequence[Tensor] = ()  # trained parameters ("train" mode)
    reference: Optional[Callable[[tuple, bool], Tensor]] = None  # replaces the workload's reference
    inference_only: bool = False
    note: str = ""


@dataclasses.dataclass
class Provider:
    name: str
    suites: Sequence[str]
    build: Callable[[Workload], Impl]
    baseline: bool  # a non-fastenc implementation that fastenc's speedups are measured against


PRIMARY_BASELINE = "torch-eager"


def _force(op: str, backend: str, **call_info) -> str:
    """Raise Unavailable unless ``backend`` can run this call of ``op``; returns the explanation."""
    try:
        chosen, why = backends.explain(op, backend, **call_info)
    except backends.BackendUnavailableError as e:
        raise Unavailable(str(e)) from None
    if chosen != backend:
        raise Unavailable(f"fastenc {op}: {backend!r} would not run ({chosen}: {why})")
    return why


# --------------------------------------------------------------------------- ops


def _fastenc_attention(backend: str):
    def build(w: Workload) -> Impl:
        _force("attention", backend, device=w.device, dtype=w.dtype, head_dim=w.params["head_dim"])
        causal = w.params["causal"]
        return Impl(lambda i: ops.attention(i[0], i[1], i[2], key_padding_mask=i[3], is_causal=causal,
                                            backend=backend))
    return build


def _fastenc_attention_varlen(backend: str):
    def build(w: Workload) -> Impl:
        if w.params["padding"] == 0:
            raise Unavailable("varlen runs only in the padding sweep (with padding > 0)")
        _force("attention", backend, device=w.device, dtype=w.dtype, head_dim=w.params["head_dim"])
        causal = w.params["causal"]

        def prepare(inputs):
            q, k, v, kpm = inputs
            qp, idx, cu, maxlen = reference.unpad(q, kpm)
            return qp, reference.unpad(k, kpm)[0], reference.unpad(v, kpm)[0], cu, maxlen, idx

        def to_dense(out, inputs):
            b, n = inputs[3].shape
            idx = reference.unpad(inputs[0], inputs[3])[1]
            return reference.pad(out, idx, b, n)

        return Impl(
            lambda i: ops.attention_varlen(i[0], i[1], i[2], i[3], i[3], i[4], i[4], is_causal=causal, backend=backend),
            prepare=prepare, to_dense=to_dense, note="inputs packed once outside the timing (unpad not timed)",
        )
    return build


def _attention_reference_fn(i, causal):
    return reference.attention(i[0], i[1], i[2], key_padding_mask=i[3], is_causal=causal)


def _torch_eager_attention(w: Workload) -> Impl:
    causal = w.params["causal"]
    return Impl(lambda i: _attention_reference_fn(i, causal), note="fastenc.reference.attention called directly")


_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _sdpa(name: str):
    def build(w: Workload) -> Impl:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:
            raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing: {e}") from None
        backend = getattr(SDPBackend, _SDPA_BACKENDS[name], None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{_SDPA_BACKENDS[name]}")
        causal = w.params["causal"]
        if causal and w.params["padding"] > 0:
            raise Unavailable("SDPA takes either is_causal or a mask, not both")

        def forward(i):
            q, k, v, kpm = (t.transpose(1, 2) if t is not None and t.dim() == 4 else t for t in i)
            mask = None if kpm is None else ~kpm[:, None, None, :]  # SDPA's bool mask: True = attend
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            except RuntimeError as e:
                raise Unavailable(f"{name}: {str(e).splitlines()[0]}") from None
            return out.transpose(1, 2)

        return Impl(forward)
    return build


def _fastenc_layer_norm(backend: str):
    def build(w: Workload) -> Impl:
        _force("layer_norm", backend, device=w.device, dtype=w.dtype, hidden=w.params["d_model"])
        return Impl(lambda i: ops.residual_layer_norm(i[0], i[1], i[2], i[3], branch_bias=i[4], backend=backend))
    return build


def _torch_eager_layer_norm(w: Workload) -> Impl:
    return Impl(lambda i: F.layer_norm(i[0] + (i[1] + i[4]), i[0].shape[-1:], i[2], i[3]))


def _fastenc_ffn(backend: str):
    def build(w: Workload) -> Impl:
        act = w.params["activation"]
        _force("ffn", backend, device=w.device, dtype=w.dtype, activation=act)
        return Impl(lambda i: ops.ffn(*i, activation=act, backend=backend))
    return build


def _fastenc_ffn_gemm_path(path: str):
    """The CUDA FFN with one GEMM path forced (FASTENC_FFN_GEMM, read by the op at every call)."""
    def build(w: Workload) -> Impl:
        if w.device.type != "cuda":
            raise Unavailable("GEMM paths apply to CUDA tensors (fastenc-cuda covers the CPU path)")
        act = w.params["activation"]
        _force("ffn", "cuda", device=w.device, dtype=w.dtype, activation=act)
        from ..ops import ffn as ffn_op

        env = ffn_op.GEMM_PATH_ENV
        with _env(env, path):
            chosen, why = ffn_op.gemm_path(w.device, w.dtype, d=w.params["d_model"], f=w.params["d_ff"],
                                           activation=act, training=w.mode != "fwd")
        if chosen != path:
            raise Unavailable(f"GEMM path {path!r} does not run here ({chosen}: {why})")

        def forward(i):
            with _env(env, path):
                return ops.ffn(*i, activation=act, backend="cuda")
        return Impl(forward, note=f"{env}={path}")
    return build


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _torch_eager_ffn(w: Workload) -> Impl:
    act = w.params["activation"]
    return Impl(lambda i: F.linear(reference.apply_activation(F.linear(i[0], i[1], i[2]), act), i[3], i[4]))


_REFERENCE_FNS = {
    "attention": lambda w: functools.partial(_attention_reference_fn, causal=w.params["causal"]),
    "layer_norm": lambda w: (lambda i: reference.residual_layer_norm(i[0], i[1], i[2], i[3], branch_bias=i[4])),
    "ffn": lambda w: (lambda i: reference.ffn(*i, activation=w.params["activation"])),
}


def _torch_compile(w: Workload) -> Impl:
    """torch.compile of the reference (ops) or of the torch module (layer/encoder/train)."""
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    torch._dynamo.reset()  # a fresh cache per workload: never a silent eager fallback at the recompile limit
    if w.suite in _REFERENCE_FNS:
        fn = torch.compile(_REFERENCE_FNS[w.suite](w), dynamic=False, fullgraph=True)
        return Impl(fn, note="torch.compile(fastenc.reference)")
    model = _load_torch(w, nn.TransformerEncoder, train=True)
    compiled = torch.compile(model, dynamic=False)
    return Impl(lambda i: compiled(i[0], src_key_padding_mask=i[1]), params=list(model.parameters()),
                note="torch.compile(nn.TransformerEncoder), training mode")


# --------------------------------------------------------------------------- layers and encoders


def _torch_layer(w: Workload) -> nn.TransformerEncoderLayer:
    m = w.model
    return nn.TransformerEncoderLayer(m["d_model"], m["nhead"], m["d_ff"], dropout=m["dropout"],
                                      activation=m["activation"], batch_first=True)


def _load_torch(w: Workload, cls, *, train: bool, nested: bool = False) -> nn.Module:
    model = cls(_torch_layer(w), w.model["layers"], enable_nested_tensor=nested)
    model.load_state_dict(w.model["state"])
    return model.to(device=w.device, dtype=w.dtype).train(train)


def _torch_eager_model(w: Workload) -> Impl:
    model = _load_torch(w, nn.TransformerEncoder, train=True)
    return Impl(lambda i: model(i[0], src_key_padding_mask=i[1]), params=list(model.parameters()),
                note="nn.TransformerEncoder in training mode (no fast path)")


def _torch_fastpath(w: Workload) -> Impl:
    """nn.TransformerEncoder's inference fast path: eval, no grad, nested tensors for the padding mask."""
    if w.mode != "fwd":
        raise Unavailable("the nn.TransformerEncoder fast path is inference only (eval, no grad)")
    model = _load_torch(w, nn.TransformerEncoder, train=False, nested=True)

    def forward(i):
        if torch.is_grad_enabled():
            raise Unavailable("the fast path needs torch.no_grad()")
        out = model(i[0], src_key_padding_mask=i[1])
        return out.to_padded_tensor(0.0, i[0].shape) if out.is_nested else out

    nested = w.params["padding"] > 0
    return Impl(forward, inference_only=True,
                note="eval + no_grad fast path" + (", nested tensors" if nested else ", no mask"))


def _fastenc_model(backend: str):
    def build(w: Workload) -> Impl:
        import fastenc

        cls_layer = getattr(fastenc, "TransformerEncoderLayer", None)
        cls_enc = getattr(fastenc, "TransformerEncoder", None)
        if cls_layer is None or cls_enc is None:
            raise Unavailable("fastenc.TransformerEncoderLayer / TransformerEncoder are not in this build")
        m = w.model
        notes = []
        if backend != "reference":
            for op, info in (("attention", dict(head_dim=m["d_model"] // m["nhead"])),
                             ("layer_norm", dict(hidden=m["d_model"])), ("ffn", dict(activation=m["activation"]))):
                try:
                    notes.append(f"{op}={backends.explain(op, backend, device=w.device, dtype=w.dtype, **info)[0]}")
                except backends.BackendUnavailableError as e:
                    raise Unavailable(str(e)) from None
        layer = cls_layer(m["d_model"], m["nhead"], m["d_ff"], dropout=m["dropout"], activation=m["activation"],
                          batch_first=True, backend=backend)
        model = cls_enc(layer, m["layers"], enable_nested_tensor=False, backend=backend)
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
        from .. import convert

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


PROVIDERS: List[Provider] = [
    Provider("fastenc-triton", ("attention", "layer_norm"), lambda w: _OP_FASTENC[w.suite]("triton")(w), False),
    Provider("fastenc-triton-varlen", ("attention",), _fastenc_attention_varlen("triton"), False),
    Provider("fastenc-cuda", ("ffn",), _fastenc_ffn("cuda"), False),
    *(Provider(f"fastenc-cuda-{p}", ("ffn",), _fastenc_ffn_gemm_path(p), False)
      for p in ("cutlass", "cublaslt", "unfused")),
    Provider("fastenc-auto", ("layer", "encoder", "train"), _fastenc_model("auto"), False),
    Provider("fastenc-reference", ("attention", "layer_norm", "ffn", "layer", "encoder", "train"),
             lambda w: _OP_FASTENC.get(w.suite, _fastenc_model)("reference")(w), False),
    Provider("torch-eager", ("attention", "layer_norm", "ffn", "layer", "encoder", "train"),
             lambda w: _EAGER[w.suite](w), True),
    *(Provider(n, ("attention",), _sdpa(n), True) for n in _SDPA_BACKENDS),
    Provider("torch-fastpath", ("layer", "encoder"), _torch_fastpath, True),
    Provider("torch-compile", ("attention", "layer_norm", "ffn", "layer", "encoder", "train"), _torch_compile, True),
    Provider("hf-bert-sdpa", ("encoder", "train"), _hf_bert(), True),
    Provider("hf-bert-fastenc", ("encoder", "train"), _hf_bert("auto"), False),
]

_OP_FASTENC = {"attention": _fastenc_attention, "layer_norm": _fastenc_layer_norm, "ffn": _fastenc_ffn}
_EAGER = {"attention": _torch_eager_attention, "layer_norm": _torch_eager_layer_norm, "ffn": _torch_eager_ffn,
          "layer": _torch_eager_model, "encoder": _torch_eager_model, "train": _torch_eager_model}


def providers_for(suite: str, names: Optional[Sequence[str]] = None) -> List[Provider]:
    """Providers of a suite, optionally filtered by names or name prefixes ("sdpa" selects every sdpa-*)."""
    out = [p for p in PROVIDERS if suite in p.suites]
    if names:
        out = [p for p in out if any(p.name.startswith(n) for n in names)]
    return out


def provider_names() -> List[str]:
    return [p.name for p in PROVIDERS]

