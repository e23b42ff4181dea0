"""fastenc benchmarks: providers side by side on each op and end to end, checked, timed, saved.

A generic engine (``registry``: suites, providers, plans; ``runner``: check then time;
``timing``; ``output``: table, JSON, CSV, plots; ``env``) and one module per suite in
``ops/`` (its workloads, providers, FLOP/byte formula and sizes).

Entry points: ``python -m fastenc bench`` (see ``fastenc/__main__.py``), the
pytest-benchmark suites under ``benchmarks/``, and :func:`run` for scripts.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Callable, List, Optional, Sequence

import torch

from . import ops as _suites  # noqa: F401  (each suite module registers itself in the registry)
from . import output, registry, runner
from .ceilings import calibrate_cpu, pct_of_ceiling
from .env import environment, header
from .registry import Entry, Provider, Suite, Unavailable
from .runner import Result, run_one
from .workload import dtype_name

__all__ = ["Provider", "Result", "Suite", "Unavailable", "environment", "run", "run_one", "default_size",
           "INTERPRETER_SKIP"]

INTERPRETER_SKIP = ("Triton interpreter on CPU: a correctness tool, never timed by default "
                    "(ask for it by name: --providers fastenc-triton)")


def default_size(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def asked_by_name(p: Provider, names: Optional[Sequence[str]]) -> bool:
    """A Triton provider runs on CPU only when a --providers entry names it (``fastenc-triton...``)."""
    return any(p.name.startswith(n) and "triton" in n for n in names or ())


@contextlib.contextmanager
def _threads(n: Optional[int]):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _results_for_entry(entry: Entry, names: Optional[Sequence[str]], min_time_s: Optional[float], size: str,
                       on_result: Callable[[Result], None], skip_all: Optional[str]) -> List[Result]:
    suite = registry.get(entry.suite)
    w = entry.make()
    provs = registry.providers_for(entry.suite, names, entry)
    skipped = {}
    for p in provs:
        reason = skip_all or entry.exclude.get(p.name)
        if reason is None and p.triton and w.device.type == "cpu" and not asked_by_name(p, names):
            reason = INTERPRETER_SKIP
        if reason is not None:
            skipped[p.name] = Result(w, p.name, "skipped", reason, baseline=p.baseline)
    runnable = [p for p in provs if p.name not in skipped]
    out = []
    with _threads(suite.threads):
        if suite.interleaved:
            t = suite.min_time_s.get(size, registry.MIN_TIME_S[size]) if min_time_s is None else min_time_s
            timed = {r.provider: r for r in runner.run_interleaved(
                w, runnable, min_time_s=t, min_rounds=suite.min_rounds, max_rounds=suite.max_rounds,
                pause_s=suite.pause_s)}
            for p in provs:
                out.append(skipped.get(p.name) or timed[p.name])
                on_result(out[-1])
        else:
            t = registry.MIN_TIME_S[size] if min_time_s is None else min_time_s
            for p in provs:  # streamed one by one: a run killed mid-workload keeps what it measured
                out.append(skipped.get(p.name) or run_one(w, p, min_time_s=t))
                on_result(out[-1])
    runner.add_speedups(out)
    return out


def run(*, ops: Sequence[str], size: str, device: torch.device, dtypes: Sequence[torch.dtype],
        providers_filter: Optional[Sequence[str]] = None, out_dir: str, time_budget_s: Optional[float] = None,
        min_time_s: Optional[float] = None, progress: bool = True, plots: bool = True,
        ceilings: Optional[dict] = None, best_effort: Sequence[str] = (), best_effort_s: Optional[float] = None,
        log=print) -> List[dict]:
    """Run a sweep and write results.json, results.csv, results.jsonl (streamed), table.txt, summary.txt and plots.

    ceilings: ``fastenc ceilings`` output: adds each row's percentage of the measured ceiling (FLOP rate
    over the matmul's, or on CPU over the GEMM rate of the precision the row ran in; GB/s over the
    copy's).  On a CPU without it, the run first measures them (``ceilings.calibrate_cpu``, a few seconds;
    a smoke test of the same code at ``tiny``); the machine and its rates tag every row and file.
    best_effort: suites whose workloads start only while less than ``best_effort_s`` seconds
    have passed (the CPU main job's op-level points; with ``best_effort_s``, also the entries marked
    ``best_effort`` of any suite); the others are listed as skipped.
    """
    os.makedirs(out_dir, exist_ok=True)
    unknown = [o for o in ops if o not in registry.suite_names()]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; expected a subset of {registry.suite_names()}")
    start = time.monotonic()
    if ceilings is None and device.type == "cpu":
        ceilings = {**calibrate_cpu(size), "seconds": round(time.monotonic() - start, 1)}
    env = environment(device, ceilings if ceilings and ceilings.get("kind") == "cpu" else None)
    for line in header(env):
        log(line)
    entries = registry.plan(size, device, dtypes, ops=ops)
    bar = _progress(len(entries), progress, log)
    stream = open(os.path.join(out_dir, "results.jsonl"), "w")

    def on_result(r: Result) -> None:
        stream.write(json.dumps({**r.row(), **env}, default=str) + "\n")
        stream.flush()

    def skip_reason(e: Entry) -> Optional[str]:
        elapsed = time.monotonic() - start
        if time_budget_s is not None and elapsed > time_budget_s:
            return "time budget exhausted (--time-budget)"
        if (e.suite in best_effort or e.best_effort) and best_effort_s is not None and elapsed > best_effort_s:
            return (f"the default CPU run starts op-level points only in its first {best_effort_s:.0f} s "
                    f"(ask for them: --ops {e.suite})")
        return None

    # `timeout` sends SIGTERM: finish the files with what was measured.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    results: List[Result] = []
    broken = []  # workloads whose inputs or model could not be built (e.g. out of memory)
    try:
        for e in entries:
            bar.set_description(e.label[:60])
            try:
                results += _results_for_entry(e, providers_filter, min_time_s, size, on_result, skip_reason(e))
            except (RuntimeError, ValueError) as err:
                broken.append(f"{e.label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                log(f"workload not run: {broken[-1]}")
            bar.update(1)
    except KeyboardInterrupt:
        log(f"interrupted after {len(results)} results: writing what was measured")
    finally:
        bar.close()
        stream.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for name in ops:
            if registry.get(name).reset is not None:
                registry.get(name).reset()
    rows = [r.row() for r in results]
    if ceilings:
        for row in rows:
            row["pct_of_ceiling"] = pct_of_ceiling(row, ceilings)
    config = dict(ops=list(ops), size=size, device=str(device), dtypes=[dtype_name(d) for d in dtypes],
                  providers=list(providers_filter or []), time_budget_s=time_budget_s, min_time_s=min_time_s,
                  workloads_not_run=broken, ceilings=ceilings, best_effort=list(best_effort),
                  best_effort_s=best_effort_s, wall_s=round(time.monotonic() - start, 1))
    output.write_json(os.path.join(out_dir, "results.json"), rows, env, config)
    output.write_csv(os.path.join(out_dir, "results.csv"), rows, env)
    summaries = [registry.get(n).summary([r for r in rows if r["suite"] == n]) for n in ops
                 if registry.get(n).summary is not None and any(r["suite"] == n for r in rows)]
    table = output.format_table(rows, env)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write("\n\n".join([table, *summaries]) + "\n")
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n\n".join(["\n".join([table.splitlines()[0], *header(env)]), *summaries]) + "\n")
    log(table)
    for s in summaries:
        log("\n" + s)
    if plots:
        try:
            files = output.write_plots(out_dir, rows, env)
            for n in ops:
                suite = registry.get(n)
                mine = [r for r in rows if r["suite"] == n]
                if suite.plots is not None and mine:
                    files += suite.plots(out_dir, mine, env)
            log(f"{len(files)} plots written to {out_dir}")
        except ImportError:
            log("matplotlib is not installed (pip install matplotlib): no plots written")
    log(f"results: {os.path.join(out_dir, 'results.json')}, {os.path.join(out_dir, 'results.csv')} "
        f"({time.monotonic() - start:.0f} s)")
    return rows


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _NoBar:
    def __init__(self, total, log):
        self.total, self.n, self.log, self.t0 = total, 0, log, time.monotonic()

    def set_description(self, s):
        self.log(f"[{self.n + 1}/{self.total}, {time.monotonic() - self.t0:.0f} s] {s}")

    def update(self, k):
        self.n += k

    def close(self):
        pass


def _progress(total: int, enabled: bool, log):
    import sys

    if not enabled:
        return _NoBar(total, lambda s: None)
    if not sys.stderr.isatty():  # a log file: one plain line per workload
        return _NoBar(total, log)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log("tqdm is not installed (pip install tqdm): progress printed as lines")
        return _NoBar(total, log)
    return tqdm(total=total, unit="workload", dynamic_ncols=True)
