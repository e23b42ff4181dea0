"""Text data for the applications: labeled TSV files, fastenc's shipped sets, a word tokenizer.

Shipped with fastenc (``fastenc/data/``, provenance in its README): ``reviews.tsv``, 944 short
English reviews labeled negative/positive; ``corpus.tsv``, unlabeled English paragraphs for
pretraining.  Both are read through ``importlib.resources`` (they work from an installed
package); nothing is downloaded.
"""
from __future__ import annotations

import random
import re
from importlib import resources
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

Tensor = torch.Tensor

REVIEWS = "reviews.tsv"  # in the fastenc.data package: see fastenc/data/README.md
CORPUS = "corpus.tsv"
HEADER = ("label", "text")
TEST_EVERY = 5  # every 5th example (1-based: rows 5, 10, ...) is held out for evaluation


def _parse_tsv(lines: Iterable[str], source: str) -> List[Tuple[str, int]]:
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, sep, text = line.rstrip("\r\n").partition("\t")
        if lineno == 1 and (label.strip(), text.strip()) == HEADER:
            continue
        if not sep or not label.strip().lstrip("-").isdigit():
            raise ValueError(f"{source}:{lineno}: expected 'label<TAB>text' with an integer label")
        out.append((text, int(label)))
    return out


def read_tsv(path: str) -> List[Tuple[str, int]]:
    """``label<TAB>text`` lines (integer labels), optionally under a ``label<TAB>text`` header;
    blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            return _parse_tsv(f, path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); expected "
                         "'label<TAB>text' lines") from None


def shipped_text(name: str) -> str:
    """The content of ``fastenc/data/<name>`` from the installed package."""
    return resources.files("fastenc.data").joinpath(name).read_text(encoding="utf-8")


def reviews_dataset() -> List[Tuple[str, int]]:
    """fastenc's shipped sentiment set: 944 short English reviews written for fastenc
    (movies, books, restaurants, products, hotels, apps, services), labeled 0 (negative) /
    1 (positive), 472 each."""
    return _parse_tsv(shipped_text(REVIEWS).splitlines(), f"fastenc/data/{REVIEWS}")


def corpus_paragraphs() -> List[str]:
    """fastenc's shipped pretraining corpus: 115 English paragraphs written for fastenc, one per line
    of ``corpus.tsv`` (under a ``text`` header)."""
    lines = [line.strip() for line in shipped_text(CORPUS).splitlines() if line.strip()]
    return lines[1:] if lines[:1] == ["text"] else lines


def train_test_split(data: Sequence, test_every: int = TEST_EVERY):
    """(train, test): every ``test_every``-th example in file order is held out (deterministic, and
    roughly stratified when the file interleaves labels or topics)."""
    if test_every < 2:
        raise ValueError(f"test_every should be at least 2, got {test_every}")
    test = [ex for i, ex in enumerate(data, 1) if i % test_every == 0]
    train = [ex for i, ex in enumerate(data, 1) if i % test_every != 0]
    return train, test


class WordTokenizer:
    """Lower-cased word tokenizer with a vocabulary built from training texts.

    Words are runs of letters/digits (with an apostrophe suffix: "isn't"), and each other
    non-space character is a token of its own ("great," -> "great", ",").  Ids: 0 [PAD],
    1 [CLS], 2 [UNK], 3 [SEP], 4 [MASK], then words seen at least ``min_count`` times, by
    first appearance.  Every sequence starts with [CLS] (what "cls" pooling reads).
    """

    SPECIALS = ("[PAD]", "[CLS]", "[UNK]", "[SEP]", "[MASK]")
    PAD, CLS, UNK, SEP, MASK = range(5)
    _WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

    def __init__(self, texts: Sequence[str], max_length: int = 64, min_count: int = 1) -> None:
        counts: Dict[str, int] = {}
        for t in texts:
            for w in self.split(t):
                counts[w] = counts.get(w, 0) + 1
        self.vocab = {s: i for i, s in enumerate(self.SPECIALS)}
        for w, c in counts.items():
            if c >= min_count:
                self.vocab.setdefault(w, len(self.vocab))
        self.max_length = max_length

    @classmethod
    def split(cls, text: str) -> List[str]:
        return cls._WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        """What a checkpoint stores: the words in id order and the length limit."""
        return {"words": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, state: dict) -> "WordTokenizer":
        words = list(state["words"])
        if tuple(words[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(f"a WordTokenizer vocabulary starts with {cls.SPECIALS}, got {words[:5]}")
        tok = cls([], max_length=int(state["max_length"]))
        tok.vocab = {w: i for i, w in enumerate(words)}
        return tok

    def ids(self, text: str) -> List[int]:
        """[CLS] then the word ids, cut at ``max_length``."""
        return ([self.CLS] + [self.vocab.get(w, self.UNK) for w in self.split(text)])[: self.max_length]

    def __call__(self, texts: Sequence[str]) -> Dict[str, Tensor]:
        return pad_batch([self.ids(t) for t in texts], self.PAD)


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> Dict[str, Tensor]:
    """Right-padded ``input_ids`` [B, longest] and ``attention_mask`` (1 = token)."""
    L = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def batches(data: Sequence[Tuple[str, int]], batch_size: int, encode, *, shuffle: bool,
            seed: int = 0) -> Iterator[Dict[str, Tensor]]:
    """Labeled batches: ``encode(texts)`` (a tokenizer call) plus ``labels``."""
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i: i + batch_size]]
        enc = dict(encode([t for t, _ in chunk]))
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc
