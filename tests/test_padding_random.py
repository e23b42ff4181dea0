"""Randomized differential tests of padding removal (fastenc/ops/padding.py) against the reference.

``padding_info`` on random bool masks [B, L] (ragged, holes, fully padded rows, empty batches) must give
``reference.unpad``'s indices, cu_seqlens and max length; ``unpad`` and ``pad`` on the ``triton`` backend
(the interpreter on CPU) must move exactly the reference's rows, forward and backward, for float,
integer and bool rows of any trailing shape.  Data movement: compared bit for bit.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies as S  # noqa: I001  (tests/conftest.py sets TRITON_INTERPRET first)
from tests.conftest import ON_GPU

from fastenc import ops, reference

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="the Triton interpreter on CPU tensors; see test_padding.py"),
    pytest.mark.skipif(not S.usable("padding", "triton", torch.float32, ()), reason="Triton cannot run here"),
]

DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool]


@dataclasses.dataclass
class Call:
    B: int
    L: int
    feature: tuple
    dtype: torch.dtype
    layout: str  # "right", "left" or "holes"
    seed: int


@st.composite
def calls(draw) -> Call:
    return Call(draw(st.integers(0, 5)), draw(st.integers(0, 60)),
                draw(st.sampled_from([(), (1,), (7,), (64,), (3, 5)])), draw(st.sampled_from(DTYPES)),
                draw(st.sampled_from(["right", "left", "holes"])), draw(st.integers(0, 2**31 - 1)))


def _mask(c: Call, g: torch.Generator) -> torch.Tensor:
    if c.layout == "holes":
        return torch.rand(c.B, c.L, generator=g) < torch.rand(c.B, 1, generator=g)  # each row its own density
    keep = torch.randint(0, c.L + 1, (c.B, 1), generator=g)  # 0: a fully padded row
    pos = torch.arange(c.L)[None, :]
    return pos >= keep if c.layout == "right" else pos < c.L - keep


def _values(c: Call, g: torch.Generator, *shape) -> torch.Tensor:
    if c.dtype.is_floating_point:
        return S.randn(g, *shape, dtype=c.dtype)
    return torch.randint(0, 2 if c.dtype == torch.bool else 1000, shape, generator=g).to(c.dtype)


@S.budget(80)
@given(c=calls())
def test_unpad_pad_triton(c):
    g = S.generator(c.seed)
    kpm = _mask(c, g)
    info = ops.padding_info(kpm)
    x = _values(c, g, c.B, c.L, *c.feature)
    packed_ref, indices, cu_seqlens, max_seqlen = reference.unpad(x, kpm)
    assert torch.equal(info.indices, indices) and torch.equal(info.cu_seqlens, cu_seqlens)
    assert (info.max_seqlen, info.batch, info.seqlen, info.total) == (max_seqlen, c.B, c.L, indices.numel())
    floating = c.dtype.is_floating_point
    leaf = x.clone().requires_grad_(floating)
    packed = ops.unpad(leaf, info, backend="triton")
    assert packed.dtype == c.dtype and torch.equal(packed, packed_ref)
    rows = _values(c, g, info.total, *c.feature).requires_grad_(floating)
    padded = ops.pad(rows, info, backend="triton")
    assert padded.dtype == c.dtype and torch.equal(padded, reference.pad(rows.detach(), indices, c.B, c.L))
    if floating:  # each is the other's backward: the gradient of unpad is pad, of pad is unpad
        d_packed, d_padded = S.randn(g, *packed.shape, dtype=c.dtype), S.randn(g, *padded.shape, dtype=c.dtype)
        packed.backward(d_packed)
        padded.backward(d_padded)
        assert torch.equal(leaf.grad, reference.pad(d_packed, indices, c.B, c.L))
        assert torch.equal(rows.grad, reference.unpad(d_padded, kpm)[0])
