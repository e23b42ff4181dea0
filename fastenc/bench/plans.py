"""Sweep plans: which workloads each ``--size`` runs, most important first.

* ``tiny``: seconds on a CPU (CI); no torch.compile (its compile time would be all we measure).
* ``cpu``: a few minutes on a CPU.
* ``gpu``: the full sweep, sized for about five minutes on one H200 (``benchmarks/gpu_suite.sh``):
  sequence length 128-4096 (attention to 16384) at constant tokens, batch, head dim 64/128,
  bf16 and fp16, padding 0-50% (end to end 0-75%).

torch.compile (whose compile time is seconds per shape) and the fastenc-reference path
(the same math as torch-eager through the dispatcher) run on a subset of points, named
in each skipped row, so a full run fits its time budget.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import workloads as W

SIZES = ("tiny", "cpu", "gpu")
MIN_TIME_S = {"tiny": 0.01, "cpu": 0.1, "gpu": 0.05}


@dataclasses.dataclass
class Entry:
    suite: str
    label: str  # for the progress bar
    make: Callable[[], W.Workload]  # built lazily: layer/encoder workloads hold model weights
    exclude: Dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why it does not run here


def _entry(suite, mode, sweep, device, dtype, exclude=None, **kw) -> Entry:
    label = f"{suite} {mode} {W.dtype_name(dtype)} " + " ".join(f"{k}={v}" for k, v in kw.items())
    if suite in ("layer", "encoder", "train"):
        make = functools.partial(W.model_workload, suite, mode, sweep, device, dtype, **kw)
    else:
        make = functools.partial(getattr(W, suite), mode, sweep, device, dtype, **kw)
    return Entry(suite, label, make, dict(exclude or {}))


NO_COMPILE_TINY = {"torch-compile": "not at --size tiny (compile time would dominate; use --size cpu)"}
SUBSET = "runs on a subset of this sweep's points to fit the time budget"


def _only_at(keep: bool, *providers: str) -> Dict[str, str]:
    return {} if keep else {p: SUBSET for p in providers}


def plan(size: str, device: torch.device, dtypes: Sequence[torch.dtype],
         sweep_dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Entry]:
    """Workloads of one size; ``dtypes[0]`` is the main dtype, ``sweep_dtypes`` the dtype sweep's."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    dt = dtypes[0]
    extra_dtypes = [d for d in (sweep_dtypes or dtypes) if d != dt]
    return {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}[size](device, dt, extra_dtypes)


def _tiny(dev, dt, extra) -> List[Entry]:
    x = NO_COMPILE_TINY
    attn = dict(heads=2, head_dim=32)
    model = dict(d_model=64, nhead=2, d_ff=128)
    e = [
        _entry("attention", "fwd", "seqlen", dev, dt, x, batch=2, seqlen=48, **attn),
        _entry("attention", "bwd", "padding", dev, dt, x, batch=4, seqlen=48, padding=0.5, **attn),
        _entry("layer_norm", "fwd", "seqlen", dev, dt, x, batch=2, seqlen=64, d_model=256),
        _entry("layer_norm", "bwd", "seqlen", dev, dt, x, batch=2, seqlen=64, d_model=256),
        _entry("ffn", "fwd", "seqlen", dev, dt, x, batch=2, seqlen=64, d_model=128, d_ff=512),
        _entry("ffn", "bwd", "seqlen", dev, dt, x, batch=2, seqlen=64, d_model=128, d_ff=512),
        _entry("layer", "train", "seqlen", dev, dt, x, batch=2, seqlen=32, layers=1, **model),
    ]
    for pad in (0.0, 0.5):
        e.append(_entry("encoder", "fwd", "padding", dev, dt, x, batch=4, seqlen=32, layers=2, padding=pad, **model))
    e.append(_entry("train", "train", "seqlen", dev, dt, x, batch=2, seqlen=32, layers=2, **model))
    e.append(_entry("train", "train", "dropout", dev, dt, x, batch=2, seqlen=32, layers=2, padding=0.5, dropout=0.1,
                    **model))
    e += [_entry("attention", "fwd", "dtype", dev, d, x, batch=2, seqlen=48, **attn) for d in extra]
    return e


def _cpu(dev, dt, extra) -> List[Entry]:
    e = []
    for mode in ("fwd", "bwd"):
        for n in (128, 256, 512):
            e.append(_entry("attention", mode, "seqlen", dev, dt, _only_at(n == 256, "torch-compile"),
                            batch=1024 // n, seqlen=n, heads=4, head_dim=64))
    for pad in (0.0, 0.25, 0.5):
        e.append(_entry("attention", "fwd", "padding", dev, dt, _only_at(False, "torch-compile"),
                        batch=8, seqlen=128, heads=4, head_dim=64, padding=pad))
    for mode in ("fwd", "bwd"):
        for n in (128, 512):
            e.append(_entry("layer_norm", mode, "seqlen", dev, dt, _only_at(n == 512, "torch-compile"),
                            batch=8, seqlen=n, d_model=768))
            e.append(_entry("ffn", mode, "seqlen", dev, dt, _only_at(n == 128, "torch-compile"),
                            batch=4, seqlen=n, d_model=384, d_ff=1536))
    model = dict(d_model=256, nhead=4, d_ff=1024)
    for mode in ("fwd", "train"):
        for n in (64, 256):
            e.append(_entry("layer", mode, "seqlen", dev, dt, _only_at(n == 64, "torch-compile"),
                            batch=1024 // n, seqlen=n, layers=1, **model))
    small = dict(d_model=128, nhead=2, d_ff=512)
    for pad in (0.0, 0.25, 0.5, 0.75):
        e.append(_entry("encoder", "fwd", "padding", dev, dt, _only_at(pad == 0.5, "torch-compile"),
                        batch=8, seqlen=128, layers=2, padding=pad, **small))
    # The padding-free training goal (CPU: >= 1.5x torch eager at 50% padding) is read off these rows.
    for pad in (0.0, 0.5):
        e.append(_entry("train", "train", "padding", dev, dt, _only_at(pad == 0.0, "torch-compile"),
                        batch=16, seqlen=128, layers=4, padding=pad, **model))
    e.append(_entry("train", "train", "dropout", dev, dt, _only_at(False, "torch-compile"),
                    batch=16, seqlen=128, layers=4, padding=0.5, dropout=0.1, **model))
    for d in extra:
        e.append(_entry("attention", "fwd", "dtype", dev, d, batch=4, seqlen=256, heads=4, head_dim=64))
    return e


BERT = dict(d_model=768, nhead=12, d_ff=3072)
GPU_TOKENS = 16384  # batch x length held constant in length sweeps (FlashAttention-3's convention)
HEAVY = {p: "runs on the torch.compile comparison points (sweep 'compile') to fit the time budget"
         for p in ("torch-compile", "fastenc-reference")}


def _gpu(dev, dt, extra) -> List[Entry]:
    """Most important first: a --time-budget cut drops the tail (encoder length, batch, dtype sweeps)."""
    e = []
    # Attention: hidden 2048 (H x D), length 128..16384.
    for d in (128, 64):
        for mode in ("fwd", "bwd"):
            for n in (128, 512, 1024, 2048, 4096, 8192, 16384):
                e.append(_entry("attention", mode, "seqlen", dev, dt, HEAVY,
                                batch=GPU_TOKENS // n, seqlen=n, heads=2048 // d, head_dim=d))
    for pad in (0.0, 0.25, 0.5):
        for mode in ("fwd", "bwd"):
            e.append(_entry("attention", mode, "padding", dev, dt, HEAVY,
                            batch=32, seqlen=512, heads=12, head_dim=64, padding=pad))
    # Per-token ops: only the token count and the widths matter, so one point per width (issue #4:
    # hidden 384..8192 at 32k rows; issue #8: 16k tokens), torch.compile included (quick to build).
    NO_REF = {"fastenc-reference": HEAVY["fastenc-reference"]}
    for mode in ("fwd", "bwd"):
        for d_model in (384, 768, 1024, 4096, 8192):
            e.append(_entry("layer_norm", mode, "hidden", dev, dt, NO_REF, batch=64, seqlen=512, d_model=d_model))
        for d_model, d_ff in ((768, 3072), (1024, 4096)):
            e.append(_entry("ffn", mode, "hidden", dev, dt, NO_REF, batch=GPU_TOKENS // 512, seqlen=512,
                            d_model=d_model, d_ff=d_ff))
    # cuBLASLt's fused epilogues have tanh-GELU and ReLU only: measure them at issue #8's 16k tokens.
    for act in ("gelu_tanh", "relu"):
        for mode in ("fwd", "bwd"):
            e.append(_entry("ffn", mode, "activation", dev, dt, HEAVY, batch=GPU_TOKENS // 512, seqlen=512,
                            d_model=768, d_ff=3072, activation=act))
    for mode in ("fwd", "train"):
        for n in (128, 512, 1024, 4096):
            e.append(_entry("layer", mode, "seqlen", dev, dt, HEAVY, batch=GPU_TOKENS // n, seqlen=n, layers=1,
                            **BERT))
    for pad in (0.0, 0.25, 0.5, 0.75):
        e.append(_entry("encoder", "fwd", "padding", dev, dt, HEAVY, batch=32, seqlen=512, layers=12, padding=pad,
                        **BERT))
    for pad in (0.0, 0.5):
        e.append(_entry("train", "train", "padding", dev, dt, HEAVY, batch=32, seqlen=512, layers=12, padding=pad,
                        **BERT))
    # Fine-tuning runs dropout 0.1 (BERT's): the in-kernel masks of attention and LayerNorm cost integer work.
    e.append(_entry("train", "train", "dropout", dev, dt, HEAVY, batch=32, seqlen=512, layers=12, padding=0.5,
                    dropout=0.1, **BERT))
    # torch.compile (and the fastenc reference path) beside everything else, on a few points.
    for mode in ("fwd", "bwd"):
        e.append(_entry("attention", mode, "compile", dev, dt, batch=4, seqlen=4096, heads=16, head_dim=128))
        e.append(_entry("layer_norm", mode, "compile", dev, dt, batch=64, seqlen=512, d_model=768))
        e.append(_entry("ffn", mode, "compile", dev, dt, batch=32, seqlen=512, d_model=768, d_ff=3072))
    e.append(_entry("layer", "train", "compile", dev, dt, batch=32, seqlen=512, layers=1, **BERT))
    e.append(_entry("encoder", "fwd", "compile", dev, dt, batch=32, seqlen=512, layers=12, padding=0.5, **BERT))
    for n in (128, 4096):
        e.append(_entry("encoder", "fwd", "seqlen", dev, dt, HEAVY, batch=GPU_TOKENS // n, seqlen=n, layers=12,
                        **BERT))
    for b in (1, 8, 32, 128):
        e.append(_entry("attention", "fwd", "batch", dev, dt, HEAVY, batch=b, seqlen=512, heads=12, head_dim=64))
    for d in extra:
        for n in (1024, 4096):
            for mode in ("fwd", "bwd"):
                e.append(_entry("attention", mode, "dtype", dev, d, HEAVY,
                                batch=GPU_TOKENS // n, seqlen=n, heads=16, head_dim=128))
        e.append(_entry("layer", "train", "dtype", dev, d, HEAVY, batch=32, seqlen=512, layers=1, **BERT))
    return e
