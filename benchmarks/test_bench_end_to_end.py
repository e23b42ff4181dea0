"""End to end: one encoder layer, a BERT-base-sized encoder, a training step (see benchmarks/conftest.py)."""
import pytest

from benchmarks.conftest import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("layer"))
def test_layer(benchmark, bench_env, entry, provider):
    run_case(benchmark, entry, provider, bench_env)


@pytest.mark.parametrize("entry,provider", cases("encoder"))
def test_encoder(benchmark, bench_env, entry, provider):
    run_case(benchmark, entry, provider, bench_env)


@pytest.mark.parametrize("entry,provider", cases("train"))
def test_train_step(benchmark, bench_env, entry, provider):
    run_case(benchmark, entry, provider, bench_env)
