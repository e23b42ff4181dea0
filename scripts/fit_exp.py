"""The CPU attention's exp (csrc/attention/cpu/micro_kernels.h: vexp, AVX-512): fit e^r ~= 1 + r + c2 r^2 + ... +
c5 r^5 on [-ln2/2, ln2/2] (relative error, Lawson reweighting towards the minimax fit, float64; then evaluated in
float32 by Horner), and with --check build the header's vexp (torch.utils.cpp_extension.load_inline, AVX-512
flags) and measure it against exp in float64: the maximum relative error over fp32's normal range, and the
specials (-inf -> 0, NaN -> NaN, overflow -> inf, a fully masked score -> exactly 0).

Usage: python scripts/fit_exp.py [--degree 5] [--check]   (--check needs a C++ compiler and an AVX-512 CPU)
"""
import argparse
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fit(degree: int, iters: int = 300, n: int = 4001):
    half = np.log(2) / 2
    r = np.cos(np.linspace(0, np.pi, n)) * half  # Chebyshev nodes
    y = np.exp(r)
    a = np.stack([r**k for k in range(2, degree + 1)], 1) / y[:, None]
    b = (y - 1 - r) / y
    w = np.ones_like(r)
    for _ in range(iters):
        c = np.linalg.lstsq(a * np.sqrt(w)[:, None], b * np.sqrt(w), rcond=None)[0]
        w = w * (np.abs(a @ c - b) + 1e-30)
        w /= w.sum()
    c32 = c.astype(np.float32)
    x = np.linspace(-half, half, 400001).astype(np.float32)
    p = np.float32(c32[-1])
    for k in range(len(c32) - 2, -1, -1):
        p = p * x + c32[k]
    p = (p * x + np.float32(1)) * x + np.float32(1)
    return c32, float(np.abs(p.astype(np.float64) / np.exp(x.astype(np.float64)) - 1).max())


def check():
    from torch.utils.cpp_extension import load_inline

    src = r'''
#include <torch/extension.h>
#include "attention/cpu/micro_kernels.h"
using namespace fastenc::cpu::CPU_CAPABILITY;
torch::Tensor vexp_all(torch::Tensor x) {  // x: fp32, contiguous, a multiple of 16 elements
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); i += 16) vexp(Vec::loadu(xp + i)).store(yp + i);
  return y;
}
'''
    flags = ["-O2", "-std=c++20", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
             "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    ext = load_inline("fastenc_vexp_check", cpp_sources=src, functions=["vexp_all"], extra_cflags=flags,
                      extra_include_paths=[os.path.join(ROOT, "csrc")])
    specials = [float("-inf"), float("inf"), float("nan"), -1e30, 1e30, 0.0, -104.0, -103.9, 88.72, 88.73]
    x = torch.cat([torch.linspace(-120, 90, 2_000_000), torch.tensor(specials)])
    x = torch.cat([x, torch.zeros(-x.numel() % 16)])
    y, ref = ext.vexp_all(x).double(), torch.exp(x.double())
    normal = (ref > torch.finfo(torch.float32).tiny) & (ref < torch.finfo(torch.float32).max)
    rel = float(((y - ref).abs() / ref)[normal].max())
    print(f"vexp: max relative error over the normal range {rel:.3g} ({rel / 2**-24:.1f} x 2^-24)")
    for a, b in zip(specials, ext.vexp_all(torch.tensor(specials + [0.0] * 6))[:len(specials)].tolist()):
        print(f"  exp({a:g}) = {b:g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="build the header's vexp and measure it")
    args = ap.parse_args()
    c, err = fit(args.degree)
    print(f"e^r, degree {args.degree}: c2.. = {[float(v) for v in c]}, max relative error (fp32 Horner) {err:.3g}")
    if args.check:
        check()


if __name__ == "__main__":
    main()
