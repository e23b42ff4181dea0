"""Shared pieces of the randomized differential tests (``tests/test_*_random.py``), on hypothesis.

Each test draws a call (shapes, masks, dtype, options, a tensor seed), runs it on a fast backend
through the public op or module, and judges outputs and gradients by the parity rule of
``fastenc.testing`` against the reference in float64 (the oracle), bounded by the reference in the
call's own dtype (plain PyTorch's error) plus the per-dtype atol: for an op, atol · max(1, the oracle's
largest magnitude) (inputs are O(1), so an output near 0 keeps the absolute atol: dq is exactly 0 for
a query with one key, where the FA2 backward leaves rounding noise); for a whole model, atol · the
oracle's magnitude (``check_model``).
Dropout is compared with the reference fed the kernel's own keep mask (replayed from the seed the
op draws), so the forward and the backward must both draw that mask.

Profiles, chosen by ``FASTENC_HYPOTHESIS_PROFILE``:
  * ``ci`` (default): derandomized (the same examples on every run and machine), each test's own
    example count (``budget(n)``: about 2,000 in all, about 3 minutes with ``-n 2`` on 2 cores);
  * ``long``: ten times as many (about 20,000), from random seeds: a failure prints the
    ``@reproduce_failure`` blob and the falsifying example, to be kept as an ``@example``.
Examples are kept small (the Triton interpreter costs about 0.1 s a launch) so that the count fits.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fastenc.backends import BackendUnavailableError, explain
from fastenc.ops._common import draw_seed
from fastenc.testing import ATOL, assert_parity
from tests.conftest import base_error, typical_relative_error

PROFILE_VAR = "FASTENC_HYPOTHESIS_PROFILE"
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get(PROFILE_VAR, "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"{PROFILE_VAR}={PROFILE!r}: expected 'ci' or 'long'")
settings.load_profile(PROFILE)
SCALE = 10 if PROFILE == "long" else 1


def budget(n: int):
    """``@settings`` with n examples in the ci profile (10 n in the long one)."""
    return settings(max_examples=n * SCALE)


def usable(op: str, backend: str, dtype: torch.dtype, shape: tuple) -> bool:
    """Whether ``backend`` runs such a call of ``op`` here (the op's own availability check)."""
    try:
        explain(op, backend, torch.device("cpu"), dtype, shape)
    except BackendUnavailableError:
        return False
    return True


# --------------------------------------------------------------------------- drawing values


def lengths(max_len: int = 300):
    """A sequence length from 1 to max_len, mostly short (a third above 32 when max_len allows)."""
    short = st.integers(1, min(32, max_len))
    return st.one_of(short, short, st.integers(1, max_len)) if max_len > 32 else short


def sizes(dtype: torch.dtype, choices):
    """Size choices for a dimension some gradient is a sum along: no 1 in fp16 / bf16.  A one-element gradient's
    same-dtype error is a single sample, which its rounding can bring near 0 by chance (an FFN with f = 1: plain
    PyTorch's db1 in bf16 0.04% off, the kernel's, summing unrounded terms, 1.2%); the parity rule needs a max
    over many elements to measure the dtype's error."""
    return [c for c in choices if c > 1] if dtype in (torch.float16, torch.bfloat16) else list(choices)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values drawn in fp32 from ``g`` and rounded once to ``dtype``."""
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def dropout_p():
    """0 half of the time, else a rate in (0, 0.9], now and then 1 (everything dropped)."""
    return st.one_of(st.just(0.0), st.floats(0.05, 0.9).map(lambda p: round(p, 3)), st.just(1.0)) | st.just(0.0)


def replay_seed(torch_seed: int, device: torch.device) -> torch.Tensor:
    """The Philox key an op draws first after ``torch.manual_seed(torch_seed)`` (its dropout seed)."""
    torch.manual_seed(torch_seed)
    return draw_seed(device)


# --------------------------------------------------------------------------- judging


def leaves(tensors, dtype: Optional[torch.dtype] = None):
    """Fresh leaf copies that require grad (in ``dtype`` when given); None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(t.is_floating_point())
            for t in tensors]


def check(fast, oracle, base, name: str) -> None:
    """An op's output or gradient: the parity rule, atol · max(1, |oracle|)."""
    assert fast.dtype == base.dtype, f"{name}: dtype {fast.dtype}, expected {base.dtype}"
    assert_parity(fast, oracle, base, rtol=ATOL[fast.dtype], name=name)


def check_model(fast, oracle, base, name: str) -> None:
    """A model's output or parameter gradient: the parity rule, atol · |oracle| (their sizes follow the width
    and the token count, so an absolute atol would be meaningless)."""
    assert fast.dtype == base.dtype, f"{name}: dtype {fast.dtype}, expected {base.dtype}"
    assert_parity(fast, oracle, base, scaled=True, name=name)


def check_grads(names, fast_leaves, oracle_leaves, base_leaves, dtype: torch.dtype, allow=None) -> None:
    """The gradients of an op's inputs by the parity rule, as ``check`` with two changes.  ``dtype`` is the
    computation's precision, whose atol applies (an fp32 LayerNorm weight's gradient from fp16 rows is an fp16
    result; plain PyTorch's fp16 LayerNorm may give NaN there, leaving no baseline).  Plain PyTorch's error is
    taken as at least conftest.typical_relative_error (over these gradients) times each one's magnitude: a
    one-element gradient measures it by one sample.  A gradient that is 0 in exact arithmetic (fp64 noise)
    has no magnitude of its own: the call's largest gradient scales its atol, as in conftest.assert_grads_parity
    (with one visible key per query dq and dk are 0, and the FA2 backward leaves rounding noise: Δ = dO · O and
    dP = dO · V summed apart).  ``allow``: {name: extra atol} (attention's _saved_output_allowance)."""
    grads = {}
    for name, f, r, b in zip(names, fast_leaves, oracle_leaves, base_leaves):
        if f is None or not f.requires_grad:
            continue
        assert (f.grad is None) == (r.grad is None), f"d{name}: gradient presence differs from the reference"
        if f.grad is not None:
            assert f.grad.dtype == b.grad.dtype, f"d{name}: dtype {f.grad.dtype}, expected {b.grad.dtype}"
            grads[name] = (f.grad, r.grad, b.grad)
    typical = typical_relative_error({n: g[2] for n, g in grads.items()}, {n: g[1] for n, g in grads.items()})
    top = max((g[1].abs().max().item() for g in grads.values() if g[1].numel()), default=0.0)
    for name, (f, r, b) in grads.items():
        mag = r.abs().max().item() if r.numel() else 0.0
        floor = 2 * max(0.0, typical * mag - base_error(b, r))
        if mag <= 1e-9 * top:  # 0 in exact arithmetic (a query seeing one key: dq, dk): judged at the call's scale
            floor = ATOL[dtype] * top
        extra = (allow or {}).get(name, 0.0)
        assert_parity(f, r, b, atol=ATOL[dtype] + floor + extra, rtol=ATOL[dtype], name=f"d{name}")


@contextlib.contextmanager
def env(name: str, value: Optional[str]):
    """Set (or, for None, unset) an environment variable inside a block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
