"""Run a workload's providers: parity check against the reference, then timing.

A result is never timed before its output (and, for "bwd"/"train", its input
gradient) passes ``fastenc.testing.parity_error`` against the fp32 reference with
plain PyTorch in the same dtype as the yardstick (or the workload's own ``check``):
a broken kernel cannot post a fast time.  ``run_one`` times one provider alone;
``run_interleaved`` checks every provider first, then times them round-robin.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional

import torch

from ..backends import BackendUnavailableError
from ..testing import parity_error
from . import timing
from .registry import Impl, Provider, Unavailable
from .workload import Workload, dtype_name

PRIMARY_BASELINE = "torch-eager"


@dataclasses.dataclass
class Result:
    workload: Workload
    provider: str
    status: str  # "ok" | "skipped" | "failed" (parity) | "error" (exception)
    reason: str = ""
    timing: Optional[timing.Timing] = None
    copies: int = 0
    note: str = ""
    baseline: bool = False
    speedups: Dict[str, float] = dataclasses.field(default_factory=dict)
    precision: Optional[str] = None  # Impl.precision (None: the workload's dtype)
    min_cosine: Optional[float] = None  # Impl.min_cosine, set by a suite's check

    def row(self) -> dict:
        w, t = self.workload, self.timing
        med_s = t.median_ms / 1e3 if t else None
        p = w.params
        row = dict(
            suite=w.suite, mode=w.mode, sweep=w.sweep, provider=self.provider, status=self.status, reason=self.reason,
            dtype=dtype_name(w.dtype), precision=self.precision or dtype_name(w.dtype), batch=p.get("batch"), seqlen=p.get("seqlen"), heads=p.get("heads"),
            head_dim=p.get("head_dim"), d_model=p.get("d_model"), d_ff=p.get("d_ff"), activation=p.get("activation"),
            layers=p.get("layers"), model=p.get("model"), op=p.get("op"),
            padding=p.get("padding"), dropout=p.get("dropout"), causal=p.get("causal"), window=p.get("window"),
            tokens=w.tokens,
            median_ms=t.median_ms if t else None, p20_ms=t.p20_ms if t else None, p80_ms=t.p80_ms if t else None,
            tflops=(w.flops / med_s / 1e12) if (t and w.flops) else None,
            gbps=(w.bytes / med_s / 1e9) if (t and w.bytes) else None,
            tokens_per_s=(w.tokens / med_s) if t else None,
            peak_mem_mb=t.peak_mem_mb if t else None, pct_of_ceiling=None, samples=t.n if t else None,
            timing=t.method if t else None, copies=self.copies or None, flops=w.flops, bytes=w.bytes,
            speedup_vs_eager=self.speedups.get(PRIMARY_BASELINE), speedups=dict(self.speedups), note=self.note,
            min_cosine=self.min_cosine,
        )
        if self.speedups and not self.baseline:
            # against the fastest baseline: the smallest of the ratios
            row["speedup_vs_best_baseline"], row["best_baseline"] = min((v, k) for k, v in self.speedups.items())
        else:
            row["speedup_vs_best_baseline"], row["best_baseline"] = None, None
        return row


def _leaf(t, requires_grad: bool):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().requires_grad_(requires_grad)


def _with_grads(inputs: tuple, idx) -> tuple:
    return tuple(_leaf(t, i in idx) for i, t in enumerate(inputs))


def _upcast(inputs: tuple) -> tuple:
    return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def check(w: Workload, impl: Impl, inputs: tuple) -> Optional[str]:
    """None when the provider matches the reference (output, and input gradient when differentiated)."""
    if w.check is not None:
        return w.check(w, impl, inputs)
    if w.check_slice is not None:
        inputs = w.check_slice(inputs)
    ref_fn = impl.reference or w.reference
    differentiate = w.mode != "fwd"
    gi = w.grad_inputs[:1]
    valid = w.valid(inputs) if w.valid is not None else None

    def run_ref(upcast: bool):
        ins = _with_grads(_upcast(inputs) if upcast else inputs, gi if differentiate else ())
        with torch.set_grad_enabled(differentiate):
            out = ref_fn(ins, upcast)
        grad = torch.autograd.grad(out, [ins[i] for i in gi], g.to(out.dtype))[0] if differentiate else None
        return out.detach(), grad

    ins = impl.prepare(inputs)
    ins = _with_grads(ins, gi if differentiate else ())
    with torch.set_grad_enabled(differentiate):
        out = impl.forward(ins)
        dense = impl.to_dense(out, inputs)
    g = torch.randn(dense.shape, device=dense.device, dtype=torch.float32)
    if valid is not None:
        g = g * valid  # outputs at padding positions are not compared, so they carry no gradient either
    grad = None
    if differentiate:
        grad = impl.to_dense(torch.autograd.grad(dense, [ins[i] for i in gi], g.to(dense.dtype))[0], inputs)
    if w.params.get("dropout"):  # random masks differ between providers: no reference to compare with
        bad = [what for what, t in (("output", dense), ("input gradient", grad)) if t is not None
               and not torch.isfinite(t if valid is None else t * valid).all()]
        return f"{' and '.join(bad)} not finite (dropout point)" if bad else None
    ref32, ref_grad32 = run_ref(True)
    base, base_grad = run_ref(False)
    pairs = [("output", dense, ref32, base)]
    if differentiate:
        pairs.append(("input gradient", grad, ref_grad32, base_grad))
    for what, fast, r, b in pairs:
        if valid is not None:
            fast, r, b = (t.detach() * valid for t in (fast, r, b))
        msg = parity_error(fast.detach(), r, b)
        if msg is not None:
            return f"{what}: {msg}"
    return None


def _bwd_steps(w: Workload, impl: Impl, copies: List[tuple]):
    graphs = []
    for inputs in copies:
        ins = _with_grads(impl.prepare(inputs), w.grad_inputs)
        out = impl.forward(ins)
        wrt = [ins[i] for i in w.grad_inputs] + list(impl.params)
        graphs.append((out, wrt, torch.randn_like(out)))

    def step(i):
        out, wrt, g = graphs[i]
        return torch.autograd.grad(out, wrt, g, retain_graph=True)
    return step


def _train_steps(w: Workload, impl: Impl, copies: List[tuple]):
    if not impl.params:
        raise Unavailable("no parameters to train")
    fused = {"fused": True} if w.device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(impl.params, lr=1e-5, **fused)
    prepared = [impl.prepare(c) for c in copies]
    grads = []

    def step(i):
        out = impl.forward(prepared[i])
        if len(grads) <= i:
            grads.append(torch.randn_like(out))
        out.backward(grads[i])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def grad_context(w: Workload):
    """Autograd mode of the timed call: none in "fwd" (inference mode where the workload asks)."""
    if w.mode != "fwd":
        return contextlib.nullcontext()
    return torch.inference_mode() if w.inference_mode else torch.no_grad()


def build_step(w: Workload, impl: Impl, first: tuple):
    """(step(i), n_copies): the timed call on input copy i, with enough copies to rotate past the L2.

    fwd: the forward alone (call it under torch.no_grad()); bwd: the backward alone, on graphs
    built once per copy; train: forward + backward + AdamW step.
    """
    per_copy = timing.tensor_bytes(first) + timing.tensor_bytes(list(impl.params))
    n = timing.copies_for_l2(per_copy, w.device)
    copies = [first] + [w.make_inputs() for _ in range(n - 1)]
    if w.mode == "fwd":
        prepared = [impl.prepare(c) for c in copies]
        return (lambda i: impl.forward(prepared[i])), n
    if w.mode == "bwd":
        return _bwd_steps(w, impl, copies), n
    return _train_steps(w, impl, copies), n


def build_checked(w: Workload, provider: Provider):
    """(impl, first inputs) after the parity check; raises Unavailable, or ParityError on a mismatch."""
    impl = provider.build(w)
    if impl.inference_only and w.mode != "fwd":
        raise Unavailable("inference only")
    torch.manual_seed(0)
    first = w.make_inputs()
    with grad_context(w):
        msg = check(w, impl, first)
    if msg is not None:
        raise ParityError(f"parity check failed, not timed: {msg}")
    return impl, first


class ParityError(AssertionError):
    """The provider's result (or gradient) does not match the reference."""


def _fail(res: Result, e: BaseException) -> None:
    """Record why a provider did not get a time."""
    if isinstance(e, (Unavailable, BackendUnavailableError)):
        res.status, res.reason = "skipped", str(e)
    elif isinstance(e, ParityError):
        res.status, res.reason = "failed", str(e)
    elif isinstance(e, torch.OutOfMemoryError):
        res.status, res.reason = "error", f"out of memory: {str(e).splitlines()[0]}"
    else:  # a provider that crashes is reported, and the sweep goes on
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _prepare(w: Workload, provider: Provider, res: Result):
    """The timed step of a checked provider (its input copies in ``res.copies``); on any failure, None
    with ``res`` saying why."""
    try:
        impl, first = build_checked(w, provider)
        res.note, res.precision, res.min_cosine = impl.note, impl.precision, impl.min_cosine
        if w.params.get("dropout"):
            res.note += ("; " if res.note else "") + "dropout: random masks, checked for finite values only"
        step, res.copies = build_step(w, impl, first)
        return step
    except Exception as e:
        _fail(res, e)
        return None


def run_one(w: Workload, provider: Provider, *, min_time_s: float) -> Result:
    res = Result(w, provider.name, "ok", baseline=provider.baseline)
    try:
        step = _prepare(w, provider, res)
        if step is not None:
            with grad_context(w):
                res.timing = timing.time_step(step, res.copies, w.device, min_time_s=min_time_s)
    except Exception as e:
        _fail(res, e)
    finally:
        if w.device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def run_interleaved(w: Workload, providers: List[Provider], *, min_time_s: float, min_rounds: int,
                    max_rounds: int, pause_s: float = 0.0) -> List[Result]:
    """Check and build every provider, then time them round-robin in one loop (medians over rounds).

    Interleaving spreads a busy machine's noise over every provider alike, where timing one
    provider after the other would hand it to whichever ran during the disturbance.
    """
    results = [Result(w, p.name, "ok", baseline=p.baseline) for p in providers]
    steps = {}
    for p, res in zip(providers, results):
        step = _prepare(w, p, res)
        if step is not None:
            steps[p.name] = (step, res.copies)
    by_name = {r.provider: r for r in results}
    with grad_context(w):
        timings, errors = timing.time_interleaved(steps, w.device, min_time_s=min_time_s, min_rounds=min_rounds,
                                                  max_rounds=max_rounds, pause_s=pause_s)
    for name, t in timings.items():
        by_name[name].timing = t
    for name, e in errors.items():
        _fail(by_name[name], e)
    if w.device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def add_speedups(results: List[Result]) -> None:
    """speedups[b] = time(baseline b) / time(this provider), per workload."""
    by_key: Dict[tuple, List[Result]] = {}
    for r in results:
        by_key.setdefault(r.workload.key, []).append(r)
    for group in by_key.values():
        base = {r.provider: r.timing.median_ms for r in group if r.baseline and r.status == "ok"}
        for r in group:
            if r.status == "ok":
                r.speedups = {b: t / r.timing.median_ms for b, t in base.items() if b != r.provider}
