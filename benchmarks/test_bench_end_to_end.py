"""Encoder stacks: one layer, an encoder, a training step (see benchmarks/cases.py and fastenc/bench/ops/)."""
import pytest

from benchmarks.cases import cases, run_case


@pytest.mark.parametrize("entry,provider", cases("layer"))
def test_layer(benchmark, entry, provider):
    run_case(benchmark, entry, provider)


@pytest.mark.parametrize("entry,provider", cases("encoder"))
def test_encoder(benchmark, entry, provider):
    run_case(benchmark, entry, provider)


@pytest.mark.parametrize("entry,provider", cases("train"))
def test_train_step(benchmark, entry, provider):
    run_case(benchmark, entry, provider)
