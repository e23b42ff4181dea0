"""Residual + LayerNorm benchmark: LayerNorm(x + (branch + branch_bias)) by fastenc's Triton kernel and its
C++ CPU backend (where the op has one) against torch eager and torch.compile, forward and backward.

Memory-bound: GB/s counts each input read once and each output written once (``bytes``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import ops, reference
from .. import registry as R
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload, randn


def bytes_moved(tokens: int, hidden: int, elt: int, *, mode: str = "fwd", has_branch: bool = True,
                prenorm: bool = False, param_elt=None) -> float:
    """fwd: read x, branch (T·N each) and weight, bias, branch bias (N each); write y (and s with prenorm).
    bwd: read dy, the saved sum s, weight and the saved mean/rstd (fp32, T each); write dx, dbranch
         (one tensor when they are equal), dweight, dbias, dbranch_bias.
    fwd+bwd: the sum of both.
    """
    pe = param_elt or elt
    fwd = (1 + has_branch + 1 + prenorm) * tokens * hidden * elt + 3 * hidden * pe
    bwd = (2 + 1 + has_branch) * tokens * hidden * elt + 2 * tokens * 4 + (1 + 3) * hidden * pe
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def workload(mode, sweep, device, dtype, *, batch, seqlen, d_model, eps=1e-5) -> Workload:
    tokens = batch * seqlen

    def make_inputs():
        x = randn((tokens, d_model), device, dtype)
        branch = randn((tokens, d_model), device, dtype)
        w = (1 + 0.1 * torch.randn(d_model, device=device)).to(dtype)
        b = (0.1 * torch.randn(d_model, device=device)).to(dtype)
        bb = (0.1 * torch.randn(d_model, device=device)).to(dtype)
        return x, branch, w, b, bb

    def ref(inputs, upcast):
        x, branch, w, b, bb = inputs
        return reference.residual_layer_norm(x, branch, w, b, branch_bias=bb, eps=eps, upcast=upcast)

    elt = torch.tensor([], dtype=dtype).element_size()
    return Workload(
        "layer_norm", mode, sweep, dict(batch=batch, seqlen=seqlen, d_model=d_model), device, dtype, make_inputs,
        (0, 1, 2, 3, 4), ref, bytes=bytes_moved(tokens, d_model, elt, mode=mode), tokens=tokens,
    )


def _fastenc(backend: str):
    def build(w: Workload) -> Impl:
        R.force("layer_norm", backend, w.device, w.dtype, (w.params["d_model"],))  # shape class: (hidden,)
        return Impl(lambda i: ops.residual_layer_norm(i[0], i[1], i[2], i[3], branch_bias=i[4], backend=backend))
    return build


def _torch_eager(w: Workload) -> Impl:
    return Impl(lambda i: F.layer_norm(i[0] + (i[1] + i[4]), i[0].shape[-1:], i[2], i[3]))


def _torch_compile(w: Workload) -> Impl:
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    torch._dynamo.reset()  # a fresh cache per workload: never a silent eager fallback at the recompile limit

    def fn(i):
        return reference.residual_layer_norm(i[0], i[1], i[2], i[3], branch_bias=i[4])
    return Impl(torch.compile(fn, dynamic=False, fullgraph=True), note="torch.compile(fastenc.reference)")


PROVIDERS = [
    Provider("fastenc-triton", _fastenc("triton"), False, triton=True),
    Provider("fastenc-cpu", _fastenc("cpu"), False),
    Provider("fastenc-reference", _fastenc("reference"), False),
    Provider("torch-eager", _torch_eager, True),
    Provider("torch-compile", _torch_compile, True),
]


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(workload, "layer_norm", mode, sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    return [_e(mode, "seqlen", dev, dt, R.NO_COMPILE_TINY, batch=2, seqlen=64, d_model=256) for mode in ("fwd", "bwd")]


def _cpu(dev, dt, extra):
    # rank (2, mode, n): interleaved with the FFN's points of the same mode and length
    return [_e(mode, "seqlen", dev, dt, R.only_at(n == 512, "torch-compile"), (2, i, j), batch=8, seqlen=n,
               d_model=768) for i, mode in enumerate(("fwd", "bwd")) for j, n in enumerate((128, 512))]


def _gpu(dev, dt, extra):
    """One point per width (only the token count and the widths matter): hidden 384..8192 at 32k rows."""
    no_ref = {"fastenc-reference": R.HEAVY["fastenc-reference"]}
    e = [_e(mode, "hidden", dev, dt, no_ref, (3, i), batch=64, seqlen=512, d_model=d)
         for i, mode in enumerate(("fwd", "bwd")) for d in (384, 768, 1024, 4096, 8192)]
    e += [_e(mode, "compile", dev, dt, None, (9, i), batch=64, seqlen=512, d_model=768)
          for i, mode in enumerate(("fwd", "bwd"))]
    return e


SUITE = R.register(R.Suite("layer_norm", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
