"""The encoder-stack op (fastenc.ops.encoder_stack): the C++ CPU stack against the reference, and its use
by fastenc.TransformerEncoder in inference."""
import pytest
import torch

import fastenc
from fastenc import backends, reference
from fastenc.ops import encoder as encoder_mod
from fastenc.testing import assert_parity

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _layers(n, d, f, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    out = []
    for _ in range(n):
        b = (lambda *s: r(*s, scale=0.1)) if bias else (lambda *s: None)
        out.append((r(3 * d, d, scale=d**-0.5), b(3 * d), r(d, d, scale=d**-0.5), b(d), r(f, d, scale=d**-0.5), b(f),
                    r(d, f, scale=f**-0.5), b(d), 1 + r(d, scale=0.1), r(d, scale=0.1) if bias else None,
                    1 + r(d, scale=0.1), r(d, scale=0.1) if bias else None))
    return out


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_first,activation,bias,causal", [
    (False, "gelu", True, False), (True, "relu", False, False), (False, "gelu_tanh", True, True),
    (True, "gelu", True, False)])
def test_cpu_stack_matches_reference(dtype, norm_first, activation, bias, causal):
    lengths = [7, 1, 0, 33, 12]
    d, H, f = 64, 4, 96
    x = torch.randn(sum(lengths), d).to(dtype)
    cu = _cu(lengths)
    layers = _layers(3, d, f, dtype, bias)
    final = (1 + torch.randn(d) * 0.1, torch.randn(d) * 0.1, 1e-6)
    kw = dict(nhead=H, norm_first=norm_first, activation=activation, eps=1e-5, final_norm=final, is_causal=causal)
    with torch.inference_mode():
        fast = fastenc.ops.encoder_stack(x, cu, max(lengths), layers, backend="cpu", **kw)
        ref = reference.encoder_stack(x, cu, layers, upcast=True, **kw)
        base = reference.encoder_stack(x, cu, layers, **kw)
    assert fast.dtype == dtype and fast.shape == x.shape
    assert_parity(fast, ref, base, name="encoder stack")


def test_cpu_stack_no_layers_and_no_tokens():
    x = torch.randn(5, 16)
    with torch.inference_mode():
        out = fastenc.ops.encoder_stack(x, _cu([2, 3]), 3, [], nhead=2, backend="cpu")
        torch.testing.assert_close(out, x)
        assert out.data_ptr() != x.data_ptr()
        empty = fastenc.ops.encoder_stack(x[:0], _cu([0, 0]), 0, _layers(2, 16, 32, torch.float32), nhead=2,
                                          backend="cpu")
    assert empty.shape == (0, 16)


def test_cpu_stack_refuses_autograd_and_bad_input():
    x = torch.randn(5, 16, requires_grad=True)
    layers = _layers(1, 16, 32, torch.float32)
    with pytest.raises(fastenc.BackendUnavailableError, match="inference only"):
        fastenc.ops.encoder_stack(x, _cu([5]), 5, layers, nhead=2, backend="cpu")
    x = x.detach()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="no sequence may exceed max_seqlen 4"):
            fastenc.ops.encoder_stack(x, _cu([5]), 4, layers, nhead=2, backend="cpu")
        with pytest.raises(ValueError, match="end at most at 5"):
            fastenc.ops.encoder_stack(x, _cu([3, 4]), 4, layers, nhead=2, backend="cpu")
        with pytest.raises(ValueError, match=r"layers\[0\].linear2.weight must have shape \[16, 32\]"):
            bad = list(layers[0])
            bad[6] = bad[6][:, :31]
            fastenc.ops.encoder_stack(x, _cu([5]), 5, [tuple(bad)], nhead=2, backend="cpu")
        with pytest.raises(ValueError, match="nhead must divide d_model 16"):
            fastenc.ops.encoder_stack(x, _cu([5]), 5, layers, nhead=3, backend="cpu")
        with pytest.raises(ValueError, match="activation must be one of"):
            fastenc.ops.encoder_stack(x, _cu([5]), 5, layers, nhead=2, activation="swish", backend="cpu")


def _count_stack_calls(monkeypatch) -> list:
    """A list that gets one entry per call of the C++ encoder stack."""
    calls, real = [], encoder_mod.extension()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def encoder_forward_cpu(self, *args):
            calls.append(1)
            return real.encoder_forward_cpu(*args)

    monkeypatch.setattr(encoder_mod, "extension", Spy)
    return calls


def _encoder(norm_first, activation="gelu"):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=activation, batch_first=True,
                                             norm_first=norm_first)
    ref = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(32), enable_nested_tensor=False).eval()
    return ref, fastenc.optimize(torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(32),
                                                             enable_nested_tensor=False).eval())


@pytest.mark.parametrize("norm_first", [False, True])
def test_module_inference_takes_the_fused_stack(norm_first, monkeypatch):
    ref, fast = _encoder(norm_first)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10, 32)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 4:] = True
    kpm[2, 1:] = True
    calls = _count_stack_calls(monkeypatch)
    with torch.inference_mode():
        out = fast(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
        dense = fast(x)
        expected_dense = ref(x)
    assert len(calls) == 2, "inference on CPU runs the whole stack in one C++ call"
    keep = ~kpm
    torch.testing.assert_close(out[keep], expected[keep], atol=2e-5, rtol=1e-4)
    assert not out[kpm].any(), "zeros at padding positions"
    torch.testing.assert_close(dense, expected_dense, atol=2e-5, rtol=1e-4)


def test_module_falls_back_per_op_when_needed(monkeypatch):
    """Training, a forced per-op backend, a dense mask or use_backend(encoder='reference') run layer by layer."""
    ref, fast = _encoder(False)
    x = torch.randn(2, 6, 32)
    calls = _count_stack_calls(monkeypatch)
    fast(x).sum()  # grad enabled, parameters require grad: autograd needs the per-op path
    with torch.inference_mode():
        with fastenc.use_backend(attention="reference"):
            fast(x)
        with fastenc.use_backend(encoder="reference"):
            fast(x)
        fast(x, mask=torch.zeros(6, 6))
        fast.train()
        fast(x)
    assert not calls, "the fused stack must not run here"


def test_single_layer_inference_is_one_call(monkeypatch):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True).eval()
    fast = fastenc.optimize(torch.nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True).eval())
    fast.load_state_dict(ref.state_dict())
    calls = _count_stack_calls(monkeypatch)
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    with torch.inference_mode():
        out = fast(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
    assert len(calls) == 1
    torch.testing.assert_close(out[~kpm], expected[~kpm], atol=2e-5, rtol=1e-4)


def test_packed_weights_are_cached_until_a_weight_changes():
    ref, fast = _encoder(False)
    x = torch.randn(2, 40, 32)
    with torch.inference_mode():
        first = fast(x)
        cache = fast.layers[0].__dict__["_onednn_cache"]["packed"]
        fast(x)
        assert fast.layers[0].__dict__["_onednn_cache"]["packed"] is cache  # reused
    with torch.no_grad():
        fast.layers[0].linear1.weight.mul_(2.0)  # an in-place update (as an optimizer step) repacks
    with torch.inference_mode():
        second = fast(x)
        assert fast.layers[0].__dict__["_onednn_cache"]["packed"] is not cache
    assert not torch.allclose(first, second)
    with torch.inference_mode(), fastenc.use_backend(encoder="reference"):
        torch.testing.assert_close(second, fast(x), atol=2e-5, rtol=1e-4)
    packed = fast.layers[0].__dict__["_onednn_cache"]["packed"][1]
    assert all(p.layout == torch._mkldnn for p in packed)
    assert "_onednn_cache" not in fastenc.to_torch(fast).layers[0].__dict__
