"""fastenc command line: ``python -m fastenc {bench,inspect,report,ceilings,embed,pretrain,finetune}`` (also the
``fastenc`` script).

  fastenc bench [--ops e2e,overhead,modernbert,attention,layer_norm,ffn,layer,encoder,train] [--size tiny|cpu|gpu]
                [--dtype bf16,fp16] [--providers NAMES] [--out DIR] [--time-budget S]
  fastenc inspect [--arch sm_90] [--ops attention,layer_norm,padding,ffn] [--module FILE.py] [--json FILE]
  fastenc report [--device cuda] [--dtype fp16] [--head-dim 64]
  fastenc ceilings [--out DIR]
  fastenc embed [--model minilm|DIR] [--texts FILE] [--smoke]   (see `fastenc embed --help`)
  fastenc pretrain [--steps N] [--out DIR]             (see `fastenc pretrain --help`)
  fastenc finetune [--pretrained minilm|DIR] [--out DIR]   (see `fastenc finetune --help`)

A bad argument, an unreadable or malformed input file, or an unavailable backend is reported in one
line on stderr with exit status 2, as argparse does (``FASTENC_TRACEBACK=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

GPU_OPS = "attention,layer_norm,ffn,layer,encoder,train"
# CPU main job: the end-to-end workloads and the host overhead, then the op-level points while
# the run is under CPU_OP_LEVEL_S seconds (each op-level suite runs in full when named in --ops).
# modernbert: its inference rows in the main job, its training step and kernel points best effort.
CPU_OPS = "e2e,overhead,modernbert"
CPU_OP_LEVEL = "attention,layer_norm,ffn,layer,encoder,train"
CPU_OP_LEVEL_S = 300.0
TRACEBACK_ENV = "FASTENC_TRACEBACK"  # =1: let argument and data errors raise with their traceback


class UsageError(ValueError):
    """A bad argument or input file: :func:`main` prints it on one line and exits with status 2."""


def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def _dtypes(spec: Optional[str], device) -> list:
    from .bench.workload import DTYPES

    if spec is None:
        # bf16 first on a GPU (fp16 swept too); fp32 on a CPU, where low precision is emulated and slow.
        return [DTYPES["bf16"], DTYPES["fp16"]] if device.type == "cuda" else [DTYPES["fp32"]]
    out = []
    for name in _csv(spec):
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {name!r}; expected some of {sorted(DTYPES)}")
        out.append(DTYPES[name])
    return out


def _ceilings(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)["ceilings"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot read ceilings from {path}: {e}") from None


def cmd_bench(args) -> int:
    from . import bench
    from .bench import registry

    device = _device(args.device)
    size = args.size or bench.default_size(device)
    if size not in registry.SIZES:
        raise UsageError(f"unknown --size {size!r}; expected one of {registry.SIZES}")
    suites = registry.suite_names()
    best_effort: List[str] = []
    if args.ops is not None:
        ops = _csv(args.ops)
    elif device.type == "cuda":
        ops = _csv(GPU_OPS)
    else:
        best_effort = _csv(CPU_OP_LEVEL)
        ops = _csv(CPU_OPS) + best_effort
    bad_ops = [o for o in ops if o not in suites]
    if bad_ops or not ops:
        raise UsageError(f"unknown --ops {bad_ops or args.ops!r}; expected a subset of {','.join(suites)}")
    names = _csv(args.providers) if args.providers else None
    if names:
        known = registry.provider_names()
        bad = [n for n in names if not any(k.startswith(n) for k in known)]
        if bad:
            raise UsageError(f"unknown providers {bad}; known: {', '.join(known)}")
    rows = bench.run(
        ops=ops, size=size, device=device, dtypes=_dtypes(args.dtype, device), providers_filter=names,
        out_dir=args.out, time_budget_s=args.time_budget, min_time_s=args.min_time,
        progress=not args.no_progress, plots=not args.no_plots, ceilings=_ceilings(args.ceilings),
        best_effort=best_effort, best_effort_s=CPU_OP_LEVEL_S if best_effort else None,
    )
    bad = [r for r in rows if r["status"] in ("failed", "error")]
    return 1 if (bad and args.strict) else 0


def cmd_inspect(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter turns kernels into Python functions: start again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastenc", *args.argv], env)
    from .apps import inspector as ins

    arch = ins.get_arch(args.arch)  # ValueError: reported by main
    shipped = ins.shipped_specs()
    names = [n for n, _ in shipped] + ["ffn"]  # ffn: the CUDA extension's kernels
    ops = names if args.ops is None else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(names))
    if unknown:
        raise UsageError(f"unknown --ops {', '.join(unknown)}; choose from {', '.join(names)}")
    try:
        sources = [(n, f) for n, f in shipped if n in ops]
        sources += [(os.path.basename(p), ins.load_module_file(p).compile_specs) for p in args.module]
        reports = ins.inspect_triton(arch, sources, jobs=args.jobs)
    except ins.InspectError as e:
        print(f"fastenc inspect: {e}", file=sys.stderr)
        return 1
    missing = []
    ext = ins.extension_path()
    if args.no_extension or "ffn" not in ops:
        pass
    elif ext is None:
        missing.append("the fastenc._C extension is not built (pip install --no-build-isolation -e .)")
    else:
        try:
            cuda = ins.inspect_extension(arch, ext)
        except ins.InspectError as e:
            print(f"fastenc inspect: {e}", file=sys.stderr)
            return 1
        if not cuda:
            missing.append(f"{os.path.basename(ext)} holds no {arch.name} device code (built without CUDA "
                           "kernels, or FASTENC_CUDA_ARCHS lacks this architecture)")
        reports += cuda
    print(ins.format_table(reports, arch))
    for m in missing:
        print(f"missing: {m}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": arch.name, "kernels": [r.as_dict() for r in reports], "missing": missing}, f, indent=1)
    return 0


def cmd_report(args) -> int:
    import torch

    from . import backend_report
    from .bench.workload import DTYPES

    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; expected one of {sorted(DTYPES)}")
    print(backend_report(args.device, dtype=DTYPES[args.dtype], head_dim=args.head_dim))
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def cmd_ceilings(args) -> int:
    from .bench import ceilings

    ceilings.run(_device(args.device), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastenc", description="fastenc: benchmarks, kernel inspector, backend report, "
                                                            "embeddings, pretraining, fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark fastenc against PyTorch baselines; writes JSON, CSV, plots")
    b.add_argument("--ops", help=f"comma-separated suites (default on GPU: {GPU_OPS}; on CPU: {CPU_OPS}, then "
                                 f"the op-level suites while the run is under {CPU_OP_LEVEL_S:.0f} s)")
    b.add_argument("--size", choices=("tiny", "cpu", "gpu"), help="sweep size (default: gpu on CUDA, cpu otherwise)")
    b.add_argument("--dtype", help="comma-separated: bf16,fp16,fp32; the first is the main dtype, the others "
                                   "are swept (default: bf16,fp16 on GPU, fp32 on CPU)")
    b.add_argument("--providers", help="comma-separated provider names or prefixes (default: all; on CPU the "
                                       "Triton providers run under the interpreter only when named: fastenc-triton)")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    b.add_argument("--time-budget", type=float, help="seconds; later workloads are listed as skipped")
    b.add_argument("--min-time", type=float, help="seconds of timed samples per measurement")
    b.add_argument("--ceilings", help="ceilings.json from `fastenc ceilings`: adds %% of the device ceiling")
    b.add_argument("--no-plots", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--strict", action="store_true", help="exit 1 if any provider failed its parity check or errored")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="registers, spills, shared memory, tensor cores, occupancy (no GPU needed)")
    i.add_argument("--arch", default="sm_90", help="sm_80, sm_86, sm_89 or sm_90 (default sm_90)")
    i.add_argument("--ops", help="comma-separated subset: attention, layer_norm, padding (Triton), ffn (the CUDA "
                   "extension); default all")
    i.add_argument("--module", action="append", default=[], help="also inspect this file's compile_specs()")
    i.add_argument("--no-extension", action="store_true", help="skip the CUDA extension")
    i.add_argument("--jobs", type=int, help="parallel Triton compiles (default: CPU count)")
    i.add_argument("--json", help="write the report as JSON to this file")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("report", help="which backend each op uses here, and why")
    r.add_argument("--device")
    r.add_argument("--dtype", default="fp16")
    r.add_argument("--head-dim", type=int, default=64)
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("ceilings", help="measure copy GB/s and matmul TFLOP/s of this device")
    c.add_argument("--device")
    c.add_argument("--out", default="bench_out")
    c.set_defaults(fn=cmd_ceilings)

    # Parsed by the applications' own main (main() hands them over before this parser runs).
    sub.add_parser("embed", help="sentence embeddings with sentence-transformers, unmodified vs optimized: "
                                 "sentences/s and cosine (see `fastenc embed --help`)")
    sub.add_parser("pretrain", help="pretrain an encoder with masked-language modelling on fastenc's corpus "
                                    "(see `fastenc pretrain --help`)")
    sub.add_parser("finetune", help="fine-tune a text classifier per backend (see `fastenc finetune --help`)")
    return p


def _user_error(e: BaseException) -> bool:
    """Errors a user fixes by changing the command line or the input (bad values, files, unavailable backends)."""
    if isinstance(e, (ValueError, OSError)):  # UsageError, UnicodeDecodeError, FileNotFoundError...
        return True
    backends = sys.modules.get("fastenc.backends")
    return backends is not None and isinstance(e, backends.BackendUnavailableError)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; an argument or data error prints one line on stderr and returns 2 (as argparse exits)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] in (["embed"], ["finetune"], ["pretrain"]):  # its own parser: fastenc.apps.<name>.main
            import importlib

            importlib.import_module(f"fastenc.apps.{argv[0]}").main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.fn(args)
    except Exception as e:
        if not _user_error(e) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"fastenc {argv[0] if argv else ''}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
