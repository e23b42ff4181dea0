"""Timing: CUDA events on the GPU (after warm-up, rotating input copies past the L2), torch.utils.benchmark on CPU;
or several providers round-robin in one loop (``time_interleaved``, wall clock, medians over rounds).

A GPU kernel that reads the same few megabytes every repetition runs out of L2 and
looks faster than it is in a real model.  ``copies_for_l2`` picks how many distinct
input copies to cycle through so that one pass touches more than 3x the L2 size.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    method: str  # "cuda-events" | "torch.utils.benchmark" | "interleaved"


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


BLOCK_S = 1e-3  # interleaved: calls shorter than this are timed in blocks of about this length


def time_interleaved(steps: Dict[str, Tuple[Callable[[int], object], int]], device: torch.device, *,
                     min_time_s: float, min_rounds: int = 3, max_rounds: int = 50, pause_s: float = 0.0
                     ) -> Tuple[Dict[str, Timing], Dict[str, BaseException]]:
    """Time several providers round-robin: {name: (step(i), n_copies)} -> ({name: Timing}, {name: error}).

    Each step has run once already (the parity check: compile, allocations).  A first round
    in order sizes the blocks (calls under ``BLOCK_S`` run in blocks; a sample is a block's
    mean; a longer call is that provider's first sample) and the rounds (enough for
    ``min_time_s`` of samples, within [min_rounds, max_rounds]).  Each later round runs every
    provider once, starting one further along each time, so none always follows the same
    neighbour; ``pause_s`` of sleep before each sample lets the previous provider's spinning
    worker threads go idle.  Wall clock, synchronised on CUDA; a provider that raises is dropped.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    errors: Dict[str, BaseException] = {}
    samples: Dict[str, List[float]] = {}
    calls: Dict[str, int] = {}

    def run(k: str, block: int) -> Optional[float]:
        """Seconds per call over a block of calls, or None (the error is recorded)."""
        step, n = steps[k]
        if pause_s:
            time.sleep(pause_s)
        try:
            sync()
            t0 = time.perf_counter()
            for _ in range(block):
                calls[k] = calls.get(k, 0) + 1
                step(calls[k] % n)
            sync()
            return max(time.perf_counter() - t0, 1e-9) / block
        except Exception as e:  # noqa: BLE001  (reported in the provider's row)
            errors[k] = e
            return None

    est = {k: t for k in steps for t in [run(k, 1)] if t is not None}
    names = list(est)
    if not names:
        return {}, errors
    block = {k: max(1, math.ceil(BLOCK_S / est[k])) for k in names}
    for k in names:
        samples[k] = [est[k] * 1e3] if block[k] == 1 else []
    per_round = sum(block[k] * est[k] for k in names)
    rounds = max(min_rounds, min(max_rounds, math.ceil(min_time_s / per_round)))
    for r in range(rounds):
        live = [k for k in names if k not in errors]
        if not live:
            break
        shift = r % len(live)
        for k in live[shift:] + live[:shift]:
            if len(samples[k]) < rounds:
                t = run(k, block[k])
                if t is not None:
                    samples[k].append(t * 1e3)
    out = {}
    for k in names:
        if k not in errors and samples[k]:
            med, p20, p80 = quantiles(samples[k])
            out[k] = Timing(med, p20, p80, len(samples[k]), None, "interleaved")
    return out, errors
