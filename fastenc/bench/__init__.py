"""fastenc benchmarks: providers side by side on each op and end to end, checked, timed, saved.

Entry points: ``python -m fastenc bench`` (see ``fastenc/__main__.py``), the
pytest-benchmark suites under ``benchmarks/``, and :func:`run` for scripts.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable, List, Optional, Sequence

import torch

from . import output, plans, providers, runner, workloads
from .env import environment
from .providers import PROVIDERS, Unavailable
from .runner import Result, run_one

__all__ = ["PROVIDERS", "Result", "Unavailable", "environment", "run", "run_one", "default_size"]


def default_size(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def _results_for_entry(entry: plans.Entry, names: Optional[Sequence[str]], min_time_s: float,
                       on_result: Callable[[Result], None], deadline: Optional[float]) -> List[Result]:
    w = entry.make()
    out = []
    for p in providers.providers_for(entry.suite, names):
        if p.name in entry.exclude:
            r = Result(w, p.name, "skipped", entry.exclude[p.name], baseline=p.baseline)
        elif deadline is not None and time.monotonic() > deadline:
            r = Result(w, p.name, "skipped", "time budget exhausted (--time-budget)", baseline=p.baseline)
        else:
            r = run_one(w, p, min_time_s=min_time_s)
        out.append(r)
        on_result(r)
    runner.add_speedups(out)
    return out


def run(*, ops: Sequence[str], size: str, device: torch.device, dtypes: Sequence[torch.dtype],
        providers_filter: Optional[Sequence[str]] = None, out_dir: str, time_budget_s: Optional[float] = None,
        min_time_s: Optional[float] = None, progress: bool = True, plots: bool = True,
        ceilings: Optional[dict] = None, log=print) -> List[dict]:
    """Run a sweep and write results.json, results.csv, results.jsonl (streamed), table.txt and plots.

    ceilings: ``fastenc ceilings`` output ({"copy_gbps", "matmul_tflops"}): adds each row's
    percentage of the measured device ceiling (TFLOP/s over the matmul's, GB/s over the copy's).
    """
    os.makedirs(out_dir, exist_ok=True)
    unknown = [o for o in ops if o not in workloads.SUITES]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; expected a subset of {workloads.SUITES}")
    env = environment(device)
    entries = [e for e in plans.plan(size, device, dtypes) if e.suite in ops]
    min_time_s = plans.MIN_TIME_S[size] if min_time_s is None else min_time_s
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    bar = _progress(len(entries), progress, log)
    stream = open(os.path.join(out_dir, "results.jsonl"), "w")

    def on_result(r: Result) -> None:
        stream.write(json.dumps({**r.row(), **env}, default=str) + "\n")
        stream.flush()

    # `timeout` sends SIGTERM: finish the files with what was measured.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    results: List[Result] = []
    broken = []  # workloads whose inputs or model could not be built (e.g. out of memory)
    try:
        for e in entries:
            bar.set_description(e.label[:60])
            try:
                results += _results_for_entry(e, providers_filter, min_time_s, on_result, deadline)
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
    rows = [r.row() for r in results]
    if ceilings:
        for row in rows:
            if row["tflops"]:
                row["pct_of_ceiling"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
            elif row["gbps"]:
                row["pct_of_ceiling"] = 100 * row["gbps"] / ceilings["copy_gbps"]
    config = dict(ops=list(ops), size=size, device=str(device), dtypes=[workloads.dtype_name(d) for d in dtypes],
                  providers=list(providers_filter or []), time_budget_s=time_budget_s, min_time_s=min_time_s,
                  workloads_not_run=broken, ceilings=ceilings)
    output.write_json(os.path.join(out_dir, "results.json"), rows, env, config)
    output.write_csv(os.path.join(out_dir, "results.csv"), rows, env)
    table = output.format_table(rows, env)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(table + "\n")
    log(table)
    if plots:
        try:
            files = output.write_plots(out_dir, rows, env)
            log(f"{len(files)} plots written to {out_dir}")
        except ImportError:
            log("matplotlib is not installed (pip install matplotlib): no plots written")
    log(f"results: {os.path.join(out_dir, 'results.json')}, {os.path.join(out_dir, 'results.csv')}")
    return rows


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _NoBar:
    def __init__(self, total, log):
        self.total, self.n, self.log = total, 0, log

    def set_description(self, s):
        self.log(f"[{self.n + 1}/{self.total}] {s}")

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
