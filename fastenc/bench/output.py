"""Results out: a console table, JSON, CSV (one row per workload x provider, tagged with the
environment) and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional

from .env import header

COLUMNS = [
    "suite", "mode", "sweep", "provider", "status", "dtype", "precision", "model", "op", "batch", "seqlen", "heads", "head_dim",
    "d_model", "d_ff", "activation", "layers", "padding", "dropout", "causal", "window", "tokens", "median_ms",
    "p20_ms", "p80_ms", "tflops", "gbps", "tokens_per_s", "pct_of_ceiling", "peak_mem_mb", "speedup_vs_eager",
    "speedup_vs_best_baseline", "best_baseline", "speedups", "min_cosine", "samples", "timing", "copies", "flops", "bytes", "note",
    "reason",
]
ENV_COLUMNS = ["device_name", "cpu_model", "cpu_vendor", "cpu_family_model_stepping", "cpu_isa", "cpu_cores",
               "threads", "aten_cpu_capability", "gemm_fp32_gflops", "gemm_bf16_gflops", "gemm_int8_gops",
               "copy_gbps", "torch", "triton", "cuda", "git_commit", "date"]
SHAPE_KEYS = ("batch", "seqlen", "heads", "head_dim", "d_model", "d_ff", "layers", "window", "padding", "dropout")


def _fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def shape_label(row: dict) -> str:
    abbrev = {"batch": "B", "seqlen": "L", "heads": "H", "head_dim": "D", "d_model": "d", "d_ff": "f",
              "layers": "layers", "window": "window", "padding": "pad", "dropout": "p"}
    parts = [str(row[k]) for k in ("model", "op") if row.get(k)]
    parts += [f"{abbrev[k]}={row[k]}" for k in SHAPE_KEYS if row.get(k) not in (None, 0.0) or k == "padding"
              and row.get("sweep") == "padding"]
    return f"{row['dtype']} " + " ".join(parts)


def format_table(rows: List[dict], env: Dict[str, str]) -> str:
    """One block per suite/mode; each sweep point lists its providers, then the skipped ones with reasons."""
    out = [f"fastenc bench on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
           f"CUDA {env['cuda']} | {env.get('threads', '?')} threads | commit {env['git_commit']} | {env['date']}",
           *header(env)]
    blocks: Dict[tuple, Dict[str, List[dict]]] = {}
    for r in rows:
        blocks.setdefault((r["suite"], r["mode"]), {}).setdefault(shape_label(r), []).append(r)
    head = f"  {'provider':<22} {'median ms':>10} {'p20-p80 ms':>17} {'TFLOP/s':>8} {'GB/s':>8} {'%ceil':>5} " \
           f"{'Mtok/s':>8} {'mem MB':>8} {'vs eager':>8} {'vs best':>8}"
    for (suite, mode), points in blocks.items():
        out.append("")
        out.append(f"== {suite} ({mode}) ==")
        for label, group in points.items():
            out.append(f" {label}")
            out.append(head)
            skipped = []
            for r in group:
                if r["status"] != "ok":
                    skipped.append(r)
                    continue
                best = "-" if r["speedup_vs_best_baseline"] is None else \
                    f"{r['speedup_vs_best_baseline']:.2f}x"
                eager = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
                q = f"{_fmt(r['p20_ms'], '.4g')}-{_fmt(r['p80_ms'], '.4g')}"
                mtok = None if r["tokens_per_s"] is None else r["tokens_per_s"] / 1e6
                out.append(f"  {r['provider']:<22} {_fmt(r['median_ms'], '.4g'):>10} {q:>17} "
                           f"{_fmt(r['tflops'], '.3g'):>8} {_fmt(r['gbps'], '.4g'):>8} "
                           f"{_fmt(r.get('pct_of_ceiling'), '.0f'):>5} {_fmt(mtok, '.3g'):>8} "
                           f"{_fmt(r['peak_mem_mb'], '.0f'):>8} {eager:>8} {best:>8}")
            for r in skipped:
                out.append(f"  {r['provider']:<22} {r['status'].upper()}: {r['reason']}")
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_bad = sum(r["status"] in ("failed", "error") for r in rows)
    out.append("")
    out.append(f"{n_ok} timed, {sum(r['status'] == 'skipped' for r in rows)} skipped, {n_bad} failed or errored "
               "(failed = parity check against fastenc.reference; never timed).")
    return "\n".join(out)


def write_json(path: str, rows: List[dict], env: Dict[str, str], config: dict) -> None:
    tagged = [{**r, **{k: env[k] for k in ENV_COLUMNS}} for r in rows]
    with open(path, "w") as f:
        json.dump({"env": env, "config": config, "rows": tagged}, f, indent=1, default=str)


def write_csv(path: str, rows: List[dict], env: Dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ENV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            r["speedups"] = ";".join(f"{k}={v:.3f}" for k, v in sorted(r["speedups"].items()))
            w.writerow({**{k: ("" if v is None else v) for k, v in r.items()}, **{k: env[k] for k in ENV_COLUMNS}})


def _metric(rows: List[dict]) -> Optional[str]:
    for m in ("tflops", "gbps", "tokens_per_s"):
        if any(r.get(m) for r in rows):
            return m
    return None


_YLABEL = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}


def write_plots(out_dir: str, rows: List[dict], env: Dict[str, str]) -> List[str]:
    """Throughput vs sequence length per provider; speedup over torch-eager vs padding ratio.

    Returns the files written; raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    written = []
    groups: Dict[tuple, List[dict]] = {}
    for r in ok:
        if r["sweep"] in ("seqlen", "padding"):
            fixed = tuple((k, r[k]) for k in ("head_dim", "d_model", "d_ff", "layers") if r.get(k))
            groups.setdefault((r["sweep"], r["suite"], r["mode"], r["dtype"], fixed), []).append(r)
    for (sweep, suite, mode, dtype, fixed), group in sorted(groups.items(), key=str):
        xkey = "seqlen" if sweep == "seqlen" else "padding"
        ykey = _metric(group) if sweep == "seqlen" else "speedup_vs_eager"
        if ykey is None:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for prov in sorted({r["provider"] for r in group}):
            pts = sorted((r[xkey], r[ykey]) for r in group if r["provider"] == prov and r.get(ykey) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        if not ax.lines:
            plt.close(fig)
            continue
        fixed_s = " ".join(f"{k}={v}" for k, v in fixed)
        if sweep == "seqlen":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(_YLABEL[ykey])
        else:
            ax.set_xlabel("padding ratio")
            ax.set_ylabel("speedup over torch-eager (x)")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{suite} {mode} {dtype} {fixed_s}\n{env['device_name']}, commit {env['git_commit']}",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        name = f"{suite}_{mode}_{sweep}_{dtype}" + "".join(f"_{k}{v}" for k, v in fixed) + ".png"
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_ratio_plot(path: str, title: str, groups: List[str], series: Dict[str, List[Optional[float]]],
                     ylabel: str, env: Dict[str, str], line: Optional[float] = 1.0, log: bool = False) -> str:
    """Grouped bars: one group per workload, one bar per series (missing values left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(groups) + 2), 4.6))
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=6)
    if line is not None:
        ax.axhline(line, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{title}\n{env['device_name']}, commit {env['git_commit']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
