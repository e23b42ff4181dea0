"""Tests of fastenc.ops.ffn's "cuda" backend (fastenc._C): CPU path everywhere, CUDA paths on a GPU.

Parity rule: the extension's error against the fp32 reference must stay within 2x the error
of the reference run in the same dtype (+ atol), for y and every gradient.
"""
import importlib
import os

import pytest
import torch

from fastenc import reference
from fastenc.backends import BackendUnavailableError, extension
from fastenc.testing import assert_parity
from tests.conftest import ON_GPU

ffn_mod = importlib.import_module("fastenc.ops.ffn")
ffn = ffn_mod.ffn

_SKIPPED_NATIVE = os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on")
pytestmark = pytest.mark.skipif(
    extension() is None and _SKIPPED_NATIVE, reason="fastenc._C deliberately not built (FASTENC_SKIP_NATIVE=1)"
)
ACTS = ("gelu", "gelu_tanh", "relu")


def _make(tokens_shape, d, f, dtype, device, bias=True, residual=False):
    """Fresh random inputs: x [*tokens_shape, d], nn.Linear-scaled weights, O(1) biases."""
    def leaf(t):
        return t.to(device=device, dtype=dtype).requires_grad_()

    x = leaf(torch.randn(*tokens_shape, d))
    w1 = leaf(torch.randn(f, d) / d**0.5)
    w2 = leaf(torch.randn(d, f) / f**0.5)
    b1 = leaf(torch.randn(f) * 0.5) if bias else None
    b2 = leaf(torch.randn(d) * 0.5) if bias else None
    r = leaf(torch.randn(*tokens_shape, d)) if residual else None
    return x, w1, b1, w2, b2, r


def _check(fast_fn, inputs, activation, dropout_p=0.0, dropout_mask=None, names=("x", "w1", "b1", "w2", "b2", "res")):
    """fast_fn() vs reference.ffn in fp32 (oracle) and in the same dtype (baseline), forward and backward.

    In fp32 the baseline is the oracle itself, so a summation-order rtol (of the largest
    reference magnitude) is all the slack there is.
    """
    x, w1, b1, w2, b2, r = inputs
    rtol = 2e-6 if x.dtype == torch.float32 else 0.0
    kw = dict(activation=activation, residual=r, dropout_p=dropout_p, dropout_mask=dropout_mask)
    y = fast_fn()
    y_ref = reference.ffn(x, w1, b1, w2, b2, upcast=True, **kw)
    y_base = reference.ffn(x, w1, b1, w2, b2, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_parity(y, y_ref, y_base, rtol=rtol, name="y")
    leaves = [(n, t) for n, t in zip(names, inputs) if t is not None]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for _, t in leaves], dy)
    grads_ref = torch.autograd.grad(y_ref, [t for _, t in leaves], dy.float())
    grads_base = torch.autograd.grad(y_base, [t for _, t in leaves], dy)
    for (name, _), g, g_ref, g_base in zip(leaves, grads, grads_ref, grads_base):
        assert_parity(g, g_ref, g_base, rtol=rtol, name="d" + name)


# ----------------------------------------------------------------------------- CPU path

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (token shape, d, f, bias, residual): odd token counts, hidden 384 / 768 / 1000.
CPU_CASES = [
    ((1,), 384, 1536, True, False),
    ((7,), 1000, 1000, False, True),
    ((127,), 768, 776, True, True),
    ((3, 7), 384, 520, False, False),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"T{c[0]}-d{c[1]}-f{c[2]}-b{int(c[3])}-r{int(c[4])}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_cpu_parity(activation, dtype, case):
    shape, d, f, bias, residual = case
    inputs = _make(shape, d, f, dtype, "cpu", bias=bias, residual=residual)
    x, w1, b1, w2, b2, r = inputs
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda"), inputs, activation)


def test_cpu_non_contiguous_inputs():
    d, f = 384, 1000
    x_t = torch.randn(d, 2, 7).requires_grad_()  # x = x_t.permute(1, 2, 0): [2, 7, d], strided
    w1_t = (torch.randn(d, f) / d**0.5).requires_grad_()  # w1 = w1_t.t(): [f, d], column-major
    w2 = (torch.randn(d, 2 * f) / f**0.5)[:, ::2].detach().requires_grad_()  # [d, f], stride 2
    b1 = torch.randn(f).requires_grad_()
    b2 = torch.randn(2 * d)[::2].detach().requires_grad_()
    x, w1 = x_t.permute(1, 2, 0), w1_t.t()
    assert not (x.is_contiguous() or w1.is_contiguous() or w2.is_contiguous() or b2.is_contiguous())
    inputs = (x, w1, b1, w2, b2, None)
    _check(lambda: ffn(x, w1, b1, w2, b2, activation="gelu", backend="cuda"), inputs, "gelu")


@pytest.mark.parametrize("activation", ACTS)
def test_cpu_inference_keeps_no_hidden(activation):
    """Without grad nothing is saved; in training relu keeps only h (its compact backward state)."""
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None for t in _make((7,), 384, 1000, torch.float32, "cpu"))
    seed = torch.zeros(1, dtype=torch.int64)
    y, h, pre = ffn_mod._ffn_fwd(x, w1, b1, w2, b2, None, seed, activation, 0.0, "auto", False)
    assert h.numel() == 0 and pre.numel() == 0 and y.shape == x.shape
    y2, h, pre = ffn_mod._ffn_fwd(x, w1, b1, w2, b2, None, seed, activation, 0.0, "auto", True)
    assert h.shape == (7, 1000)
    assert pre.numel() == (0 if activation == "relu" else 7 * 1000)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


# ----------------------------------------------------------------------------- dropout


def test_dropout_keep_rate_and_seeds():
    p = 0.3
    seed = ffn_mod.draw_dropout_seed()
    keep = ffn_mod.dropout_keep_mask(seed, 127, 1000, p)
    assert keep.dtype == torch.bool and keep.shape == (127, 1000)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.01, rate  # 127k draws: std of the rate is 0.0013
    other = ffn_mod.dropout_keep_mask(seed + 1, 127, 1000, p)
    assert (keep != other).float().mean().item() > 0.3  # a different seed draws a different mask
    torch.testing.assert_close(keep, ffn_mod.dropout_keep_mask(seed, 127, 1000, p))  # replayable
    assert not ffn_mod.dropout_keep_mask(seed, 7, 9, 1.0).any()
    assert ffn_mod.dropout_keep_mask(seed, 7, 9, 0.0).all()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dropout_same_mask_forward_and_backward(activation, dtype):
    """Replaying the seed's mask in the reference matches y and every gradient: the kernels
    drop the same elements in forward and backward and scale survivors by 1/(1-p)."""
    p = 0.25
    inputs = _make((127,), 384, 1000, dtype, "cpu", residual=True)
    x, w1, b1, w2, b2, r = inputs
    torch.manual_seed(1234)
    seed = ffn_mod.draw_dropout_seed()
    keep = ffn_mod.dropout_keep_mask(seed, 127, 1000, p)
    torch.manual_seed(1234)  # ffn draws the same seed
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r, backend="cuda"),
           inputs, activation, dropout_p=p, dropout_mask=keep)


def test_cpu_dropout_p_one_drops_everything():
    x, w1, b1, w2, b2, _ = _make((7,), 384, 1000, torch.float32, "cpu")
    y = ffn(x, w1, b1, w2, b2, dropout_p=1.0, backend="cuda")
    torch.testing.assert_close(y, b2.expand_as(y), rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None for t in _make((7,), 384, 1000, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ffn(x, w1, b1, w2, b2, activation="swish", backend="cuda")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ffn(x, w1, b1, w2, b2, dropout_p=1.5, backend="cuda")
    with pytest.raises(ValueError, match="x has last dim 384 but w1"):
        ffn(x, w1[:, :100], b1, w2, b2, backend="cuda")
    with pytest.raises(ValueError, match="w2 must be"):
        ffn(x, w1, b1, w2.t(), b2, backend="cuda")
    with pytest.raises(ValueError, match="b1 must be"):
        ffn(x, w1, b1[:-1], w2, b2, backend="cuda")
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ffn(x, w1, b1, w2, b2, residual=x[:3], backend="cuda")
    with pytest.raises(TypeError, match="w1 has dtype"):
        ffn(x, w1.double(), b1, w2, b2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float64 is not supported"):
        ffn(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), backend="cuda")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        extension().ffn_forward(x.double(), w1.double(), None, w2.double(), None, None, "gelu", 0.0, 0, "auto", False)
    with pytest.raises(TypeError, match="b2 must be a Tensor"):
        ffn(x, w1, b1, w2, 3.0, backend="cuda")


def test_bad_gemm_path_env(monkeypatch):
    x, w1, b1, w2, b2, _ = _make((7,), 384, 1000, torch.float32, "cpu")
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "cublas-fast")
    with pytest.raises(ValueError, match="is not a GEMM path"):
        ffn(x, w1, b1, w2, b2, backend="cuda")


# ----------------------------------------------------------------------------- torch.compile


def test_cpu_torch_compile_fullgraph():
    x, w1, b1, w2, b2, r = _make((7,), 384, 520, torch.float32, "cpu", residual=True)

    def fn(x, w1, b1, w2, b2, r):
        return ffn(x, w1, b1, w2, b2, activation="gelu", residual=r, backend="cuda") * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x, w1, b1, w2, b2, r)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, w1, b1, w2, b2, r)]
    for t in (x, w1, b1, w2, b2, r):
        t.grad = None
    y_eager = fn(x, w1, b1, w2, b2, r)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for g, t in zip(grads, (x, w1, b1, w2, b2, r)):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- dispatch table


def test_cpu_gemm_path_report():
    path, why = ffn_mod.gemm_path("cpu", torch.float32)
    assert path == "cpu" and "ATen" in why
    table = ffn_mod.dispatch_table()
    assert "sm_9x gelu:" in table and "sm_8x gelu_tanh:" in table


needs_cuda_build = pytest.mark.skipif(
    extension() is None or not extension().has_cuda(), reason="fastenc._C deliberately built without CUDA"
)


@needs_cuda_build
def test_dispatch_table_choices():
    """The table's picks and fallbacks for simulated GPUs (runs without a GPU)."""
    plan = extension().ffn_plan
    gelu90 = plan("cuda", 90, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "auto")
    assert gelu90[0] == ("cutlass" if extension().cutlass_sm90_built() else "unfused")
    assert plan("cuda", 90, "float16", 768, 3072, "gelu", 0.0, True, True, "auto")[0] == "unfused"
    assert plan("cuda", 80, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "auto")[0] == "unfused"
    assert plan("cuda", 90, "bfloat16", 768, 3072, "gelu_tanh", 0.0, True, True, "auto")[0] == "cublaslt"
    assert plan("cuda", 80, "float16", 768, 3072, "relu", 0.0, False, False, "auto")[0] == "cublaslt"
    path, why = plan("cuda", 90, "bfloat16", 768, 3072, "gelu_tanh", 0.1, True, True, "auto")
    assert path == "unfused" and "dropout" in why
    path, why = plan("cuda", 90, "bfloat16", 768, 3001, "relu", 0.0, False, True, "auto")
    assert path == "unfused" and "multiples of 8" in why
    assert plan("cuda", 90, "float32", 768, 3072, "relu", 0.0, False, True, "auto")[0] == "unfused"
    assert plan("cuda", 90, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "unfused")[0] == "unfused"
    with pytest.raises(ValueError, match="tanh form"):
        plan("cuda", 90, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "cublaslt")
    with pytest.raises(ValueError, match="sm_90a only"):
        plan("cuda", 80, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "cutlass")


# ----------------------------------------------------------------------------- CUDA (GPU only)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
GPU_DTYPES = [torch.bfloat16, torch.float16]


def _gpu_paths(activation, dtype):
    paths = ["auto", "unfused"]
    if activation != "gelu":
        paths.append("cublaslt")
    elif dtype == torch.bfloat16 and extension().cutlass_sm90_built() and torch.cuda.get_device_capability() == (9, 0):
        paths.append("cutlass")
    return paths


@gpu
@pytest.mark.parametrize("shape_d", [((1,), 384), ((7,), 768), ((127,), 1024), ((4, 129), 768), ((33,), 4096)],
                         ids=lambda c: f"T{c[0]}-d{c[1]}")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_parity(activation, dtype, shape_d, monkeypatch):
    shape, d = shape_d
    for path in _gpu_paths(activation, dtype):
        monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, path)
        for bias, residual in ((True, True), (False, False)):
            if path == "cutlass" and not bias:
                continue
            inputs = _make(shape, d, 4 * d, dtype, "cuda", bias=bias, residual=residual)
            x, w1, b1, w2, b2, r = inputs
            _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda"),
                   inputs, activation)


@gpu
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_odd_width_falls_back(activation):
    """f not a multiple of 8 (and a misaligned x view) take the unfused path and stay correct."""
    d, f = 384, 1001
    inputs = _make((7,), d, f, torch.bfloat16, "cuda")
    x, w1, b1, w2, b2, _ = inputs
    assert ffn_mod.gemm_path("cuda", torch.bfloat16, d=d, f=f, activation=activation)[0] == "unfused"
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, backend="cuda"), inputs, activation)
    buf = torch.randn(7 * d + 1, device="cuda", dtype=torch.bfloat16)
    x_odd = buf[1:].view(7, d).requires_grad_()  # 2-byte offset: not 16-byte aligned
    inputs = (x_odd, w1, b1, w2, b2, None)
    _check(lambda: ffn(x_odd, w1, b1, w2, b2, activation=activation, backend="cuda"), inputs, activation)


@gpu
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_dropout_matches_cpu_mask(activation):
    p = 0.1
    torch.manual_seed(7)
    seed = ffn_mod.draw_dropout_seed()
    keep = ffn_mod.dropout_keep_mask(seed, 127, 3072, p, device="cuda")
    torch.testing.assert_close(keep.cpu(), ffn_mod.dropout_keep_mask(seed, 127, 3072, p))  # same Philox stream
    inputs = _make((127,), 768, 3072, torch.bfloat16, "cuda", residual=True)
    x, w1, b1, w2, b2, r = inputs
    torch.manual_seed(7)
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r, backend="cuda"),
           inputs, activation, dropout_p=p, dropout_mask=keep)


@gpu
def test_cuda_large_tokens_bf16():
    inputs = _make((8, 512), 768, 3072, torch.bfloat16, "cuda", residual=True)
    x, w1, b1, w2, b2, r = inputs
    _check(lambda: ffn(x, w1, b1, w2, b2, activation="gelu", residual=r, backend="cuda"), inputs, "gelu")


@gpu
def test_cuda_torch_compile_fullgraph():
    x, w1, b1, w2, b2, _ = _make((7,), 768, 3072, torch.bfloat16, "cuda")
    compiled = torch.compile(lambda *a: ffn(*a, activation="gelu", backend="cuda"), fullgraph=True)
    y = compiled(x, w1, b1, w2, b2)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w1.grad).all()
    torch.testing.assert_close(y, ffn(x, w1, b1, w2, b2, activation="gelu", backend="cuda"), rtol=0, atol=0)
