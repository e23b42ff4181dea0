"""The extension's CPU FFN (fastenc._C.ffn_forward / ffn_backward) against the oracle (fastenc.reference.ffn).

    python scripts/cpu_ffn_bench.py [--rounds 5] [--tokens 1,32,128,512,2048,4096] [--dtype fp32,bf16]

y = gelu(x W1ᵀ + b1) W2ᵀ + b2 + residual at MiniLM (384→1536) and BERT-base (768→3072) widths.
Modes: fwd (inference, no grad) and train (forward saving the hidden tensors + backward).  Providers:
oracle, ext (the CPU path `auto` picks: oneDNN GEMMs where the dtype has them) and ext-aten (ATen
GEMMs, FASTENC_FFN_GEMM=unfused), interleaved in one process (each round times each in turn);
prints medians and the speed-up over the oracle (> 1: faster).  On a shared machine, repeat and
quote ranges.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastenc._C as C
from fastenc import reference

WIDTHS = [(384, 1536), (768, 3072)]


def time_once(fn, min_s: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def cases(t: int, d: int, f: int, dt: torch.dtype, act: str):
    x = torch.randn(t, d).to(dt)
    w1, b1 = (torch.randn(f, d) / d**0.5).to(dt), torch.randn(f).to(dt) * 0.5
    w2, b2 = (torch.randn(d, f) / f**0.5).to(dt), torch.randn(d).to(dt) * 0.5
    r = torch.randn(t, d).to(dt)
    dy = torch.randn(t, d).to(dt)

    def oracle_fwd():
        with torch.no_grad():
            return reference.ffn(x, w1, b1, w2, b2, activation=act, residual=r)

    def ext_fwd(path="auto"):
        return C.ffn_forward(x, w1, b1, w2, b2, r, act, 0.0, 0, path, False)[0]

    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, r)]

    def oracle_train():
        y = reference.ffn(*leaves[:5], activation=act, residual=leaves[5])
        return torch.autograd.grad(y, leaves, dy)

    def ext_train(path="auto"):
        y, h, pre = C.ffn_forward(x, w1, b1, w2, b2, r, act, 0.0, 0, path, True)
        return C.ffn_backward(dy, x, w1, w2, h, pre, act, 0.0, 0, True, True, path)

    return {
        "fwd": {"oracle": oracle_fwd, "ext": ext_fwd, "ext-aten": lambda: ext_fwd("unfused")},
        "train": {"oracle": oracle_train, "ext": ext_train, "ext-aten": lambda: ext_train("unfused")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", default="1,32,128,512,2048,4096")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--modes", default="fwd,train")
    ap.add_argument("--act", default="gelu")
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per provider per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastenc._C ISA {C.cpu_isa()}")
    torch.manual_seed(0)
    for dname in args.dtype.split(","):
        for d, f in WIDTHS:
            for t in map(int, args.tokens.split(",")):
                provs = cases(t, d, f, dtypes[dname], args.act)
                for mode in args.modes.split(","):
                    fns = provs[mode]
                    for fn in fns.values():
                        time_once(fn, args.min_time / 4)
                    times = {name: [] for name in fns}
                    for _ in range(args.rounds):
                        for name, fn in fns.items():
                            times[name].append(time_once(fn, args.min_time))
                    med = {name: statistics.median(t) for name, t in times.items()}
                    cells = "  ".join(f"{name} {med[name] * 1e3:9.3f} ms ({med['oracle'] / med[name]:4.2f}x)"
                                      for name in fns)
                    print(f"{dname} {d}->{f} T={t:5d} {mode:5s} {cells}", flush=True)

if __name__ == "__main__":
    main()
