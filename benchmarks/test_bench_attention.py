"""attention: every provider side by side (see benchmarks/cases.py and fastenc/bench/ops/attention.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("attention"))
def test_attention(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
