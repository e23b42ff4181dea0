"""fastenc.optimize / to_torch: same tensors, same state_dict keys, same outputs."""
import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc.testing import assert_close


class Classifier(nn.Module):
    """A user model with an encoder stack buried in it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
        self.body = nn.Sequential(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False))
        self.extra = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, kpm=None):
        h = self.body[0](self.embed(ids), src_key_padding_mask=kpm)
        return self.head(self.extra(h, src_key_padding_mask=kpm)[:, 0])


def test_optimize_keeps_outputs_keys_and_tensors():
    torch.manual_seed(0)
    model = Classifier().eval()
    ids = torch.randint(0, 50, (3, 9))
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1, 5:] = True
    expected = model(ids, kpm)
    keys = list(model.state_dict())
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}

    out_model = fastenc.optimize(model)
    assert out_model is model
    assert type(model.body[0]) is fastenc.TransformerEncoder
    assert all(type(layer) is fastenc.TransformerEncoderLayer for layer in model.body[0].layers)
    assert type(model.extra) is fastenc.TransformerEncoderLayer
    assert list(model.state_dict()) == keys
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs, "weights must be shared, not copied"
    assert_close(model(ids, kpm), expected, atol=2e-5, rtol=1e-4, name="optimized model")

    back = fastenc.to_torch(model)
    assert type(back.body[0]) is nn.TransformerEncoder
    assert type(back.extra) is nn.TransformerEncoderLayer
    assert list(back.state_dict()) == keys
    assert_close(back(ids, kpm), expected, atol=2e-5, rtol=1e-4, name="round trip")


def test_optimize_top_level_layer_and_backend():
    t = nn.TransformerEncoderLayer(16, 2, 32)
    f = fastenc.optimize(t, backend="reference")
    assert type(f) is fastenc.TransformerEncoderLayer and f.backend == "reference"
    assert f.self_attn is t.self_attn and f.linear1 is t.linear1
    assert type(fastenc.to_torch(f)) is nn.TransformerEncoderLayer
    with pytest.raises(ValueError, match="unknown backend"):
        fastenc.optimize(nn.TransformerEncoderLayer(16, 2, 32), backend="nope")


def test_optimize_training_gradients_match():
    torch.manual_seed(0)
    model = Classifier().train()
    ids = torch.randint(0, 50, (2, 6))
    model(ids).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fastenc.optimize(model)(ids).sum().backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-3, name=n)


def test_original_module_is_not_mutated():
    layer = nn.TransformerEncoderLayer(16, 2, 32)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    holder = nn.Sequential(enc)
    fastenc.optimize(holder)
    assert type(enc) is nn.TransformerEncoder and type(enc.layers[0]) is nn.TransformerEncoderLayer
    assert holder[0].layers[0].linear1 is enc.layers[0].linear1


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "padding-free"])
def test_optimize_torch_seq2seq_transformer(unpad):
    """fastenc.optimize(nn.Transformer(...)) converts its encoder (final LayerNorm included) and leaves the
    decoder to torch; with ragged source padding (memory_key_padding_mask) and a causal target mask, the
    output and every parameter gradient match the torch model (fp64 reference, fp32 baseline)."""
    from fastenc.testing import assert_parity

    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
                           dropout=0.0, activation="gelu", batch_first=True)
    ref, base = copy_of(model).double(), copy_of(model)
    fast = fastenc.optimize(copy_of(model))
    assert type(fast.encoder) is fastenc.TransformerEncoder and type(fast.decoder) is nn.TransformerDecoder
    assert list(fast.state_dict()) == list(model.state_dict())
    fast.encoder.unpad = unpad
    src, tgt = torch.randn(4, 9, 32), torch.randn(4, 6, 32)
    src_pad = torch.arange(9)[None, :] >= torch.tensor([9, 1, 5, 3])[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(6).isinf()
    outs = [m.train()(x.to(dtype), tgt.to(dtype), tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                      memory_key_padding_mask=src_pad)
            for m, x, dtype in ((ref, src, torch.float64), (base, src, torch.float32), (fast, src, torch.float32))]
    assert_parity(outs[2], outs[0], outs[1], name="decoder output")
    weight = torch.randn(4, 6, 32)
    for o in outs:
        (o * weight.to(o.dtype)).sum().backward()
    grads = [dict(m.named_parameters()) for m in (ref, base, fast)]
    for name in grads[0]:
        assert_parity(grads[2][name].grad, grads[0][name].grad, grads[1][name].grad, name=f"grad {name}")


def copy_of(model):
    import copy

    return copy.deepcopy(model)
