"""One skeleton for the end-to-end suites of HF models (``ops/e2e.py``: BERT; ``ops/modernbert.py``).

A suite declares its family once (:class:`ModelSuite`: how to build a random or pretrained model
of a :class:`ModelSpec`, the parameter whose gradient the training check reads, the FLOP formula,
the extra row columns) and gets the rest from here:

* models built once per run and shared by every provider: the fp32 SDPA model, and copies of it in
  other attention implementations and dtypes (same weights); fastenc's ``optimize`` of a copy;
* workloads: token ids and attention mask in, mean-pooled embeddings out (sentence-transformers'
  pooling), or a training step; random tokens with lengths spread over [min_len, seqlen], or the
  suite's own inputs (a tokenizer on real texts);
* the check every provider passes before it is timed: its embeddings against the fp32 model with
  eager attention (``model_check``), max error within ``RTOL`` of the reference's magnitude where
  the provider computes in fp32, min cosine per sentence at least ``MIN_COSINE[precision]``
  otherwise (the min cosine is every row's quality figure); in training also a probe's gradient;
* the providers every family has: ``fastenc`` (``fastenc.optimize`` of a copy, ``auto`` backends
  named in the row), ``hf-sdpa``, ``torch-compile``;
* the summary: each provider's time over fastenc's (fp32) per workload, each provider's GFLOP/s and
  its fraction of the calibrated GEMM rate of the precision it ran in, the quality (min cosine),
  and the goals (:class:`Goal`), each met or NOT MET.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import backends
from ..testing import parity_error
from . import output
from .registry import Impl, Provider, Unavailable
from .workload import ModelCache, Workload, dtype_name

Tensor = torch.Tensor
RTOL = 1e-4  # fp32 through different kernels: max |error| <= RTOL x max |reference| (+ fp32 atol)
# Quality floors of providers computing in a lower precision (min cosine per sentence against fp32): a
# broken kernel lands far below.  bf16: 8 mantissa bits; int8: ONNX Runtime's dynamic quantization of
# the real all-MiniLM-L6-v2 reaches 0.989 (issue #23), fastenc's int8 goal is 0.998.
MIN_COSINE = {"bf16": 0.999, "fp16": 0.999, "int8": 0.98}
YARDSTICK = "fastenc"  # the summary's ratios are provider time / this provider's time (fastenc in fp32)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    d_model: int
    heads: int
    layers: int
    d_ff: int
    vocab: int = 30522
    full_layers: int = 0  # the named model's depth when this runs fewer layers (0: all of them)


def transformers():
    try:
        import transformers as tf
    except ImportError:
        raise Unavailable("transformers is not installed (pip install transformers)") from None
    return tf


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """sentence-transformers' mean pooling: the average of the hidden states of the real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, inputs: tuple) -> Tensor:
    return mean_pool(model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state, inputs[1])


def spread_lengths(batch: int, seqlen: int, min_len: int) -> List[int]:
    """Lengths spread evenly over [min_len, seqlen], in a fixed shuffled order (a tokenizer's batch)."""
    if batch == 1:
        return [seqlen]
    lengths = [round(min_len + (seqlen - min_len) * b / (batch - 1)) for b in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(0)).tolist()
    return [lengths[i] for i in order]


# --------------------------------------------------------------------------- the check


def _compare(what: str, fast: Tensor, ref: Tensor, precision: str):
    """(None or what is wrong, a figure for the row's note, the min cosine per sentence)."""
    fast = fast.detach().float()
    if not torch.isfinite(fast).all():
        return f"{what}: non-finite values", "", None
    cos = float(torch.nn.functional.cosine_similarity(fast, ref.float(), dim=-1).min()) \
        if fast.shape == ref.shape else float("nan")
    if precision != "fp32":
        floor = MIN_COSINE[precision]
        bad = None if cos >= floor else f"{what}: cosine {cos:.5f} < {floor} against fp32 ({precision} floor)"
        return bad, f"{what} cosine vs fp32 >= {cos:.5f}", cos
    msg = parity_error(fast, ref, ref, rtol=RTOL)
    err = float((fast - ref).abs().max()) if fast.shape == ref.shape else float("nan")
    return (None if msg is None else f"{what}: {msg}"), f"{what} max error {err:.1e}", cos


def model_check(reference_fn, cotangent: Tensor, mode: str, dtype: torch.dtype, probe: str):
    """A workload's check of a model provider: its embeddings against ``reference_fn(inputs)`` = (embeddings,
    probe gradient), computed once; in "train" also the gradient of ``impl.probe()`` for ``cotangent``.
    Parity in fp32, the cosine floor of the provider's precision otherwise; sets ``impl.min_cosine``."""
    ref: Dict[str, Tensor] = {}

    def check(w: Workload, impl: Impl, inputs: tuple) -> Optional[str]:
        if not ref:
            ref["out"], ref["grad"] = reference_fn(inputs)
        precision = impl.precision or dtype_name(dtype)
        out = impl.forward(impl.prepare(inputs))
        results = [_compare("embeddings", out, ref["out"], precision)]
        impl.min_cosine = results[0][2]
        if mode == "train":
            grad = torch.autograd.grad(out, [impl.probe()], cotangent.to(out.dtype))[0]
            results.append(_compare(probe, grad, ref["grad"], precision))
        impl.note = "; ".join([impl.note] + [fig for _, fig, _ in results if fig])
        bad = [msg for msg, _, _ in results if msg]
        return "; ".join(bad) if bad else None
    return check


# --------------------------------------------------------------------------- the family


@dataclasses.dataclass
class ModelSuite:
    """An HF model family benchmarked end to end; see the module docstring."""

    suite: str
    models: Dict[str, ModelSpec]
    build: Callable[[ModelSpec], nn.Module]  # the fp32 model of a spec (random and seeded, or a checkpoint)
    probe: Callable[[nn.Module], Tensor]  # the parameter whose gradient the training check compares
    probe_name: str
    flops: Callable[[ModelSpec, List[int], str], float]  # (spec, real lengths, mode) -> FLOPs of the encoder
    shape_classes: Callable[[ModelSpec], Dict[str, tuple]]  # op -> shape class, for backends.explain
    columns: Callable[[ModelSpec], dict] = lambda spec: {}  # extra row columns (op, activation, window...)
    first_token: int = 1  # random token ids are drawn from [first_token, vocab) (below: special tokens)
    # spec name -> (batch, max length, device) -> (ids, mask): specs the suite tokenizes itself (real texts)
    tokenized: Dict[str, Callable[[int, int, torch.device], tuple]] = dataclasses.field(default_factory=dict)
    cache: ModelCache = dataclasses.field(default_factory=ModelCache)

    def spec(self, name: str, layers: int) -> ModelSpec:
        spec = self.models[name]
        return spec if layers == spec.layers else dataclasses.replace(spec, layers=layers, full_layers=spec.layers)

    def cached(self, key: tuple, build: Callable[[], object]) -> object:
        return self.cache.get(key, build)

    def hf_model(self, spec: ModelSpec, device, attn: str = "sdpa", dtype=torch.float32) -> nn.Module:
        """The model of a spec in eval mode; every attention implementation and dtype is a copy of the one fp32
        SDPA model (the same weights)."""
        if attn != "sdpa" or dtype != torch.float32:
            def convert():
                model = copy.deepcopy(self.hf_model(spec, device))
                model.set_attn_implementation(attn)
                return model.to(dtype)
            return self.cached(("hf", spec, str(device), attn, str(dtype)), convert)
        return self.cached(("hf", spec, str(device), attn, str(dtype)),
                           lambda: self.build(spec).to(device).eval())

    def random_tokens(self, spec: ModelSpec, lengths: List[int], device) -> tuple:
        """input_ids (random real tokens, 0 at padding) and attention_mask (1 = real), padded to the longest."""
        seqlen = max(lengths)
        ids = torch.randint(self.first_token, spec.vocab, (len(lengths), seqlen),
                            generator=torch.Generator().manual_seed(1))
        mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
        return (ids * mask).to(device), mask.to(device)

    def reference(self, spec: ModelSpec, device, mode: str, inputs: tuple, cotangent: Tensor):
        """fp32 eager-attention model: embeddings, and in "train" the probe's gradient."""
        if mode == "fwd":
            with torch.inference_mode():
                return embed(self.hf_model(spec, device, "eager"), inputs), None
        ref = copy.deepcopy(self.hf_model(spec, device, "eager")).train()
        out = embed(ref, inputs)
        return out.detach(), torch.autograd.grad(out, [self.probe(ref)], cotangent)[0]

    def workload(self, mode, sweep, device, dtype, *, model, layers, batch, seqlen, min_len=None) -> Workload:
        """min_len: the shortest sequence (lengths spread over [min_len, seqlen]; default: no padding).  A spec
        the suite tokenizes itself takes its ``tokenized`` inputs: where they are Unavailable, every provider
        is skipped with the same reason (``build`` raises it too) and the row has no padding."""
        spec = self.spec(model, layers)
        missing = False
        if spec.name in self.tokenized:
            try:
                ids, mask = self.tokenized[spec.name](batch, seqlen, device)
            except Unavailable:
                missing, ids, mask = True, torch.zeros(batch, seqlen, dtype=torch.long), torch.ones(batch, seqlen)
        else:
            ids, mask = self.random_tokens(spec, spread_lengths(batch, seqlen, min_len or seqlen), device)
        lengths = mask.sum(1).long().tolist()
        cotangent = torch.randn((batch, spec.d_model), generator=torch.Generator().manual_seed(2)).to(device)
        check = model_check(lambda inputs: self.reference(spec, device, mode, inputs, cotangent), cotangent, mode,
                            dtype, self.probe_name)
        real = sum(lengths)
        return Workload(
            self.suite, mode, sweep,
            dict(model=spec.name, batch=batch, seqlen=ids.shape[1], heads=spec.heads,
                 head_dim=spec.d_model // spec.heads, d_model=spec.d_model, d_ff=spec.d_ff, layers=spec.layers,
                 padding=None if missing else round(1 - real / ids.numel(), 2), **self.columns(spec)),
            device, dtype, lambda: (ids, mask), (), flops=self.flops(spec, lengths, mode), tokens=real, check=check,
            inference_mode=True, model=dict(spec=spec),
        )

    # ----------------------------------------------------------------------- the providers every family has

    def model_spec(self, w: Workload) -> ModelSpec:
        if not w.model or "spec" not in w.model:
            raise Unavailable("the end-to-end rows only")
        return w.model["spec"]

    def auto_backends(self, spec: ModelSpec, w: Workload, dtype: torch.dtype) -> str:
        """What ``auto`` runs here, per op; Unavailable where that is the Triton interpreter (CPU)."""
        picks = []
        for op, shape in self.shape_classes(spec).items():
            chosen = backends.explain(op, "auto", w.device, dtype, shape)[0]
            if chosen == "triton" and w.device.type == "cpu":
                raise Unavailable(f"auto runs {op} on the Triton interpreter here: a correctness tool, never timed")
            picks.append(f"{op}={chosen}")
        return "auto: " + ", ".join(picks)

    def fastenc_model(self, spec: ModelSpec, w: Workload, dtype: torch.dtype, **optimize_kw) -> nn.Module:
        """``fastenc.optimize`` of a copy of the model in ``dtype``: shared in inference, a fresh copy to train."""
        import fastenc

        def build():
            return fastenc.optimize(copy.deepcopy(self.hf_model(spec, w.device, dtype=dtype)), **optimize_kw).eval()
        if w.mode == "train":
            return build().train()
        return self.cached(("fastenc", spec, str(w.device), str(dtype), tuple(sorted(optimize_kw.items()))), build)

    def fastenc(self, w: Workload) -> Impl:
        spec = self.model_spec(w)
        note = self.auto_backends(spec, w, w.dtype)
        model = self.fastenc_model(spec, w, w.dtype)
        return Impl(lambda i: embed(model, i), params=list(model.parameters()), probe=lambda: self.probe(model),
                    note=note)

    def hf_sdpa(self, w: Workload) -> Impl:
        model = self.hf_model(self.model_spec(w), w.device, dtype=w.dtype)
        if w.mode == "train":  # steps change its weights
            model = copy.deepcopy(model).train()
        return Impl(lambda i: embed(model, i), params=list(model.parameters()), probe=lambda: self.probe(model),
                    note=f"{type(model).__name__}, attn_implementation=sdpa")

    def torch_compile(self, w: Workload) -> Impl:
        spec = self.model_spec(w)
        if w.mode != "fwd":
            raise Unavailable("inference only here (a compile per training shape does not fit the time budget)")
        if not hasattr(torch, "compile"):
            raise Unavailable("this torch has no torch.compile")
        # One compiled model per model and dtype: a static graph per input shape, well under dynamo's recompile
        # limit (where it would fall back to eager without a word).
        model = self.hf_model(spec, w.device, dtype=w.dtype)
        compiled = self.cached(("compile", spec, str(w.device), str(w.dtype)),
                               lambda: torch.compile(model, dynamic=False))
        return Impl(lambda i: embed(compiled, i), inference_only=True,
                    note=f"torch.compile({type(model).__name__} sdpa, dynamic=False), compiled in the untimed check "
                         "call")

    def providers(self) -> List[Provider]:
        return [Provider("fastenc", self.fastenc, False), Provider("hf-sdpa", self.hf_sdpa, True),
                Provider("torch-compile", self.torch_compile, True)]

    # ----------------------------------------------------------------------- the summary

    def label(self, r: dict) -> str:
        full = self.models[r["model"]].layers
        layers = "" if r["layers"] == full else f" ({r['layers']} of {full} layers)"
        pad = "-" if r["padding"] is None else f"{r['padding']:.0%}"
        return f"{r['model']}{layers} B={r['batch']} L={r['seqlen']} pad={pad}"

    def summary(self, rows: List[dict], goals: Sequence["Goal"], order: Sequence[str]) -> str:
        """Per mode and dtype: each provider's time / fastenc's per workload (> 1: fastenc faster), each
        provider's GFLOP/s and % of its precision's GEMM rate, the quality (min cosine against fp32), then the
        goals.  ``order``: the providers' column order."""
        out = [f"== {self.suite} summary: provider time / {YARDSTICK} (fp32) time (> 1: {YARDSTICK} faster; "
               "interleaved medians) =="]
        for mode in ("fwd", "train"):
            for dtype in sorted({r["dtype"] for r in rows if r["mode"] == mode}):
                group = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
                out += _ratio_tables(group, mode, dtype, self.label, order)
        out += _quality(rows, self.label, order)
        out += ["", " goals:"] + [line for g in goals for line in g.lines(rows, self.label)]
        return "\n".join(out)

    def ratio_plots(self, out_dir: str, rows: List[dict], env: Dict[str, str], order: Sequence[str]) -> List[str]:
        """``<suite>_<mode>_<dtype>_ratios.png``: each provider's time / fastenc's per workload."""
        files = []
        for mode in ("fwd", "train"):
            for dtype in sorted({r["dtype"] for r in rows if r["mode"] == mode}):
                group = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype and r["status"] == "ok"]
                points = {k: v for k, v in _by_workload(group, self.label).items() if YARDSTICK in v}
                others = [p for p in order if p != YARDSTICK and any(p in v for v in points.values())]
                if not points or not others:
                    continue
                series = {p: [v[p]["median_ms"] / v[YARDSTICK]["median_ms"] if p in v else None
                              for v in points.values()] for p in others}
                what = "inference (mean-pooled embeddings)" if mode == "fwd" else "training step (fwd + bwd + AdamW)"
                files.append(output.write_ratio_plot(
                    os.path.join(out_dir, f"{self.suite}_{mode}_{dtype}_ratios.png"),
                    f"{self.suite}, {what}, {dtype}, {env.get('threads', '?')} threads", list(points), series,
                    f"provider time / {YARDSTICK} time (> 1: {YARDSTICK} faster)", env))
        return files


# --------------------------------------------------------------------------- summary helpers


def _cell(r: Optional[dict], value: Callable[[dict], str]) -> str:
    if r is None:
        return "-"
    return value(r) if r["status"] == "ok" else r["status"]


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _by_workload(group: List[dict], label) -> Dict[str, Dict[str, dict]]:
    out: Dict[str, Dict[str, dict]] = {}
    for r in group:
        out.setdefault(label(r), {})[r["provider"]] = r
    return out


def _ratio_tables(group: List[dict], mode: str, dtype: str, label, order: Sequence[str]) -> List[str]:
    points = {k: v for k, v in _by_workload(group, label).items() if YARDSTICK in v}
    if not points:
        return []
    ran = [p for p in order if any(p in v and v[p]["status"] != "skipped" for v in points.values())]
    others = [p for p in ran if p != YARDSTICK]
    what = "inference" if mode == "fwd" else "training step"
    out = ["", f" {what} ({dtype}): provider time / {YARDSTICK} time",
           f"  {'workload':<48} {YARDSTICK + ' ms':>11}" + "".join(f" {p:>16}" for p in others)]
    for lbl, by in points.items():
        fast = by[YARDSTICK]

        def ratio(r, fast=fast):
            return f"{r['median_ms'] / fast['median_ms']:.3g}x" if fast["status"] == "ok" else "-"
        cells = [_cell(by.get(p), ratio) for p in others]
        out.append(f"  {lbl:<48} {_cell(fast, lambda r: _ms(r['median_ms'])):>11}"
                   + "".join(f" {c:>16}" for c in cells))
    out += ["", f" {what} ({dtype}): GFLOP/s (% of the calibrated GEMM rate of the precision it ran in)",
            f"  {'workload':<48}" + "".join(f" {p:>16}" for p in ran)]
    for lbl, by in points.items():
        def rate(r):
            pct = "" if r.get("pct_of_ceiling") is None else f" ({r['pct_of_ceiling']:.0f}%)"
            return "-" if not r.get("tflops") else f"{r['tflops'] * 1e3:.3g}{pct}"
        out.append(f"  {lbl:<48}" + "".join(f" {_cell(by.get(p), rate):>16}" for p in ran))
    precisions = sorted({f"{p}={by[p]['precision']}" for by in points.values() for p in ran
                         if p in by and by[p]["status"] == "ok" and by[p].get("precision") != dtype})
    if precisions:
        out.append("  (ran in another precision than the workload's: " + ", ".join(precisions) + ")")
    return out


def _quality(rows: List[dict], label, order: Sequence[str]) -> List[str]:
    """Min cosine of each provider's embeddings against fp32, on the real model's rows (real sentences)
    and over the random models' rows."""
    fwd = [r for r in rows if r["mode"] == "fwd" and r["status"] == "ok" and r.get("min_cosine") is not None]
    if not fwd:
        return []
    out = ["", " quality: min cosine of the embeddings against the fp32 model (eager attention), per sentence",
           f"  {'provider':<20} {'precision':>9} {'real sentences':>15} {'random weights':>15}  floor"]
    for p in order:
        mine = [r for r in fwd if r["provider"] == p]
        if not mine:
            continue
        real = [r["min_cosine"] for r in mine if r["sweep"] == "real"]
        rand = [r["min_cosine"] for r in mine if r["sweep"] != "real"]
        prec = mine[0]["precision"]
        floor = f">= {MIN_COSINE[prec]}" if prec in MIN_COSINE else f"parity (max error <= {RTOL:g} x max |ref|)"
        cells = [f"{min(v):.5f}" if v else "-" for v in (real, rand)]
        out.append(f"  {p:<20} {prec:>9} {cells[0]:>15} {cells[1]:>15}  {floor}")
    return out


# --------------------------------------------------------------------------- goals


ROW_KINDS = {
    "every inference row": lambda r: True,
    "about 50% padding": lambda r: r["sweep"] == "padding" and (r["padding"] or 0) >= 0.3,
    "0% padding": lambda r: r["sweep"] == "padding" and r["padding"] == 0,
    "batch 1": lambda r: r["sweep"] == "latency",
    "BERT-base batches": lambda r: r["model"] == "BERT-base" and r["sweep"] == "padding",
    "real sentences": lambda r: r["sweep"] == "real",
}


@dataclasses.dataclass(frozen=True)
class Goal:
    """A target on every row of a kind: ``provider`` at least ``at_least`` times as fast as ``baseline``
    (time(baseline) / time(provider)); with ``kind="gemm"``, at least ``at_least`` of the calibrated GEMM rate
    of its precision; with ``kind="quality"``, a min cosine against fp32 of at least ``at_least``.
    ``baseline_precision``: counts only where the baseline ran in that precision (OpenVINO's default)."""

    issue: str
    mode: str
    rows: str  # a key of ROW_KINDS
    provider: str
    baseline: Optional[str] = None
    at_least: float = 1.0
    kind: str = "speed"  # "speed" | "gemm" | "quality"
    baseline_precision: Optional[str] = None
    dtype: str = "fp32"

    def lines(self, rows: List[dict], label) -> List[str]:
        mine = [r for r in rows if r["mode"] == self.mode and r["dtype"] == self.dtype and ROW_KINDS[self.rows](r)]
        out = []
        for lbl, by in _by_workload(mine, label).items():
            if YARDSTICK not in by:
                continue
            got, why = self._measure(by)
            verdict = f"not measured ({why})" if got is None else ("met" if got >= self.at_least else "NOT MET")
            if self.kind == "speed":
                what, shown, goal = f"{self.provider} vs {self.baseline}", got and f"{got:.3g}x", f"{self.at_least}x"
            elif self.kind == "gemm":
                what, shown, goal = f"{self.provider} % of GEMM rate", got and f"{got:.0%}", f"{self.at_least:.0%}"
            else:
                what, shown, goal = f"{self.provider} min cosine", got and f"{got:.5f}", f"{self.at_least}"
            out.append(f"  {self.issue:<4} {self.mode:<5} {lbl:<48} {what:<36} {shown or '-':>8} (goal >= {goal}): "
                       f"{verdict}")
        return out

    def _measure(self, by: Dict[str, dict]):
        """(value or None, why not measured)."""
        r = by.get(self.provider)
        if r is None or r["status"] != "ok":
            return None, f"{self.provider} {'not run' if r is None else r['status'] + ': ' + r['reason']}"
        if self.kind == "gemm":
            pct = r.get("pct_of_ceiling")
            return (None, f"no {r['precision']} GEMM rate calibrated") if pct is None else (pct / 100, "")
        if self.kind == "quality":
            return r.get("min_cosine"), "no cosine measured"
        b = by.get(self.baseline)
        if b is None or b["status"] != "ok":
            return None, f"{self.baseline} {'not run' if b is None else b['status'] + ': ' + b['reason']}"
        if self.baseline_precision and b["precision"] != self.baseline_precision:
            return None, f"{self.baseline} ran in {b['precision']}, not {self.baseline_precision}"
        return b["median_ms"] / r["median_ms"], ""
