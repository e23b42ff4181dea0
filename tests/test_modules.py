"""Drop-in parity: fastenc.TransformerEncoderLayer / TransformerEncoder vs torch.nn, shared weights.

fp32 on CPU (and CUDA when present), forward, input gradient and every parameter
gradient, for every backend this machine can run.  Torch returns NaN for a query
whose keys are all masked; fastenc returns zeros from attention there, so those
cases are checked against a fastenc twin run on every op's reference backend (the oracle) and
torch is compared on the other rows only.
"""
import copy
import itertools
import os

import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc import reference
from fastenc.testing import assert_close
from tests.conftest import DEVICE, ON_GPU

B, L, D, H, FF = 3, 7, 32, 4, 48

# Mask kinds; "*_padded" forces unpad=False (auto removes padding for a bool key padding mask).
MASKS = ["none", "bool_2d", "float_2d", "bool_3d", "kpm_bool", "kpm_bool_padded", "kpm_float", "kpm_and_2d",
         "causal", "kpm_causal", "full_pad", "full_pad_padded"]


def make_masks(kind, B=B, L=L, H=H, device=DEVICE):
    """(src_mask, key_padding_mask, is_causal, has_fully_masked_rows) for a mask kind."""
    g = torch.Generator().manual_seed(1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, L - 2:] = True  # ragged: the first sequence has 2 padding tokens
    kpm[1, 1:] = True  # the second has a single real token
    rand2d = torch.rand(L, L, generator=g) < 0.3
    rand2d.fill_diagonal_(False)  # every query keeps its own key: no fully masked rows
    rand3d = torch.rand(B * H, L, L, generator=g) < 0.3
    rand3d[:, torch.arange(L), torch.arange(L)] = False
    to = dict(device=device)
    kind = kind.removesuffix("_padded")
    if kind == "none":
        return None, None, False, False
    if kind == "bool_2d":
        return rand2d.to(**to), None, False, False
    if kind == "float_2d":
        return (torch.randn(L, L, generator=g) + reference.mask_to_bias(rand2d, torch.float32)).to(**to), None, False, False
    if kind == "bool_3d":
        return rand3d.to(**to), None, False, False
    if kind == "kpm_bool":
        return None, kpm.to(**to), False, False
    if kind == "kpm_float":
        return None, reference.mask_to_bias(kpm, torch.float32).to(**to), False, False
    if kind == "kpm_and_2d":
        return rand2d.to(**to), kpm.to(**to), False, False
    if kind == "causal":
        return nn.Transformer.generate_square_subsequent_mask(L).to(**to), None, True, False
    if kind == "kpm_causal":
        return nn.Transformer.generate_square_subsequent_mask(L).to(**to), kpm.to(**to), True, False
    if kind == "full_pad":
        full = kpm.clone()
        full[2, :] = True  # every key of the third sequence is padding
        return None, full.to(**to), False, True
    raise ValueError(kind)


def make_pair(batch_first, norm_first, activation, bias, dropout=0.0, device=DEVICE):
    torch_act = {"relu": "relu", "gelu": "gelu", "gelu_tanh": nn.GELU(approximate="tanh")}[activation]
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout, torch_act, 1e-5, batch_first, norm_first, bias, device=device)
    # Non-trivial norm parameters so their gradients and effects are visible.
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    fast = fastenc.TransformerEncoderLayer(D, H, FF, dropout, activation, 1e-5, batch_first, norm_first, bias,
                                           device=device)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def _src(batch_first, device=DEVICE):
    shape = (B, L, D) if batch_first else (L, B, D)
    return torch.randn(shape, device=device, requires_grad=True)


def _row_mask(kpm, batch_first):
    """Positions compared: the real tokens (padding positions are zeros once padding is removed)."""
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    if kpm is not None:
        keep = kpm == 0 if kpm.dtype != torch.bool else ~kpm
    return keep if batch_first else keep.t()


def run_layer(module, src, masks, **kw):
    src_mask, kpm, is_causal, _ = masks
    return module(src, src_mask=src_mask, src_key_padding_mask=kpm, is_causal=is_causal, **kw)


def check_layer(backend, batch_first, norm_first, activation, bias, mask_kind, train):
    torch.manual_seed(0)
    ref, fast = make_pair(batch_first, norm_first, activation, bias)
    ref.train(train)
    fast.train(train)
    masks = make_masks(mask_kind)
    src = _src(batch_first)
    keep = _row_mask(masks[1], batch_first)
    # Random cotangent on real tokens only: outputs at padding positions are not compared.
    w = torch.randn(src.shape, device=DEVICE) * keep[..., None]

    with fastenc.use_backend(backend):
        out = run_layer(fast, src, masks, unpad=False if mask_kind.endswith("_padded") else None)
    assert torch.isfinite(out).all(), "fastenc output has NaN/inf"
    (out * w).sum().backward()
    g_fast = {n: p.grad for n, p in fast.named_parameters()}
    gx_fast = src.grad
    assert torch.isfinite(gx_fast).all() and all(torch.isfinite(g).all() for g in g_fast.values())

    if masks[3]:
        # Oracle with zeros for fully masked queries: a fastenc twin of ref on every op's reference.
        src2 = src.detach().clone().requires_grad_(True)
        oracle = fastenc.optimize(copy.deepcopy(ref))
        with fastenc.use_backend("reference"):
            expected = run_layer(oracle, src2, masks)
        (expected * w).sum().backward()
        g_ref = {n: p.grad for n, p in oracle.named_parameters()}
        gx_ref = src2.grad
    else:
        src2 = src.detach().clone().requires_grad_(True)
        expected = run_layer(ref, src2, masks)
        (expected * w).sum().backward()
        g_ref = {n: p.grad for n, p in ref.named_parameters()}
        gx_ref = src2.grad

    assert_close(out[keep], expected[keep], atol=2e-5, rtol=1e-4, name="output")
    assert_close(gx_fast, gx_ref, atol=5e-5, rtol=1e-3, name="grad src")
    for n in g_fast:
        assert_close(g_fast[n], g_ref[n], atol=1e-4, rtol=1e-3, name=f"grad {n}")


GRID = list(itertools.product([True, False], [False, True], ["relu", "gelu", "gelu_tanh"], [True, False], MASKS))


@pytest.mark.parametrize("batch_first,norm_first,activation,bias,mask_kind", GRID)
def test_layer_matches_torch_reference_backend(batch_first, norm_first, activation, bias, mask_kind):
    check_layer("reference", batch_first, norm_first, activation, bias, mask_kind, train=True)


EXTENSION = "cuda" if DEVICE == "cuda" else "cpu"  # the extension's backend for this device's tensors


def _require_native():
    if fastenc.backends.extension() is None and os.environ.get("FASTENC_SKIP_NATIVE") == "1":
        pytest.skip("fastenc._C deliberately not built (FASTENC_SKIP_NATIVE=1)")


@pytest.mark.parametrize("batch_first,norm_first,activation,bias,mask_kind", GRID)
def test_layer_matches_torch_extension_backend(batch_first, norm_first, activation, bias, mask_kind):
    """Global 'cpu' (or 'cuda' on a GPU): the ops the extension implements run there, the rest on auto."""
    _require_native()
    check_layer(EXTENSION, batch_first, norm_first, activation, bias, mask_kind, train=True)


# Under the Triton interpreter every launch costs ~0.1 s, so the Triton grid crosses every
# mask kind with pre/post-norm, and pairs the layout, bias and activation choices (which
# only change strides and optional operands seen by the kernels) in two complementary sets.
TRITON_GRID = [(bf, nf, act, bias, m) for nf in (False, True) for m in MASKS
               for bf, act, bias in ((True, "relu", True), (False, "gelu_tanh", False))]


@pytest.mark.parametrize("batch_first,norm_first,activation,bias,mask_kind", TRITON_GRID)
def test_layer_matches_torch_triton_backend(batch_first, norm_first, activation, bias, mask_kind):
    """Global 'triton': attention, residual+LayerNorm and padding removal run the Triton kernels."""
    check_layer("triton", batch_first, norm_first, activation, bias, mask_kind, train=True)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_matches_torch_eval(norm_first, mask_kind):
    check_layer("auto", True, norm_first, "gelu", True, mask_kind, train=False)


def test_dropout_statistics_match_torch():
    """With dropout, outputs are random: their mean and spread over many draws match torch's."""
    torch.manual_seed(0)
    ref, fast = make_pair(True, False, "gelu", True, dropout=0.3)
    x = torch.randn(1, L, D, device=DEVICE)
    n = 400
    with torch.no_grad():
        outs_f = torch.stack([fast(x) for _ in range(n)])
        outs_t = torch.stack([ref(x) for _ in range(n)])
    mean_f, mean_t = outs_f.mean(0), outs_t.mean(0)
    std_f, std_t = outs_f.std(0), outs_t.std(0)
    assert std_f.mean() > 0.05, "dropout did not randomise the output"
    # Means agree within the sampling error (5 standard errors), spreads within 15%.
    stderr = torch.sqrt((std_f**2 + std_t**2) / n)
    assert ((mean_f - mean_t).abs() <= 5 * stderr + 1e-3).float().mean() > 0.99
    ratio = (std_f.mean() / std_t.mean()).item()
    assert 0.85 < ratio < 1.15, f"output spread ratio fastenc/torch = {ratio:.3f}"
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), fast(x)), "eval mode must be deterministic"


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "kpm_bool", "kpm_bool_padded", "causal", "kpm_causal", "full_pad"])
def test_encoder_matches_torch(norm, mask_kind):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=True, device=DEVICE)
    ref = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D, device=DEVICE) if norm else None,
                                enable_nested_tensor=False)
    fast = fastenc.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D, device=DEVICE) if norm else None)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    src_mask, kpm, is_causal, full = make_masks(mask_kind)
    keep = _row_mask(kpm, True)
    if full:
        keep &= ~kpm.all(dim=1, keepdim=True)  # torch gives NaN on the fully padded sequence
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    out = fast(x, mask=src_mask, src_key_padding_mask=kpm, unpad=False if mask_kind.endswith("_padded") else None)
    assert torch.isfinite(out).all()
    x2 = x.detach().clone().requires_grad_(True)
    expected = ref(x2, mask=src_mask, src_key_padding_mask=kpm, is_causal=is_causal or None)
    assert_close(out[keep], expected[keep], atol=3e-5, rtol=1e-4, name="encoder output")
    w = torch.randn_like(out) * keep[..., None]
    (out * w).sum().backward()
    (expected.nan_to_num() * w).sum().backward()
    if full:
        return  # torch's gradients are NaN-polluted by the fully padded sequence
    assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-3, name="encoder grad src")
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, atol=2e-4, rtol=1e-3, name=f"grad {n}")


def test_unbatched_input():
    ref, fast = make_pair(False, False, "relu", True)
    ref.eval()
    fast.eval()
    x = torch.randn(L, D, device=DEVICE)
    assert_close(fast(x), ref(x), atol=2e-5, rtol=1e-4, name="unbatched")


def test_state_dict_round_trip_both_ways():
    t = nn.TransformerEncoderLayer(D, H, FF, bias=False, norm_first=True)
    f = fastenc.TransformerEncoderLayer(D, H, FF, bias=False, norm_first=True)
    assert list(t.state_dict()) == list(f.state_dict())
    f.load_state_dict(t.state_dict(), strict=True)
    t.load_state_dict(f.state_dict(), strict=True)
    assert isinstance(f, nn.TransformerEncoderLayer)


def test_bad_input_errors():
    f = fastenc.TransformerEncoderLayer(D, H, FF, batch_first=True)
    x = torch.randn(B, L, D)
    with pytest.raises(ValueError, match="d_model"):
        f(torch.randn(B, L, D + 1))
    with pytest.raises(TypeError, match="floating-point"):
        f(torch.ones(B, L, D, dtype=torch.long))
    with pytest.raises(ValueError, match="src_key_padding_mask should have shape"):
        f(x, src_key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="2D src_mask"):
        f(x, src_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="3D src_mask"):
        f(x, src_mask=torch.zeros(B, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or float"):
        f(x, src_key_padding_mask=torch.zeros(B, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="divisible"):
        fastenc.TransformerEncoderLayer(30, 4)
    with pytest.raises(ValueError, match="activation"):
        fastenc.TransformerEncoderLayer(D, H, activation="swish")
    with pytest.raises(ValueError, match="unknown backend"):
        fastenc.TransformerEncoderLayer(D, H, backend="fast")


def test_custom_activation_runs_unfused_with_warning():
    t = nn.TransformerEncoderLayer(D, H, FF, 0.0, torch.tanh, batch_first=True)
    f = fastenc.optimize(t)
    assert f.activation_name is None
    x = torch.randn(B, L, D)
    with pytest.warns(UserWarning, match="no fused FFN"):
        out = f(x)
    assert_close(out, t(x), atol=2e-5, rtol=1e-4, name="tanh activation")


@pytest.mark.skipif(not ON_GPU, reason="CUDA parity of the whole layer needs a GPU (ops are checked on CPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_low_precision_cuda(dtype, norm_first):
    from fastenc.testing import assert_parity

    torch.manual_seed(0)
    ref, fast = make_pair(True, norm_first, "gelu", True, device="cuda")
    ref.eval()
    x = torch.randn(4, 513, D, device="cuda")
    kpm = torch.zeros(4, 513, dtype=torch.bool, device="cuda")
    kpm[0, 300:] = True
    with torch.no_grad(), fastenc.use_backend("reference"):  # fastenc twins of ref on every op's reference
        oracle = fastenc.optimize(copy.deepcopy(ref)).double()(x.double(), src_key_padding_mask=kpm)
        base = fastenc.optimize(copy.deepcopy(ref)).to(dtype)(x.to(dtype), src_key_padding_mask=kpm)
    fast = fast.to(dtype).eval()
    with torch.no_grad():
        out = fast(x.to(dtype), src_key_padding_mask=kpm)
    assert_parity(out, oracle, base, name=f"layer {dtype}")
