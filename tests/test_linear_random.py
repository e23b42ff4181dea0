"""Randomized differential tests of the linear op (fastenc/ops/linear.py) on the extension's CPU backend.

y = x Wᵀ + b for random token counts (one or two leading dims), odd k and n on both sides of the oneDNN
threshold (2^21 multiply-adds), with and without a bias, fp32 / bf16 / fp16, and fp32 operands under
``torch.autocast`` (the GEMM in bf16).  Output and dx, dW, db against the float64 reference
(tests/strategies.py); under autocast the oracle multiplies the operands rounded to bf16, exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies as S
from tests.conftest import ON_GPU

from fastenc import ops, reference

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="the CPU backend"),
    pytest.mark.skipif(not S.usable("linear", "cpu", torch.float32, ()), reason="fastenc._C is not built"),
]


@dataclasses.dataclass
class Call:
    dtype: torch.dtype
    autocast: bool  # fp32 operands under torch.autocast(bfloat16)
    lead: tuple
    k: int
    n: int
    bias: bool
    seed: int


@st.composite
def calls(draw) -> Call:
    autocast = draw(st.integers(0, 4)) == 0
    dtype = torch.float32 if autocast else draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    low = torch.bfloat16 if autocast else dtype  # the GEMM's precision
    k = draw(st.sampled_from(S.sizes(low, [1, 8, 33, 64, 100, 384, 1000])))
    n = draw(st.sampled_from(S.sizes(low, [1, 8, 48, 96, 384, 1000, 1536])))
    most = max(1, (1 << 23) // (k * n))
    lead = draw(st.one_of(st.tuples(st.integers(1, min(300, most))),
                          st.tuples(st.integers(1, 3), st.integers(1, max(1, min(100, most // 3))))))
    return Call(dtype, autocast, lead, k, n, draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@S.budget(300)
@given(c=calls())
def test_cpu(c):
    g = S.generator(c.seed)
    inputs = [S.randn(g, *c.lead, c.k, dtype=c.dtype), S.randn(g, c.n, c.k, dtype=c.dtype, scale=c.k ** -0.5),
              S.randn(g, c.n, dtype=c.dtype) if c.bias else None]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if c.autocast else contextlib.nullcontext
    fast_in, base_in = S.leaves(inputs), S.leaves(inputs)
    # the oracle multiplies what the GEMM multiplies: under autocast, the operands rounded to bf16
    oracle_in = S.leaves([t if t is None or not c.autocast else t.to(torch.bfloat16) for t in inputs],
                         torch.float64)
    with autocast():
        y, base = ops.linear(*fast_in, backend="cpu"), reference.linear(*base_in)
    oracle = reference.linear(*oracle_in)
    S.check(y, oracle, base, "y")
    dy = S.randn(g, *y.shape, dtype=y.dtype)  # what the fast backward sees, for all three
    for o in (y, oracle, base):
        o.backward(dy.to(o.dtype))
    S.check_grads(("x", "w", "b"), fast_in, oracle_in, base_in, y.dtype)
