"""Static SASS instruction counts of the attention and LayerNorm kernels, dropout off and on, for sm_90.

    python scripts/sass_counts.py [CHECKOUT]      # default: this checkout

CHECKOUT is the root of any fastenc checkout (e.g. a `git worktree` of an older commit), so two
commits compare without a GPU: its triton_kernels/ are loaded from there and compiled with this
environment's Triton, counted as `python -m fastenc inspect` counts (alignment NOPs excluded).
The compile specs come from its triton_kernels/specs.py, or from each kernel file's
compile_specs() in checkouts older than specs.py.
Attention: the hot specs at head dims 64 and 128, each with DROPOUT False and True.  LayerNorm:
its heaviest specs (branch, bias, dropout) at hidden 1024 and 4096, bf16, aligned.
Run without TRITON_INTERPRET (the interpreter replaces triton.jit).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types

import triton
from triton.backends.compiler import GPUTarget

from fastenc.apps import inspector as fi

SM90 = fi.get_arch("sm_90")


def load(root: str, name: str):
    """triton_kernels/<name>.py of a checkout, as a module of a private package (relative imports work)."""
    pkg = types.ModuleType("_counted_kernels")
    pkg.__path__ = [os.path.join(root, "triton_kernels")]
    sys.modules[pkg.__name__] = pkg
    spec = importlib.util.spec_from_file_location(f"{pkg.__name__}.{name}", os.path.join(root, "triton_kernels",
                                                                                      f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def op_specs(root: str, op: str, **kwargs) -> list:
    """The compile specs of one op ("attention", "layer_norm") in a checkout."""
    if os.path.exists(os.path.join(root, "triton_kernels", "specs.py")):
        return getattr(load(root, "specs"), f"{op}_specs")(**kwargs)
    return load(root, op).compile_specs(**kwargs)


def count(spec: dict) -> tuple:
    """(static instructions, registers) of one compile spec on sm_90."""
    src = fi._ast_source(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        n = fi.parse_sass_instruction_counts(fi._run_cuobjdump(["-sass", path]), SM90)
        usage = fi.parse_resource_usage(fi._run_cuobjdump(["--dump-resource-usage", path]), SM90)
    return next(iter(n.values())), next(iter(usage.values()))["REG"]


def main(root: str) -> None:
    print(f"{'attention spec':42} {'no dropout':>16} {'dropout':>16}   (instructions, registers)")
    for spec in op_specs(root, "attention"):
        if not spec["hot"] or not any(f"_hd{d}_" in spec["name"] for d in (64, 128)):
            continue
        cells = []
        for dropout in (False, True):
            s = dict(spec, constexprs=dict(spec["constexprs"], DROPOUT=dropout))
            cells.append(str(count(s)))
        print(f"{spec['name']:42} {cells[0]:>16} {cells[1]:>16}")
    print(f"\n{'layer_norm spec (dropout on)':54} (instructions, registers)")
    for spec in op_specs(root, "layer_norm", dtypes=("bf16",), aligned=(True,), blocks=(1024, 4096)):
        print(f"{spec['name']:54} {count(spec)}")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1 (the interpreter's kernels cannot be compiled)")
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")))
