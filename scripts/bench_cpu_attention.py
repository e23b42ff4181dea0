"""Time fastenc._C's CPU flash attention against torch's fused CPU SDPA (interleaved, medians).

    python scripts/bench_cpu_attention.py [--threads 2] [--reps 15] [--dtype float32]

Dense batches: B sequences of L tokens, total tokens ~ --tokens; both providers read the
same [B, L, H, D] memory (SDPA through the [B, H, L, D] transposed view a model hands it, and
a contiguous copy; the faster of the two is quoted).  Ragged batches: fastenc on the packed
tokens vs SDPA on the padded batch with a key padding mask.  GFLOP/s counts the real
tokens, 4·Σ Lb·Sb·H·D forward and 2.5x that backward.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastenc._C as _C


def _timeit(fns, reps):
    """{name: median seconds}, providers interleaved rep by rep (after one warm-up call each)."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def dense(B, L, H, D, dtype, reps, backward):
    x = torch.randn(3, B, L, H, D, dtype=dtype)
    q, k, v = x.unbind(0)
    cu = _cu([L] * B)
    qp, kp, vp = (t.reshape(B * L, H, D) for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    qc, kc, vc = (t.contiguous() for t in (qt, kt, vt))
    flops = 4 * B * L * L * H * D
    if not backward:
        res = _timeit({
            "fastenc": lambda: _C.attention_forward_cpu(qp, kp, vp, cu, cu, L, L, return_lse=False),
            "sdpa_view": lambda: F.scaled_dot_product_attention(qt, kt, vt),
            "sdpa_contig": lambda: F.scaled_dot_product_attention(qc, kc, vc),
        }, reps)
    else:
        flops = int(flops * 2.5)
        out, lse = _C.attention_forward_cpu(qp, kp, vp, cu, cu, L, L)
        dout = torch.randn_like(out)
        leaves = [t.detach().clone().requires_grad_(True) for t in (qc, kc, vc)]
        o = F.scaled_dot_product_attention(*leaves)
        do = dout.view(B, L, H, D).transpose(1, 2).contiguous()
        res = _timeit({
            "fastenc": lambda: _C.attention_backward_cpu(dout, qp, kp, vp, out, lse, cu, cu, L, L),
            "sdpa_contig": lambda: torch.autograd.grad(o, leaves, do, retain_graph=True),
        }, reps)
    return res, flops


def ragged(lengths, H, D, dtype, reps):
    B, Lmax, T = len(lengths), max(lengths), sum(lengths)
    qp, kp, vp = torch.randn(3, T, H, D, dtype=dtype).unbind(0)
    cu = _cu(lengths)
    pad = torch.arange(Lmax)[None, :] >= torch.tensor(lengths)[:, None]
    qb, kb, vb = (torch.randn(B, H, Lmax, D, dtype=dtype) for _ in range(3))
    bias = torch.zeros(B, 1, 1, Lmax, dtype=dtype).masked_fill(pad[:, None, None, :], float("-inf"))
    res = _timeit({
        "fastenc": lambda: _C.attention_forward_cpu(qp, kp, vp, cu, cu, Lmax, Lmax, return_lse=False),
        "sdpa_padded": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias),
    }, reps)
    return res, 4 * sum(n * n for n in lengths) * H * D


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="8,32,128,512")
    ap.add_argument("--models", default="minilm,bert")
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    models = {"minilm": (12, 32), "bert": (12, 64)}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, cpu_isa {_C.cpu_isa()}, "
          f"{'backward' if args.backward else 'forward'}; GFLOP/s (median ms)")
    for name in args.models.split(","):
        H, D = models[name]
        for L in map(int, args.lengths.split(",")):
            B = max(1, args.tokens // L)
            res, flops = dense(B, L, H, D, dtype, args.reps, args.backward)
            best_sdpa = min(t for n, t in res.items() if n != "fastenc")
            cells = "  ".join(f"{n} {flops / t / 1e9:7.1f} ({t * 1e3:7.2f})" for n, t in res.items())
            print(f"{name:6s} B{B:4d} L{L:4d}  {cells}  fastenc/sdpa speed {best_sdpa / res['fastenc']:.2f}x")
        if not args.backward:
            g = torch.Generator().manual_seed(1)
            lengths = torch.randint(8, 513, (16,), generator=g).tolist()
            res, flops = ragged(lengths, H, D, dtype, args.reps)
            cells = "  ".join(f"{n} {flops / t / 1e9:7.1f} ({t * 1e3:7.2f})" for n, t in res.items())
            print(f"{name:6s} ragged 16 seqs 8..512 (sum {sum(lengths)}, padded {16 * max(lengths)})  {cells}  "
                  f"speed {res['sdpa_padded'] / res['fastenc']:.2f}x")


if __name__ == "__main__":
    main()
