"""Pretrain an encoder from scratch by masked-language modelling: ``python -m fastenc pretrain``.

Corpus (shipped, nothing downloaded; provenance in ``fastenc/data/README.md``): the paragraphs of
``fastenc/data/corpus.tsv`` plus the texts, without labels, of the training part of
``reviews.tsv`` (the held-out reviews stay unseen, so that ``finetune`` from this checkpoint is
evaluated on text the encoder never read).  Every 10th paragraph is held out.

Model: ``fastenc.EncoderModel`` (BERT-style, learned positions, no token types) with the
``MaskedLM`` head (decoder tied to the word embeddings), trained padding-free (the encoder
removes padding once at entry; the head scores only the masked positions).  Masking: BERT's 15%
with 80/10/10, drawn afresh at each step; the held-out masks are drawn once from a fixed seed.
Tokenizer: a BERT WordPiece vocabulary (``--vocab-size``, pieces seen at least ``--min-count``
times) trained on the training paragraphs by the `tokenizers` library.

Prints per backend: training tokens/s (real tokens, forward + backward + update) and held-out
masked-token accuracy and perplexity before and after.  Saves the first backend's model in
Hugging Face format (``--out DIR``): ``BertForMaskedLM`` weights and config (``fastenc.models.to_bert``:
the same logits), the ``BertTokenizerFast`` tokenizer, and the run's result row
(``fastenc_pretrain.json``).  transformers loads the folder on its own
(``BertForMaskedLM.from_pretrained(DIR)``, ``AutoTokenizer.from_pretrained(DIR)``), and
``python -m fastenc finetune --pretrained DIR`` starts from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence

import torch

from ..backends import use_backend
from ..models import IGNORE_INDEX, EncoderModel, MaskedLM, bert_init, mask_tokens
from .common import PRETRAIN_FACTS, Run, move, pick_device
from .text import corpus_paragraphs, pad_batch, reviews_dataset, train_test_split, train_wordpiece

Tensor = torch.Tensor

HELD_OUT_EVERY = 10
EVAL_MASK_SEED = 1234
# The held-out paragraphs are masked this many times (other positions each time): about 10 x 80 masked
# tokens at the default sizes, where one masking gave too few for a stable accuracy.
EVAL_MASKINGS = 10
VOCAB_SIZE = 2048  # WordPiece entries at most (the corpus holds about 2,850 pieces seen twice)


def corpus(max_length: int, min_count: int, vocab_size: int):
    """(tokenizer trained on the training texts, training sequences, held-out sequences) as lists of token ids."""
    paragraphs = corpus_paragraphs()
    held_out = paragraphs[HELD_OUT_EVERY - 1:: HELD_OUT_EVERY]
    train = [p for i, p in enumerate(paragraphs, 1) if i % HELD_OUT_EVERY]
    train += [t for t, _ in train_test_split(reviews_dataset())[0]]
    tokenizer = train_wordpiece(train, vocab_size=vocab_size, min_count=min_count, max_length=max_length)
    ids = lambda texts: tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]  # noqa: E731
    return tokenizer, ids(train), ids(held_out)


def _masked(tokenizer, seqs: Sequence[Sequence[int]], generator=None) -> Dict[str, Tensor]:
    batch = pad_batch(seqs, tokenizer.pad_token_id)
    batch["input_ids"], batch["labels"] = mask_tokens(
        batch["input_ids"], batch["attention_mask"], mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer), special_ids=tokenizer.all_special_ids, generator=generator)
    return batch


def unigram_perplexity(train: Sequence[Sequence[int]], batches: Sequence[Dict[str, Tensor]], vocab_size: int) -> float:
    """Perplexity of the masked tokens under the training text's token frequencies (add-one smoothed):
    what a model that ignores the context reaches."""
    counts = torch.bincount(torch.tensor([t for s in train for t in s]), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    labels = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches])
    return math.exp(-float(log_p[labels].mean()))


def evaluate(model: MaskedLM, batches: Sequence[Dict[str, Tensor]], device) -> Dict[str, float]:
    """Masked-token accuracy and perplexity (exp of the mean cross-entropy) over fixed masked batches."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            out = model(**move(b, device))
            m = out.labels.numel()
            loss += float(out.loss) * m
            correct += int((out.logits.argmax(-1) == out.labels).sum())
            n += m
    return {"masked_accuracy": correct / max(n, 1), "perplexity": math.exp(loss / max(n, 1)), "masked_tokens": n}


def build(vocab_size: int, *, d_model: int, nhead: int, num_layers: int, max_length: int, dropout: float,
          pad_token_id: int = 0) -> MaskedLM:
    """MaskedLM with BERT's init on a BERT-shaped EncoderModel (post-norm, erf GELU, learned positions, no
    token types), padding removed once at the encoder's entry."""
    encoder = EncoderModel(vocab_size, d_model, nhead, num_layers, 4 * d_model, dropout=dropout,
                           max_position=max_length, type_vocab_size=0, pad_token_id=pad_token_id, pooling="mean")
    encoder.encoder.unpad = True  # padding-free training: padding removed once at the encoder's entry
    return bert_init(MaskedLM(encoder))


def save(out: str, model: MaskedLM, tokenizer, facts: dict) -> None:
    """``out``: a Hugging Face folder: ``model`` as ``BertForMaskedLM``, its tokenizer, and ``facts``."""
    from ..models import to_bert

    to_bert(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, PRETRAIN_FACTS), "w") as f:
        json.dump(facts, f, indent=2)


def run(*, backends: Sequence[str] = ("auto",), steps: int = 1500, batch_size: int = 32, lr: float = 1e-3,
        d_model: int = 128, nhead: int = 4, num_layers: int = 2, max_length: int = 64, min_count: int = 2,
        vocab_size: int = VOCAB_SIZE, dropout: float = 0.1, device: Optional[str] = None, seed: int = 0,
        out: Optional[str] = None, progress: bool = True) -> List[Dict]:
    """Pretrain one fresh model per backend for ``steps`` steps; one result row per backend (``losses``:
    the training loss of every step).  ``out``: save the first backend's model there (:func:`save`)."""
    from tqdm.auto import tqdm

    dev = pick_device(device)
    tokenizer, train, held_out = corpus(max_length, min_count, vocab_size)
    g = torch.Generator().manual_seed(EVAL_MASK_SEED)
    eval_batches = [_masked(tokenizer, held_out[i: i + batch_size], g) for _ in range(EVAL_MASKINGS)
                    for i in range(0, len(held_out), batch_size)]
    baseline = unigram_perplexity(train, eval_batches, len(tokenizer))
    rows = []
    for i, backend in enumerate(backends):
        torch.manual_seed(seed)
        model = build(len(tokenizer), d_model=d_model, nhead=nhead, num_layers=num_layers, max_length=max_length,
                      dropout=dropout, pad_token_id=tokenizer.pad_token_id)
        model.to(dev)
        with use_backend(backend):
            before = evaluate(model, eval_batches, dev)
            r = Run("pretrain", model, lr, steps, warmup=0.06)
            order, pos, tokens = list(range(len(train))), len(train), 0
            rng = random.Random(seed)
            bar = tqdm(total=steps, disable=not progress, desc=f"pretrain ({backend})", unit="step")
            for _ in range(steps):
                if pos + batch_size > len(order):
                    rng.shuffle(order)
                    pos = 0
                batch = _masked(tokenizer, [train[j] for j in order[pos: pos + batch_size]])
                pos += batch_size
                r.step(lambda m, b: m(**b).loss, move(batch, dev), dev)
                tokens += int(batch["attention_mask"].sum())
                bar.set_postfix(loss=f"{r.loss:.3f}")
                bar.update()
            bar.close()
            after = evaluate(model, eval_batches, dev)
        row = {"backend": backend, "device": str(dev), "steps": steps, "vocab_size": len(tokenizer),
               "train_sequences": len(train), "held_out_sequences": len(held_out), "d_model": d_model,
               "nhead": nhead, "num_layers": num_layers, "max_length": max_length, "dropout": dropout,
               "train_tokens_per_s": tokens / max(sum(r.seconds), 1e-9), "final_loss": r.loss, "losses": r.losses,
               "perplexity_initial": before["perplexity"], "masked_accuracy_initial": before["masked_accuracy"],
               "perplexity_unigram": baseline, **after}
        rows.append(row)
        if out and i == 0:
            save(out, model, tokenizer, row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(prog="fastenc pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="auto", help="comma-separated, e.g. reference,triton")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (6%% warmup, then linear decay)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence ([CLS] included)")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="WordPiece vocabulary size at most")
    p.add_argument("--min-count", type=int, default=2, help="WordPiece keeps pieces seen at least this often")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastenc_pretrained", help="folder for the model and tokenizer in Hugging Face "
                                                                "format ('' to save nothing)")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    rows = run(backends=[b.strip() for b in a.backends.split(",") if b.strip()], steps=a.steps,
               batch_size=a.batch_size, lr=a.lr, d_model=a.d_model, nhead=a.heads, num_layers=a.layers,
               max_length=a.max_length, min_count=a.min_count, vocab_size=a.vocab_size, device=a.device, seed=a.seed,
               out=a.out or None,
               progress=not a.no_progress)
    for r in rows:
        print(f"pretrain backend={r['backend']:<9} device={r['device']:<5} steps={r['steps']} "
              f"train tokens/s={r['train_tokens_per_s']:.0f}  held-out perplexity {r['perplexity_initial']:.1f} -> "
              f"{r['perplexity']:.1f} (token frequencies alone: {r['perplexity_unigram']:.1f}), masked-token accuracy "
              f"{r['masked_accuracy_initial']:.3f} -> {r['masked_accuracy']:.3f} ({r['masked_tokens']} held-out "
              "masked tokens)")
    if a.out:
        print(f"saved {a.out}/ in Hugging Face format (BertForMaskedLM and its tokenizer; python -m fastenc "
              f"finetune --pretrained {a.out})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
