"""Text data for the applications: labeled TSV files, fastenc's shipped sets, WordPiece tokenizers.

Shipped with fastenc (``fastenc/data/``, provenance in its README): ``reviews.tsv``, 944 short
English reviews labeled negative/positive; ``corpus.tsv``, unlabeled English paragraphs for
pretraining.  Both are read through ``importlib.resources`` (they work from an installed
package); nothing is downloaded.
"""
from __future__ import annotations

import random
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


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, in BERT's order: [PAD] is id 0


def train_wordpiece(texts: Sequence[str], *, vocab_size: int = 4096, min_count: int = 2, max_length: int = 128):
    """A lower-cased BERT WordPiece tokenizer whose vocabulary the `tokenizers` library trains on ``texts``,
    returned as transformers' ``BertTokenizerFast`` (``save_pretrained`` writes a folder that
    ``BertTokenizerFast.from_pretrained`` and ``AutoTokenizer`` load).

    BERT's normalizer and pre-tokenizer (lower case, each punctuation mark a word of its own), then
    WordPiece: the longest pieces of the vocabulary, ``##`` marking a piece inside a word, [UNK] for a
    word no pieces spell.  At most ``vocab_size`` entries, pieces seen at least ``min_count`` times.
    Sequences are ``[CLS] ... [SEP]``; ``max_length`` is the tokenizer's ``model_max_length``.
    The same texts give the same vocabulary in every run (see below).
    """
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.normalizers import BertNormalizer
    from transformers import BertTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("texts: a tokenizer needs at least one training text")
    # The trainer numbers the word-inner characters ("##e") in hash-map order, and those numbers break
    # ties between equally frequent merges: the vocabulary changed from run to run (tokenizers issue
    # #1794).  Listing every "##c" up front numbers them in sorted order; they are ordinary vocabulary
    # entries of the BertTokenizerFast built below (only SPECIAL_TOKENS are special there).
    normalize = BertNormalizer(lowercase=True).normalize_str
    inner = sorted({"##" + c for t in texts for c in normalize(t) if not c.isspace()})
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_count,
                                  special_tokens=list(SPECIAL_TOKENS) + inner, show_progress=False)
    return BertTokenizerFast(vocab=wordpiece.get_vocab(), do_lower_case=True, model_max_length=max_length)


def tokenize(tokenizer, max_length: int):
    """texts -> ``input_ids`` and ``attention_mask`` [B, longest] tensors from a transformers tokenizer,
    padded and cut at ``max_length`` tokens; one segment, so no ``token_type_ids``."""
    def encode(texts: Sequence[str]) -> Dict[str, Tensor]:
        return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt", return_token_type_ids=False))
    return encode


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
