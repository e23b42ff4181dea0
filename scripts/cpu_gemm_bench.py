"""Which CPU GEMM torch runs at encoder shapes, and whether prepacked weights pay (issue #15).

    python scripts/cpu_gemm_bench.py [--rounds 5] [--m 32,256,1024,4096] [--dtype fp32,bf16] [--threads N]

y = x Wᵀ + b with x [M, K], W [N, K] (nn.Linear layout), for the encoder's GEMM shapes.  Providers,
interleaved in one process (each round times every provider once per shape, in turn):
  addmm          torch.addmm(b, x, W.t()): MKL sgemm in fp32, oneDNN brgemm matmul in bf16
  onednn         torch.ops.mkldnn._linear_pointwise(x, W, b) on the plain weight
  onednn-packed  the same with W reordered once by torch.ops.mkldnn._reorder_linear_weight
  mkl-packed     torch.ops.mkl._mkl_linear with W packed by torch.ops.mkl._mkl_reorder_linear_weight
                 (fp32 only: what torch.compile's freezing pass uses)
  panel          fastenc's few-row GEMM (fastenc._C.cpu_panel_gemm, W packed into 64-column panels)
  int8           fastenc's int8 GEMM (fastenc._C.cpu_int8_linear: x quantized per row at each call, W per
                 channel once), counted as GOP/s in the same column
  int_mm         torch._int_mm on int8 operands quantized outside the timing (the GEMM alone)
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
    from fastenc import backends
    from fastenc.ops.linear_int8 import quantize_weight

    ext = backends.extension()
    if ext is not None and ext.cpu_panel_gemm_supported(w.dtype):
        wp8 = ext.PanelWeight(w)
        out["panel"] = lambda x: ext.cpu_panel_gemm(x, wp8, b)
    if ext is not None and hasattr(ext, "cpu_int8_linear"):
        q = quantize_weight(w)
        out["int8"] = lambda x: ext.cpu_int8_linear(x, q.packed, b)
        wt = q.q.t()
        out["int_mm"] = lambda x: torch._int_mm(_int8_rows(x), wt)
    return out


_QUANTIZED = {}


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x quantized once per tensor (int_mm times the GEMM alone)."""
    key = (x.data_ptr(), x.shape)
    if key not in _QUANTIZED:
        from fastenc.reference import quantize_int8

        _QUANTIZED[key] = quantize_int8(x)[0]
    return _QUANTIZED[key]


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
                    if name == "int_mm":
                        continue  # integers: its scale-free product is not the float one
                    tol = 0.05 if name == "int8" else 1e-3 if dt == torch.float32 else 0.1
                    err = (fn(x).float() - ref).abs().max().item()
                    assert err <= tol * ref.abs().max().item(), (name, err)
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
