"""Padding-free path: packed (unpadded) computation equals the padded one on every real token."""
import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc import ops, reference
from fastenc.testing import assert_close
from tests.conftest import DEVICE, TRITON_DTYPES

D, H, FF = 32, 4, 64


def ragged_mask(lengths, L, device=DEVICE):
    """bool [B, L], True = padding, with sequence b holding lengths[b] real tokens."""
    return torch.arange(L, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]


BATCHES = {
    "ragged_with_len1": ([1, 5, 3, 7], 7),
    "one_full_rest_short": ([9, 1, 2, 1], 9),
    "left_and_middle_padding": (None, 6),
}


def make_kpm(name):
    lengths, L = BATCHES[name]
    if lengths is not None:
        return ragged_mask(lengths, L)
    kpm = torch.zeros(3, L, dtype=torch.bool, device=DEVICE)
    kpm[0, :2] = True  # left padding
    kpm[1, 2:4] = True  # a hole in the middle
    return kpm


def test_padding_info_and_round_trip():
    kpm = make_kpm("ragged_with_len1")
    info = ops.padding_info(kpm)
    assert info.cu_seqlens.tolist() == [0, 1, 6, 9, 16] and info.max_seqlen == 7 and info.total == 16
    assert abs(info.padding_ratio - (1 - 16 / 28)) < 1e-9
    _, idx_ref, cu_ref, max_ref = reference.unpad(torch.zeros(4, 7, 1, device=DEVICE), kpm)
    assert torch.equal(info.indices, idx_ref) and torch.equal(info.cu_seqlens, cu_ref) and info.max_seqlen == max_ref


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("width", [(1,), (37,), (3, 40)])
def test_unpad_pad_ops_and_gradients(backend, dtype, width):
    kpm = make_kpm("left_and_middle_padding")
    info = ops.padding_info(kpm)
    x = torch.randn(3, 6, *width, device=DEVICE, dtype=dtype, requires_grad=True)
    with fastenc.use_backend(padding=backend):
        packed = ops.unpad(x, info)
        g = torch.randn_like(packed)
        restored = ops.pad(packed * 2, info)
    assert torch.equal(packed, x.detach().reshape(18, *width)[info.indices])
    assert torch.equal(restored[~kpm], 2 * x.detach()[~kpm]) and not restored[kpm].any()
    (packed * g).sum().backward()
    expected = reference.pad(g, info.indices, 3, 6)
    assert torch.equal(x.grad, expected)


def test_pad_errors():
    info = ops.padding_info(make_kpm("ragged_with_len1"))
    with pytest.raises(ValueError, match="expected 16 rows"):
        ops.pad(torch.zeros(15, 4, device=DEVICE), info)
    with pytest.raises(ValueError, match="unpad: expected"):
        ops.unpad(torch.zeros(4, 8, 4, device=DEVICE), info)
    with pytest.raises(TypeError, match="bool key padding mask"):
        ops.padding_info(torch.zeros(2, 3, device=DEVICE))


def _compare(module_fn, kpm, x, params):
    """Run padded and unpadded with a cotangent on real tokens; compare outputs and all gradients."""
    keep = ~kpm
    w = torch.randn(x.shape, device=DEVICE) * keep[..., None]
    results = []
    for unpad in (False, True):
        xi = x.detach().clone().requires_grad_(True)
        for p in params:
            p.grad = None
        out = module_fn(xi, unpad)
        assert torch.isfinite(out).all()
        (out * w).sum().backward()
        results.append((out, xi.grad, [p.grad.clone() for p in params]))
    (o_pad, gx_pad, gp_pad), (o_unp, gx_unp, gp_unp) = results
    assert not o_unp[kpm].any(), "padding positions are zeros in the padding-free path"
    assert_close(o_unp[keep], o_pad[keep], atol=2e-5, rtol=1e-4, name="output on real tokens")
    assert_close(gx_unp, gx_pad, atol=5e-5, rtol=1e-3, name="grad input")
    for i, (a, b) in enumerate(zip(gp_unp, gp_pad)):
        assert_close(a, b, atol=1e-4, rtol=1e-3, name=f"grad param {i}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("norm_first,causal", [(False, False), (True, False), (False, True)])
def test_layer_unpadded_equals_padded(backend, batch, norm_first, causal):
    torch.manual_seed(0)
    layer = fastenc.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=True, norm_first=norm_first,
                                            device=DEVICE)
    kpm = make_kpm(batch)
    x = torch.randn(*kpm.shape, D, device=DEVICE)
    with fastenc.use_backend(backend):
        _compare(lambda xi, unpad: layer(xi, src_key_padding_mask=kpm, is_causal=causal, unpad=unpad), kpm, x,
                 list(layer.parameters()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_encoder_unpadded_equals_padded(backend, batch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=True, device=DEVICE)
    enc = fastenc.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D, device=DEVICE))
    kpm = make_kpm(batch)
    x = torch.randn(*kpm.shape, D, device=DEVICE)
    with fastenc.use_backend(backend):
        _compare(lambda xi, unpad: enc(xi, src_key_padding_mask=kpm, unpad=unpad), kpm, x, list(enc.parameters()))


def test_seq_first_layout_and_forward_unpadded():
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, device=DEVICE)  # batch_first=False
    enc = fastenc.TransformerEncoder(layer, 2)
    kpm = make_kpm("ragged_with_len1")
    x = torch.randn(kpm.shape[1], kpm.shape[0], D, device=DEVICE)
    padded = enc(x, src_key_padding_mask=kpm, unpad=False)
    unpadded = enc(x, src_key_padding_mask=kpm, unpad=True)
    keep = (~kpm).t()
    assert_close(unpadded[keep], padded[keep], atol=2e-5, rtol=1e-4, name="seq-first")
    hidden, info = enc.forward_unpadded(x, kpm)
    assert hidden.shape == (info.total, D) and info.cu_seqlens[-1].item() == info.total
    assert_close(ops.pad(hidden, info).transpose(0, 1), unpadded, atol=1e-6, name="packed output")


def test_auto_threshold_and_forcing():
    layer = fastenc.TransformerEncoderLayer(D, H, FF, 0.0, batch_first=True, device=DEVICE).eval()
    x = torch.randn(2, 20, D, device=DEVICE)
    little = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    little[0, -1] = True  # 2.5% padding: below the threshold, auto keeps the padded layout
    assert fastenc.stack.UNPAD_MIN_PADDING > 0.025
    assert layer(x, src_key_padding_mask=little)[0, -1].abs().sum() > 0
    assert layer(x, src_key_padding_mask=little, unpad=True)[0, -1].abs().sum() == 0
    much = ragged_mask([5, 20], 20)
    assert layer(x, src_key_padding_mask=much)[0, -1].abs().sum() == 0
    with pytest.raises(ValueError, match="unpad=True needs a bool src_key_padding_mask"):
        layer(x, src_mask=torch.zeros(20, 20, dtype=torch.bool, device=DEVICE), src_key_padding_mask=much, unpad=True)
    float_kpm = reference.mask_to_bias(much, torch.float32)
    assert layer(x, src_key_padding_mask=float_kpm)[0, -1].abs().sum() > 0  # float masks stay padded


def test_dropout_runs_on_packed_tokens():
    layer = fastenc.TransformerEncoderLayer(D, H, FF, 0.2, batch_first=True, device=DEVICE).train()
    kpm = make_kpm("ragged_with_len1")
    x = torch.randn(*kpm.shape, D, device=DEVICE, requires_grad=True)
    out = layer(x, src_key_padding_mask=kpm, unpad=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert not torch.equal(out, layer(x, src_key_padding_mask=kpm, unpad=True)), "dropout must randomise"
