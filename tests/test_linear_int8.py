"""The int8 linear op (fastenc/ops/linear_int8.py, csrc/cpu/int8_linear.cpp) against its reference, whose math
(per-token dynamic quantization, per-channel weights, exact integer sums) it reproduces; the reference
against float GEMMs (the quantization error it is meant to have); argument checks."""
import pytest
import torch
import torch.nn.functional as F

from fastenc import backends, reference
from fastenc.ops.linear_int8 import QuantWeight, linear_int8, quantize_weight

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _operands(m, k, n, dtype, act_in=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_in = 2 * k if act_in in reference.GATED_ACTIVATIONS else k
    x = torch.randn(m, k_in, generator=g)
    x[:, :3] *= 8.0  # outlier channels, as real activations have
    w = torch.randn(n, k, generator=g) * k ** -0.5
    b = torch.randn(n, generator=g) * 0.1
    r = torch.randn(m, n, generator=g)
    return x.to(dtype), w, b, r.to(dtype)


def _agree(fast, ref, *, flips_ok):
    """Same math: equal up to fp32 rounding of the epilogue; with an activation applied before quantizing,
    a rare operand one quantum apart (the activation's last bit decides a rounding tie)."""
    tol = (1e-5 if fast.dtype == torch.float32 else 2 ** -7) * ref.abs().amax().item()
    close = (fast.float() - ref.float()).abs() <= tol
    if flips_ok:
        assert close.float().mean() >= 0.999, f"{(~close).sum().item()} of {close.numel()} elements differ"
        torch.testing.assert_close(fast.float(), ref.float(), rtol=0, atol=0.02 * ref.abs().amax().item())
    else:
        assert close.all(), f"max error {(fast.float() - ref.float()).abs().max().item():.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 16, 8), (7, 33, 65), (13, 384, 1152), (24, 64, 200), (32, 384, 1152),
                                   (96, 65, 130), (97, 1536, 384), (6, 4, 64), (200, 80, 130), (512, 64, 64),
                                   (515, 96, 130)])  # 24-96 rows: the next panel prefetched; the last two: rows split
def test_cpu_matches_reference(m, k, n, dtype):
    x, w, b, r = _operands(m, k, n, dtype)
    qw = quantize_weight(w)
    with torch.no_grad():
        for bias, res in ((b, None), (None, r), (b, r), (None, None)):
            fast = linear_int8(x, qw, bias, residual=res, backend="cpu")
            ref = linear_int8(x, qw, bias, residual=res, backend="reference")
            assert fast.dtype == dtype and fast.shape == (m, n)
            _agree(fast, ref, flips_ok=False)


@pytest.mark.parametrize("act_in", ["relu", "gelu", "gelu_tanh", "geglu", "swiglu"])
def test_activation_applied_before_quantizing(act_in):
    x, w, b, r = _operands(37, 96, 80, torch.float32, act_in)
    qw = quantize_weight(w)
    with torch.no_grad():
        fast = linear_int8(x, qw, b, act_in=act_in, residual=r, backend="cpu")
        ref = linear_int8(x, qw, b, act_in=act_in, residual=r, backend="reference")
    _agree(fast, ref, flips_ok=act_in not in ("relu",))


def test_smoothing():
    """SmoothQuant: the weight quantized as W diag(s), the activations as x diag(1/s): the cpu kernel applies 1/s
    where it quantizes; with outlier input channels the smoothed GEMM is closer to the float one."""
    x, w, b, r = _operands(29, 200, 96, torch.float32)
    s = reference.smoothing(x.abs().amax(0), w)
    plain, smooth = quantize_weight(w), quantize_weight(w, s)
    torch.testing.assert_close(smooth.smooth, 1.0 / s)
    with torch.no_grad():
        fast = linear_int8(x, smooth, b, residual=r, backend="cpu")
        ref = linear_int8(x, smooth, b, residual=r, backend="reference")
        unsmoothed = linear_int8(x, plain, b, residual=r, backend="reference")
    _agree(fast, ref, flips_ok=True)  # 1/s: a multiply the activation rounding may see
    exact = F.linear(x.double(), w.double(), b.double()) + r.double()
    assert (ref.double() - exact).norm() < 0.8 * (unsmoothed.double() - exact).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_in", [None, "gelu", "geglu"])
def test_float_channels(dtype, act_in):
    """Input channels kept in float (FFN2's widest): the int8 GEMM runs without them (their weight columns and
    activation multipliers 0, so their outliers set no token's scale) and a float GEMM of those columns is
    added; the cpu backend agrees with the reference, closer to the float GEMM than int8 over every channel."""
    x, w, b, r = _operands(41, 200, 96, dtype, act_in)
    k_in = x.shape[1]
    x = x.float()
    x[:, 50] *= 40.0  # an outlier channel (both halves when gated: the activated hidden's channel 50 too)
    if k_in != 200:
        x[:, 250] *= 40.0
    x = x.to(dtype)
    keep = torch.tensor([3, 50, 199])
    w_before = w.clone()
    qw = quantize_weight(w.to(dtype), None, keep)
    assert torch.equal(w, w_before), "quantize_weight must not write to the weight"
    assert qw.float_weight.dtype == dtype and torch.equal(qw.float_weight, w.to(dtype)[:, keep])
    assert (qw.q[:, keep] == 0).all() and (qw.smooth[keep] == 0).all() and (qw.smooth.sum() == 200 - 3)
    with torch.no_grad():
        fast = linear_int8(x, qw, b, act_in=act_in, residual=r, backend="cpu")
        ref = linear_int8(x, qw, b, act_in=act_in, residual=r, backend="reference")
        every = linear_int8(x, quantize_weight(w.to(dtype)), b, act_in=act_in, residual=r, backend="reference")
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    _agree(fast, ref, flips_ok=True)
    a = x.double() if act_in is None else reference.apply_activation(x.double(), act_in)
    exact = F.linear(a, w.to(dtype).double(), b.double()) + r.double()
    assert (ref.double() - exact).norm() < 0.5 * (every.double() - exact).norm()


def test_reference_is_a_float_gemm_within_the_quantization_error():
    """Per-token and per-channel scales: each operand is off by at most half its row's quantum (max|row| / 254);
    with three outlier channels 8x the others in every token (as real activations have), the output's relative
    error is a few percent: why per-token scales and the choice of int8 GEMMs are measured on real models."""
    x, w, b, _ = _operands(64, 384, 256, torch.float32)
    q, s = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and torch.equal(q.abs().amax(1), torch.full((256,), 127))
    torch.testing.assert_close(q.float() * s[:, None], w, rtol=0, atol=(s / 2 + 1e-7).max().item())
    y = reference.linear_int8(x, q, s, b)
    exact = F.linear(x.double(), w.double(), b.double())
    rel = ((y.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 5e-2, rel


def test_zero_rows_and_weights():
    x = torch.zeros(3, 8)
    w = torch.randn(5, 8)
    w[2] = 0
    qw = quantize_weight(w)
    assert qw.scale[2] == 0
    with torch.no_grad():
        y = linear_int8(x, qw, torch.ones(5), backend="cpu")
    torch.testing.assert_close(y, torch.ones(3, 5))
    assert torch.isfinite(reference.linear_int8(x, qw.q, qw.scale)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_inputs_stay_non_finite(dtype):
    """A NaN in a row of x makes that row's scale and outputs NaN; a residual's inf stays inf (the bf16 store's
    rounding included)."""
    x, w, b, r = _operands(9, 40, 70, dtype)
    x[3, 5], r[6, 69] = float("nan"), float("inf")
    with torch.no_grad():
        y = linear_int8(x, quantize_weight(w), b, residual=r, backend="cpu")
    assert y[3].isnan().all() and y[6, 69] == float("inf")
    others = torch.ones(9, 70, dtype=torch.bool)
    others[3], others[6, 69] = False, False
    assert y[others].isfinite().all()


def test_bf16_outputs_are_the_fp32_outputs_rounded():
    """The same operands in bf16 and in fp32 give the same int8 math, so the bf16 output is the fp32 one rounded to
    nearest even, bit for bit (torch's rounding): vcvtneps2bf16 from avx512_bf16, the integer rounding of the VNNI
    kernel at avx512_vnni and of the AVX2 kernel (each capped run tests its own); a NaN row stays NaN."""
    x, w, b, r = _operands(37, 96, 130, torch.bfloat16)
    x[5, 3] = float("nan")
    # row 0 is the bias alone (x and the residual 0 there): bias values exactly between two bf16 values (the tie goes
    # to the even one) and one fp32 step to either side of it
    x[0], r[0] = 0, 0
    hi = torch.randint(0x3C00, 0x4300, (130,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    b = ((hi << 16) | torch.tensor([0x8000, 0x7FFF, 0x8001], dtype=torch.int32).repeat(44)[:130]).view(torch.float32)
    qw = quantize_weight(w)
    with torch.no_grad():
        y16 = linear_int8(x, qw, b, residual=r * 40, backend="cpu")
        y32 = linear_int8(x.float(), qw, b, residual=(r * 40).float(), backend="cpu")
    assert y16.dtype == torch.bfloat16 and y16[5].isnan().all()  # NaN payloads aside: compared by value below
    rows = torch.arange(37) != 5
    assert torch.equal(y16[rows].view(torch.int16), y32[rows].to(torch.bfloat16).view(torch.int16))


def test_the_kernel_follows_the_capability():
    """VNNI from avx512_vnni up (bf16 outputs rounded in integer operations there, by vcvtneps2bf16 from
    avx512_bf16), the AVX2 kernel at avx2 and avx512 (the suite's capped runs exercise each), exact fp32 GEMMs
    below; the backend report names it."""
    from fastenc import backend_report

    ext = backends.extension()
    selected = ext.cpu_capability()["selected"]
    expected = {"avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_vnni", "amx": "avx512_vnni", "avx2": "avx2",
                "avx512": "avx2"}
    assert ext.cpu_int8_kernel() == expected.get(selected, "fp32_exact")
    name = {"avx512_vnni": "AVX512-VNNI kernel", "avx2": "AVX2 kernel", "fp32_exact": "exact fp32 GEMMs"}
    assert name[ext.cpu_int8_kernel()] in backend_report("cpu", torch.float32)


def test_bad_input():
    qw = quantize_weight(torch.randn(8, 16))
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        linear_int8(torch.randn(4, 15), qw)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 32\]"):
        linear_int8(x, qw, act_in="geglu")
    with pytest.raises(ValueError, match="act_in must be None or one of"):
        linear_int8(x, qw, act_in="swish")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        linear_int8(x, qw, torch.zeros(7))
    with pytest.raises(TypeError, match="weight must be a QuantWeight"):
        linear_int8(x, torch.randn(8, 16))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        linear_int8(x.half(), qw)
    with pytest.raises(RuntimeError, match="inference only"):
        linear_int8(x.requires_grad_(), qw)
    with pytest.raises(TypeError, match="weight_q must be int8"):
        backends.extension().Int8Weight(torch.zeros(2, 2), torch.ones(2))
    Int8Weight = backends.extension().Int8Weight
    with pytest.raises(ValueError, match="float_channels and float_weight come together"):
        Int8Weight(qw.q, qw.scale, None, torch.tensor([1]))
    with pytest.raises(TypeError, match="float_channels must be an int64"):
        Int8Weight(qw.q, qw.scale, None, torch.tensor([1], dtype=torch.int32), torch.zeros(8, 1))
    with pytest.raises(RuntimeError, match=r"float_weight \[8, f\]"):
        Int8Weight(qw.q, qw.scale, None, torch.tensor([1]), torch.zeros(7, 1))
    with pytest.raises(RuntimeError, match=r"float_channels must lie in \[0, 16\)"):
        Int8Weight(qw.q, qw.scale, None, torch.tensor([16]), torch.zeros(8, 1))
    assert isinstance(qw, QuantWeight) and tuple(qw.packed.shape) == (8, 16)
