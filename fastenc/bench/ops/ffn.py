"""FFN benchmark: linear2(act(linear1(x))) by fastenc's CUDA extension (each GEMM path forced in turn) and its
C++ CPU backend against torch eager and torch.compile, forward and backward.

FLOPs = 2·T·d·f·2 forward (two GEMMs of T·d·f multiply-adds), 2x that backward (dX and dW of each).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from ... import ops, reference
from .. import registry as R
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload, by_mode, randn

BWD_FACTOR = 2.0  # backward of a matmul: dX and dW, each as large as the forward


def flops(tokens: int, d_model: int, d_ff: int, *, mode: str = "fwd") -> float:
    return by_mode(2.0 * tokens * d_model * d_ff * 2, mode, BWD_FACTOR)


def workload(mode, sweep, device, dtype, *, batch, seqlen, d_model, d_ff, activation="gelu") -> Workload:
    tokens = batch * seqlen

    def make_inputs():
        x = randn((batch, seqlen, d_model), device, dtype)
        w1 = randn((d_ff, d_model), device, dtype, d_model ** -0.5)
        w2 = randn((d_model, d_ff), device, dtype, d_ff ** -0.5)
        b1, b2 = randn((d_ff,), device, dtype, 0.1), randn((d_model,), device, dtype, 0.1)
        return x, w1, b1, w2, b2

    def ref(inputs, upcast):
        x, w1, b1, w2, b2 = inputs
        return reference.ffn(x, w1, b1, w2, b2, activation=activation, upcast=upcast)

    return Workload(
        "ffn", mode, sweep, dict(batch=batch, seqlen=seqlen, d_model=d_model, d_ff=d_ff, activation=activation),
        device, dtype, make_inputs, (0, 1, 2, 3, 4), ref, flops=flops(tokens, d_model, d_ff, mode=mode),
        tokens=tokens,
    )


def _fastenc(backend: str):
    def build(w: Workload) -> Impl:
        act = w.params["activation"]
        R.force("ffn", backend, w.device, w.dtype, (act,))  # shape class: (activation,)
        return Impl(lambda i: ops.ffn(*i, activation=act, backend=backend))
    return build


def _fastenc_gemm_path(path: str):
    """The CUDA FFN with one GEMM path forced (FASTENC_FFN_GEMM, read by the op at every call)."""
    def build(w: Workload) -> Impl:
        if w.device.type != "cuda":
            raise Unavailable("GEMM paths apply to CUDA tensors (fastenc-cuda covers the CPU path)")
        act = w.params["activation"]
        R.force("ffn", "cuda", w.device, w.dtype, (act,))
        from ...ops import ffn as ffn_op

        env = ffn_op.GEMM_PATH_ENV
        with _env(env, path):
            chosen, why = ffn_op.gemm_path(w.device, w.dtype, d=w.params["d_model"], f=w.params["d_ff"],
                                           activation=act, training=w.mode != "fwd")
        if chosen != path:
            raise Unavailable(f"GEMM path {path!r} does not run here ({chosen}: {why})")

        def forward(i):
            with _env(env, path):
                return ops.ffn(*i, activation=act, backend="cuda")
        return Impl(forward, note=f"{env}={path}")
    return build


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _torch_eager(w: Workload) -> Impl:
    act = w.params["activation"]
    return Impl(lambda i: F.linear(reference.apply_activation(F.linear(i[0], i[1], i[2]), act), i[3], i[4]))


def _torch_compile(w: Workload) -> Impl:
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    torch._dynamo.reset()  # a fresh cache per workload: never a silent eager fallback at the recompile limit
    act = w.params["activation"]

    def fn(i):
        return reference.ffn(*i, activation=act)
    return Impl(torch.compile(fn, dynamic=False, fullgraph=True), note="torch.compile(fastenc.reference)")


PROVIDERS = [
    Provider("fastenc-cuda", _fastenc("cuda"), False),
    *(Provider(f"fastenc-cuda-{p}", _fastenc_gemm_path(p), False) for p in ("cutlass", "cublaslt", "unfused")),
    Provider("fastenc-cpu", _fastenc("cpu"), False),
    Provider("fastenc-reference", _fastenc("reference"), False),
    Provider("torch-eager", _torch_eager, True),
    Provider("torch-compile", _torch_compile, True),
]


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(workload, "ffn", mode, sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    return [_e(mode, "seqlen", dev, dt, R.NO_COMPILE_TINY, batch=2, seqlen=64, d_model=128, d_ff=512)
            for mode in ("fwd", "bwd")]


def _cpu(dev, dt, extra):
    # rank (2, mode, n): after the LayerNorm point of the same mode and length
    return [_e(mode, "seqlen", dev, dt, R.only_at(n == 128, "torch-compile"), (2, i, j), batch=4, seqlen=n,
               d_model=384, d_ff=1536) for i, mode in enumerate(("fwd", "bwd")) for j, n in enumerate((128, 512))]


def _gpu(dev, dt, extra):
    """Issue #8's 16k tokens at 768->3072 and 1024->4096; tanh-GELU and ReLU (cuBLASLt's epilogues)."""
    no_ref = {"fastenc-reference": R.HEAVY["fastenc-reference"]}
    e = [_e(mode, "hidden", dev, dt, no_ref, (3, i), batch=R.GPU_TOKENS // 512, seqlen=512, d_model=d, d_ff=f)
         for i, mode in enumerate(("fwd", "bwd")) for d, f in ((768, 3072), (1024, 4096))]
    e += [_e(mode, "activation", dev, dt, R.HEAVY, (4,), batch=R.GPU_TOKENS // 512, seqlen=512, d_model=768,
             d_ff=3072, activation=act) for act in ("gelu_tanh", "relu") for mode in ("fwd", "bwd")]
    e += [_e(mode, "compile", dev, dt, None, (9, i), batch=32, seqlen=512, d_model=768, d_ff=3072)
          for i, mode in enumerate(("fwd", "bwd"))]
    return e


SUITE = R.register(R.Suite("ffn", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
