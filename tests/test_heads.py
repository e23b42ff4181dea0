"""fastenc.models.heads (MaskedLM, QuestionAnswering) and fastenc.models.masking.mask_tokens.

Head parity: the whole model written out in plain PyTorch, in fp64 (oracle) and fp32 (baseline),
against the module in fp32: the embeddings on the reference backend, the layer stack converted back
to ``torch.nn.TransformerEncoder`` (torch's own layers, not the encoder under test), the head's math by
hand; forward and every parameter gradient, with padding removal forced on and off.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastenc
from fastenc import backends
from fastenc.models import IGNORE_INDEX, EncoderModel, MaskedLM, QuestionAnswering, mask_tokens
from fastenc.testing import assert_parity
from tests.conftest import DEVICE, assert_auto_kernels, assert_grads_parity

VOCAB, D = 61, 64


def ragged(seqlen=11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (4, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 1, 6, 0])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def make(cls, unpad):
    torch.manual_seed(0)
    encoder = EncoderModel(VOCAB, D, 4, num_layers=2, dim_feedforward=96, dropout=0.0, max_position=16,
                           type_vocab_size=0)
    encoder.encoder.unpad = unpad
    model = cls(encoder)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE).train()


def plain_hidden(model, ids, mask):
    """The hidden states of a model from oracle_and_baseline, without fastenc's layers: the embeddings on the
    reference backend, then torch's layer stack, on the sequences that have a token (torch gives NaN on an
    empty one); zeros on the others."""
    rows = mask.bool().any(dim=1)
    with fastenc.use_backend("reference"):
        x = model.encoder.embeddings(ids[rows])
    stack = model.encoder.encoder
    assert type(stack) is torch.nn.TransformerEncoder and stack.training
    h = stack(x, src_key_padding_mask=~mask[rows].bool())
    return x.new_zeros(*ids.shape, D).index_put((rows.nonzero()[:, 0],), h)


def oracle_and_baseline(model):
    """Copies in fp64 and fp32 whose layer stacks are torch's (``fastenc.to_torch``: the same parameters)."""
    ref64, base32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    for m in (ref64, base32):
        m.encoder.encoder = fastenc.to_torch(m.encoder.encoder)
    return ref64, base32


def plain_mlm(model, ids, mask, labels):
    """BERT's head by hand: Linear -> erf GELU -> LayerNorm -> tied decoder + bias, at the labeled positions."""
    h = plain_hidden(model, ids, mask)[labels != IGNORE_INDEX]
    x = F.gelu(F.linear(h, model.transform.weight, model.transform.bias))
    x = F.layer_norm(x, (D,), model.norm.weight, model.norm.bias, model.norm.eps)
    return F.linear(x, model.encoder.embeddings.word_embeddings.weight, model.bias)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_masked_lm_parity(unpad):
    model = make(MaskedLM, unpad)
    assert sum(p.shape == (VOCAB, D) for p in model.parameters()) == 1, "tied decoder: one vocabulary matrix"
    ids, mask = ragged()
    labels = torch.where((torch.arange(ids.numel(), device=DEVICE).view(ids.shape) % 3 == 0) & (mask == 1), ids,
                         torch.full_like(ids, IGNORE_INDEX))
    ref64, base32 = oracle_and_baseline(model)
    with backends.record() as seen:
        out = model(ids, mask, labels=labels)
    assert_auto_kernels(seen)
    r, b = plain_mlm(ref64, ids, mask, labels), plain_mlm(base32, ids, mask, labels)
    target = labels[labels != IGNORE_INDEX]
    assert out.logits.shape == (target.numel(), VOCAB) and torch.equal(out.labels, target)
    assert_parity(out.logits, r, b, name="logits", scaled=True)
    assert_parity(out.loss, F.cross_entropy(r, target), F.cross_entropy(b, target), name="loss", scaled=True)
    out.loss.backward()
    F.cross_entropy(r, target).backward()
    F.cross_entropy(b, target).backward()
    gf, gr, gb = grads(model), grads(ref64), grads(base32)
    assert_grads_parity(gf, gr, gb)
    # Without labels: logits at every position; on real tokens they match the labeled call's.
    with torch.no_grad():
        full = model(ids, mask).logits
    assert full.shape == (*ids.shape, VOCAB)
    assert_parity(full[labels != IGNORE_INDEX], r, b, name="unlabeled call", scaled=True)


def test_masked_lm_edge_cases():
    """(Padded and padding-free calls are each checked against the oracle by test_masked_lm_parity.)"""
    ids, mask = ragged()
    labels = torch.where(mask == 1, ids, torch.full_like(ids, IGNORE_INDEX))
    model = make(MaskedLM, True)
    none = model(ids, mask, labels=torch.full_like(ids, IGNORE_INDEX))
    assert none.logits.shape == (0, VOCAB) and none.loss.item() == 0.0
    none.loss.backward()  # a batch without labeled positions still backpropagates (zeros)
    with pytest.raises(ValueError, match="labels should have the shape"):
        model(ids, mask, labels=labels[:, :3])
    with pytest.raises(TypeError, match="either encoder= or EncoderModel arguments"):
        MaskedLM(model.encoder, vocab_size=3)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_question_answering_spans(unpad):
    model = make(QuestionAnswering, unpad)
    ids, mask = ragged()
    start, end = torch.tensor([2, 0, 1, 0], device=DEVICE), torch.tensor([5, 0, 4, 0], device=DEVICE)
    rows = mask.any(dim=1)
    ref64, base32 = oracle_and_baseline(model)
    with backends.record() as seen:
        out = model(ids, mask, start_positions=start, end_positions=end)
    assert_auto_kernels(seen)

    def plain(m):
        logits = F.linear(plain_hidden(m, ids, mask), m.qa_outputs.weight, m.qa_outputs.bias)
        return logits[..., 0], logits[..., 1]

    (rs, re), (bs, be) = plain(ref64), plain(base32)
    keep = mask.bool()
    assert_parity(out.start_logits[keep], rs[keep], bs[keep], name="start logits", scaled=True)
    assert_parity(out.end_logits[keep], re[keep], be[keep], name="end logits", scaled=True)
    assert (out.start_logits[~keep] == torch.finfo(torch.float32).min).all()  # padding is never a span end
    assert (out.start_logits[rows].argmax(-1) < mask[rows].sum(-1)).all()
    # The loss reads non-empty rows only here (a fully padded row has no valid position).
    loss = model(ids[rows], mask[rows], start_positions=start[rows], end_positions=end[rows]).loss

    def plain_loss(m):
        s, e = plain(m)
        pad = ~keep[rows]
        s, e = s[rows].masked_fill(pad, float("-inf")), e[rows].masked_fill(pad, float("-inf"))
        return (F.cross_entropy(s, start[rows]) + F.cross_entropy(e, end[rows])) / 2

    lr, lb = plain_loss(ref64), plain_loss(base32)
    assert_parity(loss, lr, lb, name="loss", scaled=True)
    for t in (loss, lr, lb):
        t.backward()
    gf, gr, gb = grads(model), grads(ref64), grads(base32)
    assert_grads_parity(gf, gr, gb)
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        model(ids, mask, start_positions=start)


def test_mask_tokens_rates_and_rules():
    """15% of real, non-special tokens chosen; of those 80% [MASK], 10% random ordinary, 10% kept."""
    vocab, mask_id, specials = 50, 4, [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (400, 100), generator=g)
    ids[:, 0] = 1  # [CLS]
    attn = torch.ones_like(ids)
    attn[:, 80:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    masked, labels = mask_tokens(ids, attn, mask_token_id=mask_id, vocab_size=vocab, special_ids=specials,
                                 generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    eligible = (attn == 1) & (ids != 1)
    assert not chosen[~eligible].any() and torch.equal(masked[~eligible], ids[~eligible])
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum() / eligible.sum()
    assert abs(rate - 0.15) < 0.01, rate
    n = chosen.sum()
    to_mask = (masked == mask_id) & chosen
    kept = (masked == ids) & chosen
    changed = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    # A random replacement equals the original 1 time in 45 (ordinary ids 5..49): counted as kept.
    assert abs(changed.sum() / n - 0.1 * 44 / 45) < 0.015 and abs(kept.sum() / n - 0.1 * 46 / 45) < 0.015
    assert (masked[changed] >= 5).all(), "random replacements are never special tokens"
    again = mask_tokens(ids, attn, mask_token_id=mask_id, vocab_size=vocab, special_ids=specials,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_mask_tokens_errors():
    ids = torch.randint(5, 20, (2, 6))
    with pytest.raises(TypeError, match="input_ids should be a 2D integer tensor"):
        mask_tokens(ids.float(), mask_token_id=4, vocab_size=20)
    with pytest.raises(ValueError, match="attention_mask should have shape"):
        mask_tokens(ids, torch.ones(2, 5), mask_token_id=4, vocab_size=20)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, mask_token_id=4, vocab_size=20, probability=0.0)
    with pytest.raises(ValueError, match="mask_token_id and special_ids"):
        mask_tokens(ids, mask_token_id=20, vocab_size=20)
    with pytest.raises(ValueError, match="no ordinary"):
        mask_tokens(ids, mask_token_id=1, vocab_size=2, special_ids=[0])
