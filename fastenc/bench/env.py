"""What every result row is tagged with: device, the host CPU (model, family/model/stepping, the
instruction sets that matter, cores), versions, git commit, date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo().get("model name") or platform.processor() or "cpu"


# /proc/cpuinfo flag -> the name printed: the instruction sets the CPU kernels (fastenc's, oneDNN's, ORT's,
# OpenVINO's) pick their code paths by.
ISA_FLAGS = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
    "avx512_bf16": "AVX512_BF16", "avx512_vnni": "AVX512_VNNI", "avx_vnni": "AVX_VNNI",
    "amx_tile": "AMX_TILE", "amx_bf16": "AMX_BF16", "amx_int8": "AMX_INT8",
}
# Environment variables that cap the instruction set torch's and oneDNN's kernels use.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _cpuinfo(path: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none: not Linux)."""
    out: Dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def cpu_info(path: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The host CPU: model name, vendor, family/model/stepping, ISA flags present (of ISA_FLAGS), cores this
    process may use, and torch's kernel capability (what ATen dispatches to).  Two CPUs of one model name can
    differ in all the rest (an "AMD EPYC" is any of five generations)."""
    info = _cpuinfo(path)
    flags = set(info.get("flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    isa = " ".join(name for flag, name in ISA_FLAGS.items() if flag in flags)
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    return {
        "cpu_model": info.get("model name") or platform.processor() or "unknown",
        "cpu_vendor": info.get("vendor_id", "unknown"),
        "cpu_family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping"))
        if info else "unknown",
        "cpu_isa": (isa or "none of " + " ".join(ISA_FLAGS.values())) if info else "unknown",
        "cpu_cores": str(cores),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability() + (f" ({', '.join(caps)})" if caps else ""),
    }


def calibration_fields(calibration: Optional[dict]) -> Dict[str, str]:
    """The CPU calibration's rates (``ceilings.calibrate_cpu``) as the flat strings every row is tagged with;
    "-" where not measured (GPU runs: their ceilings are ``fastenc ceilings``')."""
    res = calibration or {}
    rates = res.get("gemm_gflops", {})

    def f(v) -> str:
        return "-" if v is None else f"{v:.4g}"
    return {"gemm_fp32_gflops": f(rates.get("fp32")), "gemm_bf16_gflops": f(rates.get("bf16")),
            "gemm_int8_gops": f(rates.get("int8")), "copy_gbps": f(res.get("copy_gbps"))}


def header(env: Dict[str, str]) -> List[str]:
    """The machine as the results record it: the CPU, and the rates the calibration measured (when it ran)."""
    lines = [f"CPU {env['cpu_model']} ({env['cpu_vendor']}, family/model/stepping {env['cpu_family_model_stepping']})"
             f", {env['cpu_cores']} cores, {env['threads']} threads; ISA {env['cpu_isa']}; "
             f"ATen kernels {env['aten_cpu_capability']}"]
    if env.get("gemm_fp32_gflops", "-") != "-" or env.get("copy_gbps", "-") != "-":
        lines.append(f"calibration, {env['threads']} threads: GEMM fp32 {env['gemm_fp32_gflops']} GFLOP/s, bf16 "
                     f"{env['gemm_bf16_gflops']} GFLOP/s, int8 {env['gemm_int8_gops']} GOP/s; copy "
                     f"{env['copy_gbps']} GB/s")
    return lines


def git_commit() -> str:
    """Commit of the fastenc checkout (suffix '-dirty' with local changes); 'unknown' outside git."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, calibration: Optional[dict] = None) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from .. import __version__

    return {
        "device_name": device_name(device),
        **cpu_info(),
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else "none",
        "fastenc": __version__,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "threads": str(torch.get_num_threads()),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **calibration_fields(calibration),
    }
