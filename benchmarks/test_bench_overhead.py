"""Host overhead: fastenc ops and a tiny layer against their plain-torch twins on tiny tensors, one thread (see
benchmarks/cases.py and fastenc/bench/ops/overhead.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("overhead"))
def test_overhead(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
