"""CPU residual + LayerNorm kernels of fastenc._C (csrc/layer_norm/cpu/layer_norm.cpp, csrc/bindings/layer_norm_api.cpp).

Parity rule: fast vs fp32 reference <= 2 x (reference in the input dtype vs fp32) + atol, for y, the
prenorm residual s and every gradient; the bindings are called directly (forward and backward) and the
gradients compared with autograd through fastenc.reference.residual_layer_norm.
"""
import pytest
import torch

from fastenc import ops, reference
from fastenc.backends import extension
from fastenc.ops._common import draw_seed
from fastenc.testing import assert_close, assert_parity

C = extension()
pytestmark = pytest.mark.skipif(C is None, reason="fastenc._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("x", "branch", "weight", "bias", "branch_bias")
SEED = 1234567890123


def _inputs(shape, dtype, *, branch=True, branch_bias=True, weight=True, bias=True, param_dtype=None, scale=1.0):
    n = shape[-1]
    pd = param_dtype or dtype
    return {
        "x": (scale * torch.randn(shape)).to(dtype),
        "branch": (scale * torch.randn(shape)).to(dtype) if branch else None,
        "weight": (1 + 0.5 * torch.randn(n)).to(pd) if weight else None,
        "bias": (0.5 * torch.randn(n)).to(pd) if bias else None,
        "branch_bias": (0.5 * torch.randn(n)).to(pd) if (branch and branch_bias) else None,
    }


def _fwd(t, *, eps=1e-5, p=0.0, prenorm=False):
    return C.residual_layer_norm_fwd(t["x"], t["branch"], t["weight"], t["bias"], t["branch_bias"], eps, p, SEED,
                                     prenorm)


def _keep(t, p):
    """The kernel's keep mask, in x's shape (None without dropout)."""
    if p == 0.0 or t["branch"] is None:
        return None
    n = t["x"].shape[-1]
    return C.residual_layer_norm_dropout_mask(t["x"].numel() // n, n, p, SEED).view(t["x"].shape)


def _reference(t, upcast, *, eps, p, keep, prenorm, fp64=False):
    """reference.residual_layer_norm on leaves requiring grad: returns (outputs, leaves).

    fp64: the exact reference, in float64 (where the fp32 one is itself off, as for N = 1: its
    dx should be exactly 0, but torch's fp32 LayerNorm gives rounding noise times rstd).
    """
    x = t["x"]
    leaves = {}
    for k, v in t.items():
        if v is None:
            continue
        if fp64:
            v = v.double()
        elif upcast:  # fp32 leaves, so the oracle's gradients are not rounded to the inputs' dtype
            v = v.float()
        elif k != "x":  # plain PyTorch in x's dtype: parameters cast to it
            v = v.to(x.dtype)
        leaves[k] = v.detach().clone().requires_grad_()
    upcast = upcast and not fp64
    out = reference.residual_layer_norm(leaves["x"], leaves.get("branch"), leaves.get("weight"), leaves.get("bias"),
                                        branch_bias=leaves.get("branch_bias"), eps=eps, dropout_p=p,
                                        dropout_mask=keep, prenorm=prenorm, upcast=upcast)
    return (list(out) if prenorm else [out]), leaves


def _check(t, *, eps=1e-5, p=0.0, prenorm=False, recompute=False, rtol=None, fp64_ref=False):
    """Forward and backward of the bindings against the reference (fp32 oracle and same-dtype baseline).

    recompute: with prenorm, give the backward x and branch instead of the saved s.
    fp64_ref: the oracle in float64 (see _reference).
    """
    x = t["x"]
    if rtol is None:
        rtol = 4e-6 if x.dtype == torch.float32 else 0.0
    keep = _keep(t, p)
    y, s, mean, rstd = _fwd(t, eps=eps, p=p, prenorm=prenorm)
    outs = [y, s] if prenorm else [y]
    r_outs, r_leaves = _reference(t, True, eps=eps, p=p, keep=keep, prenorm=prenorm, fp64=fp64_ref)
    b_outs, b_leaves = _reference(t, False, eps=eps, p=p, keep=keep, prenorm=prenorm)
    for name, f, r, b in zip(("y", "s"), outs, r_outs, b_outs):
        assert f.dtype == x.dtype and f.shape == x.shape
        assert_parity(f, r, b, rtol=rtol, name=name)

    grads_out = [torch.randn(x.shape).to(x.dtype) for _ in outs]
    has_branch = t["branch"] is not None
    resid = s if prenorm and not recompute else None
    got = C.residual_layer_norm_bwd(grads_out[0], grads_out[1] if prenorm else None,
                                    None if resid is not None else x, t["branch"] if resid is None else None, resid,
                                    t["weight"], t["bias"], t["branch_bias"], mean, rstd, has_branch, p, SEED)
    got = dict(zip(NAMES, got))
    names = [k for k in NAMES if t[k] is not None]
    r_grads = torch.autograd.grad(r_outs, [r_leaves[k] for k in names], [g.to(r_outs[0].dtype) for g in grads_out])
    b_grads = torch.autograd.grad(b_outs, [b_leaves[k] for k in names], grads_out)
    for name, r, b in zip(names, r_grads, b_grads):
        g = got[name]
        assert g.dtype == t[name].dtype, (name, g.dtype)
        assert_parity(g, r, b, rtol=rtol, name="d" + name)
    return y, s, got


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 384, 768, 1000])
def test_parity_post_norm(dtype, n):
    rows = {768: 1025, 1000: 301}.get(n, 2049)
    _check(_inputs((rows, n), dtype), fp64_ref=n == 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved_s", "recompute_s"])
def test_parity_prenorm(dtype, recompute):
    _check(_inputs((3, 37, 768), dtype), prenorm=True, recompute=recompute)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_parameters_with_half_rows(dtype):
    _check(_inputs((65, 384), dtype, param_dtype=torch.float32), prenorm=True)


@pytest.mark.parametrize("absent", ["branch", "branch_bias", "weight", "bias", "all"])
def test_optional_operands(absent):
    flags = dict(branch=True, branch_bias=True, weight=True, bias=True)
    if absent == "all":
        flags = dict(branch=False, branch_bias=False, weight=False, bias=False)
    else:
        flags[absent] = False
    y, s, grads = _check(_inputs((17, 7, 100), torch.float32, **flags), prenorm=True)
    if absent in ("branch", "all"):
        assert grads["branch"].numel() == 0 and grads["branch_bias"].numel() == 0


def test_rows_1_and_large_values():
    _check(_inputs((1, 768), torch.float32))
    _check(_inputs((5, 384), torch.bfloat16, scale=300.0), prenorm=True)


def test_strided_rows():
    """Row stride > N (a column slice of a wider buffer), and a transposed 3-D view (copied)."""
    t = _inputs((129, 384), torch.float32)
    wide = torch.randn(129, 1024)
    t["x"] = wide[:, 100:484]
    assert t["x"].stride() == (1024, 1)
    _check(t, prenorm=True)
    t2 = _inputs((7, 5, 96), torch.bfloat16)
    t2["x"] = torch.randn(5, 7, 96).to(torch.bfloat16).transpose(0, 1)
    _check(t2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_and_constant_rows_eps_1e12(dtype):
    """All-zero rows at eps = 1e-12 give y = bias, no NaN (pytorch #41527); constant rows too."""
    t = _inputs((64, 768), dtype)
    t["x"][:32] = 0
    t["branch"][:32] = 0
    t["branch_bias"].zero_()
    t["x"][32:48] = 3.0
    t["branch"][32:48] = -1000.0
    y, s, _, _ = _fwd(t, eps=1e-12, prenorm=True)
    assert torch.isfinite(y.float()).all()
    assert torch.equal(y[:48], t["bias"].to(dtype).expand(48, -1)), "zero and constant rows give exactly y = bias"
    base = reference.residual_layer_norm(t["x"], t["branch"], t["weight"], t["bias"], branch_bias=t["branch_bias"],
                                         eps=1e-12)
    ref = reference.residual_layer_norm(t["x"], t["branch"], t["weight"], t["bias"], branch_bias=t["branch_bias"],
                                        eps=1e-12, upcast=True)
    assert_parity(y, ref, base, name="y")


def test_all_zero_and_constant_rows_backward_eps_1e12():
    """The gradients there, in fp32 (rstd = 1e6 overflows fp16 gradients), against the float64 oracle."""
    t = _inputs((3, 384), torch.float32)
    t["branch_bias"].zero_()
    t["x"][0], t["branch"][0] = 0.0, 0.0
    t["x"][1], t["branch"][1] = 1.5, 1.0
    _check(t, eps=1e-12, prenorm=True, fp64_ref=True)
    _check(t, eps=1e-12, fp64_ref=True)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 768, 1000])
def test_dropout_replay(dtype, n):
    """Forward and backward with dropout match the reference fed the mask residual_layer_norm_dropout_mask draws."""
    rows = 301 if n < 768 else 67
    _check(_inputs((rows, n), dtype), p=0.1, prenorm=True, fp64_ref=n == 1)
    _check(_inputs((rows, n), dtype), p=0.3, prenorm=True, recompute=True, fp64_ref=n == 1)
    _check(_inputs((rows, n), dtype), p=0.5, fp64_ref=n == 1)


def test_dropout_mask_statistics_and_scheme():
    """Keep rate 1 - p; the same Philox scheme as the FFN's mask; p = 1 keeps nothing."""
    keep = C.residual_layer_norm_dropout_mask(512, 768, 0.1, SEED)
    assert keep.shape == (512, 768) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    assert torch.equal(keep, C.ffn_dropout_mask(512, 768, 0.1, SEED, torch.device("cpu")))
    assert not torch.equal(keep, C.residual_layer_norm_dropout_mask(512, 768, 0.1, SEED + 1))
    assert not C.residual_layer_norm_dropout_mask(4, 9, 1.0, SEED).any()
    t = _inputs((4, 9), torch.float32)
    y, s, _, _ = _fwd(t, p=1.0, prenorm=True)
    assert torch.equal(s, t["x"]), "p = 1 drops the whole branch"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prenorm,n", [(False, 1000), (True, 1000), (False, 768), (True, 7)])
def test_op_dropout_replays_the_mask_forward_and_backward(prenorm, n, dtype):
    """Through ops.residual_layer_norm (backend "cpu"): the op draws its Philox key from torch's generator and
    its autograd Function hands it to the backward (post-norm recomputes s from x and branch, prenorm reads the
    saved s).  Output, residual and every gradient equal the reference fed the mask
    residual_layer_norm_dropout_mask draws for that key: a backward that drew another mask fails dx / dbranch."""
    p = 0.3
    t = _inputs((3, 29, n), dtype)
    torch.manual_seed(1234)
    keep = C.residual_layer_norm_dropout_mask(3 * 29, n, p, int(draw_seed(torch.device("cpu")))).view(3, 29, n)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}

    def fast():
        torch.manual_seed(1234)
        return ops.residual_layer_norm(leaves["x"], leaves["branch"], leaves["weight"], leaves["bias"],
                                       branch_bias=leaves["branch_bias"], dropout_p=p, prenorm=prenorm, backend="cpu")

    outs = list(fast()) if prenorm else [fast()]
    with torch.no_grad():  # the inference path draws the same mask
        again = fast()
        assert all(torch.equal(a, b) for a, b in zip(list(again) if prenorm else [again], outs))
    r_outs, r_leaves = _reference(t, True, eps=1e-5, p=p, keep=keep, prenorm=prenorm)
    b_outs, b_leaves = _reference(t, False, eps=1e-5, p=p, keep=keep, prenorm=prenorm)
    rtol = 4e-6 if dtype == torch.float32 else 0.0
    for name, f, r, b in zip(("y", "s"), outs, r_outs, b_outs):
        assert_parity(f, r, b, rtol=rtol, name=name)
    grads_out = [torch.randn(f.shape).to(dtype) for f in outs]
    torch.autograd.backward(outs, grads_out)
    r_grads = torch.autograd.grad(r_outs, [r_leaves[k] for k in NAMES], [g.float() for g in grads_out])
    b_grads = torch.autograd.grad(b_outs, [b_leaves[k] for k in NAMES], grads_out)
    for name, r, b in zip(NAMES, r_grads, b_grads):
        assert_parity(leaves[name].grad, r, b, rtol=rtol, name="d" + name)


def test_post_norm_dropout_recomputes_the_forwards_sum():
    """Post-norm keeps no s: the backward recomputes x + dropout(branch) and must round it as the forward did, or
    rstd (316 here: one column, eps 1e-5) multiplies a 1-ulp difference into xhat.  A row of one column has
    y = bias and dx = 0 exactly; it was 1e-4 (found by tests/test_layer_norm_random.py's long profile)."""
    x, br = (8 + torch.randn(64, 1)).requires_grad_(), torch.randn(64, 1).requires_grad_()
    y = ops.residual_layer_norm(x, br, None, None, dropout_p=0.25, backend="cpu")
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(br.grad, torch.zeros_like(br))


def test_op_dropout_reproducible_per_torch_seed():
    x, br = torch.randn(7, 384), torch.randn(7, 384)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(ops.residual_layer_norm(x, br, None, None, dropout_p=0.5, backend="cpu"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# --------------------------------------------------------------------------- determinism, shapes


def test_parameter_gradients_independent_of_thread_count():
    t = _inputs((1000, 384), torch.float32)
    y, s, mean, rstd = _fwd(t, p=0.1)
    dy = torch.randn_like(y)

    def grads():
        return C.residual_layer_norm_bwd(dy, None, t["x"], t["branch"], None, t["weight"], t["bias"],
                                         t["branch_bias"], mean, rstd, True, 0.1, SEED)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(max(2, threads))
        many = grads()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_zero_rows_and_statistics():
    t = _inputs((0, 5), torch.float32)
    y, s, mean, rstd = _fwd(t, prenorm=True)
    assert y.shape == (0, 5) and s.shape == (0, 5) and mean.shape == (0,)
    grads = C.residual_layer_norm_bwd(y, s, None, None, s, t["weight"], t["bias"], t["branch_bias"], mean, rstd,
                                      True, 0.0, SEED)
    assert torch.equal(grads[2], torch.zeros(5)) and torch.equal(grads[4], torch.zeros(5))
    t = _inputs((3, 64), torch.float32)
    _, _, mean, rstd = _fwd(t)
    s = t["x"] + t["branch"] + t["branch_bias"]
    assert_close(mean, s.mean(-1), atol=1e-6, name="mean")
    assert_close(rstd, (s.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5, name="rstd")


def test_without_branch_prenorm_returns_x():
    t = _inputs((4, 8), torch.float32, branch=False)
    y, s, _, _ = _fwd(t, prenorm=True)
    assert s is t["x"] or s.data_ptr() == t["x"].data_ptr()


# --------------------------------------------------------------------------- bad arguments


def test_bad_arguments():
    t = _inputs((4, 8), torch.float32)
    fwd = C.residual_layer_norm_fwd
    with pytest.raises(ValueError, match="branch must have x's shape"):
        fwd(t["x"], t["branch"][:, :4], None, None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(TypeError, match="branch has dtype"):
        fwd(t["x"], t["branch"].double(), None, None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fwd(t["x"].long(), None, None, None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fwd(t["x"].double(), None, None, None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        fwd(t["x"], None, torch.ones(7), None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(TypeError, match="bias must be float32 or x's dtype"):
        fwd(t["x"].half(), None, None, torch.zeros(8, dtype=torch.bfloat16), None, 1e-5, 0.0, 0, False)
    with pytest.raises(ValueError, match="branch_bias is given but branch is None"):
        fwd(t["x"], None, None, None, torch.zeros(8), 1e-5, 0.0, 0, False)
    with pytest.raises(ValueError, match="eps must be positive"):
        fwd(t["x"], None, None, None, None, 0.0, 0.0, 0, False)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fwd(t["x"], t["branch"], None, None, None, 1e-5, 1.5, 0, False)
    with pytest.raises(ValueError, match="x must have shape"):
        fwd(torch.zeros(4, 0), None, None, None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(ValueError, match="x must have shape"):
        fwd(torch.tensor(1.0), None, None, None, None, 1e-5, 0.0, 0, False)
    y, s, mean, rstd = _fwd(t)
    bwd = C.residual_layer_norm_bwd
    with pytest.raises(ValueError, match="mean must be the forward's float32"):
        bwd(y, None, t["x"], t["branch"], None, None, None, None, mean[:2], rstd, True, 0.0, 0)
    with pytest.raises(ValueError, match="backward needs resid"):
        bwd(y, None, None, None, None, None, None, None, mean, rstd, True, 0.0, 0)
    with pytest.raises(ValueError, match="needs the branch"):
        bwd(y, None, t["x"], None, None, None, None, None, mean, rstd, True, 0.0, 0)
    with pytest.raises(ValueError, match="x must have dy's shape"):
        bwd(y, None, t["x"][:2], t["branch"], None, None, None, None, mean, rstd, True, 0.0, 0)
    with pytest.raises(ValueError, match="mask shape must be non-negative"):
        C.residual_layer_norm_dropout_mask(-1, 4, 0.1, 0)
