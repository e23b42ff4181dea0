"""Pretrain an encoder from scratch by masked-language modelling: ``python -m fastenc pretrain``.

Corpus (shipped, nothing downloaded; provenance in ``fastenc/data/README.md``): the paragraphs of
``fastenc/data/corpus.tsv`` plus the texts, without labels, of the training part of
``reviews.tsv`` (the held-out reviews stay unseen, so that ``finetune`` from this checkpoint is
evaluated on text the encoder never read).  Every 10th paragraph is held out.

Model: ``fastenc.EncoderModel`` (BERT-style, learned positions, no token types) with the
``MaskedLM`` head (decoder tied to the word embeddings), trained padding-free (the encoder
removes padding once at entry).  Masking: BERT's 15% with 80/10/10, drawn afresh at each step;
the held-out masks are drawn once from a fixed seed.  A word tokenizer is built from the
training paragraphs (words seen at least ``--min-count`` times).

Prints per backend: training tokens/s (real tokens, forward + backward + update) and held-out
masked-token accuracy and perplexity before and after; saves the first backend's encoder and
tokenizer (``--out``), which ``python -m fastenc finetune --pretrained FILE`` starts from.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from typing import Dict, List, Optional, Sequence

import torch

from ..backends import use_backend
from ..models import EncoderModel, MaskedLM, bert_init, mask_tokens
from .common import Run, move, pick_device, save_checkpoint
from .text import WordTokenizer, corpus_paragraphs, pad_batch, reviews_dataset, train_test_split

Tensor = torch.Tensor

HELD_OUT_EVERY = 10
EVAL_MASK_SEED = 1234


def corpus(max_length: int, min_count: int):
    """(tokenizer, training sequences, held-out sequences) as lists of token ids."""
    paragraphs = corpus_paragraphs()
    held_out = paragraphs[HELD_OUT_EVERY - 1:: HELD_OUT_EVERY]
    train = [p for i, p in enumerate(paragraphs, 1) if i % HELD_OUT_EVERY]
    train += [t for t, _ in train_test_split(reviews_dataset())[0]]
    tokenizer = WordTokenizer(train, max_length=max_length, min_count=min_count)
    return tokenizer, [tokenizer.ids(t) for t in train], [tokenizer.ids(t) for t in held_out]


def _masked(tokenizer: WordTokenizer, seqs: Sequence[Sequence[int]], generator=None) -> Dict[str, Tensor]:
    batch = pad_batch(seqs, tokenizer.PAD)
    batch["input_ids"], batch["labels"] = mask_tokens(
        batch["input_ids"], batch["attention_mask"], mask_token_id=tokenizer.MASK, vocab_size=len(tokenizer),
        special_ids=range(len(WordTokenizer.SPECIALS)), generator=generator)
    return batch


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
    n = max(n, 1)
    return {"masked_accuracy": correct / n, "perplexity": math.exp(loss / n)}


def build(vocab_size: int, *, d_model: int, nhead: int, num_layers: int, max_length: int, dropout: float):
    """(MaskedLM with BERT's init, the EncoderModel arguments a checkpoint stores)."""
    config = dict(vocab_size=vocab_size, d_model=d_model, nhead=nhead, num_layers=num_layers,
                  dim_feedforward=4 * d_model, dropout=dropout, max_position=max_length, type_vocab_size=0,
                  pooling="mean")
    encoder = EncoderModel(**config)
    encoder.encoder.unpad = True  # padding-free training: padding removed once at the encoder's entry
    return bert_init(MaskedLM(encoder)), config


def run(*, backends: Sequence[str] = ("auto",), steps: int = 1500, batch_size: int = 32, lr: float = 1e-3,
        d_model: int = 128, nhead: int = 4, num_layers: int = 2, max_length: int = 64, min_count: int = 2,
        dropout: float = 0.1, device: Optional[str] = None, seed: int = 0, out: Optional[str] = None,
        progress: bool = True) -> List[Dict]:
    """Pretrain one fresh model per backend for ``steps`` steps; one result row per backend."""
    from tqdm.auto import tqdm

    dev = pick_device(device)
    tokenizer, train, held_out = corpus(max_length, min_count)
    g = torch.Generator().manual_seed(EVAL_MASK_SEED)
    eval_batches = [_masked(tokenizer, held_out[i: i + batch_size], g) for i in range(0, len(held_out), batch_size)]
    rows = []
    for i, backend in enumerate(backends):
        torch.manual_seed(seed)
        model, config = build(len(tokenizer), d_model=d_model, nhead=nhead, num_layers=num_layers,
                              max_length=max_length, dropout=dropout)
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
               "train_sequences": len(train), "held_out_sequences": len(held_out), **config,
               "train_tokens_per_s": tokens / max(sum(r.seconds), 1e-9), "final_loss": r.loss,
               "perplexity_initial": before["perplexity"], "masked_accuracy_initial": before["masked_accuracy"],
               **after}
        rows.append(row)
        if out and i == 0:
            save_checkpoint(out, model.encoder, config, tokenizer, pretrain=row)
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
    p.add_argument("--min-count", type=int, default=2, help="words seen fewer times become [UNK]")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastenc_pretrained.pt", help="checkpoint file ('' to save nothing)")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    rows = run(backends=[b.strip() for b in a.backends.split(",") if b.strip()], steps=a.steps,
               batch_size=a.batch_size, lr=a.lr, d_model=a.d_model, nhead=a.heads, num_layers=a.layers,
               max_length=a.max_length, min_count=a.min_count, device=a.device, seed=a.seed, out=a.out or None,
               progress=not a.no_progress)
    for r in rows:
        print(f"pretrain backend={r['backend']:<9} device={r['device']:<5} steps={r['steps']} "
              f"train tokens/s={r['train_tokens_per_s']:.0f}  held-out perplexity {r['perplexity_initial']:.1f} -> "
              f"{r['perplexity']:.1f}, masked-token accuracy {r['masked_accuracy_initial']:.3f} -> "
              f"{r['masked_accuracy']:.3f}")
    if a.out:
        print(f"saved {a.out} (python -m fastenc finetune --pretrained {a.out})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows
