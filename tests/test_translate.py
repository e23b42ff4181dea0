"""fastenc.apps.translate: the generated language pair, BLEU, and a reduced training run with greedy decoding."""
import random

import pytest

from fastenc import backends
from fastenc.apps import translate
from tests.conftest import assert_auto_kernels


def test_grammar_rules():
    rng = random.Random(5)
    src_vocab, tgt_vocab = translate.vocabularies()
    for _ in range(200):
        en, xx = translate.sentence_pair(rng)
        e, x = en.split(), xx.split()
        assert x[-2] == translate.OBJECT and x[-1] in {t for _, t in translate.VERBS.values()}  # object-verb order
        plural_subject = e[0] in translate.PLURAL_DETS and e[0] not in translate.SINGULAR_DETS
        verb = next(w for w in e if any(w in forms for forms, _ in translate.VERBS.values()))
        if plural_subject:
            assert any(verb == forms[1] for forms, _ in translate.VERBS.values())  # "two dogs see"
        assert x.count(translate.PLURAL) <= 2 and len(x) >= len(e) - 1
        assert src_vocab.decode(src_vocab.encode(en)) == en and tgt_vocab.decode(tgt_vocab.encode(xx)) == xx
    assert translate.sentence_pair(random.Random(1)) == translate.sentence_pair(random.Random(1))
    train, test = translate.dataset(500, 50)
    assert len(train) == 500 and len(test) == 50 and not {s for s, _ in train} & {s for s, _ in test}


def test_bleu():
    assert translate.bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert translate.bleu(["x y z w"], ["a b c d"]) == 0.0
    short = translate.bleu(["a b c d"], ["a b c d e f"])
    assert short == pytest.approx(pytest.approx(2.718281828 ** (1 - 6 / 4)))  # brevity penalty only
    assert 0 < translate.bleu(["a b c d e x"], ["a b c d e f"]) < 1


def test_translate_smoke_learns():
    """CI's reduced run of examples/translate.py: loss falls, teacher-forced token accuracy far above chance
    (1 in ~60 words), and greedy decoding returns sentences of the target vocabulary."""
    with backends.record() as seen:
        row = translate.run(steps=200, d_model=64, num_layers=1, train_pairs=2000, test_pairs=64, progress=False)
    assert_auto_kernels(seen, must_run=("attention", "layer_norm", "ffn", "linear"))
    assert row["loss"] < 0.6 * row["loss_initial"] and row["token_accuracy"] > 0.3, row
    tgt = set(translate.vocabularies()[1].words)
    assert all(set(s["greedy"].split()) <= tgt for s in row["samples"])
