"""The oracle itself: fastenc.reference agrees with independent PyTorch implementations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastenc import reference
from fastenc.testing import assert_close


@pytest.mark.parametrize("L,S,D", [(1, 1, 8), (7, 7, 32), (5, 9, 16)])
def test_attention_matches_sdpa(L, S, D):
    B, H = 2, 3
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    mask = torch.rand(B, H, L, S) < 0.3
    mask[..., 0] = False  # no fully masked row: SDPA returns NaN there
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, S // 2 + 1:] = True
    ours = reference.attention(q, k, v, attn_mask=mask, key_padding_mask=kpm)
    allowed = ~(mask | kpm[:, None, None, :])
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    assert_close(ours, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5, name="vs sdpa")
    causal = reference.attention(q, k, v, is_causal=True, scale=0.3)
    sdpa_c = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                            scale=0.3)
    assert_close(causal, sdpa_c.transpose(1, 2), atol=1e-5, rtol=1e-5, name="causal vs sdpa")


def test_attention_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = (torch.randn(2, 4, 2, 8, requires_grad=True) for _ in range(3))
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    out = reference.attention(q, k, v, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_attention_upcast_returns_fp32_and_dropout_mask():
    q = torch.randn(1, 5, 2, 8, dtype=torch.float16)
    assert reference.attention(q, q, q, upcast=True).dtype == torch.float32
    keep = torch.rand(1, 2, 5, 5) > 0.5
    a = reference.attention(q.float(), q.float(), q.float(), dropout_p=0.5, dropout_mask=keep)
    # Dropout with an all-kept mask is a plain 1/(1-p) scaling.
    full = reference.attention(q.float(), q.float(), q.float(), dropout_p=0.5, dropout_mask=torch.ones_like(keep))
    assert_close(full, 2 * reference.attention(q.float(), q.float(), q.float()), atol=1e-5, name="scale")
    assert not torch.allclose(a, full)


def test_varlen_equals_padded_and_unpad_round_trip():
    lengths = [1, 5, 3]
    B, Lmax, H, D = 3, 5, 2, 8
    kpm = torch.arange(Lmax)[None, :] >= torch.tensor(lengths)[:, None]
    x = torch.randn(B, Lmax, H, D)
    packed, idx, cu, mx = reference.unpad(x, kpm)
    assert packed.shape[0] == sum(lengths) and cu.tolist() == [0, 1, 6, 9] and mx == 5
    assert torch.equal(reference.pad(packed, idx, B, Lmax)[~kpm], x[~kpm])
    out_packed = reference.attention_varlen(packed, packed, packed, cu, cu)
    out_padded = reference.attention(x, x, x, key_padding_mask=kpm)
    assert_close(reference.pad(out_packed, idx, B, Lmax)[~kpm], out_padded[~kpm], atol=1e-6, name="varlen")


@pytest.mark.parametrize("prenorm", [False, True])
def test_residual_layer_norm(prenorm):
    x, br = torch.randn(6, 20), torch.randn(6, 20)
    w, b, bb = torch.randn(20), torch.randn(20), torch.randn(20)
    out = reference.residual_layer_norm(x, br, w, b, branch_bias=bb, eps=1e-6, prenorm=prenorm)
    s = x + br + bb
    ln = nn.LayerNorm(20, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    y = ln(s)
    if prenorm:
        assert_close(out[0], y, atol=1e-5, name="y")
        assert_close(out[1], s, atol=1e-6, name="residual")
    else:
        assert_close(out, y, atol=1e-5, name="y")


@pytest.mark.parametrize("act,torch_act", [("relu", nn.ReLU()), ("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh"))])
def test_ffn(act, torch_act):
    l1, l2 = nn.Linear(12, 30), nn.Linear(30, 12)
    x, r = torch.randn(7, 12), torch.randn(7, 12)
    out = reference.ffn(x, l1.weight, l1.bias, l2.weight, l2.bias, activation=act, residual=r)
    assert_close(out, l2(torch_act(l1(x))) + r, atol=1e-5, name=act)
    with pytest.raises(ValueError, match="unknown activation"):
        reference.apply_activation(x, "swish")


def test_window_matches_sdpa_with_a_band_mask():
    B, L, S, H, D = 2, 9, 12, 2, 8
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    for window, band in (((2, 3), (j >= i - 2) & (j <= i + 3)), ((-1, 0), j <= i), ((4, -1), j >= i - 4)):
        assert torch.equal(~reference.window_mask(L, S, window), band)
        ours = reference.attention(q, k, v, window=window)
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band)
        assert_close(ours, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5, name=f"window {window}")


def test_rotary_is_a_rotation_with_relative_scores():
    D, P = 16, 40
    cos, sin = reference.rotary_tables(reference.rotary_inv_freq(D, 10000.0), P)
    assert cos.shape == sin.shape == (P, D // 2) and cos.dtype == torch.float32
    x = torch.randn(1, P, 1, D, dtype=torch.float64)
    y = reference.rotary_embed(x, cos, sin)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6, name="norm kept")
    # q_i · k_j after rotation depends only on i - j: shifting both positions by 7 keeps the score.
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    pos = torch.tensor([3, 11, 10, 18])
    rq = reference.rotary_embed(q.expand(4, 1, D), cos, sin, positions=pos)
    rk = reference.rotary_embed(k.expand(4, 1, D), cos, sin, positions=pos)
    assert_close((rq[0] * rk[1]).sum(), (rq[2] * rk[3]).sum(), atol=1e-5, name="relative")


@pytest.mark.parametrize("act,fn", [("geglu", F.gelu), ("swiglu", F.silu)])
def test_gated_ffn_is_hf_modernbert_mlp(act, fn):
    wi, wo = nn.Linear(12, 2 * 30), nn.Linear(30, 12)
    x = torch.randn(7, 12)
    a, g = wi(x).chunk(2, dim=-1)  # HF ModernBertMLP: input, gate = Wi(x).chunk(2); Wo(act(input) * gate)
    out = reference.ffn(x, wi.weight, wi.bias, wo.weight, wo.bias, activation=act)
    assert_close(out, wo(fn(a) * g), atol=1e-5, name=act)
