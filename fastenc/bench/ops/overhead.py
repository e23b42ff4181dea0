"""Host overhead: fastenc on tiny tensors against its plain-torch twin, one thread, interleaved medians.

On tiny tensors a call costs what its Python and dispatch cost; this suite measures that
(issue #13's goals: each op within 15 µs of its twin, a tiny layer at most 1.2x torch.nn's):

* attention: ``fastenc.ops.attention`` (auto) against ``F.scaled_dot_product_attention``
  (each on its own layout, [B, L, H, D] / [B, H, L, D], with a padding mask);
* residual + LayerNorm: ``fastenc.ops.residual_layer_norm`` against ``F.layer_norm(x + branch)``;
* FFN: ``fastenc.ops.ffn`` against three torch calls (linear, GELU, linear);
* layer, inference: ``fastenc.TransformerEncoderLayer`` against ``nn.TransformerEncoderLayer``
  (same weights, eval + inference mode: torch takes its fast path, checked);
* layer, training step (dropout 0): forward + backward + AdamW of each.

Each provider is checked against ``fastenc.reference`` first (the op suites' checks).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops, reference
from .. import output
from .. import registry as R
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload
from . import attention, encoder_stack, ffn, layer_norm

OP_GOAL_US = 15.0  # each op: fastenc within this many µs of its twin
LAYER_GOAL = 1.2  # the tiny layer: fastenc time at most this times torch.nn's
SHAPES = {
    "attention": dict(batch=2, seqlen=16, heads=2, head_dim=32, padding=0.25),
    "layer_norm": dict(batch=2, seqlen=16, d_model=64),
    "ffn": dict(batch=2, seqlen=16, d_model=64, d_ff=256),
    "layer": dict(batch=2, seqlen=16, d_model=64, nhead=2, d_ff=128, layers=1, padding=0.25),
}
_MAKE = {"attention": attention.workload, "layer_norm": layer_norm.workload, "ffn": ffn.workload,
         "layer": encoder_stack.workload_of("overhead")}


def workload(mode, sweep, device, dtype, *, op: str) -> Workload:
    """The op suite's workload at a tiny shape (its inputs, reference and check)."""
    w = _MAKE[op](mode, sweep, device, dtype, **SHAPES[op])
    w = dataclasses.replace(w, suite="overhead", params={**w.params, "op": op}, inference_mode=op == "layer")
    if op == "layer_norm":  # the twin is LayerNorm(x + branch): no branch bias on either side
        def ref(inputs, upcast):
            x, branch, wt, b, _ = inputs
            return reference.residual_layer_norm(x, branch, wt, b, upcast=upcast)
        w.reference = ref
    return w


def _fastenc(w: Workload) -> Impl:
    op = w.params["op"]
    if op == "attention":
        return Impl(lambda i: ops.attention(i[0], i[1], i[2], key_padding_mask=i[3]))
    if op == "layer_norm":
        return Impl(lambda i: ops.residual_layer_norm(i[0], i[1], i[2], i[3]))
    if op == "ffn":
        return Impl(lambda i: ops.ffn(*i, activation=w.params["activation"]))
    import fastenc

    m = w.model
    layer = fastenc.TransformerEncoderLayer(m["d_model"], m["nhead"], m["d_ff"], dropout=0.0,
                                            activation=m["activation"], batch_first=True)
    return _layer_impl(layer, w)


def _layer_impl(layer: nn.Module, w: Workload) -> Impl:
    layer.load_state_dict({k.split(".", 2)[2]: v for k, v in w.model["state"].items()})
    layer = layer.to(device=w.device, dtype=w.dtype).train(w.mode == "train")
    return Impl(lambda i: layer(i[0], src_key_padding_mask=i[1]), params=list(layer.parameters()))


def _torch(w: Workload) -> Impl:
    op = w.params["op"]
    if op == "attention":
        def prepare(i):  # SDPA's layout [B, H, L, D] and its mask (True = attend), made outside the timing
            q, k, v, kpm = i
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ~kpm[:, None, None, :]
        return Impl(lambda i: F.scaled_dot_product_attention(i[0], i[1], i[2], attn_mask=i[3]), prepare=prepare,
                    to_dense=lambda out, inputs: out.transpose(1, 2),
                    note="F.scaled_dot_product_attention on [B, H, L, D]")
    if op == "layer_norm":
        return Impl(lambda i: F.layer_norm(i[0] + i[1], i[0].shape[-1:], i[2], i[3]), note="F.layer_norm(x + branch)")
    if op == "ffn":
        act = w.params["activation"]
        return Impl(lambda i: F.linear(reference.apply_activation(F.linear(i[0], i[1], i[2]), act), i[3], i[4]),
                    note="linear, GELU, linear")
    m = w.model
    impl = _layer_impl(nn.TransformerEncoderLayer(m["d_model"], m["nhead"], m["d_ff"], dropout=0.0,
                                                  activation=m["activation"], batch_first=True), w)
    if w.mode == "fwd":
        with torch.inference_mode(), R.counting_torch_calls("_transformer_encoder_layer_fwd") as calls:
            impl.forward(w.make_inputs())
        if calls["_transformer_encoder_layer_fwd"] != 1:
            raise Unavailable("nn.TransformerEncoderLayer did not take its fast path here")
        impl.note = "nn.TransformerEncoderLayer, eval + inference mode (fast path)"
    else:
        impl.note = "nn.TransformerEncoderLayer, training mode"
    return impl


PROVIDERS = [Provider("fastenc", _fastenc, False), Provider("torch", _torch, True)]


def _points(rank: tuple):
    """Every size runs the same tiny shapes: right after e2e on CPU, last on GPU (not in its default plan)."""
    def points(dev, dt, extra):
        return [R.entry(workload, "overhead", mode, "op", dev, dt, None, rank, op=op)
                for mode, op in (("fwd", "attention"), ("fwd", "layer_norm"), ("fwd", "ffn"), ("fwd", "layer"),
                                 ("train", "layer"))]
    return points


def _label(r: dict) -> str:
    return f"{r['op']} {'training step' if r['mode'] == 'train' else 'forward'}"


def summary(rows: List[dict]) -> str:
    out = ["== overhead summary: tiny tensors, 1 thread, interleaved medians (fastenc vs its plain-torch twin) ==",
           f"  {'op':<26} {'fastenc us':>10} {'torch us':>9} {'diff us':>8} {'fastenc/torch':>13}  goal"]
    for r in rows:
        if r["provider"] != "fastenc":
            continue
        twin = next((t for t in rows if t["provider"] == "torch" and _label(t) == _label(r)), None)
        if r["status"] != "ok" or twin is None or twin["status"] != "ok":
            why = r["reason"] if r["status"] != "ok" else (twin or {}).get("reason", "no twin")
            out.append(f"  {_label(r):<26} not measured: {why}")
            continue
        f_us, t_us = r["median_ms"] * 1e3, twin["median_ms"] * 1e3
        ratio = f_us / t_us
        if r["op"] == "layer":
            goal, met = f"<= {LAYER_GOAL}x", ratio <= LAYER_GOAL
        else:
            goal, met = f"diff <= {OP_GOAL_US:.0f} us", f_us - t_us <= OP_GOAL_US
        out.append(f"  {_label(r):<26} {f_us:>10.1f} {t_us:>9.1f} {f_us - t_us:>+8.1f} {ratio:>12.2f}x  "
                   f"{goal}: {'met' if met else 'NOT MET'}")
    return "\n".join(out)


def plots(out_dir: str, rows: List[dict], env: Dict[str, str]) -> List[str]:
    fast = [r for r in rows if r["provider"] == "fastenc" and r["status"] == "ok"]
    twins = {_label(r): r for r in rows if r["provider"] == "torch" and r["status"] == "ok"}
    fast = [r for r in fast if _label(r) in twins]
    if not fast:
        return []
    series = {"fastenc": [r["median_ms"] * 1e3 for r in fast], "torch": [twins[_label(r)]["median_ms"] * 1e3
                                                                         for r in fast]}
    return [output.write_ratio_plot(os.path.join(out_dir, "overhead_us.png"), "host overhead, tiny tensors, 1 thread",
                                    [_label(r) for r in fast], series, "median µs per call", env, line=None,
                                    log=True)]


SUITE = R.register(R.Suite(
    "overhead", PROVIDERS, {"tiny": _points((0,)), "cpu": _points((0,)), "gpu": _points((14,))}, interleaved=True,
    min_rounds=20, max_rounds=300, min_time_s={"tiny": 0.05, "cpu": 0.5, "gpu": 0.5}, threads=1, summary=summary,
    plots=plots,
))
