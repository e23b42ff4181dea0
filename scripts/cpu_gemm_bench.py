"""Which CPU GEMM torch runs at encoder shapes, and whether prepacked weights pay (issue #15).

    python scripts/cpu_gemm_bench.py [--rounds 5] [--m 32,256,1024,4096] [--dtype fp32,bf16] [--threads N]

y = x Wᵀ + b with x [M, K], W [N, K] (nn.Linear layout), for the encoder's GEMM shapes.  Providers,
interleaved in one process (each round times every provider once per shape, in turn):
  addmm          torch.addmm(b, x, W.t()): MKL sgemm in fp32, oneDNN brgemm matmul in bf16
  onednn         torch.ops.mkldnn._linear_pointwise(x, W, b) on the plain weight
  onednn-packed  the same with W reordered once by torch.ops.mkldnn._reorder_linear_weight
  mkl-packed     torch.ops.mkl._mkl_linear with W packed by torch.ops.mkl._mkl_reorder_linear_weight
                 (fp32 only: what torch.compile's freezing pass uses)
Prints median GFLOP/s per provider (2·M·N·K / time) and the ratio to addmm.  Check the kernels with
MKL_VERBOSE=1 / ONEDNN_VERBOSE=1.  On a shared machine, repeat and quote ranges.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(1536, 384), (384, 1536), (1152, 384), (384, 384), (3072, 768), (768, 3072), (2304, 768), (768, 768)]


def providers(w: torch.Tensor, b: torch.Tensor, m: int):
    out = {"addmm": lambda x: torch.addmm(b, x, w.t())}
    out["onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    wp = torch.ops.mkldnn._reorder_linear_weight(w, m)
    out["onednn-packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, wp, b, "none", [], "")
    if w.dtype == torch.float32:
        wm = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        out["mkl-packed"] = lambda x: torch.ops.mkl._mkl_linear(x, wm, w, b, m)
    return out


def time_once(fn, x, min_s: float) -> float:
    """Seconds per call over at least min_s of calls."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--m", default="32,256,1024,4096")
    ap.add_argument("--dtype", default="fp32,bf16")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per provider per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}")
    torch.manual_seed(0)
    for dname in args.dtype.split(","):
        dt = dtypes[dname]
        for n, k in SHAPES:
            w, b = torch.randn(n, k).to(dt), torch.randn(n).to(dt)
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k).to(dt)
                provs = providers(w, b, m)
                ref = provs["addmm"](x).float()
                for name, fn in provs.items():  # each provider computes the same product
                    err = (fn(x).float() - ref).abs().max().item()
                    assert err <= (1e-3 if dt == torch.float32 else 0.1) * ref.abs().max().item(), (name, err)
                    time_once(fn, x, args.min_time / 5)  # warm-up (primitive creation, caches)
                times = {name: [] for name in provs}
                for _ in range(args.rounds):
                    for name, fn in provs.items():
                        times[name].append(time_once(fn, x, args.min_time))
                flop = 2.0 * m * n * k
                med = {name: statistics.median(t) for name, t in times.items()}
                cells = " ".join(
                    f"{name}={flop / med[name] / 1e9:6.1f} ({med['addmm'] / med[name]:.2f}x)" for name in provs
                )
                print(f"{dname} M={m:5d} N={n:5d} K={k:5d}  GFLOP/s: {cells}", flush=True)


if __name__ == "__main__":
    main()
