"""The benchmark registry: suites, their providers and their sweep plans.

Each suite is one module of ``fastenc/bench/ops/`` (its workloads, providers, FLOP/byte
formula and sizes) that calls :func:`register`; the engine (``runner``, ``timing``,
``output``, ``env``) knows no op.  Adding a benchmark means writing one such module and
importing it in ``ops/__init__.py`` (the import order is the suites' order).

Sizes: ``tiny`` (seconds on a CPU, CI; no torch.compile), ``cpu`` (the CPU main job),
``gpu`` (the full sweep, about five minutes on one H200).  A plan lists the entries of
every suite asked for, sorted by each entry's ``rank`` (stable, most important first), so
the GPU plan can interleave suites and a ``--time-budget`` cut drops the least important.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import backends
from .workload import Workload, dtype_name

Tensor = torch.Tensor
SIZES = ("tiny", "cpu", "gpu")
MIN_TIME_S = {"tiny": 0.01, "cpu": 0.1, "gpu": 0.05}


class Unavailable(Exception):
    """This provider cannot run this workload here; the message says why."""


@dataclasses.dataclass
class Impl:
    forward: Callable[[tuple], Tensor]  # the timed call on one (prepared) input copy
    prepare: Callable[[tuple], tuple] = lambda inputs: inputs  # untimed conversion (e.g. unpadding)
    to_dense: Callable[[Tensor, tuple], Tensor] = lambda out, inputs: out  # back to the reference layout
    params: Sequence[Tensor] = ()  # trained parameters ("train" mode)
    reference: Optional[Callable[[tuple, bool], Tensor]] = None  # replaces the workload's reference
    inference_only: bool = False
    note: str = ""
    probe: Optional[Callable[[], Tensor]] = None  # a parameter whose gradient a suite's own check compares
    # What the provider computes in when not the workload's dtype ("bf16", "int8": a quantized or
    # lower-precision deployment timed on an fp32 workload); its rate is compared with that precision's.
    precision: Optional[str] = None
    min_cosine: Optional[float] = None  # quality: min cosine against the fp32 reference (suites that measure it)


@dataclasses.dataclass
class Provider:
    name: str
    build: Callable[[Workload], Impl]
    baseline: bool  # a non-fastenc implementation that fastenc's speedups are measured against
    triton: bool = False  # runs fastenc's Triton kernels: under the interpreter on CPU, never timed by default


@dataclasses.dataclass
class Entry:
    suite: str
    label: str  # for the progress bar
    make: Callable[[], Workload]  # built lazily: layer/encoder workloads hold model weights
    exclude: Dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why it does not run here
    rank: tuple = (0,)  # plan order across suites (smaller first; ties keep the suites' order)
    # In a default run with a best-effort budget, starts only while the run is under it (as the
    # op-level suites do): a suite of the main job can keep its long points out of it.
    best_effort: bool = False
    # The suite's providers that apply to this entry (None: all); the others get no row (a suite of several ops).
    only: Optional[Sequence[str]] = None


SizeFn = Callable[[torch.device, torch.dtype, List[torch.dtype]], List[Entry]]


@dataclasses.dataclass
class Suite:
    name: str
    providers: List[Provider]
    sizes: Dict[str, SizeFn]  # size -> (device, main dtype, extra dtypes) -> entries
    # Providers timed round-robin in one loop (several rounds, medians), instead of one after
    # the other; with min_rounds/max_rounds and, per size, the timed seconds per workload.
    interleaved: bool = False
    min_rounds: int = 3
    max_rounds: int = 50
    min_time_s: Dict[str, float] = dataclasses.field(default_factory=dict)
    pause_s: float = 0.0  # idle time before each timed call, so the previous provider's worker threads sleep
    threads: Optional[int] = None  # torch.set_num_threads for this suite's workloads (restored after)
    summary: Optional[Callable[[List[dict]], str]] = None  # text after the table (ratios, goals)
    plots: Optional[Callable[[str, List[dict], Dict[str, str]], List[str]]] = None  # extra PNGs
    reset: Optional[Callable[[], None]] = None  # drop what the suite cached across workloads (models)


_SUITES: Dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    if suite.name in _SUITES:
        raise ValueError(f"benchmark suite {suite.name!r} is registered twice")
    unknown = set(suite.sizes) - set(SIZES)
    if unknown:
        raise ValueError(f"suite {suite.name!r}: unknown sizes {sorted(unknown)}; expected {SIZES}")
    _SUITES[suite.name] = suite
    return suite


def _load() -> Dict[str, Suite]:
    """The registered suites (``fastenc/bench/__init__.py`` imports ``ops``, whose modules register them)."""
    return _SUITES


def suites() -> List[Suite]:
    return list(_load().values())


def suite_names() -> List[str]:
    return list(_load())


def get(name: str) -> Suite:
    s = _load()
    if name not in s:
        raise ValueError(f"unknown suite {name!r}; expected one of {list(s)}")
    return s[name]


def providers_for(suite: str, names: Optional[Sequence[str]] = None, entry: Optional[Entry] = None) -> List[Provider]:
    """Providers of a suite, optionally filtered by names or name prefixes ("sdpa" selects every sdpa-*), and
    to those that apply to ``entry``."""
    out = [p for p in get(suite).providers if entry is None or entry.only is None or p.name in entry.only]
    if names:
        out = [p for p in out if any(p.name.startswith(n) for n in names)]
    return out


def provider_names() -> List[str]:
    seen: Dict[str, None] = {}
    for s in suites():
        for p in s.providers:
            seen.setdefault(p.name)
    return list(seen)


def plan(size: str, device: torch.device, dtypes: Sequence[torch.dtype],
         sweep_dtypes: Optional[Sequence[torch.dtype]] = None, ops: Optional[Sequence[str]] = None) -> List[Entry]:
    """Entries of one size for the suites ``ops`` (default: all); ``dtypes[0]`` is the main dtype,
    ``sweep_dtypes`` (default: the others) the dtype sweep's."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    dt = dtypes[0]
    extra = [d for d in (sweep_dtypes or dtypes) if d != dt]
    out: List[Entry] = []
    for s in suites():
        if (ops is None or s.name in ops) and size in s.sizes:
            out += s.sizes[size](device, dt, extra)
    return sorted(out, key=lambda e: e.rank)


def entry(make: Callable[..., Workload], suite: str, mode: str, sweep: str, device, dtype, exclude=None,
          rank: tuple = (0,), **kw) -> Entry:
    """A plan entry whose workload is ``make(mode, sweep, device, dtype, **kw)``, built when it runs."""
    label = f"{suite} {mode} {dtype_name(dtype)} " + " ".join(f"{k}={v}" for k, v in kw.items())
    return Entry(suite, label, functools.partial(make, mode, sweep, device, dtype, **kw), dict(exclude or {}), rank)


# --------------------------------------------------------------------------- shared exclusions and helpers

NO_COMPILE_TINY = {"torch-compile": "not at --size tiny (compile time would dominate; use --size cpu)"}
SUBSET = "runs on a subset of this sweep's points to fit the time budget"
# GPU plan: torch.compile (seconds of compile per shape) and the fastenc reference path (the same
# math as torch-eager through the dispatcher) run on a few points only (sweep "compile").
HEAVY = {p: "runs on the torch.compile comparison points (sweep 'compile') to fit the time budget"
         for p in ("torch-compile", "fastenc-reference")}
BERT = dict(d_model=768, nhead=12, d_ff=3072)
GPU_TOKENS = 16384  # batch x length held constant in length sweeps (FlashAttention-3's convention)


def only_at(keep: bool, *providers: str) -> Dict[str, str]:
    return {} if keep else {p: SUBSET for p in providers}


def force(op: str, backend: str, device: torch.device, dtype: torch.dtype, shape: tuple) -> str:
    """Raise Unavailable unless ``backend`` can run such a call of ``op`` (``shape``: the op's shape
    class, what its backend checks read); returns the explanation."""
    try:
        chosen, why = backends.explain(op, backend, device, dtype, shape)
    except backends.BackendUnavailableError as e:
        raise Unavailable(str(e)) from None
    if chosen != backend:
        raise Unavailable(f"fastenc {op}: {backend!r} would not run ({chosen}: {why})")
    return why


@contextlib.contextmanager
def counting_torch_calls(*names: str):
    """Count calls of ``torch.<name>`` in the block: torch.nn's fast path calls its kernels through the torch
    module, so the counts show it was taken (a TorchFunctionMode would turn the fast path off)."""
    counts = {n: 0 for n in names}
    originals = {n: getattr(torch, n) for n in names}

    def wrap(n):
        def counted(*args, **kwargs):
            counts[n] += 1
            return originals[n](*args, **kwargs)
        return counted
    for n in names:
        setattr(torch, n, wrap(n))
    try:
        yield counts
    finally:
        for n, f in originals.items():
            setattr(torch, n, f)
