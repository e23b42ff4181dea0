"""The linear op (fastenc/ops/linear.py): y = x Wᵀ + b, forward and every gradient, on each backend here.

Parity rule: the op in dtype vs fastenc.reference.linear in fp64 (fp32 inputs) or fp32 (bf16/fp16),
bounded by the reference in the same dtype; fp32's baseline is rounding only, so a summation-order
rtol of the largest magnitude.  Shapes on both sides of the oneDNN threshold (2^21 multiply-adds).
"""
import importlib

import pytest
import torch

from fastenc import ops, reference
from fastenc.backends import BackendUnavailableError, cpu_check, extension
from fastenc.testing import assert_parity
from tests.conftest import DEVICE

linear_mod = importlib.import_module("fastenc.ops.linear")

CPU_OK = cpu_check(torch.device("cpu"), torch.float32) is None
BACKENDS = ["reference", "auto"] + (["cpu"] if CPU_OK and DEVICE == "cpu" else [])
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])


def _rtol(dtype):
    return 4e-6 if dtype == torch.float32 else 0.0


# (token shape, k, n): one row, odd sizes below the threshold; 3·41 rows of 384 -> 1000 above it.
CASES = [((1,), 32, 48), ((7,), 80, 96), ((3, 41), 384, 1000), ((0,), 16, 8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-n{c[2]}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_forward_and_backward(backend, dtype, bias, case):
    shape, k, n = case
    x = torch.randn(*shape, k, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n, device=DEVICE).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(*shape, n, device=DEVICE).to(dtype)
    inputs = [t for t in (x, w, b) if t is not None]
    wide = torch.float64 if dtype == torch.float32 else torch.float32

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(dy.to(cast))
        return [y] + [t.grad for t in leaves]

    fast = run(lambda *a: ops.linear(*a, backend=backend), dtype)
    ref, base = run(reference.linear, wide), run(reference.linear, dtype)
    assert fast[0].dtype == dtype and fast[0].shape == (*shape, n)
    for name, f, r, bs in zip(["y", "dx", "dw", "db"], fast, ref, base):
        assert_parity(f, r, bs, rtol=_rtol(dtype), name=name)


@pytest.mark.skipif(not CPU_OK or DEVICE != "cpu", reason="the cpu backend needs the extension's CPU kernels")
@pytest.mark.parametrize("rows,onednn", [(123, True), (5, False)])
def test_cpu_gemms_are_onednn_above_the_threshold(rows, onednn):
    """fp32 from 2^21 multiply-adds: the forward and both backward GEMMs are oneDNN inner products (with
    AVX-512; ATen's below it, csrc/linear/linear.h)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(rows, 384, requires_grad=True)
    w = torch.randn(1000, 384, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.linear(x, w, None, backend="cpu").sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::_linear_pointwise"))
    assert (rows * 384 * 1000 >= linear_mod.ONEDNN_MIN_MACS) == onednn
    assert calls == (3 if onednn and linear_mod.extension().cpu_linear_preferred(torch.float32) else 0)


def test_only_the_needed_gradients():
    x = torch.randn(9, 64, requires_grad=True)
    w = torch.randn(32, 64)  # frozen
    b = torch.randn(32, requires_grad=True)
    ops.linear(x, w, b).sum().backward()
    assert w.grad is None and x.grad.shape == x.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_casts_every_operand(x_dtype):
    """Under autocast the GEMM runs in its dtype whatever the operands' (a bf16 x with fp32 weights too): the
    values are those of the operands rounded to bf16 (oracle: their product in fp64; baseline: F.linear under
    autocast), forward and backward, and each gradient comes back in its operand's dtype."""
    inputs = [torch.randn(130, 384, device=DEVICE, dtype=x_dtype), torch.randn(1000, 384, device=DEVICE) / 384**0.5,
              torch.randn(1000, device=DEVICE)]
    dy = torch.randn(130, 1000, device=DEVICE)

    def run(fn, autocast, cast=None):
        leaves = [(t if cast is None else t.to(torch.bfloat16).to(cast)).detach().requires_grad_() for t in inputs]
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y = fn(*leaves)
        y.backward(dy.to(y.dtype))
        return [y] + [t.grad for t in leaves]

    fast = run(ops.linear, True)
    base = run(torch.nn.functional.linear, True)
    oracle = run(reference.linear, False, cast=torch.float64)
    assert fast[0].dtype == base[0].dtype == torch.bfloat16
    assert [g.dtype for g in fast[1:]] == [x_dtype, torch.float32, torch.float32]
    for name, f, r, b in zip(["y", "dx", "dw", "db"], fast, oracle, base):
        assert_parity(f, r, b, rtol=_rtol(torch.bfloat16), name=name)


def test_compile_fullgraph_traces_the_op():
    x = torch.randn(130, 384, device=DEVICE, requires_grad=True)
    w = torch.randn(1000, 384, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda a, b: ops.linear(a, b).sum(), fullgraph=True, backend="aot_eager")
    compiled(x, w).backward()
    g = x.grad.clone()
    x.grad = None
    ops.linear(x, w).sum().backward()
    torch.testing.assert_close(g, x.grad)


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, b: ops.linear(x, w[:, :5], b), "x must be"),
    (lambda x, w, b: ops.linear(x, w, b[:3]), "bias must have shape"),
    (lambda x, w, b: ops.linear(x, w.double(), b), "weight .* must match x"),
    (lambda x, w, b: ops.linear(x.long(), w, b), "x must be a floating-point tensor"),
    (lambda x, w, b: ops.linear(x, None, b), "weight must be a tensor"),
])
def test_bad_input_names_the_argument(bad, match):
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    with pytest.raises((TypeError, ValueError), match=match):
        bad(x, w, b)


def test_forced_unknown_backend_raises():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(BackendUnavailableError, match="fastenc linear: has no 'triton' backend"):
        ops.linear(x, w, backend="triton")
    if extension() is None:
        with pytest.raises(BackendUnavailableError, match="fastenc linear: backend 'cpu' is unavailable"):
            ops.linear(x, w, backend="cpu")
