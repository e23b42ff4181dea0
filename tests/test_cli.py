"""The ``fastenc`` CLI and the benchmark package behind it (fastenc/__main__.py, fastenc/bench/).

The tiny ``python -m fastenc bench`` run goes through every layer: plan, providers, parity
check, timing, table, JSON, CSV and plots.  The unit tests pin the FLOP/byte formulas and
show that a provider returning wrong numbers is reported as failed and never timed.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before fastenc is imported)

from fastenc.__main__ import main
from fastenc.bench import formulas, output, plans, providers, runner, timing, workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OPS = "attention,layer_norm,encoder"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "fastenc", "bench", "--size", "tiny", "--ops", TINY_OPS, "--out", str(out),
         "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_bench_tiny_writes_json_csv_png(tiny_run):
    out, stdout = tiny_run
    data = json.loads((out / "results.json").read_text())
    env, rows = data["env"], data["rows"]
    for key in output.ENV_COLUMNS:
        assert env[key], key
    assert data["config"]["size"] == "tiny"
    assert {r["suite"] for r in rows} == set(TINY_OPS.split(","))
    for r in rows:
        assert set(output.COLUMNS + output.ENV_COLUMNS) <= set(r), sorted(set(output.COLUMNS) - set(r))
        assert r["git_commit"] == env["git_commit"] and r["device_name"] == env["device_name"]
        assert r["status"] in ("ok", "skipped"), f"{r['suite']} {r['mode']} {r['provider']}: {r['reason']}"
        if r["status"] == "ok":
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["tokens_per_s"] > 0 and r["samples"] >= 1
            assert (r["tflops"] or 0) > 0 or (r["gbps"] or 0) > 0, r
        else:
            assert r["reason"], r
    ok = {(r["suite"], r["provider"]) for r in rows if r["status"] == "ok"}
    for suite in TINY_OPS.split(","):
        assert (suite, "torch-eager") in ok, suite
    # every fastenc row that ran has a speedup against each baseline that ran beside it
    fast = [r for r in rows if r["status"] == "ok" and r["provider"].startswith("fastenc")]
    assert fast and all(r["speedup_vs_eager"] > 0 for r in fast)

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == output.COLUMNS + output.ENV_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert all(r["device_name"] == env["device_name"] and r["date"] == env["date"] for r in csv_rows)

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(n.startswith("attention_fwd_seqlen") for n in pngs), pngs
    assert any(n.startswith("encoder_fwd_padding") for n in pngs), pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)

    # the table names each skipped provider with its reason
    assert "== attention (fwd) ==" in stdout and "torch-compile" in stdout and "SKIPPED: not at --size tiny" in stdout


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    for args, message in ((["--ops", "attention,convolution"], "unknown --ops"), (["--dtype", "fp8"], "unknown dtype"),
                          (["--providers", "cublas-magic"], "unknown providers")):
        assert main(["bench", *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastenc bench: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="unknown size"):
        plans.plan("huge", torch.device("cpu"), [torch.float32])


def test_report_prints_backends(capsys):
    assert main(["report", "--device", "cpu", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    for op in ("attention", "layer_norm", "ffn"):
        assert op in text


# --------------------------------------------------------------------------- formulas


def test_flop_formulas():
    b, h, n, d = 3, 5, 7, 16
    fwd = formulas.attention_flops([n] * b, [n] * b, h, d)
    assert fwd == 4 * b * h * n * n * d
    assert formulas.attention_flops([n] * b, [n] * b, h, d, causal=True) == fwd / 2
    assert formulas.attention_flops([n] * b, [n] * b, h, d, mode="bwd") == 2.5 * fwd
    # padding: only real query x key pairs count
    assert formulas.attention_flops([4, 2], [4, 2], h, d) == 4 * h * d * (16 + 4)
    t, dm, f = 11, 8, 32
    assert formulas.ffn_flops(t, dm, f) == 2 * t * dm * f * 2
    assert formulas.ffn_flops(t, dm, f, mode="bwd") == 2 * formulas.ffn_flops(t, dm, f)
    assert formulas.ffn_flops(t, dm, f, mode="train") == 3 * formulas.ffn_flops(t, dm, f)
    # LN forward: x and branch read, y written (T x N each) + weight, bias, branch bias read
    assert formulas.layer_norm_bytes(t, dm, 2) == 3 * t * dm * 2 + 3 * dm * 2
    assert formulas.layer_norm_bytes(t, dm, 2, prenorm=True) == 4 * t * dm * 2 + 3 * dm * 2
    lay = formulas.encoder_layer_flops([n, n], 64, 4, 256)
    assert lay == 2 * 2 * n * 4 * 64 * 64 + 2 * 2 * n * 64 * 256 * 2 + 4 * 64 * 2 * n * n
    with pytest.raises(ValueError, match="unknown mode"):
        formulas.ffn_flops(t, dm, f, mode="sideways")


def test_padded_lengths_hit_the_ratio():
    for batch, seqlen, pad in ((8, 128, 0.0), (8, 128, 0.25), (32, 512, 0.5), (16, 64, 0.75), (1, 10, 0.5)):
        lengths = workloads.padded_lengths(batch, seqlen, pad)
        assert len(lengths) == batch and all(1 <= n <= seqlen for n in lengths)
        assert abs(1 - sum(lengths) / (batch * seqlen) - pad) < 0.05
    kpm = workloads.key_padding_mask([3, 1], 4, "cpu")
    assert kpm.tolist() == [[False, False, False, True], [False, True, True, True]]
    assert workloads.key_padding_mask([4, 4], 4, "cpu") is None
    with pytest.raises(ValueError, match="padding ratio"):
        workloads.padded_lengths(2, 8, 1.0)


def test_l2_rotation_and_quantiles(monkeypatch):
    assert timing.copies_for_l2(1 << 20, torch.device("cpu")) == 1
    monkeypatch.setattr(timing, "l2_bytes", lambda device: 60 * 2**20)
    assert timing.copies_for_l2(10 * 2**20, torch.device("cuda")) == 18  # 18 x 10 MB > 3 x 60 MB
    assert timing.copies_for_l2(1024, torch.device("cuda")) == timing.MAX_COPIES
    assert timing.copies_for_l2(1 << 30, torch.device("cuda")) == 1
    med, p20, p80 = timing.quantiles([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    assert timing.tensor_bytes((torch.zeros(4, dtype=torch.float16), [torch.zeros(2)], None)) == 16


# --------------------------------------------------------------------------- the parity guard


def _provider(fn_builder, name="fake"):
    return providers.Provider(name, ("layer_norm",), fn_builder, baseline=False)


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_wrong_results_are_never_timed(mode):
    w = workloads.layer_norm(mode, "seqlen", torch.device("cpu"), torch.float32, batch=2, seqlen=7, d_model=96)
    good = _provider(lambda w: providers.Impl(lambda i: w.reference(i, False)))
    res = runner.run_one(w, good, min_time_s=0.001)
    assert res.status == "ok" and res.timing.median_ms > 0, res.reason

    off = _provider(lambda w: providers.Impl(lambda i: w.reference(i, False) * 1.01))
    res = runner.run_one(w, off, min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "parity check failed" in res.reason
    assert res.row()["median_ms"] is None

    nan = _provider(lambda w: providers.Impl(lambda i: w.reference(i, False) + float("nan")))
    res = runner.run_one(w, nan, min_time_s=0.001)
    assert res.status == "failed" and "non-finite" in res.reason

    if mode == "bwd":  # right values, wrong gradient
        def wrong_grad(w):
            return providers.Impl(lambda i: w.reference(i, False).detach() + 0.5 * i[0] - 0.5 * i[0].detach())
        res = runner.run_one(w, _provider(wrong_grad), min_time_s=0.001)
        assert res.status == "failed" and "input gradient" in res.reason


def test_unavailable_and_crashing_providers_are_reported():
    w = workloads.layer_norm("fwd", "seqlen", torch.device("cpu"), torch.float32, batch=1, seqlen=3, d_model=32)

    def unavailable(w):
        raise providers.Unavailable("needs a GPU")

    res = runner.run_one(w, _provider(unavailable), min_time_s=0.001)
    assert (res.status, res.reason) == ("skipped", "needs a GPU")

    def crash(i):
        raise RuntimeError("kernel exploded")

    res = runner.run_one(w, _provider(lambda w: providers.Impl(crash)), min_time_s=0.001)
    assert res.status == "error" and "kernel exploded" in res.reason and res.timing is None


def test_forced_backend_that_cannot_run_is_skipped_not_substituted(monkeypatch):
    # Triton on CPU tensors without the interpreter: skipped with the dispatcher's reason, never
    # timed as the reference.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = workloads.layer_norm("fwd", "seqlen", torch.device("cpu"), torch.float32, batch=1, seqlen=5, d_model=32)
    (triton,) = [p for p in providers.providers_for("layer_norm") if p.name == "fastenc-triton"]
    res = runner.run_one(w, triton, min_time_s=0.001)
    assert res.status == "skipped" and "TRITON_INTERPRET" in res.reason and res.timing is None
    # GEMM-path variants of the CUDA FFN exist only for CUDA tensors
    w = workloads.ffn("fwd", "seqlen", torch.device("cpu"), torch.float32, batch=1, seqlen=5, d_model=32, d_ff=64)
    (cutlass,) = [p for p in providers.providers_for("ffn") if p.name == "fastenc-cuda-cutlass"]
    res = runner.run_one(w, cutlass, min_time_s=0.001)
    assert res.status == "skipped" and "CUDA tensors" in res.reason


def test_speedups_and_table():
    w = workloads.layer_norm("fwd", "seqlen", torch.device("cpu"), torch.float32, batch=1, seqlen=3, d_model=32)
    t = lambda ms: timing.Timing(ms, ms, ms, 3, None, "test")  # noqa: E731
    results = [
        runner.Result(w, "fastenc-triton", "ok", timing=t(1.0)),
        runner.Result(w, "torch-eager", "ok", timing=t(4.0), baseline=True),
        runner.Result(w, "torch-compile", "ok", timing=t(2.0), baseline=True),
        runner.Result(w, "sdpa-flash", "skipped", reason="no GPU", baseline=True),
    ]
    runner.add_speedups(results)
    row = results[0].row()
    assert row["speedups"] == {"torch-eager": 4.0, "torch-compile": 2.0}
    assert (row["speedup_vs_eager"], row["speedup_vs_best_baseline"], row["best_baseline"]) == (4.0, 2.0,
                                                                                                 "torch-compile")
    assert row["gbps"] == pytest.approx(w.bytes / 1e-3 / 1e9)
    env = {k: "x" for k in output.ENV_COLUMNS}
    table = output.format_table([r.row() for r in results], env)
    assert "SKIPPED: no GPU" in table and "2.00x" in table
