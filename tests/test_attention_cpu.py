"""CPU flash attention kernels of the extension (csrc/attention/cpu/, bound in csrc/bindings/attention_api.cpp).

Called directly through ``fastenc._C`` on packed tokens with int32 ``cu_seqlens``, and through the
op (``ops.attention`` / ``attention_varlen`` with ``backend="cpu"``) for sliding windows and rotary
embeddings.  Oracle: ``fastenc.reference.attention`` / ``attention_varlen`` with ``upcast=True``;
baseline: the same reference in the input dtype (torch's own bf16 error); ``fastenc.testing.assert_parity`` judges
outputs and dq, dk, dv (reference gradients by autograd).  In fp32 the baseline is the oracle, so
a summation-order rtol of the largest magnitude is allowed.
"""
import os

import pytest
import torch

from fastenc import reference
from fastenc.backends import explain
from fastenc.ops import attention, attention_varlen
from fastenc.ops._common import draw_seed
from fastenc.testing import assert_parity

if os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
    pytest.skip("fastenc._C deliberately not built (FASTENC_SKIP_NATIVE=1)", allow_module_level=True)

import fastenc._C as _C  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def _fwd_bwd(q, k, v, cu_q, cu_k, max_q, max_k, dout, **kw):
    out, lse = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    grads = _C.attention_backward_cpu(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, **kw)
    return out, lse, grads


def _check(q, k, v, cu_q, cu_k, max_q, max_k, ref_fn, name, **kw):
    """Kernel vs ref_fn(q, k, v, upcast) on packed [T, H, D] tensors: out, then dq, dk, dv."""
    ref_in, base_in = _leaves((q, k, v), torch.float32), _leaves((q, k, v))
    ref = ref_fn(*ref_in, upcast=True)
    base = ref_fn(*base_in, upcast=False)
    dout = torch.randn_like(ref)
    out, lse, grads = _fwd_bwd(q, k, v, cu_q, cu_k, max_q, max_k, dout.to(q.dtype), **kw)
    rtol = 2e-6 if q.dtype == torch.float32 else 0.0
    assert_parity(out, ref, base, rtol=rtol, name=f"{name} out")
    ref.backward(dout)
    base.backward(dout.to(base.dtype))
    for label, g, r, b in zip("qkv", grads, ref_in, base_in):
        assert_parity(g, r.grad, b.grad, rtol=rtol, name=f"{name} d{label}")
    return out, lse, grads


def _dense(B, L, S, H, D, dtype, Dv=None):
    q = torch.randn(B * L, H, D, dtype=dtype)
    k = torch.randn(B * S, H, D, dtype=dtype)
    v = torch.randn(B * S, H, Dv or D, dtype=dtype)
    return q, k, v, _cu([L] * B), _cu([S] * B)


def _dense_ref(B, L, S, **kw):
    """reference.attention on the packed tensors viewed as [B, L, H, D], back to [B·L, H, Dv]."""
    def ref(q, k, v, upcast):
        o = reference.attention(q.view(B, L, *q.shape[1:]), k.view(B, S, *k.shape[1:]),
                                v.view(B, S, *v.shape[1:]), upcast=upcast, **kw)
        return o.reshape(B * L, *o.shape[2:])
    return ref


# --------------------------------------------------------------------------- dense parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,L,S,H,D,causal",
    [
        (1, 1, 1, 1, 32, False),
        (2, 7, 7, 2, 32, False),
        (1, 127, 127, 2, 64, True),
        (2, 7, 19, 2, 80, False),
        (1, 19, 7, 1, 96, True),
        (1, 130, 140, 1, 40, False),  # two key blocks, a head dim that is no multiple of the vector width
        (2, 9, 11, 1, 33, True),  # odd head dim: bf16 falls back from pair (AVX512-BF16) products to fp32
    ],
)
def test_dense_parity(B, L, S, H, D, causal, dtype):
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, is_causal=causal), f"B{B} L{L} S{S} H{H} D{D} {dtype}",
           is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence(causal):
    q, k, v, cu_q, cu_k = _dense(1, 513, 513, 1, 32, torch.float32)
    _check(q, k, v, cu_q, cu_k, 513, 513, _dense_ref(1, 513, 513, is_causal=causal), "L513", is_causal=causal)


def test_float16_and_custom_scale():
    q, k, v, cu_q, cu_k = _dense(2, 9, 11, 2, 64, torch.float16)
    _check(q, k, v, cu_q, cu_k, 9, 11, _dense_ref(2, 9, 11, scale=0.3), "fp16 scale 0.3", scale=0.3)


def test_value_head_dim_differs():
    q, k, v, cu_q, cu_k = _dense(2, 10, 12, 2, 32, torch.float32, Dv=48)
    _check(q, k, v, cu_q, cu_k, 10, 12, _dense_ref(2, 10, 12), "Dv 48")


# --------------------------------------------------------------------------- ragged batches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_ragged(dtype, causal):
    lq, lk = [5, 0, 1, 70, 33], [5, 3, 1, 70, 0]  # empty query / key sequences, length 1, two chunks
    H, D = 2, 64
    q = torch.randn(sum(lq), H, D, dtype=dtype)
    k, v = torch.randn(2, sum(lk), H, D, dtype=dtype)
    cu_q, cu_k = _cu(lq), _cu(lk)

    def ref(q, k, v, upcast):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, is_causal=causal, upcast=upcast)

    out, lse, (dq, dk, dv) = _check(q, k, v, cu_q, cu_k, max(lq), max(lk), ref, f"ragged {dtype} causal={causal}",
                                    is_causal=causal)
    rows = slice(int(cu_q[4]), int(cu_q[5]))  # queries of the sequence with no keys: zeros, lse +inf
    assert (out[rows] == 0).all() and (dq[rows] == 0).all() and torch.isinf(lse[:, rows]).all()
    assert (dk[int(cu_k[1]):int(cu_k[2])] == 0).all()  # keys nobody queries: zero gradients


def test_rows_outside_every_sequence_are_zero():
    q, k, v = torch.randn(3, 12, 2, 32).unbind(0)
    cu_q, cu_k = torch.tensor([2, 6, 9], dtype=torch.int32), torch.tensor([1, 5, 11], dtype=torch.int32)
    out, lse, (dq, dk, dv) = _fwd_bwd(q, k, v, cu_q, cu_k, 4, 6, torch.randn(12, 2, 32))
    for t, lo, hi in ((out, 2, 9), (dq, 2, 9), (dk, 1, 11), (dv, 1, 11)):
        assert (t[:lo] == 0).all() and (t[hi:] == 0).all()
    assert torch.isinf(lse[:, :2]).all() and torch.isinf(lse[:, 9:]).all()
    expected = reference.attention(q[None, 2:6], k[None, 1:5], v[None, 1:5])[0]
    assert_parity(out[2:6], expected, expected, rtol=2e-6, name="first sequence")


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding(kind, dtype):
    B, L, S, H, D = 3, 20, 21, 2, 32
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    pad = torch.rand(B, S) < 0.3
    pad[1] = True  # every key of sequence 1 padded: its rows give zeros and zero gradients
    mask = pad if kind == "bool" else torch.randn(B, S).masked_fill(pad, float("-inf"))
    out, lse, (dq, dk, dv) = _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, key_padding_mask=mask),
                                    f"key padding {kind}", key_padding_mask=mask)
    assert (out[L:2 * L] == 0).all() and (dq[L:2 * L] == 0).all() and (dk[S:2 * S] == 0).all()
    assert torch.isinf(lse[:, L:2 * L]).all() and (lse[:, L:2 * L] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool_2d", "float_2d", "bool_full", "float_full"])
def test_attn_mask(kind, dtype):
    B, L, S, H, D = 2, 13, 17, 3, 32
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    shape = (L, S) if kind.endswith("2d") else (B, H, L, S)
    masked = torch.rand(shape) < 0.4
    masked[..., 3, :] = True  # a query row with every key masked
    mask = masked if kind.startswith("bool") else torch.randn(shape).masked_fill(masked, float("-inf"))
    view = mask.expand(B, H, L, S)  # broadcast dims keep stride 0: no copy
    out, _, (dq, _, _) = _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, attn_mask=mask),
                                f"attn_mask {kind}", attn_mask=view)
    rows = torch.arange(B) * L + 3
    assert (out[rows] == 0).all() and (dq[rows] == 0).all()


def test_masks_combined_on_a_ragged_batch():
    lq, lk, H, D = [4, 9, 1], [6, 2, 9], 2, 32
    q = torch.randn(sum(lq), H, D)
    k, v = torch.randn(2, sum(lk), H, D)
    cu_q, cu_k = _cu(lq), _cu(lk)
    am = torch.randn(3, H, 9, 9)
    kp = torch.rand(3, 9) < 0.3

    def ref(q, k, v, upcast):  # one reference call per sequence, masks cut at its lengths
        outs = []
        for b in range(3):
            qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            outs.append(reference.attention(q[None, qs], k[None, ks], v[None, ks],
                                            attn_mask=am[b:b + 1, :, :lq[b], :lk[b]],
                                            key_padding_mask=kp[b:b + 1, :lk[b]], is_causal=True, upcast=upcast)[0])
        return torch.cat(outs)

    _check(q, k, v, cu_q, cu_k, 9, 9, ref, "ragged masks", attn_mask=am, key_padding_mask=kp, is_causal=True)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["t3hd", "th3d"])
def test_strided_views_of_packed_qkv(layout):
    T, H, D = 23, 3, 32
    if layout == "t3hd":  # [T, 3, H, D]: token stride 3·H·D, head stride D
        qkv = torch.randn(T, 3, H, D)
        q, k, v = qkv.unbind(1)
    else:  # [T, H, 3, D]: head stride 3·D
        qkv = torch.randn(T, H, 3, D)
        q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    cu = _cu([10, 13])

    def ref(q, k, v, upcast):
        return reference.attention_varlen(q, k, v, cu, cu, upcast=upcast)

    out, _, grads = _check(q, k, v, cu, cu, 13, 13, ref, layout)
    contiguous = _fwd_bwd(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 13, 13, torch.ones(T, H, D))
    plain = _fwd_bwd(q, k, v, cu, cu, 13, 13, torch.ones(T, H, D))
    assert torch.equal(contiguous[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(contiguous[2], plain[2]))


def test_lse():
    B, L, S, H, D = 2, 9, 70, 2, 32
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, torch.float32)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1] = True
    out, lse = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, L, S, key_padding_mask=pad, scale=0.25)
    scores = torch.einsum("blhd,bshd->bhls", q.view(B, L, H, D), k.view(B, S, H, D)) * 0.25
    expected = scores.masked_fill(pad[:, None, None, :], float("-inf")).logsumexp(-1)  # [B, H, L]
    expected = expected.permute(1, 0, 2).reshape(H, B * L)
    torch.testing.assert_close(lse[:, :L], expected[:, :L], atol=1e-5, rtol=1e-5)
    assert (lse[:, L:] == float("inf")).all()  # fully masked rows: +inf (P = exp(s - lse) = 0)
    none_lse = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, L, S, key_padding_mask=pad, scale=0.25,
                                        return_lse=False)
    assert none_lse[1] is None and torch.equal(none_lse[0], out)


def test_same_result_on_one_and_two_threads():
    lq = [3, 70, 129, 1]
    q, k, v = torch.randn(3, sum(lq), 2, 64).unbind(0)
    cu = _cu(lq)
    dout = torch.randn_like(q)
    kw = dict(is_causal=True, dropout_p=0.2, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(q, k, v, cu, cu, 129, 129, dout, **kw)
        torch.set_num_threads(2)
        two = _fwd_bwd(q, k, v, cu, cu, 129, 129, dout, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and all(torch.equal(a, b) for a, b in zip(one[2], two[2]))


def test_nan_propagates():
    q, k, v, cu_q, cu_k = _dense(2, 5, 6, 2, 32, torch.float32)
    q[3, 1, 7] = float("nan")  # query 3, head 1
    ref_in = _leaves((q, k, v))
    ref = _dense_ref(2, 5, 6)(*ref_in, upcast=True)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out, _, grads = _fwd_bwd(q, k, v, cu_q, cu_k, 5, 6, dout)
    for name, fast, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *(t.grad for t in ref_in))):
        assert torch.isnan(expected).any()
        assert torch.equal(torch.isnan(fast), torch.isnan(expected)), name


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_replays_the_mask(dtype):
    B, L, S, H, D, p, seed = 2, 37, 45, 2, 32, 0.3, 1234
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    keep = _C.attention_dropout_mask_cpu(B, H, L, S, p, seed)
    assert keep.shape == (B, H, L, S) and keep.dtype == torch.bool
    _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, dropout_p=p, dropout_mask=keep, is_causal=True),
           f"dropout {dtype}", dropout_p=p, seed=seed, is_causal=True)
    other = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, L, S, dropout_p=p, seed=seed + 1)[0]
    same = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, L, S, dropout_p=p, seed=seed)[0]
    assert not torch.equal(other, same)


def test_dropout_on_a_ragged_batch():
    lq, lk, H, D, p, seed = [5, 66, 1], [7, 40, 3], 2, 32, 0.25, 99
    q = torch.randn(sum(lq), H, D)
    k, v = torch.randn(2, sum(lk), H, D)
    cu_q, cu_k = _cu(lq), _cu(lk)
    keep = _C.attention_dropout_mask_cpu(3, H, max(lq), max(lk), p, seed)
    masks = [keep[b:b + 1, :, :lq[b], :lk[b]] for b in range(3)]  # element (b, h, i, j) relative to each start

    def ref(q, k, v, upcast):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p, dropout_masks=masks, upcast=upcast)

    _check(q, k, v, cu_q, cu_k, max(lq), max(lk), ref, "ragged dropout", dropout_p=p, seed=seed)


def test_dropout_mask_statistics_and_edges():
    keep = _C.attention_dropout_mask_cpu(2, 3, 64, 64, 0.3, 5)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    # neighbouring elements (which share a Philox call) are not correlated
    a, b = keep[..., 0::2].float().flatten(), keep[..., 1::2].float().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05
    assert _C.attention_dropout_mask_cpu(1, 1, 5, 5, 0.0, 5).all()
    q, k, v, cu_q, cu_k = _dense(1, 6, 6, 1, 32, torch.float32)
    out, lse = _C.attention_forward_cpu(q, k, v, cu_q, cu_k, 6, 6, dropout_p=1.0, seed=3)
    assert (out == 0).all() and torch.isfinite(lse).all()


# --------------------------------------------------------------------------- sliding window, rotary


def _window_kw(window):
    return dict(window_left=window[0], window_right=window[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 2), (0, 5), (40, 70), (500, 500)], ids=str)
def test_window(window, causal, dtype):
    """L, S = 300, 290: several forward key blocks and backward query chunks, most outside the window
    (skipped), (500, 500) wider than the sequence; queries past the last key see none with right = 0, -1."""
    B, L, S, H, D = 1, 300, 290, 1, 32
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    out, lse, _ = _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, is_causal=causal, window=window),
                         f"window {window} causal={causal} {dtype}", is_causal=causal, **_window_kw(window))
    if window[1] >= 0 and window[0] >= 0 and window[0] < 10:  # query i sees no key once i - left >= S
        assert (out[S + window[0]:] == 0).all() and torch.isinf(lse[:, S + window[0]:]).all()


def test_window_with_key_padding_and_attn_mask():
    """Small windows over padded keys leave some queries no key at all: zeros, lse +inf, zero gradients."""
    B, L, S, H, D = 2, 40, 40, 2, 32
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, torch.float32)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 10:20] = True
    pad[1, 30:] = True
    am = torch.randn(B, H, L, S)
    window = (2, 1)
    out, lse, (dq, _, _) = _check(q, k, v, cu_q, cu_k, L, S,
                                  _dense_ref(B, L, S, key_padding_mask=pad, attn_mask=am, window=window),
                                  "window + masks", key_padding_mask=pad, attn_mask=am, **_window_kw(window))
    blind = slice(12, 19)  # sequence 0: queries 12..18 see only keys 10..19
    assert (out[blind] == 0).all() and (dq[blind] == 0).all() and torch.isinf(lse[:, blind]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_dropout_replays_the_mask(dtype):
    B, L, S, H, D, p, seed = 2, 150, 150, 2, 32, 0.3, 77
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    keep = _C.attention_dropout_mask_cpu(B, H, L, S, p, seed)
    _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, dropout_p=p, dropout_mask=keep, window=(21, 9)),
           f"window dropout {dtype}", dropout_p=p, seed=seed, **_window_kw((21, 9)))


def _tables(n, D, base=10000.0):
    return reference.rotary_tables(reference.rotary_inv_freq(D, base), n)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 34], ids=lambda d: f"D{d}")
def test_rotary(D, dtype):
    """Rotated q and k (D 34: a half of 17, no multiple of the vector width); bf16 tables as ModernBERT's."""
    B, L, S, H = 2, 37, 41, 2
    q, k, v, cu_q, cu_k = _dense(B, L, S, H, D, dtype)
    cos, sin = _tables(64, D, 160000.0)
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    _check(q, k, v, cu_q, cu_k, L, S, _dense_ref(B, L, S, rotary=(cos, sin)), f"rotary D{D} {dtype}",
           rotary_cos=cos, rotary_sin=sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_window_rotary_on_a_ragged_batch(causal, dtype):
    """Varlen with empty and length-1 sequences, L != S per sequence: window and rotary positions
    count from each sequence's first row."""
    lq, lk, H, D = [5, 0, 1, 140, 33, 4], [5, 3, 1, 150, 0, 9], 2, 64
    q = torch.randn(sum(lq), H, D, dtype=dtype)
    k, v = torch.randn(2, sum(lk), H, D, dtype=dtype)
    cu_q, cu_k = _cu(lq), _cu(lk)
    cos, sin = _tables(150, D)
    window = (17, 4)

    def ref(q, k, v, upcast):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, is_causal=causal, window=window, rotary=(cos, sin),
                                          upcast=upcast)

    out, lse, _ = _check(q, k, v, cu_q, cu_k, max(lq), max(lk), ref, f"ragged window rotary {dtype} causal={causal}",
                         is_causal=causal, rotary_cos=cos, rotary_sin=sin, **_window_kw(window))
    rows = slice(int(cu_q[4]), int(cu_q[5]))  # the sequence with no keys
    assert (out[rows] == 0).all() and torch.isinf(lse[:, rows]).all()


def test_rotary_matches_pre_rotated_inputs():
    """The in-kernel rotation equals rotating q and k first (fp32: same arithmetic up to rounding)."""
    lq = [7, 19]
    q, k, v = torch.randn(3, sum(lq), 2, 32).unbind(0)
    cu = _cu(lq)
    cos, sin = _tables(19, 32)
    pos = torch.cat([torch.arange(n) for n in lq])
    dout = torch.randn_like(q)
    rq, rk = (reference.rotary_embed(t, cos, sin, pos) for t in (q, k))
    out, _, (dq, dk, dv) = _fwd_bwd(q, k, v, cu, cu, 19, 19, dout, rotary_cos=cos, rotary_sin=sin)
    plain_out, _, (pdq, pdk, pdv) = _fwd_bwd(rq, rk, v, cu, cu, 19, 19, dout)
    torch.testing.assert_close(out, plain_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv, pdv, atol=1e-5, rtol=1e-5)
    # dq = Rᵀ (gradient wrt the rotated q)
    for g, pg in ((dq, pdq), (dk, pdk)):
        leaf = torch.zeros_like(q).requires_grad_(True)
        reference.rotary_embed(leaf, cos, sin, pos).backward(pg)
        torch.testing.assert_close(g, leaf.grad, atol=1e-5, rtol=1e-5)


def test_window_skips_blocks_outside():
    """NaN in rows far outside a window reaches nothing: the forward never visits the key blocks, nor the
    backward the query chunks, outside each range (masking them alone would give 0 · NaN = NaN)."""
    L, H, D, w = 512, 1, 32, (8, 8)
    q, k, v, cu, _ = _dense(1, L, L, H, D, torch.float32)
    dout = torch.randn_like(q)
    for t in (q, k, v, dout):
        t[300:] = float("nan")
    out, lse, (dq, dk, dv) = _fwd_bwd(q, k, v, cu, cu, L, L, dout, **_window_kw(w))
    assert torch.isfinite(out[:128]).all(), "the forward visited key blocks outside the window"
    assert torch.isfinite(dq[:128]).all(), "dQ visited key blocks outside the window"
    assert torch.isfinite(dk[:64]).all() and torch.isfinite(dv[:64]).all(), "dK/dV visited far query chunks"
    assert torch.isnan(out[300:]).all()


# --------------------------------------------------------------------------- the op (ops.attention, backend="cpu")


def _op_parity(fast_fn, ref_fn, inputs, name):
    """fast_fn(q, k, v) vs ref_fn(q, k, v, upcast) on fresh leaves: output and dq, dk, dv; and the
    inference path (no gradient: no log-sum-exp kept) gives the same output."""
    fast_in, ref_in, base_in = _leaves(inputs), _leaves(inputs, torch.float32), _leaves(inputs)
    out = fast_fn(*fast_in)
    ref, base = ref_fn(*ref_in, upcast=True), ref_fn(*base_in, upcast=False)
    assert_parity(out, ref, base, name=f"{name} out")
    with torch.no_grad():
        assert torch.equal(fast_fn(*fast_in), out), f"{name}: inference path differs"
    dout = torch.randn_like(ref)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    base.backward(dout.to(base.dtype))
    for label, f, r, b in zip("qkv", fast_in, ref_in, base_in):
        assert_parity(f.grad, r.grad, b.grad, name=f"{name} d{label}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window,causal,padded", [((5, 11), False, True), ((0, -1), True, False),
                                                  ((-1, 3), False, False), (None, False, True)], ids=str)
def test_op_window_rotary(window, causal, padded, dtype):
    B, L, H, D = 2, 45, 3, 64
    qkv = [torch.randn(B, L, H, D, dtype=dtype) for _ in range(3)]
    cos, sin = _tables(L, D)
    kpm = (torch.arange(L) >= torch.tensor([[30], [45]])) if padded else None  # sequence 0 padded after 30
    kw = dict(key_padding_mask=kpm, is_causal=causal, window=window, rotary=(cos, sin))
    _op_parity(lambda q, k, v: attention(q, k, v, backend="cpu", **kw),
               lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast, **kw), qkv,
               f"op window={window} causal={causal} padded={padded} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_varlen_window_rotary(dtype):
    lens, H, D = [7, 0, 1, 130, 64], 2, 32
    cu = _cu(lens)
    qkv = [torch.randn(sum(lens), H, D, dtype=dtype) for _ in range(3)]
    cos, sin = (t.to(dtype) for t in _tables(max(lens), D, 160000.0))
    kw = dict(window=(16, 16), rotary=(cos, sin))
    _op_parity(lambda q, k, v: attention_varlen(q, k, v, cu, cu, max(lens), max(lens), backend="cpu", **kw),
               lambda q, k, v, upcast: reference.attention_varlen(q, k, v, cu, cu, upcast=upcast, **kw), qkv,
               f"op varlen window rotary {dtype}")


# Dropout through the op (ops.attention / attention_varlen, backend "cpu"): the op draws a Philox key from torch's
# generator and its autograd Function hands it to the backward.  The forward, the inference path and the backward
# must all use the mask _C.attention_dropout_mask_cpu draws for that key: a backward that drew another mask (or
# another key) fails the dq / dk / dv parity against the reference fed the mask.


def _op_keep(torch_seed, batch, heads, lq, lk, p):
    torch.manual_seed(torch_seed)
    return _C.attention_dropout_mask_cpu(batch, heads, lq, lk, p, int(draw_seed(torch.device("cpu"))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,padded,window", [(False, False, None), (True, True, None), (False, True, (4, 9))],
                         ids=str)
def test_op_dropout_replays_the_mask_forward_and_backward(causal, padded, window, dtype):
    B, L, S, H, D, p = 2, 19, 37, 2, 32, 0.2
    keep = _op_keep(2024, B, H, L, S, p)
    kpm = (torch.arange(S) >= torch.tensor([[37], [20]])) if padded else None
    kw = dict(key_padding_mask=kpm, is_causal=causal, window=window, dropout_p=p)

    def fast(q, k, v):
        torch.manual_seed(2024)
        return attention(q, k, v, backend="cpu", **kw)

    qkv = [torch.randn(B, L, H, D, dtype=dtype), torch.randn(B, S, H, D, dtype=dtype),
           torch.randn(B, S, H, D, dtype=dtype)]
    _op_parity(fast, lambda q, k, v, upcast: reference.attention(q, k, v, upcast=upcast, dropout_mask=keep, **kw),
               qkv, f"op dropout causal={causal} padded={padded} window={window} {dtype}")


def test_op_varlen_dropout_replays_the_mask_forward_and_backward():
    lq, lk, H, D, p = [5, 0, 66, 1], [7, 3, 40, 1], 2, 32, 0.3
    cu_q, cu_k = _cu(lq), _cu(lk)
    keep = _op_keep(77, len(lq), H, max(lq), max(lk), p)
    masks = [keep[b:b + 1, :, :lq[b], :lk[b]] for b in range(len(lq))]  # relative to each sequence's start

    def fast(q, k, v):
        torch.manual_seed(77)
        return attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=p, backend="cpu")

    qkv = [torch.randn(sum(lq), H, D), torch.randn(sum(lk), H, D), torch.randn(sum(lk), H, D)]
    _op_parity(fast, lambda q, k, v, upcast: reference.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p,
                                                                        dropout_masks=masks, upcast=upcast),
               qkv, "op varlen dropout")


def test_op_dropout_seed_from_torch_rng():
    q, k, v = (torch.randn(1, 8, 2, 32) for _ in range(3))

    def run(seed):
        torch.manual_seed(seed)
        return attention(q, k, v, dropout_p=0.5, backend="cpu")

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b), "torch.manual_seed makes dropout reproducible"
    assert not torch.equal(a, c), "another torch seed gives another dropout mask"


def test_bf16_rotary_backward_scores_are_the_forwards():
    """bf16 with rotary: the forward (AVX512-BF16 pair products) multiplies q and k rotated and rounded back to bf16;
    the backward's recomputed scores must be those, or P = exp(s - lse) is not the forward's softmax.  With a
    window of (0, 0) each query sees one key, P is 1 and dV must be dO; it was 2.5% off (scale 1: a bf16 rounding
    of each score).  Found by tests/test_attention_random.py's long profile."""
    B, L, H, D = 1, 17, 2, 24
    q, k, v = (torch.randn(B, L, H, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, window=(0, 0), rotary=_tables(L, D), scale=1.0, backend="cpu")
    dout = torch.randn_like(out)
    out.backward(dout)
    assert torch.equal(v.grad, dout)


def test_auto_picks_the_cpu_kernels_for_window_and_rotary():
    chosen = explain("attention", "auto", torch.device("cpu"), torch.float32, (64, 64, False, True, True))[0]
    assert chosen == "cpu"


# --------------------------------------------------------------------------- bad arguments


def _args(**over):
    q, k, v, cu_q, cu_k = _dense(2, 4, 4, 2, 32, torch.float32)
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4)
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(q=torch.randn(8, 2, 32, dtype=torch.float64)), TypeError, "q must be float32, bfloat16 or float16"),
        (dict(k=torch.randn(8, 2, 32, dtype=torch.bfloat16)), TypeError, "k has dtype"),
        (dict(q=torch.randn(8, 64)), ValueError, r"q must be \[tokens, heads, head_dim\]"),
        (dict(k=torch.randn(8, 3, 32)), ValueError, "k has 3 heads"),
        (dict(v=torch.randn(7, 2, 32)), ValueError, "k and v must have the same tokens"),
        (dict(k=torch.randn(8, 2, 16)), ValueError, "k has head_dim 16"),
        (dict(q=torch.randn(8, 2, 64)[..., ::2]), ValueError, "q must have a unit last stride"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 8])), TypeError, "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 4], dtype=torch.int32), max_seqlen_k=5), ValueError,
         "cu_seqlens_k must be non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=5), ValueError,
         "beyond the packed length 8"),
        (dict(cu_seqlens_q=torch.tensor([-1, 4, 8], dtype=torch.int32), max_seqlen_q=5), ValueError, "is negative"),
        (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "the same length"),
        (dict(max_seqlen_q=3), ValueError, "sequence 0 has length 4 .* max_seqlen_q = 3"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "key_padding_mask must be bool"),
        (dict(attn_mask=torch.zeros(4, 4, dtype=torch.bool)), ValueError, "attn_mask must have shape"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
        (dict(q=torch.randn(8, 2, 32, device="meta")), ValueError, "q must be a CPU tensor"),
        (dict(window_left=-2), ValueError, "window_left and window_right must be >= 0, or -1"),
        (dict(window_right=-5), ValueError, "window_left and window_right must be >= 0, or -1"),
        (dict(rotary_cos=torch.ones(4, 16)), ValueError, "rotary_cos and rotary_sin must be given together"),
        (dict(rotary_cos=torch.ones(4, 16, dtype=torch.int32), rotary_sin=torch.ones(4, 16, dtype=torch.int32)),
         TypeError, "must be floating point"),
        (dict(rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8)), ValueError,
         r"must both be \[positions, head_dim / 2\] = \[P, 16\]"),
        (dict(rotary_cos=torch.ones(4, 16), rotary_sin=torch.ones(5, 16)), ValueError, "must both be"),
        (dict(rotary_cos=torch.ones(3, 16), rotary_sin=torch.ones(3, 16)), ValueError,
         "rotary tables cover 3 positions, the sequences need 4"),
        (dict(rotary_cos=torch.ones(4, 16, device="meta"), rotary_sin=torch.ones(4, 16)), ValueError,
         "rotary_cos must be a CPU tensor"),
        (dict(q=torch.randn(8, 2, 33), k=torch.randn(8, 2, 33), v=torch.randn(8, 2, 33),
              rotary_cos=torch.ones(4, 16), rotary_sin=torch.ones(4, 16)), ValueError, "even head_dim, got 33"),
    ],
)
def test_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        _C.attention_forward_cpu(**_args(**over))


def test_bad_backward_arguments():
    a = _args()
    out, lse = _C.attention_forward_cpu(**a)
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    pos = [a[n] for n in names]
    with pytest.raises(ValueError, match=r"lse must be \[heads, Tq\]"):
        _C.attention_backward_cpu(out, pos[0], pos[1], pos[2], out, lse.t(), *pos[3:])
    with pytest.raises(TypeError, match="lse must be float32"):
        _C.attention_backward_cpu(out, pos[0], pos[1], pos[2], out, lse.double(), *pos[3:])
    with pytest.raises(TypeError, match="dout has dtype"):
        _C.attention_backward_cpu(out.bfloat16(), pos[0], pos[1], pos[2], out, lse, *pos[3:])
    with pytest.raises(ValueError, match="dout and out must have q's 8 tokens"):
        _C.attention_backward_cpu(out[:7], pos[0], pos[1], pos[2], out, lse, *pos[3:])
    with pytest.raises(ValueError, match="dropout mask sizes"):
        _C.attention_dropout_mask_cpu(1, -1, 2, 2, 0.1, 0)
