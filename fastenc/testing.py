"""Parity checking shared by tests and benchmarks (the one tolerance helper).

Parity rule (flash-attention's): the fast result's error against an fp32 reference
must be at most ``factor`` times the error of plain PyTorch in the same low
precision, plus a per-dtype atol.  NaN or inf where the reference is finite fails.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def parity_error(fast: Tensor, ref: Tensor, base: Tensor, *, factor: float = 2.0, atol: Optional[float] = None,
                 rtol: float = 0.0):
    """Return None if fast passes the parity rule, else a diagnostic message.

    fast: the tested result; ref: the fp32 reference; base: plain PyTorch in fast's dtype.
    rtol scales with the reference's largest magnitude (for fp32, where base is the reference
    itself and only a summation-order error is left).
    """
    if atol is None:
        atol = ATOL.get(fast.dtype, 1e-5)
    if fast.shape != ref.shape:
        return f"shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
    f, r, b = fast.detach().float(), ref.detach().float(), base.detach().float()
    bad_nonfinite = ~torch.isfinite(f) & torch.isfinite(r)
    if bad_nonfinite.any():
        idx = bad_nonfinite.nonzero()[0].tolist()
        return f"{int(bad_nonfinite.sum())} non-finite values where the reference is finite (first at {idx})"
    err = (f - r).abs().nan_to_num(0.0)
    base_err = (b - r).abs().nan_to_num(0.0).max().item() if b.numel() else 0.0
    bound = factor * base_err + atol + (rtol * r.abs().max().item() if r.numel() else 0.0)
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
                  rtol: float = 0.0, name: str = "") -> None:
    msg = parity_error(fast, ref, base, factor=factor, atol=atol, rtol=rtol)
    assert msg is None, f"{name}: {msg}" if name else msg


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Elementwise |a - e| <= atol + rtol |e| with the same diagnostics; NaN never passes."""
    a, e = actual.detach().float(), expected.detach().float()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    assert not nonfinite.any(), f"{name}: {int(nonfinite.sum())} non-finite values where expected is finite"
    err = (a - e).abs().nan_to_num(0.0)
    tol = atol + rtol * e.abs().nan_to_num(0.0)
    bad = err > tol
    if bad.any():
        worst = (err - tol).flatten().argmax().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off, max error {err.max().item():.3e} "
            f"(atol {atol:.1e}, rtol {rtol:.1e}); worst flat index {worst}: "
            f"actual={a.flatten()[worst].item():.6g} expected={e.flatten()[worst].item():.6g}"
        )
