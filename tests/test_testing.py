"""The parity helpers every test leans on (fastenc/testing.py): what they accept and what they reject.

A helper that accepts a wrong answer makes every test built on it blind, so each rule has a case
that must fail: a finite value where the reference is NaN or inf (and the reverse), an inf of the
other sign, an error just over the bound; and the scaled atol follows the reference's magnitude.
"""
import pytest
import torch

from fastenc.testing import ATOL, assert_close, assert_parity, nonfinite_mismatch, parity_error

NAN, INF = float("nan"), float("inf")


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("fast,ref", [
    (_t(1.0, 0.0), _t(1.0, NAN)),  # a finite answer where the reference is NaN
    (_t(1.0, NAN), _t(1.0, 0.0)),  # NaN where the reference is finite
    (_t(1.0, 5.0), _t(1.0, INF)),  # finite where the reference is inf
    (_t(1.0, -INF), _t(1.0, INF)),  # an inf of the other sign
    (_t(1.0, NAN), _t(1.0, INF)),  # NaN where the reference is inf
    (_t(INF, 1.0), _t(NAN, 1.0)),  # inf where the reference is NaN
], ids=["finite-vs-nan", "nan-vs-finite", "finite-vs-inf", "sign-of-inf", "nan-vs-inf", "inf-vs-nan"])
def test_nonfinite_values_must_sit_where_the_reference_has_them(fast, ref):
    assert nonfinite_mismatch(fast, ref) is not None
    assert "NaN/inf mismatch" in parity_error(fast, ref, ref)
    with pytest.raises(AssertionError, match="NaN/inf mismatch"):
        assert_parity(fast, ref, ref, name="x")
    with pytest.raises(AssertionError, match="NaN/inf mismatch"):
        assert_close(fast, ref, atol=1e9, name="x")


def test_matching_nonfinite_values_pass_and_the_finite_rest_is_still_compared():
    ref = _t(NAN, INF, -INF, 1.0)
    assert parity_error(_t(NAN, INF, -INF, 1.0), ref, ref) is None
    assert_close(_t(NAN, INF, -INF, 1.0 + 1e-7), ref, atol=1e-6)
    assert "max error" in parity_error(_t(NAN, INF, -INF, 1.1), ref, ref)
    with pytest.raises(AssertionError, match="elements off"):
        assert_close(_t(NAN, INF, -INF, 1.1), ref, atol=1e-6)


def test_bound_is_twice_the_same_dtype_error_plus_atol():
    ref = torch.zeros(3, dtype=torch.float64)
    base = _t(0.0, 1e-3, 0.0)  # plain PyTorch's error: 1e-3
    atol = ATOL[torch.float32]
    assert parity_error(_t(0.0, 2e-3 + 0.5 * atol, 0.0), ref, base) is None
    msg = parity_error(_t(0.0, 0.0, 2e-3 + 2 * atol), ref, base)
    assert msg is not None and "1/3 elements over, worst at [2]" in msg


def test_scaled_atol_follows_the_reference_magnitude():
    """bf16's atol (8e-3) is absolute by default; scaled, it is relative to the reference's largest value."""
    small = torch.full((4,), 1e-3, dtype=torch.float64)  # e.g. a parameter gradient of size 1e-3
    fast = (small + 5e-3).to(torch.bfloat16)  # wrong by 5x its size
    assert parity_error(fast, small, small) is None, "absolute atol: passes (the blind spot)"
    assert parity_error(fast, small, small, scaled=True) is not None
    big = torch.full((4,), 1e3, dtype=torch.float64)
    assert parity_error((big + 4.0).to(torch.bfloat16), big, big, scaled=True) is None  # 8e-3 x 1e3 = 8


def test_an_fp64_reference_is_not_rounded_to_fp32():
    ref = torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)
    assert parity_error(ref.clone(), ref, ref, atol=0.0) is None
    assert parity_error(torch.ones(1, dtype=torch.float64), ref, ref, atol=0.0) is not None


def test_shapes_must_agree():
    assert "shape" in parity_error(torch.zeros(2), torch.zeros(3), torch.zeros(3))


def test_a_reference_past_the_dtype_range_is_an_infinity_there():
    """fp16 holds at most 65504: an fp64 oracle of -1.4e6 is -inf in fp16, which a correct fp16 result shows."""
    ref = torch.tensor([-1.4e6, 1.0], dtype=torch.float64)
    base = ref.to(torch.float16)
    assert parity_error(torch.tensor([-INF, 1.0], dtype=torch.float16), ref, base) is None
    assert parity_error(torch.tensor([-65504.0, 1.0], dtype=torch.float16), ref, base) is not None  # saturated
    assert parity_error(torch.tensor([-1.4e6, 1.0]), ref, ref.float()) is None  # fp32 holds it


def test_a_value_at_the_overflow_edge_may_round_either_way():
    """An fp64 oracle of -65530 is -inf in fp16 while an fp32 result of -65515 rounds to -65504: the same value up
    to rounding (found by the long profile of tests/test_layer_norm_random.py).  Only within 2 ulps of the edge,
    only with the same sign, and the finite rest is still compared."""
    base = torch.tensor([-INF, 1.0], dtype=torch.float16)
    for ref, fast in ((-65530.0, -65504.0), (-65510.0, -INF)):
        ref64 = torch.tensor([ref, 1.0], dtype=torch.float64)
        assert parity_error(torch.tensor([fast, 1.0], dtype=torch.float16), ref64, base) is None
        assert parity_error(torch.tensor([fast, 2.0], dtype=torch.float16), ref64, base) is not None
    far = torch.tensor([-1.4e6, 1.0], dtype=torch.float64)
    assert parity_error(torch.tensor([-65504.0, 1.0], dtype=torch.float16), far, base) is not None  # saturated
    assert parity_error(torch.tensor([65504.0, 1.0], dtype=torch.float16),
                        torch.tensor([-65530.0, 1.0], dtype=torch.float64), base) is not None  # wrong sign


def test_a_baseline_that_overflowed_does_not_widen_the_bound():
    """Plain PyTorch's inf or NaN where the reference is finite measures nothing: the bound comes from the rest."""
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    base = _t(INF, 2.0)
    assert parity_error(_t(1.0, 2.0), ref, base) is None
    assert "max error" in parity_error(_t(3.0, 2.0), ref, base)
    assert "max error" in parity_error(_t(3.0, 2.0), ref, _t(NAN, 2.0))
