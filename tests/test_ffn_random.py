"""Randomized differential tests of the FFN op (fastenc/ops/ffn.py) on the extension's CPU backend.

y = dropout(act(x W1ᵀ + b1)) W2ᵀ + b2 (+ residual) for relu, erf-GELU, tanh-GELU and the gated geglu /
swiglu: random token counts (one or two leading dims), odd model and hidden sizes, each bias and the
residual present or not, dropout, both CPU GEMM paths (oneDNN above 2^21 multiply-adds, ATen's GEMM
below it or with ``FASTENC_FFN_GEMM=unfused``), fp32 / bf16 / fp16.  Output and the gradients of x, both
weights, both biases and the residual against the float64 reference (tests/strategies.py); dropout
against the reference fed the kernel's keep mask (``ffn.dropout_keep_mask``).
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies as S
from tests.conftest import ON_GPU

from fastenc import ops, reference

ffn_mod = importlib.import_module("fastenc.ops.ffn")  # the module (fastenc.ops.ffn is also the op's name)

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="the CPU backend; the CUDA one is checked by test_ffn.py"),
    pytest.mark.skipif(not S.usable("ffn", "cpu", torch.float32, ("geglu",)), reason="fastenc._C is not built"),
]

ACTIVATIONS = reference.ACTIVATIONS + reference.GATED_ACTIVATIONS
NAMES = ("x", "w1", "b1", "w2", "b2", "residual")


@dataclasses.dataclass
class Call:
    dtype: torch.dtype
    lead: tuple
    d: int
    f: int
    activation: str
    b1: bool
    b2: bool
    residual: bool
    p: float
    gemm: str  # FASTENC_FFN_GEMM
    seed: int


@st.composite
def calls(draw) -> Call:
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    d = draw(st.sampled_from(S.sizes(dtype, [1, 8, 16, 33, 64, 100, 384])))
    f = draw(st.sampled_from(S.sizes(dtype, [1, 8, 24, 64, 100, 256, 1000, 1536])))
    most = max(1, (1 << 23) // (d * f))  # at most 2^23 multiply-adds a GEMM (2^21: the oneDNN threshold)
    rows = st.integers(1, min(300, most))
    lead = draw(st.one_of(st.tuples(rows), st.tuples(st.integers(1, 3), st.integers(1, max(1, min(100, most // 3))))))
    return Call(dtype, lead, d, f,
                draw(st.sampled_from(ACTIVATIONS)), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                draw(S.dropout_p()), draw(st.sampled_from(["auto", "auto", "unfused"])), draw(st.integers(0, 2**31 - 1)))


@S.budget(400)
@given(c=calls())
def test_cpu(c):
    g = S.generator(c.seed)
    rows = 2 * c.f if c.activation in reference.GATED_ACTIVATIONS else c.f
    inputs = [S.randn(g, *c.lead, c.d, dtype=c.dtype), S.randn(g, rows, c.d, dtype=c.dtype, scale=c.d ** -0.5),
              S.randn(g, rows, dtype=c.dtype) if c.b1 else None, S.randn(g, c.d, c.f, dtype=c.dtype, scale=c.f ** -0.5),
              S.randn(g, c.d, dtype=c.dtype) if c.b2 else None,
              S.randn(g, *c.lead, c.d, dtype=c.dtype) if c.residual else None]
    keep = None
    if c.p > 0:
        tokens = torch.Size(c.lead).numel()
        keep = ffn_mod.dropout_keep_mask(S.replay_seed(c.seed, torch.device("cpu")), tokens, c.f, c.p)
        keep = keep.view(*c.lead, c.f)

    def fast(x, w1, b1, w2, b2, residual):
        torch.manual_seed(c.seed)  # the op draws the seed replayed above
        with S.env(ffn_mod.GEMM_PATH_ENV, c.gemm):
            return ops.ffn(x, w1, b1, w2, b2, activation=c.activation, dropout_p=c.p, residual=residual,
                           backend="cpu")

    def ref(x, w1, b1, w2, b2, residual):
        return reference.ffn(x, w1, b1, w2, b2, activation=c.activation, dropout_p=c.p, dropout_mask=keep,
                             residual=residual)

    fast_in, oracle_in, base_in = S.leaves(inputs), S.leaves(inputs, torch.float64), S.leaves(inputs)
    outs = [fast(*fast_in), ref(*oracle_in), ref(*base_in)]
    S.check(*outs, "y")
    dy = S.randn(g, *outs[0].shape, dtype=outs[0].dtype)  # what the fast backward sees, for all three
    with S.env(ffn_mod.GEMM_PATH_ENV, c.gemm):
        for o in outs:
            o.backward(dy.to(o.dtype))
    S.check_grads(NAMES, fast_in, oracle_in, base_in, c.dtype)
