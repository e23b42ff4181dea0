"""Backend selection: precedence, context manager, environment variable, errors, report."""
import pytest
import torch

import fastenc
from fastenc import backends


def test_default_is_auto_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested_backend("attention") == ("auto", False)
    assert backends.resolve("attention", device="cpu", dtype=torch.float32, head_dim=64) == "reference"
    assert backends.resolve("ffn", device="cpu", dtype=torch.float32) == "reference"


def test_precedence_module_over_context_over_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "attention=triton")
    assert backends.requested_backend("attention") == ("triton", True)
    with fastenc.use_backend("reference"):
        assert backends.requested_backend("attention") == ("reference", False)
        with fastenc.use_backend(ffn="cuda"):
            assert backends.requested_backend("ffn") == ("cuda", True)
            assert backends.requested_backend("attention") == ("reference", False)
        assert backends.requested_backend("attention", module_backend="auto") == ("auto", False)
    assert backends.requested_backend("layer_norm") == ("auto", False)


def test_env_var_forms(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend("ffn") == ("reference", False)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.requested_backend("ffn")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastenc.use_backend("fastest"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with fastenc.use_backend(softmax="triton"):
            pass


def test_forced_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 3, 2, 8)
    with fastenc.use_backend("triton"):
        with pytest.raises(fastenc.BackendUnavailableError, match="tensor is on CPU"):
            fastenc.ops.attention(q, q, q)


def test_backend_an_op_lacks(monkeypatch):
    """A global 'triton' lets the FFN (no Triton backend) run auto; naming it for the FFN is an error."""
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    with fastenc.use_backend("triton"):
        assert backends.explain("ffn", device="cpu", dtype=torch.float32)[0] == "reference"
        fastenc.ops.ffn(x, w1, None, w2, None, activation="relu")
    with fastenc.use_backend(ffn="triton"):
        with pytest.raises(fastenc.BackendUnavailableError, match="has no 'triton' backend"):
            fastenc.ops.ffn(x, w1, None, w2, None, activation="relu")


def test_report_lists_every_op():
    text = fastenc.backend_report(device="cpu")
    for op in ("attention", "layer_norm", "ffn"):
        assert op in text
    assert "available" in text


def test_auto_fallback_on_a_device_with_a_fast_backend_warns_once():
    """head_dim 300 has no Triton kernel (and CPU-only machines have no CUDA): auto says so, once."""
    backends._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="fastenc attention: falling back to the PyTorch reference"):
        chosen, why = backends.explain("attention", device="cuda", dtype=torch.float16, head_dim=300)
    assert chosen == "reference" and "triton" in why
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.explain("attention", device="cuda", dtype=torch.float16, head_dim=300)
