"""Drop-in parity: fastenc.TransformerEncoderLayer / TransformerEncoder vs torch.nn, shared weights.

fp32 on CPU (and CUDA when present), forward, input gradient and every parameter
gradient, for every backend this machine can run, by the parity rule: torch's module in
float64 is the oracle, torch in float32 the baseline, the atol scaled by the oracle's
magnitude.  Torch returns NaN for a query whose keys are all masked; fastenc returns zeros
from attention there, so in those cases fastenc's own module in float64 on the reference
backend is the oracle (and in float32 the baseline).
"""
import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc import reference
from fastenc.testing import assert_parity
from tests.conftest import DEVICE, ON_GPU, assert_grads_parity, pairwise

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


def in_dtype(masks, dtype):
    """The masks with float ones cast to dtype (torch adds an additive mask in the query's dtype)."""
    return tuple(m.to(dtype) if isinstance(m, torch.Tensor) and m.is_floating_point() else m for m in masks)


def oracle_and_baseline(torch_module, fast_module, has_fully_masked_rows):
    """(oracle in float64, baseline in float32, backend setting to run both under).

    torch's module where torch is defined; where a query sees no key torch returns NaN and fastenc zeros, so
    there fastenc's own module on the reference backend stands in (its ops are the reference's)."""
    module, setting = (fast_module, "reference") if has_fully_masked_rows else (torch_module, None)
    return copy.deepcopy(module).double(), copy.deepcopy(module).float(), setting


def run_with_grads(module, src, masks, cotangent, setting=None, **kw):
    """(output, d src, {name: d parameter}) of module on a fresh copy of src, in the module's dtype."""
    dtype = next(module.parameters()).dtype
    x = src.detach().to(dtype).requires_grad_(True)
    with fastenc.use_backend(setting) if setting else contextlib.nullcontext():
        out = run_layer(module, x, in_dtype(masks, dtype), **kw)
    (out * cotangent.to(dtype)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def check_layer(backend, batch_first, norm_first, activation, bias, mask_kind, train):
    """fastenc's layer on ``backend`` against torch's in float64 by the parity rule (baseline: torch in
    float32): output on real tokens, the input gradient and every parameter gradient."""
    torch.manual_seed(0)
    ref, fast = make_pair(batch_first, norm_first, activation, bias)
    ref.train(train)
    fast.train(train)
    masks = make_masks(mask_kind)
    src = _src(batch_first)
    keep = _row_mask(masks[1], batch_first)
    # Random cotangent on real tokens only: outputs at padding positions are not compared.
    w = torch.randn(src.shape, device=DEVICE) * keep[..., None]
    oracle_m, base_m, setting = oracle_and_baseline(ref, fast, masks[3])
    got = run_with_grads(fast, src, masks, w, backend, unpad=False if mask_kind.endswith("_padded") else None)
    oracle = run_with_grads(oracle_m, src, masks, w, setting)
    base = run_with_grads(base_m, src, masks, w, setting)
    assert_parity(got[0][keep], oracle[0][keep], base[0][keep], scaled=True, name="output")
    assert_parity(got[1], oracle[1], base[1], scaled=True, name="grad src")
    assert set(got[2]) == set(oracle[2])
    assert_grads_parity(got[2], oracle[2], base[2])


# Pairwise, not the full product (288 cases per backend): every pair of choices meets in some case.
GRID = pairwise([True, False], [False, True], ["relu", "gelu", "gelu_tanh"], [True, False], MASKS)


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


# Under the Triton interpreter every launch costs ~0.1 s: the same pairwise grid (36 cases; it had been 48 that
# crossed every mask kind with pre/post-norm and two fixed layout / bias / activation sets).
@pytest.mark.parametrize("batch_first,norm_first,activation,bias,mask_kind", GRID)
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
    """A 3-layer fastenc.TransformerEncoder against torch's in float64 (fastenc's own on the reference backend
    where a sequence is all padding: torch gives NaN there), baseline float32: output on real tokens, the input
    gradient and every parameter gradient."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, "gelu", batch_first=True, device=DEVICE)
    ref = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D, device=DEVICE) if norm else None,
                                enable_nested_tensor=False)
    fast = fastenc.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D, device=DEVICE) if norm else None)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    src_mask, kpm, is_causal, full = make_masks(mask_kind)
    keep = _row_mask(kpm, True)
    x = torch.randn(B, L, D, device=DEVICE)
    w = torch.randn_like(x) * keep[..., None]
    oracle_m, base_m, setting = oracle_and_baseline(ref, fast, full)

    def run(module, setting=None, **kw):
        dtype = next(module.parameters()).dtype
        xx = x.to(dtype).clone().requires_grad_(True)
        with fastenc.use_backend(setting) if setting else contextlib.nullcontext():
            out = module(xx, mask=src_mask, src_key_padding_mask=kpm, is_causal=is_causal or None, **kw)
        (out * w.to(dtype)).sum().backward()
        return out.detach(), xx.grad, dict((n, p.grad) for n, p in module.named_parameters())

    got = run(fast, unpad=False if mask_kind.endswith("_padded") else None)
    oracle, base = run(oracle_m, setting), run(base_m, setting)
    assert_parity(got[0][keep], oracle[0][keep], base[0][keep], scaled=True, name="encoder output")
    assert_parity(got[1], oracle[1], base[1], scaled=True, name="encoder grad src")
    assert_grads_parity(got[2], oracle[2], base[2])


def test_unbatched_input():
    ref, fast = make_pair(False, False, "relu", True)
    ref.eval()
    fast.eval()
    x = torch.randn(L, D, device=DEVICE)
    with torch.no_grad():
        assert_parity(fast(x), copy.deepcopy(ref).double()(x.double()), ref(x), scaled=True, name="unbatched")


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
    torch_layer = nn.TransformerEncoderLayer(D, H, FF, 0.0, torch.tanh, batch_first=True)
    torch_layer.load_state_dict(t.state_dict())
    assert_parity(out, copy.deepcopy(torch_layer).double()(x.double()), torch_layer(x), scaled=True,
                  name="tanh activation")


@pytest.mark.skipif(not ON_GPU, reason="CUDA parity of the whole layer needs a GPU (ops are checked on CPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_low_precision_cuda(dtype, norm_first):
    torch.manual_seed(0)
    ref, fast = make_pair(True, norm_first, "gelu", True, device="cuda")
    ref.eval()
    x = torch.randn(4, 513, D, device="cuda")
    kpm = torch.zeros(4, 513, dtype=torch.bool, device="cuda")
    kpm[0, 300:] = True
    keep = ~kpm
    fast = fast.to(dtype).eval()
    with torch.no_grad():
        out = fast(x.to(dtype), src_key_padding_mask=kpm)
        oracle = copy.deepcopy(ref).double()(x.double(), src_key_padding_mask=kpm)
        with fastenc.use_backend("reference"):
            base = copy.deepcopy(fast)(x.to(dtype), src_key_padding_mask=kpm)
    assert_parity(out[keep], oracle[keep], base[keep], scaled=True, name=f"layer {dtype}")
