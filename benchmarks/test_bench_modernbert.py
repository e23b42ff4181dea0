"""ModernBERT (an HF ModernBertModel end to end, sliding-window attention with rotary, the GeGLU FFN): every
provider (see benchmarks/cases.py and fastenc/bench/ops/modernbert.py)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("modernbert"))
def test_modernbert(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
