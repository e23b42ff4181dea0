"""fastenc.models: Embeddings, EncoderModel, SequenceClassifier, pooling, freezing, parameter groups.

EncoderModel parity: against a plain-PyTorch twin holding the same weights (torch's own
nn.TransformerEncoder via fastenc.to_torch, embeddings written out with F.embedding /
F.layer_norm) in fp64 as the reference and in the tested dtype as the baseline.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastenc
from fastenc.models import (
    Embeddings,
    EncoderModel,
    SequenceClassifier,
    encoder_parts,
    freeze,
    parameter_groups,
    pool,
    sinusoidal_positions,
)
from fastenc import backends
from fastenc.testing import assert_close, assert_parity
from tests.conftest import DEVICE, assert_auto_kernels, assert_grads_parity

VOCAB = 53


def ragged_batch(n=3, seqlen=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 1, 7, 5][:n])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    types = (torch.arange(seqlen) >= seqlen // 2).long().expand(n, seqlen)
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE), types.to(DEVICE)


def make_model(d_model=384, nhead=12, **kw):
    torch.manual_seed(0)
    model = EncoderModel(VOCAB, d_model, nhead, num_layers=2, dim_feedforward=200, dropout=0.0, max_position=24,
                         **kw).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def plain_forward(model, ids, mask, types):
    """The same computation in plain PyTorch: explicit embeddings, torch's TransformerEncoder, pool()."""
    emb = model.embeddings
    L = ids.shape[1]
    pos = (emb.position_embeddings.weight[:L] if emb.positional == "learned" else emb.position_table[:L])
    x = F.embedding(ids, emb.word_embeddings.weight) + pos
    if emb.token_type_embeddings is not None:
        x = x + F.embedding(types, emb.token_type_embeddings.weight)
    x = F.layer_norm(x, x.shape[-1:], emb.norm.weight, emb.norm.bias, emb.norm.eps)
    h = model.encoder(x, src_key_padding_mask=mask == 0)
    return h, pool(h, mask, model.pooler.mode)


def twin(model, dtype):
    t = copy.deepcopy(model).to(dtype)
    t.encoder = fastenc.to_torch(t.encoder)
    assert type(t.encoder) is nn.TransformerEncoder
    return t


CASES = [
    dict(d_model=384, nhead=12, positional="learned", pooling="max", norm_first=False, dtype=torch.float32),
    dict(d_model=480, nhead=6, positional="sinusoidal", pooling="mean", norm_first=True, dtype=torch.float32),
    # max pooling routes gradients by argmax, which low precision may flip: checked in fp32 only
    dict(d_model=384, nhead=12, positional="learned", pooling="cls", norm_first=False, dtype=torch.float16),
    dict(d_model=480, nhead=6, positional="sinusoidal", pooling="cls", norm_first=False, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['d_model']}-{c['positional']}-{c['pooling']}-"
                         f"{'pre' if c['norm_first'] else 'post'}-{str(c['dtype'])[6:]}")
def test_encoder_model_parity(case):
    case = dict(case)
    dtype = case.pop("dtype")
    model = make_model(**case)
    ref_model, base_model = twin(model, torch.float64), twin(model, dtype)
    fast_model = model.to(dtype)
    ids, mask, types = ragged_batch()
    keep = mask.bool()
    with backends.record() as seen:
        out = fast_model(ids, mask, types)
    assert_auto_kernels(seen)
    ref_h, ref_p = plain_forward(ref_model, ids, mask, types)
    base_h, base_p = plain_forward(base_model, ids, mask, types)
    assert out.last_hidden_state.shape == (3, 13, case["d_model"]) and out.pooled.shape == (3, case["d_model"])
    assert_parity(out.last_hidden_state[keep], ref_h[keep], base_h[keep], name="hidden", scaled=True)
    assert_parity(out.pooled, ref_p, base_p, name="pooled", scaled=True)
    w = torch.randn_like(ref_p)
    for p in (out.pooled, ref_p, base_p):
        (p.double() * w).sum().backward()
    ref_g = {n: p.grad for n, p in ref_model.named_parameters()}
    base_g = {n: p.grad for n, p in base_model.named_parameters()}
    fast_g = {n: p.grad for n, p in fast_model.named_parameters()}
    assert all(g is not None for g in fast_g.values()) and set(fast_g) == set(ref_g)
    assert_grads_parity(fast_g, ref_g, base_g)


def test_pooling_over_padded_batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    for b in range(3):
        real = h[b, : int(mask[b].sum())]
        assert_close(pool(h, mask, "mean")[b], real.mean(0), atol=1e-6, name="mean")
        assert_close(pool(h, mask, "max")[b], real.amax(0), atol=0, name="max")
        assert_close(pool(h, mask, "cls")[b], h[b, 0], atol=0, name="cls")
    for mode in ("mean", "max"):
        out = pool(h, mask, mode)
        assert torch.equal(out[3], torch.zeros(5)), f"{mode}: a fully padded row pools to zeros"
        out.sum().backward()
        assert torch.isfinite(h.grad).all() and h.grad[3].abs().sum() == 0
        assert h.grad[1, 2:].abs().sum() == 0, f"{mode}: padding gets no gradient"
        h.grad = None
    assert_close(pool(h, mask.bool(), "mean"), pool(h, mask, "mean"), atol=0)
    assert_close(pool(h, None, "mean"), h.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        pool(h, mask, "sum")


def test_sinusoidal_positions_formula():
    for dim in (6, 7):
        t = sinusoidal_positions(50, dim)
        for p, j in ((0, 0), (3, 1), (17, 4), (49, dim - 1)):
            angle = p / 10000 ** (2 * (j // 2) / dim)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert abs(t[p, j].item() - expected) < 1e-6, (dim, p, j)


def test_embeddings_options_and_errors():
    torch.manual_seed(0)
    emb = Embeddings(VOCAB, 24, 16, positional="sinusoidal", type_vocab_size=0, dropout=0.0).to(DEVICE)
    assert "position_table" not in emb.state_dict()  # fixed table: not a checkpoint entry
    ids, _, types = ragged_batch(seqlen=9)
    x = emb(ids)
    assert x.shape == (3, 9, 24) and torch.isfinite(x).all()
    shifted = emb(ids, position_ids=torch.arange(2, 11, device=DEVICE)[None])
    assert (shifted - x).abs().max() > 1e-3
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        emb(ids, token_type_ids=types)
    with pytest.raises(TypeError, match="integer"):
        emb(ids.float())
    with pytest.raises(ValueError, match="max_position"):
        emb(torch.ones(1, 17, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="positional"):
        Embeddings(VOCAB, 24, positional="rotary")
    with pytest.raises(ValueError, match="positive"):
        Embeddings(0, 24)
    emb.train()
    emb.dropout.p = 0.5
    assert (emb(ids) == 0).float().mean() > 0.3


def test_sequence_classifier_loss_and_errors():
    torch.manual_seed(0)
    clf = SequenceClassifier(4, vocab_size=VOCAB, d_model=32, nhead=4, num_layers=1, dim_feedforward=40,
                             max_position=16, pooling="mean").to(DEVICE).eval()
    ids, mask, _ = ragged_batch()
    labels = torch.tensor([0, 3, 1], device=DEVICE)
    out = clf(ids, mask, labels=labels)
    assert out.logits.shape == (3, 4)
    assert_close(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6)
    out.loss.backward()
    assert clf.classifier.weight.grad is not None and clf.encoder.embeddings.word_embeddings.weight.grad is not None
    assert clf(ids, mask).loss is None
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassifier(0, vocab_size=VOCAB)
    with pytest.raises(TypeError, match="either encoder"):
        SequenceClassifier(2, encoder=clf.encoder, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="attention_mask"):
        clf(ids, mask[:, :5])


def _tiny_classifier():
    torch.manual_seed(0)
    return SequenceClassifier(2, vocab_size=VOCAB, d_model=32, nhead=4, num_layers=3, dim_feedforward=40,
                              max_position=16).to(DEVICE)


def test_freeze_embeddings_and_lowest_layers():
    clf = _tiny_classifier()
    names = freeze(clf, embeddings=True, layers=2)
    assert names and all(n.startswith(("encoder.embeddings.", "encoder.encoder.layers.0.", "encoder.encoder.layers.1."))
                         for n in names)
    ids, mask, _ = ragged_batch()
    clf(ids, mask, labels=torch.tensor([0, 1, 1], device=DEVICE)).loss.backward()
    for n, p in clf.named_parameters():
        assert (p.grad is None) == (n in names), n
    with pytest.raises(ValueError, match="between 0 and 3"):
        freeze(clf, layers=4)
    with pytest.raises(ValueError, match="no encoder"):
        freeze(nn.Linear(2, 2))


def test_parameter_groups_layer_decay_and_no_decay():
    clf = _tiny_classifier()
    freeze(clf, layers=1)
    groups = parameter_groups(clf, 1e-3, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in clf.named_parameters() if p.requires_grad]
    assert len(by_param) == sum(len(g["params"]) for g in groups) == len(trainable)
    depth = lambda n: (0 if n.startswith("encoder.embeddings.") else  # noqa: E731
                       int(n.split(".")[3]) + 1 if n.startswith("encoder.encoder.layers.") else 4)
    for n, p in trainable:
        g = by_param[id(p)]
        assert g["lr"] == pytest.approx(1e-3 * 0.5 ** (4 - depth(n))), n
        no_decay = n.endswith("bias") or ".norm" in n
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    assert by_param[id(clf.encoder.embeddings.word_embeddings.weight)]["weight_decay"] == 0.05
    assert by_param[id(clf.classifier.weight)]["lr"] == pytest.approx(1e-3)
    torch.optim.AdamW(groups).step()  # the groups are valid optimizer input
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(clf, 1e-3, layer_decay=0.0)


def test_freeze_and_groups_on_hf_models():
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements/dev.txt)")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    for optimized in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(config)
        if optimized:
            fastenc.optimize(model)
        emb, layers = encoder_parts(model)
        assert emb is model.bert.embeddings and len(layers) == 3
        names = freeze(model, embeddings=True, layers=1)
        assert any("embeddings" in n for n in names) and any(".0." in n for n in names)
        groups = parameter_groups(model, 1e-3, layer_decay=0.8)
        lrs = sorted({g["lr"] for g in groups})
        assert lrs == pytest.approx([1e-3 * 0.8 ** k for k in (2, 1, 0)])  # layers 1, 2 and the head
