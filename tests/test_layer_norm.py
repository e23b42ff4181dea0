"""Triton fused residual-add + LayerNorm (triton_kernels/layer_norm.py, fastenc/ops/layer_norm.py).

Parity rule: fast vs fp32 reference <= 2 x (reference in the input dtype vs fp32) + atol,
for the outputs and every gradient.  On CPU the kernels run under the Triton
interpreter (fp16/fp32); bf16 and large shapes run where CUDA exists.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEVICE, ON_GPU, TRITON_DTYPES
from fastenc import reference
from fastenc.backends import BackendUnavailableError
from fastenc.ops import residual_layer_norm
from fastenc.ops._common import draw_seed as draw_dropout_seed
from fastenc.testing import assert_close, assert_parity
from fastenc.triton_kernels import layer_norm as kernels
from fastenc.triton_kernels import layer_norm_config

NAMES = ("x", "branch", "weight", "bias", "branch_bias")


def _inputs(shape, dtype, *, branch=True, branch_bias=True, weight=True, bias=True, param_dtype=None):
    """Fresh random leaves (None where absent), all requiring grad."""
    n = shape[-1]
    pd = param_dtype or dtype
    t = {
        "x": torch.randn(shape, device=DEVICE, dtype=dtype),
        "branch": torch.randn(shape, device=DEVICE, dtype=dtype) if branch else None,
        "weight": (1 + 0.5 * torch.randn(n, device=DEVICE)).to(pd) if weight else None,
        "bias": (0.5 * torch.randn(n, device=DEVICE)).to(pd) if bias else None,
        "branch_bias": (0.5 * torch.randn(n, device=DEVICE)).to(pd) if (branch and branch_bias) else None,
    }
    return {k: v.requires_grad_() if v is not None else None for k, v in t.items()}


def _run(fn, t, grads_out, prenorm):
    """Outputs and gradients of every present input of fn(**t)."""
    out = fn(**t)
    outs = list(out) if prenorm else [out]
    leaves = [t[k] for k in NAMES if t[k] is not None]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return outs, list(grads)


def _check_parity(t, *, eps=1e-5, prenorm=False, dropout_p=0.0, keep=None, fast=None, grad_layout=None,
                  fp64_ref=False):
    """Fast op vs reference(upcast=True), baseline reference in the input dtype; fwd and all grads.

    fp64_ref: take the exact reference in float64 instead (for ill-conditioned rows, where
    the fp32 reference itself is off).
    """
    x = t["x"]
    kw = dict(eps=eps, prenorm=prenorm)
    if fast is None:
        def fast(**a):
            return residual_layer_norm(a["x"], a["branch"], a["weight"], a["bias"], branch_bias=a["branch_bias"],
                                       dropout_p=dropout_p, backend="triton", **kw)

    def ref(upcast):
        def f(**a):
            if not upcast:  # plain PyTorch in x's dtype: parameters cast to it
                a = {k: (v.to(x.dtype) if v is not None and k != "x" else v) for k, v in a.items()}
            elif fp64_ref:
                a = {k: (v.double() if v is not None else v) for k, v in a.items()}
            return reference.residual_layer_norm(a["x"], a["branch"], a["weight"], a["bias"],
                                                 branch_bias=a["branch_bias"], dropout_p=dropout_p,
                                                 dropout_mask=keep, upcast=upcast and not fp64_ref, **kw)
        return f

    n_out = 2 if prenorm else 1
    grads_out = [torch.randn(x.shape, device=DEVICE, dtype=x.dtype) for _ in range(n_out)]
    if grad_layout is not None:  # applied in x's dtype, so the fast op sees this very layout
        grads_out = [grad_layout(g) for g in grads_out]
    f_out, f_grads = _run(fast, t, grads_out, prenorm)
    r_out, r_grads = _run(ref(True), t, grads_out, prenorm)
    b_out, b_grads = _run(ref(False), t, grads_out, prenorm)
    names = ["y", "residual"][:n_out] + [f"d{k}" for k in NAMES if t[k] is not None]
    for name, f, r, b in zip(names, f_out + f_grads, r_out + r_grads, b_out + b_grads):
        assert f.dtype == b.dtype or name.startswith("d"), f"{name}: dtype {f.dtype}"
        # fp32: the baseline *is* the reference, so allow fp32 rounding relative to the magnitude.
        atol = 1e-5 * max(1.0, r.abs().max().item()) if f.dtype == torch.float32 else None
        assert_parity(f, r, b, atol=atol, name=name)
    for name, f, leaf in zip(names[n_out:], f_grads, [t[k] for k in NAMES if t[k] is not None]):
        assert f.dtype == leaf.dtype and f.shape == leaf.shape, f"{name}: {f.dtype} {tuple(f.shape)}"
    return f_out, f_grads


# (hidden, rows, prenorm, branch, branch_bias, weight, bias)
CASES = [
    (384, 1, False, True, True, True, True),
    (768, 7, False, True, True, True, True),
    (768, 7, True, True, True, True, True),
    (1000, 7, True, True, False, True, False),
    (1000, 1, False, False, False, True, True),
    (1024, 127, False, True, True, True, True),
    (1024, 7, True, False, False, False, False),
    (384, 7, False, True, False, False, True),
    (4096, 3, True, True, True, True, True),
]


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("hidden,rows,prenorm,branch,branch_bias,weight,bias", CASES)
def test_parity(dtype, hidden, rows, prenorm, branch, branch_bias, weight, bias):
    t = _inputs((rows, hidden), dtype, branch=branch, branch_bias=branch_bias, weight=weight, bias=bias)
    _check_parity(t, prenorm=prenorm)


class _NotLaunched:
    """Stands in for a kernel that the chosen path must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched")


# (hidden, prenorm, branch, param_dtype): 4096 < N <= 8192 without dropout
WHOLE_ROW_CASES = [(8192, False, True, None), (6000, True, True, None), (5000, False, False, None),
                   (7000, False, True, torch.float32)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("hidden,prenorm,branch,param_dtype", WHOLE_ROW_CASES)
def test_parity_whole_row_backward_up_to_8192(dtype, hidden, prenorm, branch, param_dtype, monkeypatch):
    """4096 < N <= 8192 without dropout, 16-bit rows: whole rows in registers, one per program
    (the wide two-kernel path must not run); dbranch_bias from a second pass over dbranch.
    fp32 rows take the two-kernel path."""
    wide = dtype == torch.float32
    unused = "_ln_bwd_kernel" if wide else "_ln_bwd_wide_kernel"
    monkeypatch.setattr(kernels, unused, _NotLaunched(unused))
    t = _inputs((3, hidden), dtype, branch=branch, param_dtype=param_dtype)
    _check_parity(t, prenorm=prenorm)


def test_parity_8192_fp32_branch_takes_two_kernels(monkeypatch):
    """An fp32 row (here the branch of an fp16 x: dbranch written apart from dx) is too wide for
    registers at 8192: the two-kernel backward runs."""
    monkeypatch.setattr(kernels, "_ln_bwd_kernel", _NotLaunched("_ln_bwd_kernel"))
    t = _inputs((2, 8192), torch.float16)
    t["branch"] = torch.randn(2, 8192, device=DEVICE).requires_grad_()
    _check_parity(t)


def test_parity_hidden_16384():
    t = _inputs((2, 16384), torch.float16)
    _check_parity(t, prenorm=True)


@pytest.mark.parametrize("n,prenorm", [(5000, False), (8192, True), (9000, False)])
def test_parity_wide_rows_with_dropout(n, prenorm, monkeypatch):
    """Dropout with N > 4096 (and every N > 8192) takes the two-kernel backward (column chunks +
    column-tiled parameter sums)."""
    monkeypatch.setattr(kernels, "_ln_bwd_kernel", _NotLaunched("_ln_bwd_kernel"))
    p = 0.2
    t = _inputs((2, n), torch.float32)
    keep = _replay_keep(99, (2, n), p)

    def fast(**a):
        torch.manual_seed(99)
        return residual_layer_norm(a["x"], a["branch"], a["weight"], a["bias"], branch_bias=a["branch_bias"],
                                   dropout_p=p, prenorm=prenorm, backend="triton")

    _check_parity(t, prenorm=prenorm, dropout_p=p, keep=keep, fast=fast)


def test_backward_path_by_hidden_size_and_dropout():
    cfg = layer_norm_config.LayerNormBwdConfig.for_hidden
    for n in (1, 384, 1000, 4096):
        for dropout in (False, True):
            b = cfg(n, dropout)
            assert not b.wide and not b.dbb_pass, (n, dropout, b)
    for n in (4097, 6000, 8192):
        b = cfg(n)
        assert not b.wide and b.dbb_pass and b.ROWS == 1 and b.num_warps == 32, (n, b)
        assert cfg(n, dropout=True).wide and cfg(n, element_size=4).wide
    assert not cfg(4096, element_size=4).wide
    for n in (8193, 16384):
        assert cfg(n).wide and cfg(n, dropout=True).wide
    assert layer_norm_config.WIDE_HIDDEN == 8192


def test_parity_leading_dims_and_odd_rows():
    # [batch, seq, hidden] with seq = 13, a [B, L, H, N] 4-d input, a single [N] row.
    _check_parity(_inputs((2, 13, 384), torch.float16), prenorm=True)
    _check_parity(_inputs((2, 3, 2, 96), torch.float32))
    _check_parity(_inputs((1000,), torch.float32), prenorm=True)


def test_empty_input():
    t = _inputs((0, 384), torch.float16)
    y = residual_layer_norm(t["x"], t["branch"], t["weight"], t["bias"], branch_bias=t["branch_bias"],
                            backend="triton")
    assert y.shape == (0, 384)
    y.sum().backward()
    assert t["weight"].grad.shape == (384,) and not t["weight"].grad.any()


@pytest.mark.skipif(not ON_GPU, reason="needs tensors of more than 2^31 elements (about 13 GB); CUDA only")
def test_int64_offsets_past_2_31_elements():
    n = 4096
    m = 2**31 // n + 3
    x = torch.randn(m, n, device=DEVICE, dtype=torch.float16).requires_grad_()
    w = torch.randn(n, device=DEVICE, dtype=torch.float16)
    y = residual_layer_norm(x, None, w, None, backend="triton")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    tail = x[-5:].detach().float().requires_grad_()  # rows whose offsets pass 2^31
    y_ref = reference.residual_layer_norm(tail, None, w.float(), None)
    (dx_ref,) = torch.autograd.grad(y_ref, tail, dy[-5:].float())
    assert_close(y[-5:], y_ref, atol=1e-2, name="y tail")
    assert_close(dx[-5:], dx_ref, atol=5e-2, rtol=1e-2, name="dx tail")


@pytest.mark.parametrize("prenorm", [False, True])
def test_fp32_params_with_half_input(prenorm):
    """Autocast layout: fp16 activations, fp32 LayerNorm and bias parameters; output in fp16."""
    dtype = TRITON_DTYPES[1] if ON_GPU else torch.float16
    t = _inputs((7, 768), dtype, param_dtype=torch.float32)
    outs, grads = _check_parity(t, prenorm=prenorm)
    assert all(o.dtype == dtype for o in outs)
    assert grads[2].dtype == torch.float32  # dweight


def test_branch_dtype_unlike_x():
    """An fp32 branch on an fp16 residual: outputs in x's dtype, dbranch written separately in fp32."""
    t = _inputs((7, 384), torch.float16)
    t["branch"] = torch.randn(7, 384, device=DEVICE).requires_grad_()
    outs, grads = _check_parity(t, prenorm=True)
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert grads[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_zero_and_constant_rows_eps_1e12(dtype):
    x = torch.randn(4, 1000, device=DEVICE, dtype=dtype)
    x[0] = 0.0
    x[1] = 3.0
    x[2] = -1000.0
    w = torch.randn(1000, device=DEVICE, dtype=dtype)
    b = torch.randn(1000, device=DEVICE, dtype=dtype)
    y = residual_layer_norm(x, None, w, b, eps=1e-12, backend="triton")
    assert torch.isfinite(y).all()
    # Zero and constant rows normalise to exactly 0, so y = bias there.
    assert_close(y[:3], b.expand(3, -1), atol=0.0, name="constant rows")
    ref = reference.residual_layer_norm(x, None, w, b, eps=1e-12, upcast=True)
    base = reference.residual_layer_norm(x, None, w, b, eps=1e-12)
    assert_parity(y, ref, base, name="y")
    # Zero and constant sums through the residual add, with gradients in fp32 (rstd = 1e6
    # overflows fp16 gradients).
    t = _inputs((3, 384), torch.float32, branch_bias=False)
    with torch.no_grad():
        t["x"][0], t["branch"][0] = 0.0, 0.0
        t["x"][1], t["branch"][1] = 1.5, 1.0
    _check_parity(t, eps=1e-12, prenorm=True, fp64_ref=True)


def test_large_mean_small_variance():
    """Variance from centred values: a row 1e4 + N(0, 1e-2) keeps its shape in fp32."""
    x = 1e4 + 1e-2 * torch.randn(7, 768, device=DEVICE)
    y = residual_layer_norm(x, None, None, None, backend="triton")
    ref = reference.residual_layer_norm(x.double(), None, None, None).float()
    assert_close(y, ref, atol=2e-2, name="y")


def test_non_contiguous_inputs():
    dtype = torch.float16
    base = torch.randn(13, 2, 384, device=DEVICE, dtype=dtype)
    x = base.transpose(0, 1).detach().requires_grad_()  # [2, 13, 384] strided rows: no copy
    wide = torch.randn(2, 13, 400, device=DEVICE, dtype=dtype)
    branch = wide[..., :384].detach().requires_grad_()  # row stride 400
    n = 384
    t = dict(x=x, branch=branch, weight=torch.randn(n, device=DEVICE, dtype=dtype).requires_grad_(),
             bias=torch.randn(n, device=DEVICE, dtype=dtype).requires_grad_(),
             branch_bias=torch.randn(n, device=DEVICE, dtype=dtype).requires_grad_())
    _check_parity(t, prenorm=True, grad_layout=lambda g: g.transpose(0, 1).contiguous().transpose(0, 1))
    # Last dim not unit-stride (copied by the launcher), and a gradient with stride-0 rows.
    xt = torch.randn(n, 5, device=DEVICE, dtype=dtype).t().detach().requires_grad_()
    t2 = dict(x=xt, branch=None, weight=None, bias=None, branch_bias=None)
    _check_parity(t2, grad_layout=lambda g: g[:1].expand(g.shape))


def test_no_x_stride_copy_for_strided_rows():
    """Rows with a stride (a slice of a wider tensor) are read in place: same result as the copy."""
    wide = torch.randn(7, 1030, device=DEVICE, dtype=torch.float16)
    x = wide[:, 3:1003]
    y1 = residual_layer_norm(x, None, None, None, backend="triton")
    y2 = residual_layer_norm(x.contiguous(), None, None, None, backend="triton")
    assert torch.equal(y1, y2)


# --------------------------------------------------------------------------- dropout


def _replay_keep(seed_state, shape, p):
    torch.manual_seed(seed_state)
    return kernels.dropout_keep_mask(draw_dropout_seed(DEVICE), shape, p)


@pytest.mark.parametrize("prenorm,n", [(False, 1000), (True, 1000), (False, 768)])
def test_dropout_matches_reference_with_replayed_mask(prenorm, n):
    """Forward and all gradients equal the reference fed the kernel's own keep mask: the backward
    regenerates exactly the forward's mask (per-column draws at N = 1000, per 4 columns at 768)."""
    p = 0.3
    t = _inputs((7, n), torch.float32)
    torch.manual_seed(1234)
    keep = _replay_keep(1234, (7, n), p)
    state = torch.random.get_rng_state()

    def fast(**a):
        torch.manual_seed(1234)
        return residual_layer_norm(a["x"], a["branch"], a["weight"], a["bias"], branch_bias=a["branch_bias"],
                                   dropout_p=p, prenorm=prenorm, backend="triton")

    torch.random.set_rng_state(state)
    _check_parity(t, prenorm=prenorm, dropout_p=p, keep=keep, fast=fast)


def test_dropout_keep_rate_scaling_and_seed():
    p = 0.25
    for n in (1000, 1024):  # one draw per column, one per 4 columns
        rate = _replay_keep(7, (32, n), p).float().mean().item()
        assert abs(rate - (1 - p)) < 0.015, (n, rate)  # 5 sigma is 0.012
    shape = (32, 1024)
    keep = _replay_keep(7, shape, p)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert torch.equal(keep, _replay_keep(7, shape, p))
    assert not torch.equal(keep, _replay_keep(8, shape, p))
    # Row-major (row, col) numbering: the mask of the first rows does not depend on the row count.
    assert torch.equal(_replay_keep(7, (3, 1024), p), keep[:3])
    shape = (8, 1024)
    keep = keep[:8]

    # Scaling: the prenorm residual is x + keep * (branch + branch_bias) / (1 - p), exactly.
    x = torch.randn(shape, device=DEVICE)
    br = torch.randn(shape, device=DEVICE)
    bb = torch.randn(1024, device=DEVICE)
    torch.manual_seed(7)
    _, s = residual_layer_norm(x, br, None, None, branch_bias=bb, dropout_p=p, prenorm=True, backend="triton")
    assert_close(s, x + keep * (br + bb) / (1 - p), atol=1e-5, rtol=1e-6, name="residual")
    # p = 1 drops the whole branch.
    _, s1 = residual_layer_norm(x, br, None, None, dropout_p=1.0, prenorm=True, backend="triton")
    assert torch.equal(s1, x)


def test_dropout_reproducible_per_torch_seed():
    x = torch.randn(7, 384, device=DEVICE)
    br = torch.randn(7, 384, device=DEVICE)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(residual_layer_norm(x, br, None, None, dropout_p=0.5, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# --------------------------------------------------------------------------- errors, dispatch, compile


def test_bad_inputs_raise():
    x = torch.randn(4, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    with pytest.raises(ValueError, match="branch has shape"):
        residual_layer_norm(x, torch.randn(4, 32, device=DEVICE), w, None, backend="triton")
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        residual_layer_norm(x, None, torch.randn(65, device=DEVICE), None, backend="triton")
    with pytest.raises(ValueError, match=r"branch_bias must have shape"):
        residual_layer_norm(x, x, w, None, branch_bias=torch.randn(2, 64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="is on meta but x is on"):
        residual_layer_norm(x, None, torch.randn(64, device="meta"), None, backend="triton")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        residual_layer_norm(torch.ones(4, 64, dtype=torch.int32, device=DEVICE), None, None, None, backend="triton")
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        residual_layer_norm(x, None, w, torch.ones(64, dtype=torch.int64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="branch_bias is given but branch is None"):
        residual_layer_norm(x, None, w, None, branch_bias=w, backend="triton")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        residual_layer_norm(x, x, w, None, dropout_p=1.5, backend="triton")
    with pytest.raises(ValueError, match="eps must be positive"):
        residual_layer_norm(x, None, w, None, eps=0.0, backend="triton")


def test_unsupported_hidden_size_is_explained():
    x = torch.randn(1, layer_norm_config.MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="outside the Triton kernel's range"):
        residual_layer_norm(x, None, None, None, backend="triton")
    for config in (layer_norm_config.LayerNormFwdConfig, layer_norm_config.LayerNormBwdConfig):
        with pytest.raises(ValueError, match="outside the supported range"):
            config.for_hidden(layer_norm_config.MAX_HIDDEN + 1)


def test_torch_compile_fullgraph():
    t = _inputs((3, 384), torch.float32)
    backend = "inductor" if ON_GPU else "aot_eager"

    def f(x, branch, weight, bias, branch_bias):
        y, s = residual_layer_norm(x, branch, weight, bias, branch_bias=branch_bias, prenorm=True,
                                   backend="triton")
        return y * 2 + s

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out = compiled(**t)
    out.sum().backward()
    got = [t[k].grad.clone() for k in NAMES]
    for v in t.values():
        v.grad = None
    ref = f(**t)
    ref.sum().backward()
    assert_close(out, ref, atol=1e-5, name="compiled y")
    for k, g in zip(NAMES, got):
        assert_close(g, t[k].grad, atol=1e-4, name=f"compiled d{k}")


# --------------------------------------------------------------------------- sm_90 compile check

# tests/test_inspector.py compiles every shipped config in its default variant (fp16, sizes
# without divisibility hints); this adds bf16, fp32 and the JIT's 16-divisibility hints (N % 16
# == 0, aligned rows: vectorised loads, a different register allocation) for the kernels that
# run at the register limit: the whole-row backward at 4096 and 8192 columns (64 registers at
# 32 warps), its dbranch_bias pass, and the forward at 8192 and 16384.
_SPILL_PROBE = r"""
import json, os
from fastenc.apps import inspector as ins
from fastenc.triton_kernels.specs import layer_norm_specs
hot = ("_ln_bwd_kernel", "_ln_fwd_kernel[BLOCK_N=8192,", "_ln_fwd_kernel[BLOCK_N=16384,")
specs = [s for s in layer_norm_specs(dtypes=("fp16", "bf16", "fp32"), aligned=(False, True), blocks=(4096, 8192, 16384))
         if s["name"].endswith(("bf16]", "fp32]", "aligned]")) and (s["name"].startswith(hot) or ",dbb," in s["name"])]
reports = ins.inspect_triton(ins.get_arch("sm_90"), [("layer_norm", lambda: specs)], jobs=os.cpu_count())
print(json.dumps([dict(name=r.name, regs=r.regs, spill=r.spill_bytes, warps=r.num_warps) for r in reports]))
"""


def test_no_register_spills_sm90_bf16_fp32_aligned():
    """The configs at the register limit, in every dtype and both alignments, compiled for sm_90
    (no GPU needed), use no local memory (spills)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # triton.compile needs real jit functions
    out = subprocess.run([sys.executable, "-c", _SPILL_PROBE], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in rows}
    for dtype in ("fp16,aligned", "bf16", "bf16,aligned", "fp32", "fp32,aligned"):
        expected = ["_ln_bwd_kernel[BLOCK_N=4096,postnorm", "_ln_bwd_kernel[BLOCK_N=4096,prenorm",
                    "_ln_fwd_kernel[BLOCK_N=8192", "_ln_fwd_kernel[BLOCK_N=16384"]
        if not dtype.startswith("fp32"):  # fp32 rows above 4096 take the two-kernel backward
            expected += ["_ln_bwd_kernel[BLOCK_N=8192,postnorm", "_ln_bwd_kernel[BLOCK_N=8192,prenorm",
                         "_ln_bwd_params_kernel[BLOCK_N=8192,prenorm,dbb"]
        for name in expected:
            assert f"{name},{dtype}]" in names, (name, dtype, sorted(names))
    assert all(r["warps"] == 32 for r in rows if r["name"].startswith("_ln_bwd_kernel[BLOCK_N=8192"))
    spilled = [f"{r['name']} regs={r['regs']} spill={r['spill']} B" for r in rows if r["spill"]]
    assert not spilled, "register spills: " + "; ".join(spilled)
