"""triton_kernels/dropout_rng.py: the threshold every dropout kernel compares Philox words with."""
import pytest

from tests.conftest import DEVICE  # noqa: F401,I001  (sets TRITON_INTERPRET first)

from fastenc.triton_kernels.dropout_rng import keep_threshold


def test_keep_threshold_is_round_p_times_2_32_minus_2_31():
    assert keep_threshold(0.0) == -(2**31)  # every word >= 0: nothing dropped
    assert keep_threshold(0.5) == 0
    assert keep_threshold(0.1) == round(0.1 * 2**32) - 2**31
    assert keep_threshold(1.0) == 2**31 - 1  # t = 2^32 - 1: the kernels' scale 1 - p = 0 drops the rest
    for p in (0.0, 1e-9, 0.1, 0.5, 0.999, 1.0):
        assert -(2**31) <= keep_threshold(p) < 2**31  # an int32 kernel argument


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_keep_threshold_rejects_bad_probabilities(p):
    with pytest.raises(ValueError, match="dropout probability"):
        keep_threshold(p)
