"""Attention benchmark: fastenc's Triton kernels (padded and varlen) and its C++ CPU backend (where the op
has one) against torch eager, SDPA's backends and torch.compile, forward and backward.

FLOPs = 4·H·D·Σ_b L_b·S_b forward (QKᵀ and PV, 2 FLOPs per MAC; 4·B·H·L·S·D without
padding), halved for causal, 2.5x for the backward (FlashAttention's convention); only
real tokens count, so a kernel that skips padding gets the credit for it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ... import ops, reference
from ...ops.attention import shape_class as attention_shape_class
from .. import registry as R
from ..registry import Impl, Provider, Unavailable
from ..workload import Workload, by_mode, key_padding_mask, padded_lengths, randn, valid_tokens

BWD_FACTOR = 2.5  # backward = 2.5x forward (5 matmuls of the forward's 2)
# Check large workloads on a slice (same kernels, smaller batch/heads): the fp32 reference
# materialises the [B, H, L, S] scores.
CHECK_MAX_SCORES = 2**28


def flops(lengths_q, lengths_k, heads: int, head_dim: int, *, causal: bool = False, mode: str = "fwd") -> float:
    f = 4.0 * heads * head_dim * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k))
    if causal:
        f /= 2
    return by_mode(f, mode, BWD_FACTOR)


def workload(mode, sweep, device, dtype, *, batch, seqlen, heads, head_dim, padding=0.0, causal=False) -> Workload:
    lengths = padded_lengths(batch, seqlen, padding)

    def make_inputs():
        q, k, v = (randn((batch, seqlen, heads, head_dim), device, dtype) for _ in range(3))
        return q, k, v, key_padding_mask(lengths, seqlen, device)

    def ref(inputs, upcast):
        q, k, v, kpm = inputs
        return reference.attention(q, k, v, key_padding_mask=kpm, is_causal=causal, upcast=upcast)

    def check_slice(inputs):
        """The first batch element (and fewer heads) when the reference's scores would be huge."""
        if batch * heads * seqlen * seqlen <= CHECK_MAX_SCORES:
            return inputs
        h = max(1, min(heads, CHECK_MAX_SCORES // (seqlen * seqlen)))
        q, k, v, kpm = inputs
        return (q[:1, :, :h].contiguous(), k[:1, :, :h].contiguous(), v[:1, :, :h].contiguous(),
                None if kpm is None else kpm[:1])

    return Workload(
        "attention", mode, sweep,
        dict(batch=batch, seqlen=seqlen, heads=heads, head_dim=head_dim, padding=padding, causal=causal),
        device, dtype, make_inputs, (0, 1, 2), ref, valid=lambda inp: valid_tokens(inp, 3, 2),
        flops=flops(lengths, lengths, heads, head_dim, causal=causal, mode=mode), tokens=sum(lengths),
        check_slice=check_slice,
    )


# --------------------------------------------------------------------------- providers


def shape_class(w: Workload) -> tuple:
    """What the attention backends' checks read (``fastenc.ops.attention.shape_class``)."""
    return attention_shape_class(w.params["head_dim"], w.params["head_dim"])


def _fastenc(backend: str):
    def build(w: Workload) -> Impl:
        R.force("attention", backend, w.device, w.dtype, shape_class(w))
        causal = w.params["causal"]
        return Impl(lambda i: ops.attention(i[0], i[1], i[2], key_padding_mask=i[3], is_causal=causal,
                                            backend=backend))
    return build


def _fastenc_varlen(backend: str):
    def build(w: Workload) -> Impl:
        if w.params["padding"] == 0:
            raise Unavailable("varlen runs only in the padding sweep (with padding > 0)")
        R.force("attention", backend, w.device, w.dtype, shape_class(w))
        causal = w.params["causal"]

        def prepare(inputs):
            q, k, v, kpm = inputs
            qp, idx, cu, maxlen = reference.unpad(q, kpm)
            return qp, reference.unpad(k, kpm)[0], reference.unpad(v, kpm)[0], cu, maxlen, idx

        def to_dense(out, inputs):
            b, n = inputs[3].shape
            idx = reference.unpad(inputs[0], inputs[3])[1]
            return reference.pad(out, idx, b, n)

        return Impl(
            lambda i: ops.attention_varlen(i[0], i[1], i[2], i[3], i[3], i[4], i[4], is_causal=causal, backend=backend),
            prepare=prepare, to_dense=to_dense, note="inputs packed once outside the timing (unpad not timed)",
        )
    return build


def _reference_fn(i, causal):
    return reference.attention(i[0], i[1], i[2], key_padding_mask=i[3], is_causal=causal)


def _torch_eager(w: Workload) -> Impl:
    causal = w.params["causal"]
    return Impl(lambda i: _reference_fn(i, causal), note="fastenc.reference.attention called directly")


_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _sdpa(name: str):
    def build(w: Workload) -> Impl:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:
            raise Unavailable(f"torch.nn.attention.sdpa_kernel is missing: {e}") from None
        backend = getattr(SDPBackend, _SDPA_BACKENDS[name], None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{_SDPA_BACKENDS[name]}")
        causal = w.params["causal"]
        if causal and w.params["padding"] > 0:
            raise Unavailable("SDPA takes either is_causal or a mask, not both")

        def forward(i):
            q, k, v, kpm = (t.transpose(1, 2) if t is not None and t.dim() == 4 else t for t in i)
            mask = None if kpm is None else ~kpm[:, None, None, :]  # SDPA's bool mask: True = attend
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            except RuntimeError as e:
                raise Unavailable(f"{name}: {str(e).splitlines()[0]}") from None
            return out.transpose(1, 2)

        return Impl(forward)
    return build


def _torch_compile(w: Workload) -> Impl:
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    torch._dynamo.reset()  # a fresh cache per workload: never a silent eager fallback at the recompile limit
    fn = functools.partial(_reference_fn, causal=w.params["causal"])
    return Impl(torch.compile(fn, dynamic=False, fullgraph=True), note="torch.compile(fastenc.reference)")


PROVIDERS = [
    Provider("fastenc-triton", _fastenc("triton"), False, triton=True),
    Provider("fastenc-triton-varlen", _fastenc_varlen("triton"), False, triton=True),
    Provider("fastenc-cpu", _fastenc("cpu"), False),
    Provider("fastenc-reference", _fastenc("reference"), False),
    Provider("torch-eager", _torch_eager, True),
    *(Provider(n, _sdpa(n), True) for n in _SDPA_BACKENDS),
    Provider("torch-compile", _torch_compile, True),
]


# --------------------------------------------------------------------------- sizes

def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(workload, "attention", mode, sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    x = R.NO_COMPILE_TINY
    a = dict(heads=2, head_dim=32)
    return [
        _e("fwd", "seqlen", dev, dt, x, batch=2, seqlen=48, **a),
        _e("bwd", "padding", dev, dt, x, batch=4, seqlen=48, padding=0.5, **a),
        *(_e("fwd", "dtype", dev, d, x, (1,), batch=2, seqlen=48, **a) for d in extra),
    ]


def _cpu(dev, dt, extra):
    e = [_e(mode, "seqlen", dev, dt, R.only_at(n == 256, "torch-compile"), (1,), batch=1024 // n, seqlen=n,
            heads=4, head_dim=64) for mode in ("fwd", "bwd") for n in (128, 256, 512)]
    e += [_e("fwd", "padding", dev, dt, R.only_at(False, "torch-compile"), (1,), batch=8, seqlen=128, heads=4,
             head_dim=64, padding=pad) for pad in (0.0, 0.25, 0.5)]
    e += [_e("fwd", "dtype", dev, d, None, (6,), batch=4, seqlen=256, heads=4, head_dim=64) for d in extra]
    return e


def _gpu(dev, dt, extra):
    """Hidden 2048 (H x D), length 128..16384 first; padding; then the compile, batch and dtype points."""
    h = R.HEAVY
    e = [_e(mode, "seqlen", dev, dt, h, (1,), batch=R.GPU_TOKENS // n, seqlen=n, heads=2048 // d, head_dim=d)
         for d in (128, 64) for mode in ("fwd", "bwd") for n in (128, 512, 1024, 2048, 4096, 8192, 16384)]
    e += [_e(mode, "padding", dev, dt, h, (2,), batch=32, seqlen=512, heads=12, head_dim=64, padding=pad)
          for pad in (0.0, 0.25, 0.5) for mode in ("fwd", "bwd")]
    e += [_e(mode, "compile", dev, dt, None, (9, i), batch=4, seqlen=4096, heads=16, head_dim=128)
          for i, mode in enumerate(("fwd", "bwd"))]
    e += [_e("fwd", "batch", dev, dt, h, (11,), batch=b, seqlen=512, heads=12, head_dim=64) for b in (1, 8, 32, 128)]
    e += [_e(mode, "dtype", dev, d, h, (12, j), batch=R.GPU_TOKENS // n, seqlen=n, heads=16, head_dim=128)
          for j, d in enumerate(extra) for n in (1024, 4096) for mode in ("fwd", "bwd")]
    return e


SUITE = R.register(R.Suite("attention", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
