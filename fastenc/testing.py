"""Parity checking shared by tests and benchmarks (the one tolerance helper).

Parity rule (flash-attention's): the fast result's error against an fp32 reference
must be at most ``factor`` times the error of plain PyTorch in the same low
precision, plus a per-dtype atol.  Non-finite values must sit where the reference has
them: NaN where the reference has NaN, +inf / -inf where it has the same infinity (the
reference as the result's dtype holds it: past that dtype's range it is an infinity).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rounded(ref: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference as ``dtype`` holds it, where ``dtype`` has a narrower range: a value past that range is an
    infinity there (fp16 overflows above 65504), which a correctly rounded result must show too."""
    if ref.is_floating_point() and dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(ref.dtype).max:
        return ref.detach().to(dtype)
    return ref.detach()


def _overflow_edge(f: Tensor, r: Tensor, ref: Tensor) -> Tensor:
    """Where f and r (ref rounded to f's dtype) differ only in how a value within 2 ulps of the dtype's largest
    finite value rounded: one is ±max, the other ±inf of the same sign (an fp32 result rounds to 65504 in fp16
    where the fp64 oracle's value, a few units larger, rounds to inf: the same value up to rounding)."""
    if not (f.is_floating_point() and ref.is_floating_point()) or torch.finfo(f.dtype).max >= torch.finfo(ref.dtype).max:
        return torch.zeros_like(f, dtype=torch.bool)
    fi = torch.finfo(f.dtype)
    near = (ref.detach().abs().to(torch.float64) - fi.max).abs() <= 2 * fi.max * fi.eps
    same = torch.sign(f.to(torch.float64)) == torch.sign(ref.detach().to(torch.float64))
    edge = (torch.isinf(f) & (r.abs() == fi.max)) | (torch.isinf(r) & (f.abs() == fi.max))
    return near & same & edge


def nonfinite_mismatch(fast: Tensor, ref: Tensor) -> Optional[str]:
    """None when fast's NaN and inf sit exactly where ref's do (same sign of inf; ref rounded to fast's dtype,
    a value within 2 ulps of the dtype's largest finite one may round either way), else a diagnostic."""
    f, r = fast.detach(), rounded(ref, fast.dtype)
    bad = (torch.isnan(f) != torch.isnan(r)) | (torch.isposinf(f) != torch.isposinf(r)) | \
        (torch.isneginf(f) != torch.isneginf(r))
    bad &= ~_overflow_edge(f, r, ref)
    if not bad.any():
        return None
    idx = bad.nonzero()[0].tolist()
    return (f"NaN/inf mismatch: {int(bad.sum())} non-finite values where the reference is finite or another "
            f"non-finite, or the reverse (first at {idx}: got {f[tuple(idx)].item():.6g}, reference "
            f"{r[tuple(idx)].item():.6g})")


def parity_error(fast: Tensor, ref: Tensor, base: Tensor, *, factor: float = 2.0, atol: Optional[float] = None,
                 rtol: float = 0.0, scaled: bool = False):
    """Return None if fast passes the parity rule, else a diagnostic message.

    fast: the tested result; ref: the fp32 (or fp64) reference; base: plain PyTorch in fast's dtype.
    rtol scales with the reference's largest magnitude (for fp32, where base is the reference
    itself and only a summation-order error is left).  scaled: the atol too is relative to the
    reference's largest finite magnitude (for model outputs and gradients, whose size depends on
    the width and the token count: a flat atol is meaningless there).
    """
    if atol is None:
        atol = ATOL.get(fast.dtype, 1e-5)
    if fast.shape != ref.shape:
        return f"shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
    msg = nonfinite_mismatch(fast, ref)
    if msg is not None:
        return msg
    wide = torch.float64 if ref.dtype == torch.float64 else torch.float32  # an fp64 oracle is not rounded
    f, r, b = (t.detach().to(wide) for t in (fast, ref, base))
    # elsewhere fast agrees with the reference (checked above: the same non-finite values, or the overflow edge)
    finite = torch.isfinite(rounded(ref, fast.dtype)) & torch.isfinite(fast.detach())
    err = torch.where(finite, f - r, 0.0).abs()
    # Where plain PyTorch itself overflowed or gave NaN its error is no measure: left out, not an infinite bound.
    base_ok = finite & torch.isfinite(b)
    base_err = torch.where(base_ok, b - r, 0.0).abs().max().item() if b.numel() else 0.0
    magnitude = torch.where(finite, r, 0.0).abs().max().item() if r.numel() else 0.0
    if scaled:
        atol *= magnitude
    bound = factor * base_err + atol + rtol * magnitude
    if err.numel() and err.max().item() > bound:
        worst = err.flatten().argmax().item()
        idx = list(torch.unravel_index(torch.tensor(worst), f.shape)) if f.dim() else []
        n_bad = int((err > bound).sum())
        return (
            f"max error {err.max().item():.3e} > {factor} x torch error {base_err:.3e} + atol {atol:.1e}; "
            f"{n_bad}/{err.numel()} elements over, worst at {[int(i) for i in idx]}: "
            f"fast={f.flatten()[worst].item():.6g} ref={r.flatten()[worst].item():.6g}"
        )
    return None


def assert_parity(fast: Tensor, ref: Tensor, base: Tensor, *, factor: float = 2.0, atol: Optional[float] = None,
                  rtol: float = 0.0, scaled: bool = False, name: str = "") -> None:
    msg = parity_error(fast, ref, base, factor=factor, atol=atol, rtol=rtol, scaled=scaled)
    assert msg is None, f"{name}: {msg}" if name else msg


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Elementwise |a - e| <= atol + rtol |e| with the same diagnostics; NaN and inf must sit where expected's do."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    msg = nonfinite_mismatch(actual, expected)
    assert msg is None, f"{name}: {msg}"
    finite = torch.isfinite(rounded(expected, actual.dtype))
    a, e = actual.detach().float(), expected.detach().float()
    err = torch.where(finite, a - e, 0.0).abs()
    tol = atol + rtol * torch.where(finite, e, 0.0).abs()
    bad = err > tol
    if bad.any():
        worst = (err - tol).flatten().argmax().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off, max error {err.max().item():.3e} "
            f"(atol {atol:.1e}, rtol {rtol:.1e}); worst flat index {worst}: "
            f"actual={a.flatten()[worst].item():.6g} expected={e.flatten()[worst].item():.6g}"
        )
