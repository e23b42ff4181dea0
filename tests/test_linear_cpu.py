"""CPU oneDNN linear layer of fastenc._C (csrc/linear/linear.cpp, csrc/bindings/linear_api.cpp): cpu_linear with plain
and prepacked weights (cpu_pack_linear_weight).

Parity rule against F.linear + fastenc.reference.apply_activation in fp32 (oracle) and in the input dtype
(baseline); fp32's baseline is the oracle itself, so a summation-order rtol of the largest magnitude.
"""
import pytest
import torch
import torch.nn.functional as F

from fastenc import reference
from fastenc.backends import extension
from fastenc.testing import assert_parity

C = extension()
pytestmark = pytest.mark.skipif(C is None, reason="fastenc._C is not built")

DTYPES = [d for d in (torch.float32, torch.bfloat16, torch.float16) if C is not None and C.cpu_linear_supported(d)]


def _oracle(x, w, b, activation, add, upcast):
    t = [v.float() if (upcast and v is not None) else v for v in (x, w, b, add)]
    y = F.linear(t[0], t[1], t[2])
    if activation != "none":
        y = reference.apply_activation(y, activation)
    return y + t[3] if add is not None else y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "add"])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 65)], ids=str)
def test_parity(shape, activation, packed, dtype):
    k, n = 384, 1000
    x = torch.randn(*shape, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    add = torch.randn(*shape, n).to(dtype) if activation == "add" else None
    act = "none" if activation == "add" else activation
    y = C.cpu_linear(x, C.cpu_pack_linear_weight(w) if packed else w, b, act, add)
    assert y.dtype == dtype and y.shape == (*shape, n)
    ref, base = _oracle(x, w, b, act, add, True), _oracle(x, w, b, act, add, False)
    assert_parity(y, ref, base, rtol=4e-6 if dtype == torch.float32 else 0.0)


def test_onednn_is_preferred_on_unpacked_weights_only_with_avx512():
    """Below AVX-512 ATen's GEMMs are faster on weights oneDNN has not prepacked (csrc/linear/linear.h): the
    linear and FFN ops' training and per-op inference GEMMs take them; the capped CI runs check the AVX2 side."""
    avx512 = C.cpu_capability()["selected"] in ("avx512", "avx512_vnni", "avx512_bf16", "amx")
    for dt in DTYPES:
        assert C.cpu_linear_preferred(dt) == avx512, dt
    assert not C.cpu_linear_preferred(torch.int32)


def test_no_bias_strided_input_and_empty():
    x = torch.randn(384, 9).t()  # [9, 384], column stride 9
    w = torch.randn(2 * 200, 384)[::2]  # [200, 384], row stride 768
    y = C.cpu_linear(x, w)
    assert_parity(y, x @ w.t(), x @ w.t(), rtol=4e-6)
    assert C.cpu_linear(torch.randn(0, 384), w).shape == (0, 200)


def test_packed_weight_reused_across_row_counts():
    """One packed weight serves every number of rows (the layout is picked once, not per batch)."""
    w = torch.randn(768, 384) / 20
    wp = C.cpu_pack_linear_weight(w)
    assert wp.is_mkldnn and wp.shape == w.shape
    for m in (1, 3, 32, 257):
        x = torch.randn(m, 384)
        assert_parity(C.cpu_linear(x, wp, None, "gelu"), F.gelu(x @ w.t()), F.gelu(x @ w.t()), rtol=4e-6)


def test_bad_arguments():
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(ValueError, match="x has last dim 7"):
        C.cpu_linear(x[:, :7], w)
    with pytest.raises(TypeError, match="w has dtype"):
        C.cpu_linear(x, w.double())
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        C.cpu_linear(x.double(), w.double())
    with pytest.raises(ValueError, match=r"b must be a CPU \[N\] = \[5\]"):
        C.cpu_linear(x, w, b[:4])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        C.cpu_linear(x, w, b, "swish")
    with pytest.raises(ValueError, match="add and an activation cannot both be fused"):
        C.cpu_linear(x, w, b, "relu", torch.randn(4, 5))
    with pytest.raises(ValueError, match="add must be a CPU tensor of the output's shape"):
        C.cpu_linear(x, w, b, "none", torch.randn(4, 6))
    with pytest.raises(ValueError, match="w must be \\[N, K\\]"):
        C.cpu_pack_linear_weight(torch.randn(8))
    if not C.cpu_linear_supported(torch.float16):
        with pytest.raises(ValueError, match="no oneDNN linear kernels for Half"):
            C.cpu_linear(x.half(), w.half())
