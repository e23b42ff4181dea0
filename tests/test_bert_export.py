"""fastenc.models.to_bert: EncoderModel -> BertModel and MaskedLM -> BertForMaskedLM, same outputs.

The transformers model computes what the fastenc one does (parity rule against the transformers model in
fp64), also after ``save_pretrained`` and ``from_pretrained`` (transformers' own classes; the apps' tests
load such folders in a process without fastenc).  Configurations BERT cannot express raise.
"""
import pytest
import torch

from fastenc.models import EncoderModel, MaskedLM, SequenceClassifier, bert_init
from fastenc.testing import assert_parity
from tests.conftest import DEVICE

pytest.importorskip("transformers", reason="to_bert builds transformers models (requirements/dev.txt)")

VOCAB = 53


def _encoder(**kw):
    """A small EncoderModel with non-trivial biases and norms (bert_init zeroes them)."""
    args = dict(vocab_size=VOCAB, d_model=48, nhead=4, num_layers=2, dim_feedforward=96, dropout=0.1,
                max_position=24, type_vocab_size=0)
    args.update(kw)
    model = bert_init(EncoderModel(**args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    ids = torch.randint(5, VOCAB, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 1:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("types", [0, 2])
def test_encoder_model_as_bert_model(types):
    from transformers import BertModel

    from fastenc.models import to_bert

    model = _encoder(type_vocab_size=types, activation="gelu_tanh").to(DEVICE).eval()
    bert = to_bert(model)
    assert type(bert) is BertModel and bert.pooler is None and not bert.training
    assert bert.config.hidden_act == "gelu_pytorch_tanh" and bert.config.type_vocab_size == 2
    assert bert.config.num_hidden_layers == 2 and bert.config.max_position_embeddings == 24
    ids, mask = (t.to(DEVICE) for t in _batch())
    keep = mask.bool()
    with torch.no_grad():
        fast = model(ids, mask).last_hidden_state[keep]
        base = bert(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
        ref = bert.double()(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
    assert_parity(fast, ref, base, name="last_hidden_state")
    # a copy, not a view: changing the BERT model leaves the fastenc one alone
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.zero_()
    assert model.embeddings.word_embeddings.weight.abs().sum() > 0


def test_masked_lm_as_bert_for_masked_lm_saved_and_reloaded(tmp_path):
    from transformers import BertForMaskedLM, BertTokenizerFast

    from fastenc.models import to_bert

    model = MaskedLM(_encoder()).eval()
    with torch.no_grad():
        model.bias.normal_(0, 0.1)
        model.norm.weight.add_(0.1 * torch.randn_like(model.norm.weight))
    bert = to_bert(model)
    assert type(bert) is BertForMaskedLM
    assert bert.cls.predictions.decoder.weight.data_ptr() == bert.bert.embeddings.word_embeddings.weight.data_ptr()
    words = [f"w{i}" for i in range(VOCAB - 5)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
                      ).save_pretrained(tmp_path / "mlm")
    bert.save_pretrained(tmp_path / "mlm")
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w9", "w40 w3 w3 [MASK] w7 w8 w11 w12 w13 w14 w15 w16"]
    enc = BertTokenizerFast.from_pretrained(tmp_path / "mlm")(texts, padding=True, return_tensors="pt",
                                                             return_token_type_ids=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert not mask.all() and ids.max() >= 5  # padded, real words
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert type(reloaded.bert.encoder).__name__ == "BertEncoder"  # transformers' own code path
    with torch.no_grad():
        fast = model(ids, mask).logits
        base = reloaded(**enc).logits
        ref = reloaded.double()(**enc).logits
    keep = mask.bool()
    assert_parity(fast[keep], ref[keep], base[keep], name="masked-LM logits")


def test_configurations_bert_cannot_express():
    from fastenc.models import to_bert

    with pytest.raises(ValueError, match="sinusoidal"):
        to_bert(_encoder(positional="sinusoidal"))
    with pytest.raises(ValueError, match="final norm"):
        to_bert(_encoder(norm_first=True))
    with pytest.raises(ValueError, match="erf GELU"):
        to_bert(MaskedLM(_encoder(activation="relu")))
    odd = _encoder()
    odd.encoder.layers[1].norm1.eps = 1e-5
    with pytest.raises(ValueError, match="layer 1 differs"):
        to_bert(odd)
    with pytest.raises(TypeError, match="export its .encoder"):
        to_bert(SequenceClassifier(2, _encoder()))
