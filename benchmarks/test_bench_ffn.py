"""ffn: every provider side by side (see benchmarks/conftest.py and fastenc/bench/)."""
import pytest

from benchmarks.conftest import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("ffn"))
def test_ffn(benchmark, bench_env, entry, provider):
    run_case(benchmark, entry, provider, bench_env)
