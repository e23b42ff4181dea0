"""fastenc.apps.pretrain: masked-LM pretraining on the shipped corpus, its checkpoint, and fine-tuning from it."""
import json

import torch

from fastenc.__main__ import main as cli
from fastenc.apps import common, finetune, pretrain, text
from fastenc.models import EncoderModel
from tests.conftest import DEVICE


def test_corpus_split_and_vocabulary():
    tokenizer, train, held_out = pretrain.corpus(max_length=64, min_count=2)
    paragraphs = text.corpus_paragraphs()
    assert len(paragraphs) >= 100 and len(set(paragraphs)) == len(paragraphs)
    assert len(held_out) == len(paragraphs) // pretrain.HELD_OUT_EVERY
    test_reviews = text.train_test_split(text.reviews_dataset())[1]
    assert len(train) == len(paragraphs) - len(held_out) + len(text.reviews_dataset()) - len(test_reviews)
    assert all(1 < len(s) <= 64 and s[0] == tokenizer.CLS for s in train + held_out)
    assert tokenizer.vocab["the"] > tokenizer.MASK


def test_pretrain_smoke_learns_and_finetune_starts_from_it(tmp_path, capsys):
    """CI's reduced run of `fastenc pretrain`: held-out perplexity falls by half and masked-token accuracy
    leaves zero; the checkpoint reloads into an EncoderModel and `finetune --pretrained FILE` trains on it."""
    ckpt, rows_path = tmp_path / "enc.pt", tmp_path / "rows.json"
    cli(["pretrain", "--steps", "100", "--d-model", "32", "--heads", "4", "--layers", "1", "--max-length", "32",
         "--device", DEVICE, "--no-progress", "--out", str(ckpt), "--json", str(rows_path)])
    (row,) = json.loads(rows_path.read_text())
    assert row["perplexity"] < 0.5 * row["perplexity_initial"], row
    assert row["masked_accuracy"] > 0.04 and row["train_tokens_per_s"] > 0, row
    assert "held-out perplexity" in capsys.readouterr().out
    encoder, saved = common.load_checkpoint(str(ckpt))
    assert isinstance(encoder, EncoderModel) and saved["config"]["d_model"] == 32
    assert torch.equal(encoder.embeddings.word_embeddings.weight, saved["state_dict"]["embeddings.word_embeddings.weight"])
    (ft,) = finetune.run(pretrained=str(ckpt), train_size=64, eval_size=32, epochs=1, device=DEVICE, progress=False)
    assert ft["model"] == str(ckpt) and "speedup_vs_hf" not in ft and 0.0 <= ft["accuracy"] <= 1.0


def test_checkpoint_format_is_checked(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    try:
        common.load_checkpoint(str(path))
    except ValueError as e:
        assert "not a `fastenc pretrain` checkpoint" in str(e)
    else:
        raise AssertionError("a foreign checkpoint was accepted")
