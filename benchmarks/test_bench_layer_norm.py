"""layer_norm: every provider side by side (see benchmarks/cases.py and fastenc/bench/ops/layer_norm.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("layer_norm"))
def test_layer_norm(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
