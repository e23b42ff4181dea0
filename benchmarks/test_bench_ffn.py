"""ffn: every provider side by side (see benchmarks/cases.py and fastenc/bench/ops/ffn.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("ffn"))
def test_ffn(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
