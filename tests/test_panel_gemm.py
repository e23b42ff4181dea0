"""The few-row CPU GEMM (csrc/linear/panel_gemm.cpp) against torch's GEMM: the parity rule against fp64, odd
shapes (one row, one column, panel edges, odd k), bias and residual, fp32 and bf16, rows at any stride.  Its use
in the fused stack is checked by tests/test_encoder.py's stacks.  The activation in its epilogue, on each tile's
fp32 values before they are stored, against torch's activation of the fp64 GEMM."""
import pytest
import torch
import torch.nn.functional as F

from fastenc import backends
from fastenc.testing import assert_parity

ext = backends.extension()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "cpu_panel_gemm"), reason="the extension is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 384, 1152), (7, 3, 65), (32, 384, 1536), (13, 1536, 384),
                                   (24, 64, 200), (31, 64, 128), (64, 97, 63), (96, 33, 130), (97, 64, 70),
                                   (100, 768, 130)])
def test_matches_torch(m, k, n, dtype):
    """Row counts whose tiles have unequal heights (7: 4 + 3, 13: 5 + 4 + 4, 31: 6 + 5 x 5), the rows at which the
    next panel's prefetch starts and stops (24, 96: an odd k's last line), and tasks of 96 rows with a remainder
    (97, 100)."""
    if not ext.cpu_panel_gemm_supported(dtype):
        pytest.skip(f"no panel GEMM for {dtype} on this CPU (AVX-512; bf16 also AVX512-BF16)")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b, r = torch.randn(n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    packed = ext.PanelWeight(w)
    for bias, res in ((None, None), (b, None), (b, r), (None, r)):
        fast = ext.cpu_panel_gemm(x, packed, bias, res)
        oracle = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        base = F.linear(x, w, bias)
        if res is not None:
            oracle, base = oracle + res.double(), base + res
        assert fast.dtype == dtype
        assert_parity(fast, oracle, base, name=f"panel gemm {m}x{k}x{n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k", [(5, 64), (13, 7)])
def test_rows_at_any_stride(m, k, dtype):
    """x a column slice of a wider tensor: an odd row stride and an odd offset, so bf16's k pairs (one 32-bit
    load each) are not 4-byte aligned, and the last pair of an odd k is read alone (the next element is
    another column's)."""
    if not ext.cpu_panel_gemm_supported(dtype):
        pytest.skip(f"no panel GEMM for {dtype} on this CPU (AVX-512; bf16 also AVX512-BF16)")
    g = torch.Generator().manual_seed(3)
    width = k + 3 if (k + 3) % 2 else k + 4  # an odd row stride, two or three columns past the slice
    wide = torch.randn(m, width, generator=g).to(dtype)
    wide[:, k + 1:] = float("nan")  # read past the row's k values: the outputs turn NaN
    x = wide[:, 1:k + 1]
    assert x.stride(0) % 2 == 1 and x.stride(1) == 1
    w = (torch.randn(70, k, generator=g) * k ** -0.5).to(dtype)
    fast = ext.cpu_panel_gemm(x, ext.PanelWeight(w), None, None)
    assert_parity(fast, F.linear(x.double(), w.double()), F.linear(x.contiguous(), w),
                  name=f"panel gemm on a column slice {m}x{k}")


ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("m,k,n", [(7, 3, 65), (32, 384, 1536), (127, 80, 130)])
def test_activation_in_epilogue(m, k, n, act, dtype):
    if not ext.cpu_panel_gemm_supported(dtype):
        pytest.skip(f"no panel GEMM for {dtype} on this CPU (AVX-512; bf16 also AVX512-BF16)")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    b, r = torch.randn(n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    packed, f = ext.PanelWeight(w), ACTS[act]
    for bias, res in ((b, None), (None, r)):
        fast = ext.cpu_panel_gemm(x, packed, bias, res, act=act)
        oracle = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        base = F.linear(x, w, bias)
        if res is not None:
            oracle, base = oracle + res.double(), base + res
        assert_parity(fast, f(oracle), f(base), name=f"panel gemm + {act} {m}x{k}x{n}")


def test_bad_input():
    if not ext.cpu_panel_gemm_supported(torch.float32):
        pytest.skip("no AVX-512 on this CPU")
    packed = ext.PanelWeight(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"x must be a CPU \[m, 16\]"):
        ext.cpu_panel_gemm(torch.randn(2, 15), packed)
    with pytest.raises(TypeError, match="x has dtype BFloat16"):
        ext.cpu_panel_gemm(torch.randn(2, 16).bfloat16(), packed)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        ext.cpu_panel_gemm(torch.randn(2, 16), packed, torch.zeros(7))
    for act in ("geglu", "GELU", ""):
        with pytest.raises(ValueError, match=f"act must be none, relu, gelu or gelu_tanh, got '{act}'"):
            ext.cpu_panel_gemm(torch.randn(2, 16), packed, act=act)
    with pytest.raises(TypeError, match="w must be float32 or bfloat16"):
        ext.PanelWeight(torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_outputs_stay_non_finite(dtype):
    """A NaN in a row of x makes that row's outputs NaN and a residual's inf stays inf, in the bf16 store's
    rounding too (vcvtneps2bf16; integer rounding can carry a NaN's payload into an inf)."""
    if not ext.cpu_panel_gemm_supported(dtype):
        pytest.skip(f"no panel GEMM for {dtype} on this CPU (AVX-512; bf16 also AVX512-BF16)")
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 40, generator=g).to(dtype), torch.randn(70, 40, generator=g).to(dtype)
    r = torch.randn(9, 70, generator=g).to(dtype)
    x[3, 5], r[6, 69] = float("nan"), float("inf")
    y = ext.cpu_panel_gemm(x, ext.PanelWeight(w), None, r)
    assert y[3].isnan().all() and y[6, 69] == float("inf")
    others = torch.ones(9, 70, dtype=torch.bool)
    others[3], others[6, 69] = False, False
    assert y[others].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", sorted(ACTS))
def test_activation_keeps_nan_and_saturates(act, dtype):
    """The epilogue's activation (fp32 lanes, erf / tanh fits clamped at their saturation): a NaN pre-activation
    stays NaN (relu included), and pre-activations far past the clamp give torch's values (x or 0) to within
    1e-7·|x| (the fits reach ±1 to within 6e-8) and the output dtype's rounding."""
    if not ext.cpu_panel_gemm_supported(dtype):
        pytest.skip(f"no panel GEMM for {dtype} on this CPU (AVX-512; bf16 also AVX512-BF16)")
    pre = torch.tensor([float("nan"), -1e4, 1e4, -50.0, 50.0, -3.0, 2.5]).to(dtype)
    k = 2  # y = pre through x = [pre, 0] and w = [[1, 0]] * 70 columns; a tile's every lane sees a value
    x = torch.zeros(pre.numel(), k, dtype=dtype)
    x[:, 0] = pre
    w = torch.zeros(70, k, dtype=dtype)
    w[:, 0] = 1
    y = ext.cpu_panel_gemm(x, ext.PanelWeight(w), None, None, act=act)
    ref = ACTS[act](pre.double()).to(dtype)
    assert y[0].isnan().all()
    err = (y[1:].double() - ref[1:, None].double()).abs()
    bound = 1e-2 * ref[1:, None].double().abs() + 1e-7 * pre[1:, None].double().abs() + 1e-6
    assert (err <= bound).all(), (err / bound).max()
