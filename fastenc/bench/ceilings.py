"""Device ceilings: what this machine's copy bandwidth and matmul throughput are, measured here.

GB/s counts bytes read + written (a D2D copy of N bytes moves 2N).  TFLOP/s of a
square matmul is 2·n³ / time.  On a GPU: 4 GiB copy, bf16 8192³; on a CPU: 256 MiB
copy, fp32 1024³ (a smoke test of the same code).
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

from . import timing
from .env import environment


def measure(device: torch.device, *, min_time_s: float = 0.2) -> Dict[str, float]:
    gpu = device.type == "cuda"
    nbytes = (4 << 30) if gpu else (64 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = timing.time_step(lambda i: dst.copy_(src), 1, device, min_time_s=min_time_s)
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t_mm = timing.time_step(lambda i: a @ b, 1, device, min_time_s=min_time_s)
    return {
        "copy_bytes": nbytes, "copy_ms": t_copy.median_ms, "copy_gbps": 2 * nbytes / t_copy.median_ms / 1e6,
        "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_ms": t_mm.median_ms,
        "matmul_tflops": 2 * n ** 3 / t_mm.median_ms / 1e9,
    }


def run(device: torch.device, out_dir: str, log=print) -> Dict[str, float]:
    os.makedirs(out_dir, exist_ok=True)
    res = measure(device)
    env = environment(device)
    with open(os.path.join(out_dir, "ceilings.json"), "w") as f:
        json.dump({"env": env, "ceilings": res}, f, indent=1)
    log(f"ceilings on {env['device_name']}: copy {res['copy_gbps']:.0f} GB/s (read+write), "
        f"{res['matmul_dtype']} {res['matmul_n']}^3 matmul {res['matmul_tflops']:.3g} TFLOP/s")
    return res
