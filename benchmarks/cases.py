"""pytest-benchmark cases over the same workloads and providers as ``python -m fastenc bench``.

    pytest benchmarks/ --benchmark-json=out.json          # time every provider side by side
    pytest benchmarks/ --benchmark-compare                # against the last saved run (--benchmark-autosave)
    FASTENC_BENCH_SIZE=cpu pytest benchmarks/             # sizes: tiny | cpu | gpu (default: gpu on CUDA, tiny on CPU)

Each case checks its provider against ``fastenc.reference`` (or its suite's own check)
before any timing (a mismatch fails the test), then times it twice: with CUDA events /
torch.utils.benchmark (median, p20, p80, TFLOP/s or GB/s, tokens/s, peak memory: in
``extra_info``) and with pytest-benchmark's own rounds (synchronised), which
``--benchmark-compare`` compares across commits.  A provider that cannot run here is
skipped with its reason; so is the timing of a Triton provider on CPU (the interpreter),
after its check.  Under ``--benchmark-disable`` (CI) each case is checked and run once, untimed.
"""
import functools
import os

import pytest
import torch

from fastenc.backends import BackendUnavailableError
from fastenc.bench import INTERPRETER_SKIP, registry, runner, timing
from fastenc.bench.env import environment

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = os.environ.get("FASTENC_BENCH_SIZE", "gpu" if DEVICE.type == "cuda" else "tiny")
DTYPES = [torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32]
ENV_TAGS = ("device_name", "cpu_model", "cpu_family_model_stepping", "cpu_isa", "cpu_cores", "threads", "torch",
            "triton", "cuda", "git_commit", "date")


def cases(*suites):
    """pytest params (entry, provider) for the suites' workloads at this size."""
    out = []
    for e in registry.plan(SIZE, DEVICE, DTYPES, ops=suites):
        for p in registry.providers_for(e.suite, entry=e):
            out.append(pytest.param(e, p, id=f"{e.label.replace(' ', '-')}-{p.name}"))
    return out


@functools.lru_cache(maxsize=None)
def bench_env():
    return environment(DEVICE)


def run_case(benchmark, entry, provider):
    if provider.name in entry.exclude:
        pytest.skip(entry.exclude[provider.name])
    env = bench_env()
    suite = registry.get(entry.suite)
    w = entry.make()
    try:
        impl, first = runner.build_checked(w, provider)  # raises ParityError (a failure) on a mismatch
    except (registry.Unavailable, BackendUnavailableError) as e:
        pytest.skip(str(e))
    if provider.triton and DEVICE.type == "cpu" and not benchmark.disabled:
        pytest.skip(f"checked; {INTERPRETER_SKIP}")
    step, n = runner.build_step(w, impl, first)
    benchmark.group = f"{w.suite} {w.mode} {entry.label.split(' ', 2)[2]}"
    benchmark.extra_info.update({k: env[k] for k in ENV_TAGS})
    benchmark.extra_info.update(provider=provider.name, flops=w.flops, bytes=w.bytes, tokens=w.tokens, copies=n)
    threads = torch.get_num_threads()
    if suite.threads is not None:
        torch.set_num_threads(suite.threads)
    try:
        if not benchmark.disabled:
            with runner.grad_context(w):
                t = timing.time_step(step, n, w.device, min_time_s=registry.MIN_TIME_S[SIZE])
            s = t.median_ms / 1e3
            benchmark.extra_info.update(
                median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, timing=t.method, peak_mem_mb=t.peak_mem_mb,
                tflops=w.flops / s / 1e12 if w.flops else None, gbps=w.bytes / s / 1e9 if w.bytes else None,
                tokens_per_s=w.tokens / s,
            )
        state = {"i": 0}

        def call():
            with runner.grad_context(w):
                step(state["i"] % n)
            state["i"] += 1
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)

        benchmark.pedantic(call, rounds=20 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
