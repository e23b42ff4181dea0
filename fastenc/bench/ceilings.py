"""Device ceilings: this machine's copy bandwidth and GEMM throughput, measured here.

GPU (``python -m fastenc ceilings``, the GPU suite): a 4 GiB device-to-device copy and a bf16
8192³ matmul.  CPU (the calibration ``python -m fastenc bench`` runs first on a CPU, a few
seconds; also ``python -m fastenc ceilings --device cpu``), with the run's thread count:

* GEMM rates y = x Wᵀ at M = 2048 rows and the encoder's three shapes (K, N) = (768, 768)
  (attention projections), (768, 3072) and (3072, 768) (the FFN), FLOP-weighted over them
  (2·M·K·N per GEMM), in fp32 and bf16 through oneDNN's inner product as fastenc calls it
  (``fastenc._C.cpu_linear`` on a weight prepacked by ``cpu_pack_linear_weight``) and through
  torch's ``F.linear`` (MKL in fp32, oneDNN in bf16), and in int8 through ``torch._int_mm``
  (u8 activations x s8 weights -> s32: the VNNI form); a precision's rate is its best library's;
* copy bandwidth: a 64 MiB fp32 copy (above any L3 here), GB/s counting bytes read + written.

All calls are timed round-robin (``timing.time_interleaved``), so a busy machine slows each
alike.  Each row's ``pct_of_ceiling`` is its FLOP rate over the rate of the precision it
ran in (CPU), or over the bf16 matmul's (GPU); rows without FLOPs use the copy's GB/s.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from . import timing
from .env import environment

CPU_GEMM_SHAPES = ((768, 768), (768, 3072), (3072, 768))  # (K, N)
CPU_GEMM_ROWS = {"tiny": 16, "cpu": 2048, "gpu": 2048}  # M; tiny: a smoke test of the same code
CPU_MIN_TIME_S = {"tiny": 0.02, "cpu": 2.5, "gpu": 2.5}  # timed seconds of the whole calibration
CPU_COPY_BYTES = {"tiny": 1 << 20, "cpu": 64 << 20, "gpu": 64 << 20}
PRECISIONS = ("fp32", "bf16", "int8")
INT8_LIBRARY = "torch._int_mm u8 x s8 -> s32"


def _gpu(device: torch.device, min_time_s: float) -> Dict[str, float]:
    nbytes = 4 << 30
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = timing.time_step(lambda i: dst.copy_(src), 1, device, min_time_s=min_time_s)
    n = 8192
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    t_mm = timing.time_step(lambda i: a @ b, 1, device, min_time_s=min_time_s)
    return {
        "copy_bytes": nbytes, "copy_ms": t_copy.median_ms, "copy_gbps": 2 * nbytes / t_copy.median_ms / 1e6,
        "matmul_n": n, "matmul_dtype": "bfloat16", "matmul_ms": t_mm.median_ms,
        "matmul_tflops": 2 * n ** 3 / t_mm.median_ms / 1e9,
    }


def _cpu_gemms(m: int) -> Tuple[Dict[Tuple[str, str], list], Dict[str, str]]:
    """{(precision, library): [step per shape]} and {precision or library: why it is not measured}."""
    g = torch.Generator().manual_seed(0)
    ext = backends.extension()
    steps: Dict[Tuple[str, str], list] = {}
    missing: Dict[str, str] = {}
    for prec, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for k, n in CPU_GEMM_SHAPES:
            x = torch.randn(m, k, generator=g).to(dtype)
            w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
            steps.setdefault((prec, "torch F.linear"), []).append(lambda i, x=x, w=w: F.linear(x, w))
            if ext is not None:
                try:
                    packed = ext.cpu_pack_linear_weight(w)
                except (RuntimeError, TypeError, ValueError) as e:  # no oneDNN kernels for this dtype here
                    missing[f"{prec} oneDNN"] = str(e).splitlines()[0]
                    continue
                steps.setdefault((prec, "oneDNN fastenc._C.cpu_linear"), []).append(
                    lambda i, x=x, p=packed: ext.cpu_linear(x, p, None))
    if ext is None:
        missing["oneDNN"] = "fastenc._C is not built (fastenc's cpu_linear)"
    if not hasattr(torch, "_int_mm"):
        missing["int8"] = f"this torch has no torch._int_mm ({torch.__version__})"
        return steps, missing
    for k, n in CPU_GEMM_SHAPES:
        a = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
        b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        try:
            torch._int_mm(a[:32], b)
        except RuntimeError as e:
            missing["int8"] = f"torch._int_mm fails on CPU here: {str(e).splitlines()[0]}"
            return steps, missing
        steps.setdefault(("int8", INT8_LIBRARY), []).append(lambda i, a=a, b=b: torch._int_mm(a, b))
    return steps, missing


def calibrate_cpu(size: str = "cpu") -> dict:
    """GEMM rates per precision and library, and copy bandwidth, with ``torch.get_num_threads()`` threads."""
    m = CPU_GEMM_ROWS[size]
    gemms, missing = _cpu_gemms(m)
    nbytes = CPU_COPY_BYTES[size]
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    named = {"copy": (lambda i: dst.copy_(src), 1)}
    for (prec, lib), shape_steps in gemms.items():
        for (k, n), step in zip(CPU_GEMM_SHAPES, shape_steps):
            step(0)  # first call: oneDNN primitive creation, allocations
            named[f"{prec}|{lib}|{k}x{n}"] = (step, 1)
    times, errors = timing.time_interleaved(named, torch.device("cpu"), min_time_s=CPU_MIN_TIME_S[size],
                                            min_rounds=3, max_rounds=50)
    by_lib: Dict[str, Dict[str, float]] = {}
    for prec, lib in gemms:
        keys = [f"{prec}|{lib}|{k}x{n}" for k, n in CPU_GEMM_SHAPES]
        if all(k in times for k in keys):
            flops = sum(2.0 * m * k * n for k, n in CPU_GEMM_SHAPES)
            by_lib.setdefault(prec, {})[lib] = flops / sum(times[k].median_ms for k in keys) / 1e6
        else:
            missing[f"{prec} {lib}"] = "; ".join(str(errors[k]) for k in keys if k in errors) or "not timed"
    best = {p: max(libs.items(), key=lambda kv: kv[1]) for p, libs in by_lib.items()}
    for p in PRECISIONS:
        if p not in best:
            missing.setdefault(p, "; ".join(v for k, v in missing.items() if k.startswith(p)) or "not measured")
    res = {
        "kind": "cpu", "threads": torch.get_num_threads(), "gemm_rows": m,
        "gemm_shapes": ", ".join(f"{m}x{k}x{n}" for k, n in CPU_GEMM_SHAPES),
        "gemm_gflops": {p: v for p, (_, v) in best.items()},  # int8: GOP/s
        "gemm_library": {p: lib for p, (lib, _) in best.items()},
        "gemm_gflops_by_library": by_lib, "missing": missing,
        "copy_bytes": nbytes, "copy_gbps": 2 * nbytes / times["copy"].median_ms / 1e6 if "copy" in times else None,
        # the GPU ceilings' keys, so --ceilings files of either kind read alike
        "matmul_dtype": "float32", "matmul_tflops": best["fp32"][1] / 1e3 if "fp32" in best else None,
    }
    return res


def calibration_line(res: dict) -> str:
    """The calibration in one line (the bench's header, the summaries)."""
    if res.get("kind") != "cpu":
        return (f"ceilings: copy {res['copy_gbps']:.0f} GB/s (read+write), {res['matmul_dtype']} "
                f"{res['matmul_n']}^3 matmul {res['matmul_tflops']:.3g} TFLOP/s")
    rates = []
    for p in PRECISIONS:
        unit = "GOP/s" if p == "int8" else "GFLOP/s"
        v = res["gemm_gflops"].get(p)
        rates.append(f"{p} {v:.0f} {unit} ({res['gemm_library'][p]})" if v else f"{p} not measured "
                     f"({res['missing'].get(p, '?')})")
    copy = "-" if res.get("copy_gbps") is None else f"{res['copy_gbps']:.0f}"
    return (f"calibration ({res['threads']} threads, GEMM {res['gemm_shapes']}): " + ", ".join(rates)
            + f"; copy {copy} GB/s (read+write)")


def pct_of_ceiling(row: dict, ceilings: dict) -> Optional[float]:
    """A row's FLOP rate over the GEMM rate of the precision it ran in (CPU calibration) or over the matmul's
    (GPU ceilings); a row without FLOPs: its GB/s over the copy's."""
    if row.get("tflops"):
        rate = ceilings.get("gemm_gflops", {}).get(row.get("precision") or row["dtype"])
        tflops = rate / 1e3 if rate else ceilings.get("matmul_tflops")
        return 100 * row["tflops"] / tflops if tflops else None
    if row.get("gbps") and ceilings.get("copy_gbps"):
        return 100 * row["gbps"] / ceilings["copy_gbps"]
    return None


def measure(device: torch.device, *, min_time_s: float = 0.2) -> dict:
    return _gpu(device, min_time_s) if device.type == "cuda" else calibrate_cpu("cpu")


def run(device: torch.device, out_dir: str, log=print) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    res = measure(device)
    env = environment(device)
    with open(os.path.join(out_dir, "ceilings.json"), "w") as f:
        json.dump({"env": env, "ceilings": res}, f, indent=1)
    log(f"ceilings on {env['device_name']}: {calibration_line(res)}")
    return res
