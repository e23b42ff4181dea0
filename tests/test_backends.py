"""Backend selection: precedence, context manager, environment variable, errors, caching, report."""
import warnings

import pytest
import torch

import fastenc
from fastenc import backends

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested_backend("attention") == ("auto", False)
    ext = backends.extension() is not None
    assert backends.resolve("ffn", None, CPU, torch.float32, ("gelu",)) == ("cpu" if ext else "reference")
    assert backends.resolve("padding", None, CPU, torch.float32) == "reference"


def test_precedence_call_over_context_over_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "attention=triton")
    assert backends.requested_backend("attention") == ("triton", True)
    with fastenc.use_backend("reference"):
        assert backends.requested_backend("attention") == ("reference", False)
        with fastenc.use_backend(ffn="cuda"):
            assert backends.requested_backend("ffn") == ("cuda", True)
            assert backends.requested_backend("attention") == ("reference", False)
        assert backends.requested_backend("attention", "auto") == ("auto", True)
    assert backends.requested_backend("layer_norm") == ("auto", False)


def test_env_var_forms(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend("ffn") == ("reference", False)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FASTENC_BACKEND: unknown backend 'bogus'"):
        backends.requested_backend("ffn")
    monkeypatch.setenv(backends.ENV_VAR, "atention=triton")  # a misspelt op is an error, not ignored
    with pytest.raises(ValueError, match="FASTENC_BACKEND: unknown op 'atention'; expected one of"):
        backends.requested_backend("ffn")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastenc.use_backend("fastest"):
            pass
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        with fastenc.use_backend(softmax="triton"):
            pass
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        fastenc.TransformerEncoderLayer(8, 2, 16, backend={"atention": "triton"})
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastenc.TransformerEncoderLayer(8, 2, 16, backend="fast")
    with pytest.raises(TypeError, match="backend must be None, a backend name or a dict"):
        fastenc.TransformerEncoderLayer(8, 2, 16, backend=3)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fastenc.ops.ffn(torch.randn(2, 4), torch.randn(8, 4), None, torch.randn(4, 8), None, backend="gpu")


def test_forced_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends.clear_cache()
    try:
        q = torch.randn(1, 3, 2, 8)
        with fastenc.use_backend("triton"):
            with pytest.raises(fastenc.BackendUnavailableError, match="tensor is on CPU"):
                fastenc.ops.attention(q, q, q)
    finally:
        monkeypatch.undo()
        backends.clear_cache()


def test_backend_an_op_lacks():
    """A default 'triton' lets the FFN (no Triton backend) run auto; naming it for the FFN raises, wherever."""
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    with fastenc.use_backend("triton"):
        chosen, why = backends.explain("ffn", None, CPU, torch.float32, ("relu",))
        assert "'triton' is not a backend of this op" in why
        fastenc.ops.ffn(x, w1, None, w2, None, activation="relu")
    with fastenc.use_backend(ffn="triton"):
        with pytest.raises(fastenc.BackendUnavailableError, match="has no 'triton' backend"):
            fastenc.ops.ffn(x, w1, None, w2, None, activation="relu")
    with pytest.raises(fastenc.BackendUnavailableError, match="has no 'triton' backend"):
        fastenc.ops.ffn(x, w1, None, w2, None, activation="relu", backend="triton")
    with pytest.raises(fastenc.BackendUnavailableError, match="attention: has no 'cuda' backend"):
        fastenc.ops.attention(x.view(1, 4, 2, 4), x.view(1, 4, 2, 4), x.view(1, 4, 2, 4), backend="cuda")
    layer = fastenc.TransformerEncoderLayer(8, 2, 16, batch_first=True, backend={"ffn": "triton"})
    with pytest.raises(fastenc.BackendUnavailableError, match="ffn: has no 'triton' backend"):
        layer(torch.randn(1, 3, 8))


def test_module_default_applies_to_the_ops_that_have_it():
    layer = fastenc.TransformerEncoderLayer(8, 2, 16, backend="triton")
    assert layer._backend("attention") == "triton" and layer._backend("ffn") == "auto"
    layer.backend = {"ffn": "reference"}
    assert layer._backend("ffn") == "reference" and layer._backend("attention") is None
    assert layer.backend == {"ffn": "reference"}


def test_decisions_are_cached():
    backends.clear_cache()
    first = backends.resolve("layer_norm", None, CPU, torch.float32, (768,))
    n = len(backends._DECISIONS)
    assert backends.resolve("layer_norm", None, CPU, torch.float32, (768,)) == first
    assert len(backends._DECISIONS) == n
    backends.resolve("layer_norm", None, CPU, torch.float32, (1024,))  # another shape class: a new entry
    assert len(backends._DECISIONS) == n + 1
    with pytest.raises(fastenc.BackendUnavailableError):  # a cached refusal raises every time
        backends.resolve("layer_norm", "cuda", CPU, torch.float32, (768,))
    with pytest.raises(fastenc.BackendUnavailableError):
        backends.resolve("layer_norm", "cuda", CPU, torch.float32, (768,))


def test_report_lists_every_op():
    text = fastenc.backend_report(device="cpu")
    for op in ("attention", "layer_norm", "ffn", "padding"):
        assert op in text
    assert "available" in text


def test_auto_fallback_on_a_device_with_a_fast_backend_warns_once():
    """head_dim 300 has no Triton kernel (and CPU-only machines have no CUDA): auto says so, once."""
    from fastenc._util import warn_once

    warn_once.cache_clear()
    with pytest.warns(UserWarning, match="fastenc attention: falling back to the PyTorch reference"):
        chosen, why = backends.explain("attention", None, CUDA, torch.float16, (300, 300, False, False, False))
    assert chosen == "reference" and "triton" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.explain("attention", None, CUDA, torch.float16, (300, 300, False, False, False))


def test_record_collects_the_backend_each_op_resolved_to():
    """record(): what ran, per op, inside the block only; nested blocks each see their calls; nothing is
    recorded (and the recorder list is empty) outside."""
    x = torch.randn(4, 8)
    w = torch.randn(8)
    with backends.record() as outer:
        fastenc.ops.residual_layer_norm(x, None, w, None, backend="reference")
        with backends.record() as inner:
            with fastenc.use_backend(layer_norm="reference"):
                fastenc.ops.residual_layer_norm(x, None, w, None)
            fastenc.ops.linear(x, torch.randn(3, 8), backend="reference")
    fastenc.ops.linear(x, torch.randn(3, 8), backend="reference")  # after the blocks: not recorded
    assert inner == {"layer_norm": {"reference"}, "linear": {"reference"}}
    assert outer == inner
    assert backends._RECORDERS == []
    if backends.extension() is not None:
        with backends.record() as seen:
            fastenc.ops.residual_layer_norm(x, None, w, None)
            fastenc.ops.residual_layer_norm(x, None, w, None, backend="reference")
        assert seen == {"layer_norm": {"cpu", "reference"}}
    with backends.record() as seen:  # a refused forced backend records nothing
        with pytest.raises(fastenc.BackendUnavailableError):
            fastenc.ops.ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, backend="triton")
    assert seen == {}
