"""pytest-benchmark suites (``pytest benchmarks/``); the shared helpers live in conftest.py."""
