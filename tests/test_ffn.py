"""Tests of fastenc.ops.ffn's extension backends (fastenc._C): "cpu" everywhere, "cuda" on a GPU.

Parity rule: the extension's error against the fp32 reference must stay within 2x the error
of the reference run in the same dtype (+ atol), for y and every gradient.
"""
import functools
import importlib
import os

import pytest
import torch

from fastenc import reference
from fastenc.backends import extension
from fastenc.ops._common import draw_seed
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
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cpu"), inputs, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_cpu_paths_agree_with_oracle(activation, dtype, monkeypatch):
    """The oneDNN path (auto) and ATen GEMMs (FASTENC_FFN_GEMM=unfused), with dropout and a residual."""
    for path in ("auto", "unfused"):
        monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, path)
        for p in (0.0, 0.2):
            inputs = _make((129,), 384, 776, dtype, "cpu", residual=True)
            x, w1, b1, w2, b2, r = inputs
            torch.manual_seed(77)
            seed = draw_seed(torch.device("cpu"))
            keep = ffn_mod.dropout_keep_mask(seed, 129, 776, p) if p else None
            torch.manual_seed(77)  # ffn draws the same seed
            run = functools.partial(ffn, x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r,
                                    backend="cpu")
            _check(run, inputs, activation, dropout_p=p, dropout_mask=keep)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_cpu_inference_parity(activation, dtype):
    """Without grad (fp16/bf16 on oneDNN fuse the GELUs into GEMM1), on both sides of the oneDNN size threshold."""
    for tokens in (2, 129):
        x, w1, b1, w2, b2, r = (t.detach() for t in _make((tokens,), 384, 776, dtype, "cpu", residual=True))
        with torch.no_grad():
            y = ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cpu")
        kw = dict(activation=activation, residual=r)
        y_ref = reference.ffn(x, w1, b1, w2, b2, upcast=True, **kw)
        y_base = reference.ffn(x, w1, b1, w2, b2, **kw)
        assert_parity(y, y_ref, y_base, rtol=2e-6 if dtype == torch.float32 else 0.0, name=f"y (T={tokens})")


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
    _check(lambda: ffn(x, w1, b1, w2, b2, activation="gelu", backend="cpu"), inputs, "gelu")


@pytest.mark.parametrize("activation", ACTS)
def test_cpu_inference_keeps_no_hidden(activation):
    """Without grad nothing is saved; in training relu keeps only h (its compact backward state)."""
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None for t in _make((7,), 384, 1000, torch.float32, "cpu"))
    seed = torch.zeros(1, dtype=torch.int64)
    y, h, pre = ffn_mod._forward(x, w1, b1, w2, b2, None, seed, activation, 0.0, "auto", False)
    assert h.numel() == 0 and pre.numel() == 0 and y.shape == x.shape
    y2, h, pre = ffn_mod._forward(x, w1, b1, w2, b2, None, seed, activation, 0.0, "auto", True)
    assert h.shape == (7, 1000)
    assert pre.numel() == (0 if activation == "relu" else 7 * 1000)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


# ----------------------------------------------------------------------------- dropout


def test_dropout_keep_rate_and_seeds():
    p = 0.3
    seed = draw_seed(torch.device("cpu"))
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
    seed = draw_seed(torch.device("cpu"))
    keep = ffn_mod.dropout_keep_mask(seed, 127, 1000, p)
    torch.manual_seed(1234)  # ffn draws the same seed
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r, backend="cpu"),
           inputs, activation, dropout_p=p, dropout_mask=keep)


def test_cpu_dropout_p_one_drops_everything():
    x, w1, b1, w2, b2, _ = _make((7,), 384, 1000, torch.float32, "cpu")
    y = ffn(x, w1, b1, w2, b2, dropout_p=1.0, backend="cpu")
    torch.testing.assert_close(y, b2.expand_as(y), rtol=0, atol=0)


# ----------------------------------------------------------------------------- gated (geglu, swiglu)

GATED = ("geglu", "swiglu")


def _make_gated(tokens_shape, d, f, dtype, device, bias=True, residual=False):
    """Inputs of a gated FFN with hidden width f: w1 [2f, d] (activated rows, then gate rows), w2 [d, f]."""
    x, w1, b1, _, b2, r = _make(tokens_shape, d, 2 * f, dtype, device, bias=bias, residual=residual)
    w2 = (torch.randn(d, f) / f**0.5).to(device=device, dtype=dtype).requires_grad_()
    return x, w1, b1, w2, b2, r


# (token shape, d, f, bias, residual): hidden widths not a multiple of the vector width.
GATED_CASES = [((1,), 64, 96, True, False), ((7,), 100, 37, False, True), ((3, 41), 96, 160, True, True)]


@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: f"T{c[0]}-d{c[1]}-f{c[2]}-b{int(c[3])}-r{int(c[4])}")
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", GATED)
def test_cpu_gated_parity(activation, dtype, case):
    shape, d, f, bias, residual = case
    inputs = _make_gated(shape, d, f, dtype, "cpu", bias=bias, residual=residual)
    x, w1, b1, w2, b2, r = inputs
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cpu"), inputs, activation)


@pytest.mark.parametrize("activation", GATED)
def test_cpu_gated_dropout_same_mask_forward_and_backward(activation):
    """The gated pass drops elements of the [T, f] hidden: the mask of ffn's dropout_keep_mask(T, f)."""
    p = 0.3
    inputs = _make_gated((131,), 64, 72, torch.float32, "cpu", residual=True)
    x, w1, b1, w2, b2, r = inputs
    torch.manual_seed(99)
    keep = ffn_mod.dropout_keep_mask(draw_seed(torch.device("cpu")), 131, 72, p)
    torch.manual_seed(99)
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r, backend="cpu"),
           inputs, activation, dropout_p=p, dropout_mask=keep)


def test_cpu_gated_saved_tensors_and_extremes():
    """Training keeps h [T, f] and pre [T, 2f], inference neither; SiLU's exp overflow gives finite zeros."""
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None
                            for t in _make_gated((5,), 64, 48, torch.float32, "cpu"))
    seed = torch.zeros(1, dtype=torch.int64)
    y, h, pre = ffn_mod._forward(x, w1, b1, w2, b2, None, seed, "swiglu", 0.0, "auto", True)
    assert h.shape == (5, 48) and pre.shape == (5, 96)
    y0, h0, pre0 = ffn_mod._forward(x, w1, b1, w2, b2, None, seed, "swiglu", 0.0, "auto", False)
    assert h0.numel() == 0 and pre0.numel() == 0
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    big = (x * 1e4).requires_grad_()  # pre-activations far beyond exp's range on both sides
    y = ffn(big, w1, b1, w2, b2, activation="swiglu", backend="cpu")
    (g,) = torch.autograd.grad(y.sum(), big)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("activation", ACTS + GATED)
def test_cpu_activation_pass_accuracy(activation):
    """The CPU activation pass (rational erf and tanh, common/activation_vec.h) on a dense grid of pre-activations
    against float64: within 3e-7 · max(1, |x|) (ATen's float32 GELU: 6e-8 · |x|).  W1 = I (gated: [I; I], so
    h = act(x) · x) makes the pre-activations exactly the grid."""
    d = 64
    grid = torch.linspace(-12, 12, 384 * d).reshape(384, d)
    gated = activation in GATED
    w1 = torch.eye(d).repeat(2 if gated else 1, 1)
    seed = torch.zeros(1, dtype=torch.int64)
    _, h, pre = ffn_mod._forward(grid, w1, None, torch.zeros(d, d), None, None, seed, activation, 0.0, "auto", True)
    x = torch.cat([grid] * (2 if gated else 1), 1)
    if pre.numel():  # ReLU's backward needs only h
        torch.testing.assert_close(pre, x, rtol=0, atol=0)
    exact = reference.apply_activation(x.double(), activation)
    bound = 3e-7 * grid.abs().clamp_min(1).double() * (grid.abs().double() if gated else 1)
    excess = (h.double() - exact).abs() - bound
    assert excess.max() <= 0, f"{activation}: error beyond the bound by {excess.max().item():.3g}"


def test_gated_bad_shapes_raise():
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None
                            for t in _make_gated((7,), 64, 48, torch.float32, "cpu"))
    with pytest.raises(ValueError, match=r"w2 must have shape \[64, 48\]"):
        ffn(x, w1, b1, torch.randn(64, 96), b2, activation="geglu", backend="cpu")
    with pytest.raises(ValueError, match="even row count"):
        ffn(x, w1[:95], b1[:95], w2, b2, activation="geglu", backend="cpu")
    with pytest.raises(ValueError, match="even row count"):
        extension().ffn_forward(x, w1[:95], None, w2, None, None, "geglu", 0.0, 0, "auto", False)
    with pytest.raises(ValueError, match=r"w2 must be \[d, f\] = \[64, 48\]"):
        extension().ffn_forward(x, w1, None, torch.randn(64, 96), None, None, "swiglu", 0.0, 0, "auto", False)
    with pytest.raises(ValueError, match="saved by a training forward"):
        extension().ffn_backward(x, x, w1, w2, torch.randn(7, 48), torch.randn(7, 48), "geglu", 0.0, 0, True, True,
                                 "auto")


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    x, w1, b1, w2, b2, _ = (t.detach() if t is not None else None for t in _make((7,), 384, 1000, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ffn(x, w1, b1, w2, b2, activation="swish", backend="cpu")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ffn(x, w1, b1, w2, b2, dropout_p=1.5, backend="cpu")
    with pytest.raises(ValueError, match=r"x must have shape \[7, 100\]"):
        ffn(x, w1[:, :100], b1, w2, b2, backend="cpu")
    with pytest.raises(ValueError, match=r"w2 must have shape \[384, 1000\]"):
        ffn(x, w1, b1, w2.t(), b2, backend="cpu")
    with pytest.raises(ValueError, match=r"b1 must have shape \[1000\]"):
        ffn(x, w1, b1[:-1], w2, b2, backend="cpu")
    with pytest.raises(ValueError, match=r"residual must have shape \[7, 384\]"):
        ffn(x, w1, b1, w2, b2, residual=x[:3], backend="cpu")
    with pytest.raises(TypeError, match="w1 .torch.float64, cpu. must match x"):
        ffn(x, w1.double(), b1, w2, b2, backend="cpu")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.float64"):
        ffn(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), backend="cpu")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        extension().ffn_forward(x.double(), w1.double(), None, w2.double(), None, None, "gelu", 0.0, 0, "auto", False)
    with pytest.raises(TypeError, match="b2 must be a Tensor"):
        ffn(x, w1, b1, w2, 3.0, backend="cpu")
    with pytest.raises(ValueError, match=r"f, d >= 1"):
        ffn(x[:, :0], w1[:, :0], b1, w2[:0], b2[:0], backend="cpu")
    bwd = extension().ffn_backward
    h, pre = torch.randn(7, 1000), torch.randn(7, 1000)
    with pytest.raises(TypeError, match="h has dtype"):
        bwd(x, x, w1, w2, h.half(), pre, "gelu", 0.0, 0, True, True, "auto")
    with pytest.raises(TypeError, match="pre has dtype"):
        bwd(x, x, w1, w2, h, pre.double(), "gelu", 0.0, 0, True, True, "auto")
    with pytest.raises(ValueError, match="saved by a training forward"):
        bwd(x, x, w1, w2, h, pre[:0], "gelu", 0.0, 0, True, True, "auto")


@pytest.mark.parametrize("activation", ACTS)
def test_cpu_no_tokens(activation):
    """x [0, d]: y is empty, weight gradients are zero (every GEMM path routes this to ATen)."""
    x, w1, b1, w2, b2, r = _make((0,), 384, 1000, torch.float32, "cpu", residual=True)
    y = ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cpu")
    assert y.shape == (0, 384)
    grads = torch.autograd.grad(y, (x, w1, b1, w2, b2, r), torch.randn_like(y))
    for g, t in zip(grads, (x, w1, b1, w2, b2, r)):
        assert g.shape == t.shape and not g.any()


def test_bad_gemm_path_env(monkeypatch):
    x, w1, b1, w2, b2, _ = _make((7,), 384, 1000, torch.float32, "cpu")
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "cublas-fast")
    with pytest.raises(ValueError, match="is not a GEMM path"):
        ffn(x, w1, b1, w2, b2, backend="cpu")
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "cublaslt")  # cannot run erf-GELU: reported, not raised
    path, why = ffn_mod.gemm_path("cuda", torch.bfloat16, activation="gelu")
    assert path == "error" and "'cublaslt' (FASTENC_FFN_GEMM) cannot run this call" in why


# ----------------------------------------------------------------------------- torch.compile


def test_cpu_torch_compile_fullgraph():
    x, w1, b1, w2, b2, r = _make((7,), 384, 520, torch.float32, "cpu", residual=True)

    def fn(x, w1, b1, w2, b2, r):
        return ffn(x, w1, b1, w2, b2, activation="gelu", residual=r, backend="cpu") * 2.0

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


def test_cpu_gemm_path_report(monkeypatch):
    """oneDNN's GEMMs with AVX-512, ATen's below it (faster there: csrc/linear/linear.h); the capped CI runs
    check the AVX2 side."""
    avx512 = extension().cpu_capability()["selected"] in ("avx512", "avx512_vnni", "avx512_bf16", "amx")
    path, why = ffn_mod.gemm_path("cpu", torch.float32)
    if avx512:
        assert path == "cpu" and "oneDNN" in why
    else:
        assert path == "unfused" and "slower than ATen's GEMMs below AVX-512" in why, why
    path, why = ffn_mod.gemm_path("cpu", torch.float16)
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        assert path == "unfused" and "no kernels for Half" in why
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "unfused")
    path, why = ffn_mod.gemm_path("cpu", torch.float32)
    assert path == "unfused" and "ATen" in why
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
    with pytest.raises(ValueError, match=r"'cublaslt' \(FASTENC_FFN_GEMM\) cannot run this call: .*tanh form"):
        plan("cuda", 90, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "cublaslt")
    with pytest.raises(ValueError, match="sm_90a only" if extension().cutlass_sm90_built() else "were not built"):
        plan("cuda", 80, "bfloat16", 768, 3072, "gelu", 0.0, False, True, "cutlass")
    with pytest.raises(ValueError, match="no library epilogue draws dropout"):
        plan("cuda", 90, "float16", 768, 3072, "relu", 0.5, True, True, "cublaslt")
    with pytest.raises(ValueError, match="float16/bfloat16 only"):
        plan("cuda", 90, "float32", 768, 3072, "relu", 0.0, True, True, "cublaslt")
    with pytest.raises(ValueError, match="multiples of 8"):
        plan("cuda", 90, "bfloat16", 770, 3080, "gelu_tanh", 0.0, True, True, "cublaslt")
    for act in GATED:  # ATen GEMMs + the GLU pass; a forced fused path is refused, never replaced
        assert plan("cuda", 90, "bfloat16", 768, 2304, act, 0.0, True, False, "auto")[0] == "unfused"
        with pytest.raises(ValueError, match="multiplies the gate"):
            plan("cuda", 90, "bfloat16", 768, 2304, act, 0.0, True, False, "cublaslt")


# ------------------------------------------------------------- cuBLASLt calls on a column-major model


def _colmajor(buf, rows, cols, ld):
    """The column-major rows x cols matrix that the flat buffer holds with leading dimension ld."""
    assert ld >= rows and (cols == 0 or ld * (cols - 1) + rows <= buf.numel()), (rows, cols, ld, buf.numel())
    return buf[torch.arange(rows)[:, None] + ld * torch.arange(cols)[None, :]]


def _colmajor_store(mat, ld, numel):
    buf = torch.full((numel,), float("nan"), dtype=mat.dtype)
    rows, cols = mat.shape
    buf[(torch.arange(rows)[:, None] + ld * torch.arange(cols)[None, :]).flatten()] = mat.flatten()
    return buf


def _lt_replay(desc, operands, bias=None, aux=None, out_numel=None):
    """What cuBLASLt computes for a descriptor: D = op(A) op(B) then the epilogue, on the flat
    buffers of the row-major operands.  Returns (flat D, flat aux or None, bias gradient or None)."""
    m, n, k = desc["m"], desc["n"], desc["k"]
    a = _colmajor(operands[desc["a_operand"]].flatten(), *((k, m) if desc["trans_a"] else (m, k)), desc["lda"])
    b = _colmajor(operands[desc["b_operand"]].flatten(), *((n, k) if desc["trans_b"] else (k, n)), desc["ldb"])
    op_a, op_b = (a.t() if desc["trans_a"] else a), (b.t() if desc["trans_b"] else b)
    d = op_a @ op_b
    ep, aux_out, bgrad = desc["epilogue"], None, None
    assert desc["bias"] == (bias is not None) or ep in ("DGELU_BGRAD", "BGRADB")
    if ep in ("BIAS", "RELU_BIAS", "GELU_BIAS", "GELU_AUX_BIAS"):
        assert bias.shape == (m,)  # cuBLASLt: bias length = rows of D, broadcast over its columns
        d = d + bias[:, None]
    if ep in ("GELU_AUX", "GELU_AUX_BIAS"):
        assert desc["ld_aux"] % 8 == 0 and desc["ld_aux"] >= m  # cuBLASLt's aux ld rule
        aux_out = _colmajor_store(d, desc["ld_aux"], desc["ld_aux"] * n)
    if ep in ("RELU", "RELU_BIAS"):
        d = reference.apply_activation(d, "relu")
    elif ep in ("GELU", "GELU_BIAS", "GELU_AUX", "GELU_AUX_BIAS"):
        d = reference.apply_activation(d, "gelu_tanh")
    elif ep in ("DGELU", "DGELU_BGRAD"):
        assert desc["ld_aux"] % 8 == 0 and desc["ld_aux"] >= m
        pre = _colmajor(aux.flatten(), m, n, desc["ld_aux"]).detach().requires_grad_()
        (dgelu,) = torch.autograd.grad(reference.apply_activation(pre, "gelu_tanh").sum(), pre)
        d = d * dgelu
        if ep == "DGELU_BGRAD":
            bgrad = d.sum(1)  # length m: summed over the columns of D
    elif ep == "BGRADB":
        bgrad = op_b.sum(0)  # length n: op(B) summed over the GEMM's k
    else:
        assert ep in ("DEFAULT", "BIAS"), ep
    return _colmajor_store(d, desc["ldd"], out_numel), aux_out, bgrad


@needs_cuda_build
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_cublaslt_descriptors_compute_the_ffn_gemms(has_bias):
    """Each cuBLASLt call's transposes, dims, leading dims and epilogue, replayed on a column-major
    model of cuBLASLt, give the row-major math the op needs (forward and backward GEMMs)."""
    describe = extension().ffn_lt_describe
    T, d, f = 7, 24, 40  # tokens odd; d, f multiples of 8 as the dispatch table requires
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, b1, w2, b2, res, dy = rnd(T, d), rnd(f, d), rnd(f), rnd(d, f), rnd(d), rnd(T, d), rnd(T, d)
    bias1, bias2 = (b1, b2) if has_bias else (None, None)
    pre = x @ w1.t() + (b1 if has_bias else 0)

    for ep, act in (("relu_bias", "relu"), ("gelu_bias", "gelu_tanh"), ("gelu_aux_bias", "gelu_tanh")):
        desc = describe("linear", T, f, d, has_bias, ep)  # GEMM1: h[T, f] = act(x W1^T + b1)
        assert desc["epilogue"] == {"relu_bias": "RELU", "gelu_bias": "GELU", "gelu_aux_bias": "GELU_AUX"}[ep] + (
            "_BIAS" if has_bias else "")
        h, aux, _ = _lt_replay(desc, {"a": x, "b": w1}, bias=bias1, out_numel=T * f)
        torch.testing.assert_close(h.view(T, f), reference.apply_activation(pre, act), rtol=1e-12, atol=1e-12)
        if ep == "gelu_aux_bias":
            torch.testing.assert_close(aux.view(T, f), pre, rtol=1e-12, atol=1e-12)  # pre, row-major [T, f]
        else:
            assert aux is None and desc["ld_aux"] == 0

    h = reference.apply_activation(pre, "gelu_tanh")
    desc = describe("linear", T, d, f, has_bias, "bias")  # GEMM2 with beta = 1, C = residual (D's layout)
    y, _, _ = _lt_replay(desc, {"a": h, "b": w2}, bias=bias2, out_numel=T * d)
    y = y.view(T, d) + res
    torch.testing.assert_close(y, h @ w2.t() + (b2 if has_bias else 0) + res, rtol=1e-12, atol=1e-12)

    desc = describe("dgelu_bgrad", T, f, d, has_bias)  # dpre[T, f] = (dy W2) * gelu'(pre), db1
    assert desc["epilogue"] == ("DGELU_BGRAD" if has_bias else "DGELU")
    dpre, _, db1 = _lt_replay(desc, {"g": dy, "w": w2}, aux=pre, out_numel=T * f)
    pre_leaf = pre.clone().requires_grad_()
    (dpre_ref,) = torch.autograd.grad(reference.apply_activation(pre_leaf, "gelu_tanh"), pre_leaf, dy @ w2)
    torch.testing.assert_close(dpre.view(T, f), dpre_ref, rtol=1e-12, atol=1e-12)
    if has_bias:
        torch.testing.assert_close(db1, dpre_ref.sum(0), rtol=1e-12, atol=1e-12)  # db1 [f] = sum over tokens
    else:
        assert db1 is None and not desc["bias"]

    desc = describe("wgrad_bgradb", T, d, f, has_bias)  # dW2[d, f] = dy^T h, db2 = sum over tokens of dy
    assert desc["epilogue"] == ("BGRADB" if has_bias else "DEFAULT")
    dw2, _, db2 = _lt_replay(desc, {"dy": dy, "h": h}, out_numel=d * f)
    torch.testing.assert_close(dw2.view(d, f), dy.t() @ h, rtol=1e-12, atol=1e-12)
    if has_bias:
        torch.testing.assert_close(db2, dy.sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert db2 is None and not desc["bias"]
    with pytest.raises(ValueError, match="unknown cuBLASLt GEMM"):
        describe("dgrad", T, d, f, has_bias)


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
            _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda"),  # noqa: B023
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
    seed = draw_seed(torch.device("cpu"))
    keep = ffn_mod.dropout_keep_mask(seed, 127, 3072, p, device="cuda")
    torch.testing.assert_close(keep.cpu(), ffn_mod.dropout_keep_mask(seed, 127, 3072, p))  # same Philox stream
    inputs = _make((127,), 768, 3072, torch.bfloat16, "cuda", residual=True)
    x, w1, b1, w2, b2, r = inputs
    torch.manual_seed(7)
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, dropout_p=p, residual=r, backend="cuda"),
           inputs, activation, dropout_p=p, dropout_mask=keep)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("activation", GATED)
def test_cuda_gated_parity(activation, dtype):
    # f = 1152 (ModernBERT-base): 16-byte packs; f = 37: the scalar kernels.
    for shape, d, f in (((4, 129), 768, 1152), ((7,), 96, 37)):
        for bias, residual in ((True, True), (False, False)):
            inputs = _make_gated(shape, d, f, dtype, "cuda", bias=bias, residual=residual)
            x, w1, b1, w2, b2, r = inputs
            _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda"),  # noqa: B023 (called in this iteration)
                   inputs, activation)


@gpu
@pytest.mark.parametrize("activation", GATED)
def test_cuda_gated_dropout_matches_cpu_mask(activation):
    p = 0.1
    torch.manual_seed(8)
    keep = ffn_mod.dropout_keep_mask(draw_seed(torch.device("cpu")), 127, 1152, p, device="cuda")
    inputs = _make_gated((127,), 768, 1152, torch.bfloat16, "cuda", residual=True)
    x, w1, b1, w2, b2, r = inputs
    torch.manual_seed(8)
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


@gpu
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_fp32_unfused(activation):
    """fp32 runs the handwritten passes (no fused path takes fp32) at fp32 accuracy: nvcc's
    --use_fast_math must not leak tanh.approx (fp16-level error) into gelu_tanh."""
    inputs = _make((127,), 384, 1000, torch.float32, "cuda", residual=True)
    x, w1, b1, w2, b2, r = inputs
    assert ffn_mod.gemm_path("cuda", torch.float32, d=384, f=1000, activation=activation)[0] == "unfused"
    _check(lambda: ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda"), inputs, activation)


@gpu
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_cuda_cublaslt_16byte_aligned_views(activation, monkeypatch):
    """Operands aligned to 16 bytes but not 256 (cuBLASLt's default assumption): the heuristic
    is told the real alignment, so the forced cuBLASLt path runs them (it raises if it cannot)."""
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "cublaslt")
    T, d, f = 33, 392, 1568  # row stride 784 bytes: x[1:] starts 16-byte aligned, not 32
    base = _make((T + 1,), d, f, torch.bfloat16, "cuda", residual=True)
    x = base[0].detach()[1:].requires_grad_()
    r = base[5].detach()[1:].requires_grad_()
    assert x.data_ptr() % 16 == 0 and x.data_ptr() % 32 != 0
    inputs = (x, base[1], base[2], base[3], base[4], r)
    _check(lambda: ffn(x, *inputs[1:5], activation=activation, residual=r, backend="cuda"), inputs, activation)


@gpu
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_no_tokens(activation, monkeypatch):
    for path in _gpu_paths(activation, torch.bfloat16):
        monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, path)
        x, w1, b1, w2, b2, r = _make((0,), 768, 3072, torch.bfloat16, "cuda", residual=True)
        y = ffn(x, w1, b1, w2, b2, activation=activation, residual=r, backend="cuda")
        assert y.shape == (0, 768)
        grads = torch.autograd.grad(y, (x, w1, b1, w2, b2, r), torch.randn_like(y))
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (x, w1, b1, w2, b2, r)))


@gpu
def test_cuda_int64_indexing_and_dropout_offsets(monkeypatch):
    """Hidden matrix of more than 2^31 elements through the handwritten passes: the last rows
    (flat index > 2^31, Philox block > 2^29) match the reference on those rows with the same
    mask rows, forward and dx (which depends on the tail rows only)."""
    monkeypatch.setenv(ffn_mod.GEMM_PATH_ENV, "unfused")
    T, d, f, p, tail = 2**31 // 4096 + 65, 8, 4096, 0.1, 64
    assert T * f > 2**31
    x, w1, b1, w2, b2, _ = _make((T,), d, f, torch.bfloat16, "cuda")
    torch.manual_seed(11)
    seed = draw_seed(torch.device("cpu"))
    keep_tail = ffn_mod.dropout_keep_mask(seed, T, f, p, device="cuda")[-tail:]
    torch.manual_seed(11)
    y = ffn(x, w1, b1, w2, b2, activation="gelu", dropout_p=p, backend="cuda")
    dy = torch.zeros_like(y)
    dy[-tail:] = torch.randn(tail, d, device="cuda", dtype=y.dtype)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    y_tail = y.detach()[-tail:].clone()
    del y
    xt = x.detach()[-tail:].requires_grad_()
    kw = dict(activation="gelu", dropout_p=p, dropout_mask=keep_tail)
    y_ref = reference.ffn(xt, w1, b1, w2, b2, upcast=True, **kw)
    y_base = reference.ffn(xt, w1, b1, w2, b2, **kw)
    assert_parity(y_tail, y_ref, y_base, name="y_tail")
    (dx_ref,) = torch.autograd.grad(y_ref, (xt,), dy[-tail:].float())
    (dx_base,) = torch.autograd.grad(y_base, (xt,), dy[-tail:])
    assert_parity(dx[-tail:], dx_ref, dx_base, name="dx_tail")
    assert not dx[:-tail].any()


@pytest.mark.parametrize("tokens,onednn", [(123, True), (7, False)])
def test_cpu_gated_gemms_follow_the_ungated_choice(tokens, onednn):
    """On CPU the gated FFN's GEMMs are oneDNN's inner products from 2^21 multiply-adds per GEMM (as the
    ungated path's), forward and fp32 backward; below that ATen's, and ATen's at every size below AVX-512."""
    from torch.profiler import ProfilerActivity, profile

    inputs = _make_gated((tokens,), 96, 160, torch.float32, "cpu", residual=True)
    x, w1, b1, w2, b2, r = inputs
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = ffn(x, w1, b1, w2, b2, activation="geglu", residual=r, backend="cpu")
        y.sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::_linear_pointwise"))
    onednn = onednn and extension().cpu_linear_preferred(torch.float32)
    assert calls == (6 if onednn else 0), f"{calls} oneDNN linear calls"
