"""Triton flash attention (triton_kernels/attention.py) and its op (fastenc/ops/attention.py).

Oracle: ``fastenc.reference.attention(..., upcast=True)``; baseline: the same reference in the
input dtype; ``fastenc.testing.assert_parity`` judges outputs and gradients.  On CPU the kernels
run under the Triton interpreter with small shapes (fp16, fp32); bigger shapes and bf16 on CUDA.
"""
import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import DEVICE, ON_GPU, TRITON_DTYPES  # noqa: I001  (sets TRITON_INTERPRET first)

import fastenc
from fastenc import reference
from fastenc.backends import BackendUnavailableError
from fastenc.ops import attention, attention_varlen
from fastenc.testing import assert_parity
from fastenc.triton_kernels import attention as kernels
from fastenc.triton_kernels import specs
from fastenc.triton_kernels.attention_config import KERNELS, AttentionConfig

attn_mod = sys.modules["fastenc.ops.attention"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def _check_parity(fast_fn, ref_fn, inputs, name=""):
    """fast_fn(q, k, v) vs ref_fn(q, k, v, upcast) on fresh leaves: output and dq, dk, dv."""
    fast_in, ref_in, base_in = _leaves(inputs), _leaves(inputs, torch.float32), _leaves(inputs)
    out = fast_fn(*fast_in)
    ref = ref_fn(*ref_in, upcast=True)
    base = ref_fn(*base_in, upcast=False)
    assert_parity(out, ref, base, name=f"{name} out")
    dout = torch.randn_like(ref)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    base.backward(dout.to(base.dtype))
    for label, f, r, b in zip("qkv", fast_in, ref_in, base_in):
        assert_parity(f.grad, r.grad, b.grad, name=f"{name} d{label}")
    return out, fast_in


def _dense_case(B, L, S, H, D, dtype, **kw):
    qkv = [_rand(B, L, H, D, dtype=dtype), _rand(B, S, H, D, dtype=dtype), _rand(B, S, H, D, dtype=dtype)]
    return _check_parity(
        lambda q, k, v: attention(q, k, v, backend="triton", **kw),
        lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast, **kw),
        qkv, name=f"B{B} L{L} S{S} H{H} D{D} {dtype} {kw}",
    )


# --------------------------------------------------------------------------- dense parity


@pytest.mark.parametrize(
    "B,L,S,H,D,dtype,causal",
    [
        (1, 1, 1, 1, 16, torch.float16, False),
        (1, 5, 3, 2, 8, torch.float32, False),
        (2, 7, 7, 2, 32, torch.float16, False),
        (1, 127, 127, 1, 64, torch.float16, False),
        (1, 7, 19, 2, 80, torch.float32, False),
        (1, 19, 7, 1, 96, torch.float16, True),
        (1, 33, 40, 1, 128, torch.float16, False),
        (1, 9, 11, 1, 256, torch.float16, True),
        (1, 513, 513, 1, 32, torch.float16, True),
    ],
)
def test_parity_shapes(B, L, S, H, D, dtype, causal):
    _dense_case(B, L, S, H, D, dtype, is_causal=causal)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_parity_dtypes_scale(dtype):
    _dense_case(2, 21, 17, 2, 64, dtype, scale=0.3)


@pytest.mark.skipif(not ON_GPU, reason="large shapes run only on CUDA (covered small on CPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,S,D,causal", [(4097, 4097, 128, False), (1000, 513, 80, True), (2048, 2048, 256, False)])
def test_parity_large_gpu(dtype, L, S, D, causal):
    _dense_case(2, L, S, 4, D, dtype, is_causal=causal)


# --------------------------------------------------------------------------- masks


def _masks(kind, B, H, L, S):
    """(attn_mask, key_padding_mask, rows that see no key as (b, i) pairs) for one mask kind."""
    g = torch.rand
    if kind == "bool_LS":
        m = g(L, S, device=DEVICE) < 0.3
        m[3] = True  # fully masked query row
        return m, None, [(b, 3) for b in range(B)]
    if kind == "float_LS":
        m = torch.randn(L, S, device=DEVICE)
        m[5] = float("-inf")
        return m, None, [(b, 5) for b in range(B)]
    if kind == "bool_B1LS":
        m = g(B, 1, L, S, device=DEVICE) < 0.3
        m[1, 0, 2] = True
        return m, None, [(1, 2)]
    if kind == "float_BHLS":
        m = torch.randn(B, H, L, S, device=DEVICE).masked_fill(g(B, H, L, S, device=DEVICE) < 0.2, float("-inf"))
        return m, None, []
    if kind == "kpm_bool":
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[0, S // 2:] = True  # right padding: skipped key blocks
        kpm[0, 1] = True  # interior hole: masked elementwise
        kpm[1] = True  # every key padded: all rows of batch 1 are empty
        return None, kpm, [(1, i) for i in range(L)]
    if kind == "kpm_float":
        kpm = torch.randn(B, S, device=DEVICE)
        kpm[1, :3] = float("-inf")  # left padding
        return None, kpm, []
    if kind == "bool_and_kpm":
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[:, -4:] = True
        return g(L, S, device=DEVICE) < 0.2, kpm, []
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,causal",
    [(kind, False) for kind in ("bool_LS", "float_LS", "bool_B1LS", "float_BHLS", "kpm_bool", "kpm_float",
                                "bool_and_kpm")] + [("bool_LS", True), ("kpm_bool", True)],
)
def test_masks(kind, causal):
    B, L, S, H, D = 2, 13, 45, 2, 32
    attn_mask, kpm, empty_rows = _masks(kind, B, H, L, S)
    out, (q, k, v) = _dense_case(B, L, S, H, D, torch.float16, attn_mask=attn_mask, key_padding_mask=kpm,
                                 is_causal=causal)
    for b, i in empty_rows:
        assert torch.all(out[b, i] == 0), f"row {(b, i)} sees no key: output must be 0"
        assert torch.all(q.grad[b, i] == 0), f"row {(b, i)} sees no key: dq must be 0"
    if kind == "kpm_bool":
        assert torch.all(k.grad[0, S // 2:] == 0) and torch.all(v.grad[1] == 0), "padded keys get zero gradients"


def test_lse_matches_logsumexp():
    B, L, S, H, D = 2, 9, 20, 2, 32
    q, k, v = _rand(B, L, H, D), _rand(B, S, H, D), _rand(B, S, H, D)
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    out, lse = torch.ops.fastenc.attention_fwd(q, k, v, None, kpm, None, None, L, S, False, 0.25, 0.0, None, "triton")
    scores = torch.einsum("blhd,bshd->bhls", q.float(), k.float()) * 0.25
    expected = torch.logsumexp(scores.masked_fill(kpm[:, None, None, :], float("-inf")), -1)
    torch.testing.assert_close(lse[0], expected[0], atol=1e-4, rtol=1e-4)
    assert torch.all(lse[1] == float("inf")), "rows with no visible key store lse = +inf"


# --------------------------------------------------------------------------- layouts


def test_strided_qkv_views_no_copy():
    B, L, H, D = 2, 11, 3, 32
    qkv = _rand(B, L, 3 * H * D)
    q, k, v = qkv.view(B, L, 3, H, D).unbind(2)
    assert not q.is_contiguous() and all(kernels._last_dim_contiguous(t) is t for t in (q, k, v))

    def split(fn):
        return lambda x, upcast=None: fn(*x.view(B, L, 3, H, D).unbind(2),
                                         **({} if upcast is None else {"upcast": upcast}))

    _check_parity(
        split(lambda q, k, v: attention(q, k, v, backend="triton", is_causal=True)),
        split(lambda q, k, v, upcast: reference.attention(q, k, v, is_causal=True, upcast=upcast)),
        [qkv], name="packed qkv",
    )


def test_last_dim_strided_inputs():
    B, L, H, D = 1, 10, 2, 32
    q, k, v = (_rand(B, L, H, 2 * D)[..., ::2] for _ in range(3))
    assert q.stride(-1) == 2
    _check_parity(
        lambda q, k, v: attention(q, k, v, backend="triton"),
        lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast),
        [q, k, v], name="last-dim stride 2",
    )


def test_grid_stays_within_cuda_limits():
    assert kernels._grid(33, 70000) == (33 * 70000,)  # b*h = 70000 > 65535 programs on one axis
    with pytest.raises(ValueError, match="2\\^31-1"):
        kernels._grid(2**16, 2**16)


_INT64_SCRIPT = """
import torch
from fastenc import reference
from fastenc.testing import assert_parity
from fastenc.triton_kernels import attention as kernels
B, L, H, D = 4, 5, 1, 16
# q's batch 3 starts 3 * 2^30 elements (6 GiB) in: its offset overflows int32.  Only the touched
# pages of the virtual allocation become resident.
try:
    big = torch.empty(3 * 2**30 + L * H * D, dtype=torch.float16, device="{device}")
except (RuntimeError, MemoryError):
    print("no-memory")
    raise SystemExit(0)
q = big.as_strided((B, L, H, D), (2**30, H * D, D, 1))
q.copy_(torch.randn(B, L, H, D))
k, v = (torch.randn(B, L, H, D, dtype=torch.float16, device="{device}") for _ in range(2))
out, lse = kernels.attention_forward(q, k, v)
dout = torch.randn_like(out)
dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse)
qc = q.contiguous()
ref_in = [t.float().requires_grad_() for t in (qc, k, v)]
base_in = [t.clone().requires_grad_() for t in (qc, k, v)]
ref, base = reference.attention(*ref_in, upcast=True), reference.attention(*base_in)
ref.backward(dout.float()); base.backward(dout)
assert_parity(out, ref, base, name="out")
for f, r, b in zip((dq, dk, dv), ref_in, base_in):
    assert_parity(f, r.grad, b.grad, name="grad")
print("ok")
"""


def test_int64_offsets():
    # In a subprocess: an int32 overflow is an out-of-bounds access (a crash, not an assert).
    env = dict(os.environ, TRITON_INTERPRET="1" if not ON_GPU else "0")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_INT64_SCRIPT).format(device=DEVICE)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if res.returncode == 0 and "no-memory" in res.stdout:
        pytest.skip("this machine refuses a 6 GiB (virtual) allocation")
    assert res.returncode == 0 and "ok" in res.stdout, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"


# --------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_varlen(causal, dtype):
    lens_q, lens_k = [1, 7, 1, 40], [3, 7, 1, 25]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    H, D = 2, 64
    inputs = [_rand(sum(lens_q), H, D, dtype=dtype), _rand(sum(lens_k), H, D, dtype=dtype),
              _rand(sum(lens_k), H, D, dtype=dtype)]
    _check_parity(
        lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), is_causal=causal,
                                         backend="triton"),
        lambda q, k, v, upcast: reference.attention_varlen(q, k, v, cu_q, cu_k, is_causal=causal, upcast=upcast),
        inputs, name=f"varlen causal={causal}",
    )


def test_varlen_strided_packed_qkv():
    lens = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=DEVICE)
    T, H, D = sum(lens), 2, 32
    qkv = _rand(T, 3, H, D)

    def run(fn):
        return lambda x, upcast=None: fn(*x.unbind(1), **({} if upcast is None else {"upcast": upcast}))

    _check_parity(
        run(lambda q, k, v: attention_varlen(q, k, v, cu, cu, max(lens), max(lens), backend="triton")),
        run(lambda q, k, v, upcast: reference.attention_varlen(q, k, v, cu, cu, upcast=upcast)),
        [qkv], name="varlen packed qkv",
    )


# --------------------------------------------------------------------------- dropout


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_dropout_keep_rate_and_replay():
    p = 0.3
    keep = kernels.dropout_keep_mask(_seed(123), 2, 2, 64, 64, p)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.015, f"keep rate {rate:.4f}, expected {1 - p}"
    assert torch.equal(keep, kernels.dropout_keep_mask(_seed(123), 2, 2, 64, 64, p)), "same seed, same mask"
    other = kernels.dropout_keep_mask(_seed(124), 2, 2, 64, 64, p)
    assert (keep != other).float().mean() > 0.2, "another seed gives another mask"
    assert not kernels.dropout_keep_mask(_seed(5), 1, 1, 8, 8, 1.0).any()


def test_dropout_elements_sharing_a_philox_call_are_independent():
    # Queries i, i+8 and keys 2d, 2d+1 take the four outputs of one call: their keep flags must be
    # as uncorrelated as any others (p = 0.5: correlation ~ N(0, 1/sqrt(n)), n = 2^15 pairs here).
    keep = kernels.dropout_keep_mask(_seed(11), 2, 2, 128, 128, 0.5).float()
    for a, b in ((keep[..., 0::2], keep[..., 1::2]), (keep[..., 0:8, :], keep[..., 8:16, :])):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr) < 5 / a.numel() ** 0.5, f"correlation {corr:.4f} between elements of one call"


def test_dropout_scaling():
    # scale = 0 makes attention uniform (1/S); with v = 1 a row's output is (#kept / S) / (1 - p).
    B, L, S, H, D, p = 1, 16, 40, 2, 32, 0.25
    q, k = _rand(B, L, H, D), _rand(B, S, H, D)
    v = torch.ones(B, S, H, D, device=DEVICE, dtype=torch.float16)
    seed = _seed(7)
    out, _ = torch.ops.fastenc.attention_fwd(q, k, v, None, None, None, None, L, S, False, 0.0, p, seed, "triton")
    keep = kernels.dropout_keep_mask(seed, B, H, L, S, p)
    expected = keep.float().mean(-1).transpose(1, 2)[..., None].expand(B, L, H, D) / (1 - p)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    out1, _ = torch.ops.fastenc.attention_fwd(q, k, v, None, None, None, None, L, S, False, 0.3, 1.0, seed, "triton")
    assert torch.all(out1 == 0), "p = 1 drops everything"


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_dropout_matches_reference_mask(causal, masked):
    # Forward and backward against the reference replaying the kernel's keep mask: a backward that
    # drew a different mask would fail the dv / dq parity.
    B, L, S, H, D, p = 2, 19, 37, 2, 32, 0.2
    seed = _seed(2024)
    keep = kernels.dropout_keep_mask(seed, B, H, L, S, p)
    kpm = None
    if masked:
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[1, 20:] = True
    _check_parity(
        lambda q, k, v: attn_mod._Attention.apply(q, k, v, None, kpm, None, None, L, S, causal, 1 / math.sqrt(D), p,
                                                  seed, "triton"),
        lambda q, k, v, upcast: reference.attention(q, k, v, key_padding_mask=kpm, is_causal=causal, dropout_p=p,
                                                    dropout_mask=keep, upcast=upcast),
        [_rand(B, L, H, D), _rand(B, S, H, D), _rand(B, S, H, D)], name="dropout",
    )


def _saved_output_term(q, k, cu_q, cu_k, out, ref_out, dout, scale):
    """The FA2 backward's exact deviation from the oracle: Δ_i = dO_i · O_i is taken from the output
    saved in fp16, so dS_ij = P_ij (dP_ij - Δ_i) carries -P_ij c_i with c_i = dO_i · (O_saved - O)_i,
    i.e. dq_i gets -scale Σ_j P_ij c_i k_j and dk_j gets -scale Σ_i P_ij c_i q_i (P: softmax without
    dropout).  Where the exact dS is 0 (a sequence with one key) torch in fp16 is exact and this term,
    about one fp16 ulp of the output times |dO|, is all of the kernel's error; FlashAttention and
    torch's flash backend compute Δ the same way.  Returns (dq, dk) terms, fp32, packed like q and
    k (cu_q, cu_k: lists)."""
    c = (dout.float() * (out.detach().float() - ref_out.detach())).sum(-1)  # [Tq, H]
    dq, dk = torch.zeros(q.shape, device=q.device), torch.zeros(k.shape, device=k.device)
    for b in range(len(cu_q) - 1):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb = q[rq].detach().float(), k[rk].detach().float()
        pc = torch.softmax(torch.einsum("ihd,jhd->hij", qb, kb) * scale, -1) * c[rq].T[..., None]  # [H, Lb, Sb]
        dq[rq] = -scale * torch.einsum("hij,jhd->ihd", pc, kb)
        dk[rk] = -scale * torch.einsum("hij,ihd->jhd", pc, qb)
    return dq, dk


def test_dropout_varlen_matches_reference_mask():
    # Includes a one-key sequence, where every gradient is exactly 0 in the oracle: the kernel's dq
    # and dk are checked against the oracle plus _saved_output_term.
    lens_q, lens_k, H, D, p = [3, 17], [9, 1], 2, 32, 0.4
    cu_q = torch.tensor([0, 3, 20], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 10], dtype=torch.int32, device=DEVICE)
    seed = _seed(99)
    keep = kernels.dropout_keep_mask(seed, 2, H, max(lens_q), max(lens_k), p)
    masks = [keep[b:b + 1, :, :lens_q[b], :lens_k[b]] for b in range(2)]
    inputs = [_rand(20, H, D), _rand(10, H, D), _rand(10, H, D)]
    fast_in, ref_in, base_in = _leaves(inputs), _leaves(inputs, torch.float32), _leaves(inputs)
    out = attn_mod._Attention.apply(*fast_in, None, None, cu_q, cu_k, 17, 9, False, 1 / math.sqrt(D), p, seed,
                                    "triton")
    ref, base = (reference.attention_varlen(*t, cu_q, cu_k, dropout_p=p, dropout_masks=masks, upcast=upcast)
                 for t, upcast in ((ref_in, True), (base_in, False)))
    assert_parity(out, ref, base, name="varlen dropout out")
    dout = torch.randn_like(ref)
    for t, g in ((out, dout.to(out.dtype)), (ref, dout), (base, dout.to(base.dtype))):
        t.backward(g)
    terms = _saved_output_term(*ref_in[:2], cu_q.tolist(), cu_k.tolist(), out, ref, dout, 1 / math.sqrt(D))
    for label, f, r, b, term in zip("qkv", fast_in, ref_in, base_in, (*terms, 0.0)):
        assert_parity(f.grad, r.grad + torch.as_tensor(term).to(DEVICE), b.grad, name=f"varlen dropout d{label}")


def test_dropout_seed_from_torch_rng():
    q, k, v = _rand(1, 8, 2, 32), _rand(1, 8, 2, 32), _rand(1, 8, 2, 32)

    def run(seed):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=0.5, backend="triton")

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b), "torch.manual_seed makes dropout reproducible"
    assert not torch.equal(a, c), "another torch seed gives another dropout mask"


# --------------------------------------------------------------------------- sliding window and rotary


def _tables(D, P, base=10000.0):
    return reference.rotary_tables(reference.rotary_inv_freq(D, base, device=DEVICE), P)


@pytest.mark.parametrize(
    "B,L,S,H,D,dtype,window,rotary,causal",
    [
        (1, 70, 70, 2, 32, torch.float16, (8, 8), False, False),  # many key blocks skipped on both sides
        (2, 45, 61, 1, 16, torch.float32, (40, 3), False, False),  # L != S, asymmetric
        (1, 50, 50, 1, 32, torch.float16, (0, 0), False, False),  # each query sees itself only
        (1, 67, 67, 2, 64, torch.float16, (-1, 5), False, False),  # right side only
        (1, 67, 67, 1, 32, torch.float16, (6, -1), False, True),  # left side only, with causal
        (1, 40, 40, 2, 32, torch.float32, None, True, False),  # rotary alone
        (1, 33, 29, 2, 24, torch.float16, (9, 17), True, False),  # hd 24: halves padded to 16 columns each
        (2, 70, 70, 1, 64, torch.float16, (16, 16), True, True),
        (1, 21, 21, 1, 80, torch.float32, (4, 7), True, False),
        (1, 19, 19, 1, 8, torch.float16, None, True, False),  # smallest head dim: 4-column halves
    ],
)
def test_window_rotary_parity(B, L, S, H, D, dtype, window, rotary, causal):
    rot = _tables(D, max(L, S) + 3) if rotary else None
    _dense_case(B, L, S, H, D, dtype, window=window, rotary=rot, is_causal=causal)


@pytest.mark.parametrize("kind", ["kpm_bool", "kpm_float", "bool_LS"])
def test_window_rotary_with_masks(kind):
    B, L, S, H, D = 2, 45, 45, 2, 32
    attn_mask, kpm, _ = _masks(kind, B, H, L, S)
    _dense_case(B, L, S, H, D, torch.float16, attn_mask=attn_mask, key_padding_mask=kpm, window=(5, 11),
                rotary=_tables(D, S))


def test_window_padded_row_sees_nothing():
    # Query 0 of a left-padded sequence with window (2, 2) sees only padding: zeros and zero gradients.
    B, L, H, D = 1, 40, 1, 32
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[0, :5] = True
    out, (q, k, v) = _dense_case(B, L, L, H, D, torch.float16, key_padding_mask=kpm, window=(2, 2),
                                 rotary=_tables(D, L))
    assert torch.all(out[0, :3] == 0) and torch.all(q.grad[0, :3] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_window_rotary_varlen(causal):
    lens = [1, 70, 5, 38]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    H, D = 2, 32
    rot = _tables(D, max(lens), base=160000.0)
    inputs = [_rand(sum(lens), H, D) for _ in range(3)]
    _check_parity(
        lambda q, k, v: attention_varlen(q, k, v, cu, cu, max(lens), max(lens), is_causal=causal, window=(7, 9),
                                         rotary=rot, backend="triton"),
        lambda q, k, v, upcast: reference.attention_varlen(q, k, v, cu, cu, is_causal=causal, window=(7, 9),
                                                           rotary=rot, upcast=upcast),
        inputs, name=f"varlen window rotary causal={causal}",
    )


def test_window_skips_blocks_outside():
    # NaN in rows far outside the first query block's window reaches it only if those blocks are
    # loaded: a masked-but-visited block gives 0 * NaN = NaN.  Forward (v), dQ (v), dK/dV (dout).
    B, L, H, D, w = 1, 256, 1, 32, 8
    q, k, v = _rand(B, L, H, D), _rand(B, L, H, D), _rand(B, L, H, D)
    v[:, 200:] = float("nan")
    out, lse = kernels.attention_forward(q, k, v, window=(w, w))
    assert torch.isfinite(out[:, :32]).all(), "forward visited key blocks outside the window"
    dout = torch.randn_like(out)
    dout[:, 200:] = float("nan")
    dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, window=(w, w))
    assert torch.isfinite(dq[:, :32]).all(), "dQ visited key blocks outside the window"
    assert torch.isfinite(dk[:, :32]).all() and torch.isfinite(dv[:, :32]).all(), \
        "dK/dV visited query blocks outside the window"


def test_window_dropout_matches_reference_mask():
    B, L, S, H, D, p = 1, 37, 37, 2, 32, 0.3
    seed = _seed(77)
    keep = kernels.dropout_keep_mask(seed, B, H, L, S, p)
    rot = _tables(D, L)
    cos, sin = rot
    _check_parity(
        lambda q, k, v: attn_mod._Attention.apply(q, k, v, None, None, None, None, L, S, False, 1 / math.sqrt(D), p,
                                                  seed, "triton", 6, 6, cos, sin),
        lambda q, k, v, upcast: reference.attention(q, k, v, dropout_p=p, dropout_mask=keep, window=(6, 6),
                                                    rotary=rot, upcast=upcast),
        [_rand(B, L, H, D), _rand(B, S, H, D), _rand(B, S, H, D)], name="window dropout",
    )


def test_rotary_matches_hf_apply_rotary_pos_emb():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding, apply_rotary_pos_emb
    from transformers import ModernBertConfig

    cfg = ModernBertConfig(hidden_size=64, num_attention_heads=2, global_rope_theta=160000.0)
    emb = ModernBertRotaryEmbedding(cfg)
    B, L, H, D = 2, 11, 2, 32
    x = torch.randn(B, L, H, D)
    pos = torch.arange(L)[None]
    for layer_type, base in (("full_attention", 160000.0), ("sliding_attention", 10000.0)):
        cos_hf, sin_hf = emb(x, pos, layer_type)
        hf, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos_hf, sin_hf)
        cos, sin = reference.rotary_tables(reference.rotary_inv_freq(D, base), L)
        torch.testing.assert_close(reference.rotary_embed(x, cos, sin), hf.transpose(1, 2), atol=0, rtol=0)


def test_window_rotary_bad_inputs():
    q, k, v = _rand(1, 4, 2, 32), _rand(1, 6, 2, 32), _rand(1, 6, 2, 32)
    cos, sin = _tables(32, 6)
    with pytest.raises(TypeError, match="window must be None or a pair"):
        attention(q, k, v, window=8, backend="triton")
    with pytest.raises(TypeError, match="window must be None or a pair"):
        attention(q, k, v, window=(1.5, 2), backend="triton")
    with pytest.raises(ValueError, match="window sides must be >= 0"):
        attention(q, k, v, window=(-2, 3), backend="triton")
    with pytest.raises(TypeError, match="rotary must be None or a pair"):
        attention(q, k, v, rotary=cos, backend="triton")
    with pytest.raises(ValueError, match=r"\[P, 16\]"):
        attention(q, k, v, rotary=(cos[:, :8], sin[:, :8]), backend="triton")
    with pytest.raises(ValueError, match="cover 5 positions"):
        attention(q, k, v, rotary=(cos[:5], sin[:5]), backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        attention(q, k, v, rotary=(cos.int(), sin.int()), backend="triton")
    with pytest.raises(ValueError, match="rotary tables are on meta"):
        attention(q, k, v, rotary=(cos.to("meta"), sin.to("meta")), backend="triton")
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cover 6 positions, the sequences need 9"):
        attention_varlen(q[0], k[0], v[0], cu, torch.tensor([0, 6], dtype=torch.int32, device=DEVICE), 4, 9,
                         rotary=(cos, sin), backend="triton")
    with pytest.raises(ValueError, match="even head dim"):
        attention(_rand(1, 4, 1, 9), _rand(1, 4, 1, 9), _rand(1, 4, 1, 9), rotary=_tables(8, 4), backend="reference")
    # window (-1, -1) is no window at all
    torch.testing.assert_close(attention(q, k, v, window=(-1, -1), backend="triton"),
                               attention(q, k, v, backend="triton"), atol=0, rtol=0)


# --------------------------------------------------------------------------- validation and dispatch


def test_bad_inputs():
    q, k, v = _rand(1, 4, 2, 32), _rand(1, 6, 2, 32), _rand(1, 6, 2, 32)
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, k.float(), v, backend="triton")
    with pytest.raises(ValueError, match="must be 4-D"):
        attention(q[0], k, v, backend="triton")
    with pytest.raises(ValueError, match="disagree"):
        attention(q, _rand(1, 6, 3, 32), _rand(1, 6, 3, 32), backend="triton")
    with pytest.raises(ValueError, match="shapes disagree"):
        attention(q, k, v[:, :5], backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.bool, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(q, k, v, key_padding_mask=torch.zeros(1, 4, dtype=torch.bool, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="bool .* or float"):
        attention(q, k, v, attn_mask=torch.zeros(4, 6, dtype=torch.int64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        attention(q, k, v, attn_mask=torch.zeros(4, 6, dtype=torch.bool, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5, backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        attention(q.int(), k.int(), v.int(), backend="triton")
    with pytest.raises(BackendUnavailableError, match="head dim 20"):
        attention(_rand(1, 4, 2, 20), _rand(1, 6, 2, 20), _rand(1, 6, 2, 20), backend="triton")
    with pytest.raises(BackendUnavailableError, match="head dim 4 "):
        attention(_rand(1, 4, 2, 4), _rand(1, 6, 2, 4), _rand(1, 6, 2, 4), backend="triton")
    with pytest.raises(BackendUnavailableError, match="v head dim"):
        attention(q, k, _rand(1, 6, 2, 64), backend="triton")
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="int32"):
        attention_varlen(q[0], k[0], v[0], cu.long(), cu, 4, 6, backend="triton")
    with pytest.raises(ValueError, match="entries"):
        attention_varlen(q[0], k[0], v[0], cu, torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE), 4, 6,
                         backend="triton")
    with pytest.raises(ValueError, match=r"attn_mask must be a \[B, H, L, S\]"):
        kernels.attention_forward(q, k, v, attn_mask=torch.zeros(4, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="takes no masks"):
        kernels.attention_forward(q[0], k[0], v[0], key_padding_mask=torch.zeros(1, 6, dtype=torch.bool, device=DEVICE),
                                  cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=6)
    with pytest.raises(ValueError, match="head dim 300"):
        kernels.attention_forward(_rand(1, 2, 1, 300), _rand(1, 2, 1, 300), _rand(1, 2, 1, 300))


def test_check_reasons():
    check = attn_mod._triton_available
    dev = torch.device(DEVICE)
    assert check(dev, torch.float16, (64, 64, False)) is None
    assert check(dev, torch.float16, (72, 72, False)) is None
    assert "head dim 264" in check(dev, torch.float16, (264, 264, False))
    assert "head dim 12" in check(dev, torch.float16, (12, 12, False))
    assert check(dev, torch.float16, (8, 8, False)) is None
    assert "float64" in check(dev, torch.float64, (64, 64, False))
    assert "mask" in check(dev, torch.float16, (64, 64, True))
    assert "v head dim 32" in check(dev, torch.float16, (64, 32, False))


@pytest.mark.filterwarnings("ignore:fastenc attention. falling back to the PyTorch reference")  # meant: auto's fallback
def test_mask_needing_grad_goes_to_reference():
    q, k, v = _rand(1, 5, 2, 32), _rand(1, 7, 2, 32), _rand(1, 7, 2, 32)
    bias = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="requires grad"):
        attention(q, k, v, attn_mask=bias, backend="triton")
    attention(q, k, v, attn_mask=bias, backend="auto").float().sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()
    with torch.no_grad():  # no gradient wanted: the kernel may run
        attention(q, k, v, attn_mask=bias, backend="triton")


def test_empty_inputs():
    q, k, v = _rand(2, 0, 2, 32), _rand(2, 5, 2, 32), _rand(2, 5, 2, 32)
    assert attention(q, k, v, backend="triton").shape == (2, 0, 2, 32)
    q = _rand(2, 3, 2, 32)
    out = attention(q, k[:, :0], v[:, :0], backend="triton")
    assert out.shape == q.shape and torch.all(out == 0)


# --------------------------------------------------------------------------- torch.compile / custom op


def test_custom_op_opcheck():
    """The raw custom ops (autograd is the autograd.Function above them, as flash-attention does)."""
    q, k, v = (_rand(1, 6, 2, 32) for _ in range(3))
    kpm = torch.zeros(1, 6, dtype=torch.bool, device=DEVICE)
    kpm[0, 4:] = True
    args = (None, kpm, None, None, 6, 6, False, 0.2, 0.0, None, "triton")
    torch.library.opcheck(torch.ops.fastenc.attention_fwd.default, (q, k, v, *args),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastenc.attention_fwd(q, k, v, *args)
    torch.library.opcheck(torch.ops.fastenc.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *args),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    B, L, H, D = 1, 6, 2, 32
    mask = torch.rand(L, L, device=DEVICE) < 0.2

    def fn(q, k, v):
        return attention(q, k, v, attn_mask=mask, is_causal=True, backend="triton").float().square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    inputs = [_rand(B, L, H, D) for _ in range(3)]
    eager_in, comp_in = _leaves(inputs), _leaves(inputs)
    fn(*eager_in).backward()
    compiled(*comp_in).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- sm_90 code generation


_COMPILE_SCRIPT = """
import os, subprocess, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from fastenc.triton_kernels.attention_config import AttentionConfig
from fastenc.triton_kernels.specs import attention_specs
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
kernel_of = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dq_kernel": "bwd_dq", "_attn_bwd_dkdv_kernel": "bwd_dkdv"}
for spec in attention_specs():
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=spec["attrs"])
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        open(cubin, "wb").write(k.asm["cubin"])
        open(ptx, "w").write(k.asm["ptx"])
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        # Triton keeps ptxas's log only on failure (the kernel may also come from its cache): rerun ptxas
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "o")],
                             capture_output=True, text=True, check=True).stderr
    usage = dict(kv.split(":", 1) for kv in res.split("Function", 1)[1].split("\\n", 1)[1].split())
    ce = spec["constexprs"]
    mask_elt = {"*u8": 1, "*fp32": 4}[spec["signature"]["Mask"]] if ce["HAS_MASK"] else 0
    cfg = AttentionConfig(ce["BLOCK_M"], ce["BLOCK_N"], spec["num_warps"], spec["num_stages"])
    est = cfg.smem_bytes(kernel_of[spec["fn"].__name__], ce["HEAD_DIM"], 2, mask_elt, ce["DROPOUT"], ce["ROTARY"])
    print(spec["name"], "HGMMA", sass.count("HGMMA"), "REG", usage["REG"], "STACK", usage["STACK"],
          "LOCAL", usage["LOCAL"], "SHARED", k.metadata.shared, "EST", est,
          "SERIALIZED", log.count("wgmma.mma_async instructions are serialized"), flush=True)
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__), "backends",
                                                    "nvidia", "bin", "cuobjdump")),
                    reason="this Triton wheel ships no cuobjdump")
def test_sm90_codegen_hgmma_no_spills():
    # Compile-only, in a subprocess without TRITON_INTERPRET (the interpreter replaces triton.jit).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    shipped = specs.attention_specs()
    assert len(lines) == len(shipped) and {s["name"] for s in shipped} == {ln.split()[0] for ln in lines}
    assert {s["fn"].__name__ for s in shipped} >= {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    for line in lines:
        f = line.split()
        stats = dict(zip(f[1::2], f[2::2]))
        assert int(stats["HGMMA"]) > 0, f"{line}: no Hopper tensor-core instruction"
        # hd256 dK/dV with dropout sits at the register limit: C7515 (Triton 3.8) or an 8-byte spill
        # (3.6), and no tile avoids both without losing wgmma (the comment above attention_config._SM90)
        at_limit = f[0].startswith("attention_bwd_dkdv_dropout_hd256_")
        assert int(stats["STACK"]) + int(stats["LOCAL"]) <= (8 if at_limit else 0), f"{line}: registers spill"
        if not at_limit:
            assert int(stats["SERIALIZED"]) == 0, f"{line}: ptxas serializes the wgmma pipeline (C7515)"
        assert int(stats["SHARED"]) <= 227 * 1024, f"{line}: shared memory over the sm_90 limit"
        assert int(stats["SHARED"]) <= int(stats["EST"]), f"{line}: AttentionConfig.smem_bytes is not an upper bound"


def test_attention_specs_mirror_jit_specialization():
    # Triton's JIT turns an int argument equal to 1 into a constexpr: the unit last stride of a
    # contiguous key padding mask / attn_mask.  The specs must compile that kernel, not a generic one.
    for spec in specs.attention_specs():
        ce = spec["constexprs"]
        if not (ce["HAS_MASK"] or ce["HAS_KPM"]):  # packed tokens: no mask, its strides are 0
            assert ce["IS_VARLEN"] and "stride_pn" not in ce and "stride_mn" not in ce, spec["name"]
            continue
        unit = "stride_mn" if ce["HAS_MASK"] else "stride_pn"
        assert ce.get(unit) == 1 and spec["signature"][unit] == "constexpr", spec["name"]


@pytest.mark.parametrize("smem_limit", [99 * 1024, 163 * 1024, 227 * 1024])
def test_attention_config_fits_shared_memory(smem_limit):
    # sm_86/89/120 allow ~99 KB per block, A100 163 KB, H100/H200 227 KB: shipped tiles must shrink to fit.
    for arch in ((8, 0), (8, 6), (9, 0), (12, 0)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for kernel in KERNELS:
                for head_dim in (8, 64, 80, 96, 128, 256):
                    for mask_elt, dropout, rotary in itertools.product((0, 1, 2, 4), (False, True), (False, True)):
                        cfg = AttentionConfig.for_launch(kernel, head_dim, 512, dtype, arch, masked=mask_elt > 0,
                                                         smem_limit=smem_limit, mask_elt=mask_elt, dropout=dropout,
                                                         rotary=rotary)
                        elt = torch.empty((), dtype=dtype).element_size()
                        assert cfg.smem_bytes(kernel, head_dim, elt, mask_elt, dropout, rotary) <= smem_limit
                        assert min(cfg.BLOCK_M, cfg.BLOCK_N) >= 16 and cfg.num_stages >= 1
    h200 = AttentionConfig.for_launch("fwd", 128, 512, torch.float16, (9, 0), smem_limit=227 * 1024, mask_elt=0)
    assert h200 == AttentionConfig.for_launch("fwd", 128, 512, torch.float16, (9, 0)), "H200 keeps the table's tile"
    with pytest.raises(ValueError, match="fits in"):
        AttentionConfig.for_launch("fwd", 256, 512, torch.float32, (9, 0), smem_limit=8 * 1024)


class _ShrunkAttention(torch.autograd.Function):
    """The kernels through explicit launch configs (the op picks its own)."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, config, kw):
        out, lse = kernels.attention_forward(q, k, v, key_padding_mask=kpm, config=config, **kw)
        ctx.save_for_backward(q, k, v, out, lse, kpm)
        ctx.config, ctx.kw = config, kw
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kpm = ctx.saved_tensors
        dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, key_padding_mask=kpm,
                                                config_dq=ctx.config, config_dkdv=ctx.config, **ctx.kw)
        return dq, dk, dv, None, None, None


@pytest.mark.parametrize("config,modern", [
    (AttentionConfig(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1), False),
    (AttentionConfig(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1), False),
    (AttentionConfig(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2), True),  # sm_90 rotary dK/dV at hd 128
    (AttentionConfig(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2), True),  # sm_90 rotary dQ with dropout
])
def test_shrunk_tiles_parity(config, modern):
    # The smallest tiles AttentionConfig.fit_smem can pick, and the rotary tiles of _ROTARY_SM90, still
    # give the same attention (forward and backward).
    B, L, S, H, D = 1, 37, 29, 2, 96
    q, k, v = _rand(B, L, H, D), _rand(B, S, H, D), _rand(B, S, H, D)
    kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    kpm[0, 20:] = True
    kw = dict(window=(5, 9), rotary=_tables(D, L)) if modern else {}
    _check_parity(
        lambda q, k, v: _ShrunkAttention.apply(q, k, v, kpm, config, kw),
        lambda q, k, v, upcast: reference.attention(q, k, v, key_padding_mask=kpm, upcast=upcast, **kw),
        [q, k, v], name=f"tiles {config} {kw}",
    )


def test_backend_report_mentions_attention():
    assert "attention" in fastenc.backend_report(DEVICE)
