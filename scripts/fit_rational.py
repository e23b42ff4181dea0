"""Fit an odd function as f(x) ~= x P(x^2) / Q(x^2) on [0, c], Q(0) = 1: the coefficients of the CPU passes'
erf and tanh (csrc/common/activation_vec.h).

Method: linearised least squares (x P - f Q = 0 weighted by 1/Q) with Lawson reweighting towards the minimax
fit, in float64; the result is then evaluated in float32 (Horner, one division) over [-12, 12] against
float64, the figure the header quotes.  Usage: python scripts/fit_rational.py erf 5 5 3.92
"""
import argparse

import numpy as np
import torch

FUNCS = {"erf": torch.special.erf, "tanh": torch.tanh}


def fit(fun, deg_p: int, deg_q: int, c: float, iters: int = 80, n: int = 40000):
    x = np.linspace(1e-5, c, n)
    y = fun(torch.from_numpy(x)).numpy()
    z = x * x
    w = np.ones_like(x)
    q = np.zeros(deg_q + 1)
    q[0] = 1.0
    best = None
    for _ in range(iters):
        qz = np.polyval(q[::-1], z)
        a = np.concatenate([np.stack([x * z**i for i in range(deg_p + 1)], 1),
                            np.stack([-y * z**j for j in range(1, deg_q + 1)], 1)], 1)
        sol = np.linalg.lstsq(a * (w / qz)[:, None], y * w / qz, rcond=None)[0]
        p, q = sol[:deg_p + 1], np.concatenate([[1.0], sol[deg_p + 1:]])
        err = np.abs(x * np.polyval(p[::-1], z) / np.polyval(q[::-1], z) - y)
        if best is None or err.max() < best[0]:
            best = (err.max(), p.copy(), q.copy())
        w = w * (err / err.max() + 1e-2)
        w /= w.mean()
    return best


def horner32(coef, z):
    acc = torch.full_like(z, float(np.float32(coef[-1])))
    for co in coef[-2::-1]:
        acc = acc * z + float(np.float32(co))
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("func", choices=sorted(FUNCS))
    ap.add_argument("deg_p", type=int)
    ap.add_argument("deg_q", type=int)
    ap.add_argument("clamp", type=float, help="|x| is clamped to this before the fit is evaluated")
    args = ap.parse_args()
    fun = FUNCS[args.func]
    err64, p, q = fit(fun, args.deg_p, args.deg_q, args.clamp)
    x = torch.linspace(-12, 12, 4_000_001)
    xc = x.clamp(-args.clamp, args.clamp)
    approx = xc * horner32(p, xc * xc) / horner32(q, xc * xc)
    exact = fun(x.double())
    print(f"{args.func} on [0, {args.clamp}]: float64 fit max abs error {err64:.3g}; in float32 "
          f"{(approx.double() - exact).abs().max().item():.3g} (torch float32: "
          f"{(fun(x).double() - exact).abs().max().item():.3g})")
    print("P:", ", ".join(f"{float(np.float32(v)):.9g}f" for v in p))
    print("Q:", ", ".join(f"{float(np.float32(v)):.9g}f" for v in q))


if __name__ == "__main__":
    main()
