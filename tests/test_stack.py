"""The stack executor (fastenc/stack.py): one composition of the layer for every front end, the decision
"fused or op by op" made once per call, and what each path gives."""
import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc import backends, stack
from fastenc.ops import encoder as encoder_op
from fastenc.testing import assert_parity
from fastenc.weight_cache import cache_of
from tests.layer_cases import cu_seqlens, random_layer

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _count_fused_calls(monkeypatch) -> list:
    """A list that gets one entry per call of the C++ encoder stack."""
    calls, real = [], encoder_op.forward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(encoder_op, "forward", spy)
    return calls


def _encoder(norm_first, activation="gelu", layers=2, d=32):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    ref = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False).eval()
    fast = fastenc.optimize(nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d),
                                                  enable_nested_tensor=False).eval())
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("norm_first", [False, True])
def test_module_inference_takes_the_fused_stack(norm_first, monkeypatch):
    ref, fast = _encoder(norm_first)
    x = torch.randn(3, 10, 32)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 4:] = True
    kpm[2, 1:] = True
    calls = _count_fused_calls(monkeypatch)
    with torch.inference_mode():
        out = fast(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
        dense = fast(x)
        expected_dense = ref(x)
    assert len(calls) == 2, "inference on CPU runs the whole stack in one C++ call"
    assert cache_of(fast).last_decision[0] == "fused"
    assert "TransformerEncoder: fused (" in fastenc.backend_report("cpu", model=fast)
    keep = ~kpm
    torch.testing.assert_close(out[keep], expected[keep], atol=2e-5, rtol=1e-4)
    assert not out[kpm].any(), "zeros at padding positions"
    torch.testing.assert_close(dense, expected_dense, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case,why", [
    ("grad", "autograd needs the per-op path"),
    ("attention=reference", "attention is set to 'reference'"),
    ("encoder=reference", "the encoder op is set to 'reference'"),
    ("dense mask", "a dense src_mask"),
    ("unpad=False", "a dense src_mask or a float / kept key padding mask"),
    ("train", "training mode"),
    ("autocast", "torch.autocast is on"),
    ("custom activation", "has no kernel"),
])
def test_per_op_when_the_fused_stack_cannot_run(case, why, monkeypatch):
    """Each reason to run op by op is decided in one place and recorded for the report."""
    ref, fast = _encoder(False, activation=torch.sigmoid if case == "custom activation" else "gelu")
    x = torch.randn(2, 6, 32)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 3:] = True
    calls = _count_fused_calls(monkeypatch)
    if case == "grad":
        fast(x).sum()  # grad enabled, parameters require grad
    else:
        with torch.inference_mode():
            if case.endswith("=reference"):
                op, _, b = case.partition("=")
                with fastenc.use_backend(**{op: b}):
                    fast(x)
            elif case == "dense mask":
                fast(x, mask=torch.zeros(6, 6))
            elif case == "unpad=False":
                fast(x, src_key_padding_mask=kpm, unpad=False)
            elif case == "train":
                fast.train()(x)
            elif case == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fast(x)
            else:
                fast(x)
    assert not calls, "the fused stack must not run here"
    path, reason = cache_of(fast).last_decision
    assert path == "per-op" and why in reason
    report = fastenc.backend_report("cpu", model=fast)
    assert "fastenc backends for device=cpu" in report and f"per-op ({reason})" in report


def test_named_cpu_encoder_raises_instead_of_running_per_op():
    ref, fast = _encoder(False)
    with torch.inference_mode(), fastenc.use_backend(encoder="cpu"):
        with pytest.raises(fastenc.BackendUnavailableError, match="a dense src_mask"):
            fast(torch.randn(2, 6, 32), mask=torch.zeros(6, 6))


def test_single_layer_inference_is_one_call(monkeypatch):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True).eval()
    fast = fastenc.optimize(nn.TransformerEncoderLayer(32, 4, 64, activation="gelu", batch_first=True).eval())
    fast.load_state_dict(ref.state_dict())
    calls = _count_fused_calls(monkeypatch)
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    with torch.inference_mode():
        out = fast(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
    assert len(calls) == 1
    torch.testing.assert_close(out[~kpm], expected[~kpm], atol=2e-5, rtol=1e-4)


def test_per_op_path_on_reference_ops_is_the_reference():
    """The per-op composition with every op on "reference" (the stack's oracle) matches torch's own layer,
    pre- and post-norm, ungated activations, with a padding mask (rows with real tokens)."""
    for norm_first in (False, True):
        ref, fast = _encoder(norm_first)
        x = torch.randn(3, 7, 32)
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[0, 4:] = True
        with torch.no_grad(), fastenc.use_backend("reference"):
            out = fast(x, src_key_padding_mask=kpm)
            expected = ref(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(out[~kpm], expected[~kpm], atol=2e-5, rtol=1e-4)
        assert cache_of(fast).last_decision[0] == "per-op"


def test_hidden_states_and_callable_final_norm(monkeypatch):
    """Per-layer outputs come from the per-op path; a final norm that is not a LayerNorm runs in PyTorch on the
    real tokens, after the fused stack."""
    ref, fast = _encoder(True)
    fast.norm = ref.norm = nn.RMSNorm(32)
    x = torch.randn(2, 5, 32)
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])
    calls = _count_fused_calls(monkeypatch)
    with torch.inference_mode():
        out = fast(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
    assert len(calls) == 1
    torch.testing.assert_close(out[~kpm], expected[~kpm], atol=2e-5, rtol=1e-4)
    with torch.inference_mode():
        res = fast.run(x, None, kpm, False, hidden_states=True)
    assert len(res.hidden_states) == 3 and len(calls) == 1  # input + two layers, per op
    torch.testing.assert_close(res.last[~kpm], expected[~kpm], atol=2e-5, rtol=1e-4)


def test_functional_stack_reference_and_fused_agree_on_mixed_layers():
    """Layers of one stack may differ (norm placement, activation, window, rotary): the C++ stack takes a
    spec per layer."""
    g = torch.Generator().manual_seed(3)
    layers = [random_layer(64, 4, 96, norm_first=True, activation="swiglu", rotary=True, generator=g),
              random_layer(64, 4, 128, norm_first=False, activation="relu", window=(3, 2), generator=g),
              random_layer(64, 8, 96, norm_first=True, activation="gelu", bias=False, attn_norm=False, generator=g)]
    lengths = [9, 17, 1]
    x = torch.randn(sum(lengths), 64)
    with torch.inference_mode():
        fast = fastenc.encoder_stack(x, cu_seqlens(lengths), 17, layers, backend="cpu")
        ref = fastenc.encoder_stack(x.double(), cu_seqlens(lengths), 17,
                                    [(s, type(w)(*(None if t is None else t.double() for t in w.tensors())))
                                     for s, w in layers], backend="reference")
        base = fastenc.encoder_stack(x, cu_seqlens(lengths), 17, layers, backend="reference")
    assert_parity(fast, ref, base, name="mixed stack")


def test_padding_plan_policy():
    kpm = torch.zeros(4, 10, dtype=torch.bool)
    assert stack.padding_plan(None, None, kpm) is None  # no padding: auto keeps the layout
    kpm[:, 5:] = True
    assert stack.padding_plan(None, None, kpm).total == 20
    assert stack.padding_plan(False, None, kpm) is None
    with pytest.raises(ValueError, match="unpad=True needs a bool src_key_padding_mask"):
        stack.padding_plan(True, torch.zeros(4, 1, 10, 10), kpm)
