"""Timing: CUDA events on the GPU (after warm-up, rotating input copies past the L2), torch.utils.benchmark on CPU.

A GPU kernel that reads the same few megabytes every repetition runs out of L2 and
looks faster than it is in a real model.  ``copies_for_l2`` picks how many distinct
input copies to cycle through so that one pass touches more than 3x the L2 size.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence

import torch

L2_BYTES_DEFAULT = 60 * 2**20  # H200 / H100 L2 size, used when the device does not report it
MAX_COPIES = 64


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int  # number of timed samples
    peak_mem_mb: Optional[float]  # memory a call allocates on top of its inputs (GPU only)
    method: str  # "cuda-events" | "torch.utils.benchmark"


def quantiles(samples: Sequence[float], qs=(0.5, 0.2, 0.8)) -> List[float]:
    t = torch.tensor(list(samples), dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or L2_BYTES_DEFAULT
    return 0


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in a (nested) tuple/list/dict of inputs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def copies_for_l2(bytes_per_copy: int, device: torch.device) -> int:
    """Input copies to cycle through so that one pass over them reads more than 3x the L2."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_copy <= 0:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(3 * l2 / bytes_per_copy)))


def time_cuda(step: Callable[[int], object], n_copies: int, *, warmup_s: float = 0.05, min_time_s: float = 0.2,
              max_iters: int = 2000, device=None) -> Timing:
    """Median of per-call CUDA event times; ``step(i)`` runs on input copy i."""
    torch.cuda.synchronize(device)
    start_wall = time.perf_counter()
    i = 0
    while time.perf_counter() - start_wall < warmup_s or i < 2:  # compile, autotune, allocator warm-up
        step(i % n_copies)
        i += 1
        torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    starts, ends = [], []
    t0 = time.perf_counter()
    it = 0
    while it < max_iters and (time.perf_counter() - t0 < min_time_s or it < 5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(it % n_copies)
        e.record()
        starts.append(s)
        ends.append(e)
        it += 1
        if it % 50 == 0:
            e.synchronize()  # keep the wall-clock check honest
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    med, p20, p80 = quantiles(samples)
    return Timing(med, p20, p80, len(samples), peak_mb, "cuda-events")


def time_cpu(step: Callable[[int], object], *, min_time_s: float = 0.2) -> Timing:
    """torch.utils.benchmark's blocked_autorange; quantiles over its per-block means."""
    from torch.utils.benchmark import Timer

    step(0)  # warm-up (lazy init, first-call allocations)
    m = Timer(stmt="step(0)", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time_s
    )
    med, p20, p80 = quantiles(m.times)
    return Timing(med * 1e3, p20 * 1e3, p80 * 1e3, len(m.times), None, "torch.utils.benchmark")


def time_step(step: Callable[[int], object], n_copies: int, device: torch.device, *, min_time_s: float) -> Timing:
    if device.type == "cuda":
        return time_cuda(step, n_copies, min_time_s=min_time_s, device=device)
    return time_cpu(step, min_time_s=min_time_s)
