"""benchmarks/gpu_suite.sh --dry-run: every stage of the one-command GPU suite, on CPU, tiny sizes.

The dry run runs a few quick tests (FASTENC_SUITE_TESTS), the CPU ceilings and a tiny
benchmark, and writes the same files a GPU run does.
"""
import json
import os
import subprocess
import sys

from tests.conftest import DEVICE  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def _run(args, env_extra, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "suite"
    proc = _run(["--dry-run", str(out)], {
        "FASTENC_SUITE_TESTS": "tests/test_cli.py -k formulas",
        "FASTENC_SUITE_OPS": "attention",
        "FASTENC_SUITE_SKIP_INSPECT": "1",
    })
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("build", "tests", "ceilings", "bench"):
        line = next((ln for ln in summary.splitlines() if ln.startswith(stage)), None)
        assert line is not None and " ok " in line, summary
    build_log = (out / "logs" / "build.log").read_text()
    assert "would run:" in build_log and "FASTENC_CUDA_ARCHS=" in build_log and "extension:" in build_log
    assert "1 passed" in (out / "logs" / "tests.log").read_text()
    assert (out / "tests.xml").exists()
    ceilings = json.loads((out / "ceilings.json").read_text())["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
    rows = json.loads((out / "bench" / "results.json").read_text())["rows"]
    assert {r["suite"] for r in rows} == {"attention"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["pct_of_ceiling"] > 0 for r in ok if r["tflops"])  # bench read ceilings.json
    assert (out / "bench" / "results.csv").exists() and list((out / "bench").glob("*.png"))
    assert "torch" in (out / "env.txt").read_text()


def test_usage_errors():
    proc = _run([], {})
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = _run(["--frobnicate", "x"], {})
    assert proc.returncode == 2 and "unknown option" in proc.stderr
