"""End to end (sentence embeddings, fine-tuning step of an HF BertModel): every provider (see benchmarks/cases.py
and fastenc/bench/ops/e2e.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("e2e"))
def test_e2e(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
