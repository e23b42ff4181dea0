"""fastenc.apps.pretrain: masked-LM pretraining on the shipped corpus, its Hugging Face folder (loaded without
fastenc), and fine-tuning from it."""
import json
import math

import torch

from fastenc.__main__ import main as cli
from fastenc.apps import finetune, pretrain, text
from fastenc.testing import assert_parity
from tests import without_fastenc
from tests.conftest import DEVICE


def test_corpus_split_and_vocabulary():
    tokenizer, train, held_out = pretrain.corpus(max_length=64, min_count=2, vocab_size=1024)
    paragraphs = text.corpus_paragraphs()
    assert len(paragraphs) >= 100 and len(set(paragraphs)) == len(paragraphs)
    assert len(held_out) == len(paragraphs) // pretrain.HELD_OUT_EVERY
    test_reviews = text.train_test_split(text.reviews_dataset())[1]
    assert len(train) == len(paragraphs) - len(held_out) + len(text.reviews_dataset()) - len(test_reviews)
    assert all(2 < len(s) <= 64 and s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id
               for s in train + held_out)
    assert len(tokenizer) == 1024 and tokenizer.vocab["the"] > tokenizer.mask_token_id
    assert max(len(s) for s in held_out) == 64  # long paragraphs are cut, [SEP] kept


def test_unigram_perplexity():
    """Token frequencies of the training text (add-one smoothed) scoring the masked labels."""
    train = [[2, 5, 5, 3], [2, 6, 3]]  # counts + 1 over a vocabulary of 8: 5 -> 3/15, 6 -> 2/15
    batch = {"labels": torch.tensor([[-100, 5, -100], [6, -100, 5]])}
    assert math.isclose(pretrain.unigram_perplexity(train, [batch], 8), math.exp(-(2 * math.log(3 / 15)
                                                                                   + math.log(2 / 15)) / 3))


def test_pretrain_smoke_learns_saves_hf_and_finetune_starts_from_it(tmp_path, capsys):
    """CI's reduced run of `fastenc pretrain`: held-out perplexity falls below half its start and below the
    token-frequency baseline (the model reads context), masked-token accuracy leaves zero.  A broken
    model fails these (checked by skipping the optimizer step: perplexity stays at its start, accuracy
    near 0).  The saved folder loads in transformers alone (a process without fastenc): the reloaded
    BertForMaskedLM scores the held-out masked tokens with the run's perplexity (parity rule, the
    reloaded model in float64 as the oracle); `finetune --pretrained DIR` trains on it."""
    out, rows_path = tmp_path / "enc", tmp_path / "rows.json"
    cli(["pretrain", "--steps", "100", "--d-model", "32", "--heads", "4", "--layers", "1", "--max-length", "32",
         "--vocab-size", "1024", "--lr", "3e-3", "--device", DEVICE, "--no-progress", "--out", str(out),
         "--json", str(rows_path)])
    (row,) = json.loads(rows_path.read_text())
    assert len(row["losses"]) == 100 and row["masked_tokens"] > 400, row
    assert row["perplexity"] < 0.5 * row["perplexity_initial"], row
    assert row["perplexity"] < row["perplexity_unigram"], row
    assert row["masked_accuracy"] > 0.03 and row["train_tokens_per_s"] > 0, row
    assert "held-out perplexity" in capsys.readouterr().out
    assert json.loads((out / pretrain.PRETRAIN_FACTS).read_text()) == row

    # the run's held-out masked batches (fixed seed), scored by the reloaded model
    from transformers import BertTokenizerFast

    tokenizer, _, held_out = pretrain.corpus(32, 2, 1024)
    assert BertTokenizerFast.from_pretrained(out).vocab == tokenizer.vocab
    g = torch.Generator().manual_seed(pretrain.EVAL_MASK_SEED)
    batches = [pretrain._masked(tokenizer, held_out[i: i + 32], g) for _ in range(pretrain.EVAL_MASKINGS)
               for i in range(0, len(held_out), 32)]
    width = max(b["input_ids"].shape[1] for b in batches)
    stack = {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1])) for b in batches])
             for k in ("input_ids", "attention_mask")}
    (got,) = without_fastenc.outputs([("masked-lm", out, {k: stack[k].tolist() for k in ("input_ids",
                                                                                         "attention_mask")})],
                                     tmp_path)
    def perplexity(logits):  # as pretrain.evaluate: a mean cross-entropy per batch in the logits' dtype
        nll, n, start = 0.0, 0, 0
        for b in batches:
            rows, start = slice(start, start + len(b["labels"])), start + len(b["labels"])
            keep = b["labels"] != -100
            part = logits[rows, : b["labels"].shape[1]][keep]
            nll += float(torch.nn.functional.cross_entropy(part, b["labels"][keep], reduction="sum") / keep.sum()
                         ) * int(keep.sum())
            n += int(keep.sum())
        return torch.tensor([math.exp(nll / n)], dtype=torch.float64)

    assert_parity(torch.tensor([row["perplexity"]], dtype=torch.float64), perplexity(got["fp64"]),
                  perplexity(got["fp32"]), name="held-out perplexity, fastenc's run vs the transformers reload")

    (ft,) = finetune.run(pretrained=str(out), train_size=64, eval_size=32, epochs=1, compare_steps=0, device=DEVICE,
                         progress=False)
    assert ft["model"] == str(out) and ft["lr"] == finetune.FASTENC_PRETRAIN_DEFAULTS["lr"]
    assert math.isfinite(ft["eval_loss"]) and len(ft["losses"]) == 2
