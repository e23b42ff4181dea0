"""Kernel inspector: registers, spills, shared memory, tensor-core use and occupancy, without a GPU.

Triton kernels: ``fastenc.triton_kernels.specs.COMPILE_SPECS`` maps each shipped op to a
function returning a list of dicts
``{"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot"}`` (optionally
``"attrs"``, passed on to ``ASTSource``), and a kernel file under development defines
``compile_specs()`` returning the same; each spec is compiled ahead of time for the target
architecture (``triton.compile`` on an ``ASTSource``) and its cubin is read with ``cuobjdump``.
CUDA extension: the cubins for the target architecture inside the built ``fastenc/_C*.so``.

What is read per kernel (cuobjdump ``--dump-resource-usage`` and ``-sass``):
  * REG: registers per thread; LOCAL: local memory per thread, which in compiled
    kernels is register spill space (Triton's ``n_spills`` reads the same value);
  * shared memory: Triton's dynamic allocation plus the cubin's static SHARED
    (extension kernels: static only; dynamic shared memory is chosen at launch);
  * tensor-core instructions in the SASS (HGMMA/QGMMA are Hopper's warpgroup MMAs,
    HMMA/IMMA the warp-level ones).
Theoretical occupancy follows the CUDA occupancy calculator (see ``occupancy``).

Triton's interpreter (``TRITON_INTERPRET=1``) replaces ``@triton.jit`` kernels by
Python functions that cannot be compiled; the CLI re-runs itself without it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA", "DMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA")
_TC_RE = re.compile(r"\b(" + "|".join(TENSOR_CORE_OPS) + r")\b")


class InspectError(RuntimeError):
    """The inspector cannot run (missing tool, interpreter mode, failed compile)."""


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one architecture (CUDA programming guide, compute capabilities table)."""

    name: str
    capability: int
    smem_per_sm: int  # bytes, including the per-block reserve
    max_smem_per_block: int  # bytes a block may ask for (opt-in maximum)
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    warp_alloc_granularity: int = 4  # warps per SM are allocated in groups of 4 (one per sub-partition)
    reserved_smem_per_block: int = 1024  # the driver reserves 1 KB of shared memory per block (sm_80+)


ARCHS: Dict[str, Arch] = {
    "sm_80": Arch("sm_80", 80, 164 * 1024, 163 * 1024, 64, 32),
    "sm_86": Arch("sm_86", 86, 100 * 1024, 99 * 1024, 48, 16),
    "sm_89": Arch("sm_89", 89, 100 * 1024, 99 * 1024, 48, 24),
    "sm_90": Arch("sm_90", 90, 228 * 1024, 227 * 1024, 64, 32),
}


def get_arch(name: str) -> Arch:
    key = name.lower().replace("compute_", "sm_")
    key = key if key.startswith("sm_") else "sm_" + key
    key = key.rstrip("a")  # sm_90a has sm_90's limits
    if key not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[key]


@dataclasses.dataclass
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # active warps / max warps per SM
    limiter: str  # "regs" | "smem" | "warps" | "blocks" | a reason the kernel cannot launch


def occupancy(regs: int, smem_bytes: int, num_warps: int, arch: Arch) -> Occupancy:
    """Theoretical occupancy of a kernel with ``num_warps`` warps per block.

    blocks/SM = min(max_warps // warps,
                    regs_per_sm // (warps · roundup(regs · 32, 256)),   (regs per warp, 256-register units)
                    smem_per_sm // (smem + 1 KB reserve),
                    max_blocks)
    with the register limit taken on warps rounded down to the warp allocation granularity.
    """
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    if regs > arch.max_regs_per_thread:
        return Occupancy(0, 0, 0.0, f"{regs} registers/thread > {arch.max_regs_per_thread}")
    if smem_bytes > arch.max_smem_per_block:
        return Occupancy(0, 0, 0.0, f"{smem_bytes} B shared memory > {arch.max_smem_per_block} B per block")
    limits = {"warps": arch.max_warps_per_sm // num_warps, "blocks": arch.max_blocks_per_sm}
    if regs > 0:
        regs_per_warp = math.ceil(regs * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
        warps_by_regs = arch.regs_per_sm // regs_per_warp
        warps_by_regs -= warps_by_regs % arch.warp_alloc_granularity
        limits["regs"] = warps_by_regs // num_warps
    if smem_bytes > 0:
        limits["smem"] = arch.smem_per_sm // (smem_bytes + arch.reserved_smem_per_block)
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    warps = blocks * num_warps
    if blocks == 0:
        return Occupancy(0, 0, 0.0, f"{limiter}: a block of {num_warps} warps does not fit on one SM")
    return Occupancy(blocks, warps, warps / arch.max_warps_per_sm, limiter)


@dataclasses.dataclass
class KernelReport:
    source: str  # "triton:<module>" or "cuda:<library file>"
    name: str
    regs: int
    spill_bytes: int  # local memory per thread
    smem_bytes: int
    tensor_core_ops: Dict[str, int]
    num_warps: Optional[int]  # None for extension kernels (block size is chosen at launch)
    num_stages: Optional[int]
    hot: bool
    occupancy: Optional[Occupancy]
    note: str = ""
    sass_instructions: int = 0  # static count (parse_sass_instruction_counts)

    @property
    def uses_tensor_cores(self) -> bool:
        return bool(self.tensor_core_ops)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["uses_tensor_cores"] = self.uses_tensor_cores
        return d


# ----------------------------------------------------------------------------- cuobjdump


def cuobjdump_path() -> str:
    """cuobjdump shipped inside Triton's NVIDIA backend (else the one on PATH)."""
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    found = shutil.which("cuobjdump")
    if found is None:
        raise InspectError("cuobjdump not found (expected in <triton>/backends/nvidia/bin or on PATH)")
    return found


def _run_cuobjdump(args: List[str]) -> str:
    proc = subprocess.run([cuobjdump_path(), *args], capture_output=True, text=True)
    if "does not contain device code" in proc.stderr + proc.stdout:
        return ""  # a library built without CUDA kernels
    if proc.returncode != 0:
        raise InspectError(f"cuobjdump {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _split_by_arch(text: str) -> List[Tuple[Optional[str], str]]:
    """Fat-binary listings repeat a header 'arch = sm_XX' per ELF; a bare cubin has none."""
    parts = re.split(r"^arch = (sm_\w+)\s*$", text, flags=re.M)
    if len(parts) == 1:
        return [(None, text)]
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def _arch_matches(elf_arch: Optional[str], arch: Arch) -> bool:
    return elf_arch is None or elf_arch.rstrip("a") == arch.name


def parse_resource_usage(text: str, arch: Arch) -> Dict[str, Dict[str, int]]:
    """{function: {"REG": .., "SHARED": .., "LOCAL": .., "STACK": ..}} for the arch's ELFs."""
    out: Dict[str, Dict[str, int]] = {}
    for elf_arch, body in _split_by_arch(text):
        if not _arch_matches(elf_arch, arch):
            continue
        for m in re.finditer(r"^\s*Function (\S+?):\s*\n\s*(.*)$", body, flags=re.M):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(2)))
            out[m.group(1)] = {k: int(v) for k, v in fields.items()}
    return out


def _sass_functions(text: str, arch: Arch) -> Dict[str, List[str]]:
    """{function: its instructions (opcode and operands, no address or encoding)} in the arch's SASS."""
    out: Dict[str, List[str]] = {}
    for elf_arch, body in _split_by_arch(text):
        if not _arch_matches(elf_arch, arch):
            continue
        current = None
        for line in body.splitlines():
            m = re.match(r"^\s*Function : (\S+)", line)
            if m:
                current = out.setdefault(m.group(1), [])
                continue
            m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+([^;]+);", line)
            if current is not None and m:
                current.append(m.group(1).strip())
    return out


def parse_sass_tensor_ops(text: str, arch: Arch) -> Dict[str, Dict[str, int]]:
    """{function: {opcode: count}} of tensor-core instructions in the arch's SASS."""
    out: Dict[str, Dict[str, int]] = {}
    for fn, instructions in _sass_functions(text, arch).items():
        ops = out.setdefault(fn, {})
        for ins in instructions:
            for op in _TC_RE.findall(ins):
                ops[op] = ops.get(op, 0) + 1
    return out


def parse_sass_instruction_counts(text: str, arch: Arch) -> Dict[str, int]:
    """{function: static instruction count, alignment NOPs excluded}: a GPU-free proxy for the issue
    work a change adds or removes (a loop body counts once, however often it runs)."""
    return {fn: sum(1 for ins in instructions if not ins.startswith("NOP"))
            for fn, instructions in _sass_functions(text, arch).items()}


def parse_launch_bounds(text: str, arch: Arch) -> Dict[str, int]:
    """{function: threads per block} from __launch_bounds__ / reqntid (EIATTR_MAX_THREADS, EIATTR_REQNTID)."""
    out: Dict[str, int] = {}
    for elf_arch, body in _split_by_arch(text):
        if not _arch_matches(elf_arch, arch):
            continue
        for m in re.finditer(r"^\.nv\.info\.(\S+)\s*$(.*?)(?=^\.(?:nv\.info|section)|\Z)", body, flags=re.M | re.S):
            a = re.search(r"Attribute:\s*EIATTR_(?:REQNTID|MAX_THREADS)\s*\n\s*Format:.*\n\s*Value:\s*([0-9a-fx ]+)",
                          m.group(2))
            if a:
                out[m.group(1)] = math.prod(int(v, 16) for v in a.group(1).split())
    return out


def _demangle(names: Iterable[str]) -> Dict[str, str]:
    names = list(names)
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return dict(zip(names, lines)) if proc.returncode == 0 and len(lines) == len(names) else {n: n for n in names}


# ----------------------------------------------------------------------------- Triton kernels


def _ast_source(fn, signature: dict, constexprs: dict, attrs: Optional[dict] = None):
    """triton.compiler.ASTSource across Triton versions.

    Triton >= 3.2 (so 3.6-3.9): ``signature`` names every argument, constexprs typed
    "constexpr", ``constexprs`` maps names to values, and the optional ``attrs``
    ({(arg_index,): [["tt.divisibility", 16]]}) states what the JIT would infer at
    launch (aligned pointers and strides).  Older releases keyed ``constants`` and
    the signature by argument index and left constexprs out.
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    extra = {"attrs": attrs} if attrs else {}
    if "constexprs" in params:
        sig = dict(signature)
        for k in constexprs:
            sig.setdefault(k, "constexpr")
        return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), **extra)
    names = list(fn.arg_names)
    sig = {names.index(k): v for k, v in signature.items() if v != "constexpr" and k not in constexprs}
    return ASTSource(fn=fn, signature=sig, constants={names.index(k): v for k, v in constexprs.items()}, **extra)


def _check_spec(spec: dict, where: str) -> None:
    missing = [k for k in ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot") if k not in spec]
    if missing:
        raise InspectError(f"{where}: compile spec {spec.get('name', '?')!r} lacks {missing}")
    if type(spec["fn"]).__name__ == "InterpretedFunction" or os.environ.get("TRITON_INTERPRET") == "1":
        raise InspectError(
            "TRITON_INTERPRET=1 turns @triton.jit kernels into Python functions that cannot be compiled: "
            "run the inspector in a process without it (`python -m fastenc inspect` does this itself)"
        )


def compile_triton_spec(spec: dict, arch: Arch, source: str) -> KernelReport:
    """Compile one spec for ``arch`` and read its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    _check_spec(spec, source)
    src = _ast_source(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
    try:
        kernel = triton.compile(
            src, target=GPUTarget("cuda", arch.capability, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as e:  # a compile error names the kernel and spec, whatever Triton raised
        raise InspectError(f"{source}: compiling {spec['name']!r} for {arch.name} failed: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = parse_resource_usage(_run_cuobjdump(["--dump-resource-usage", path]), arch)
        sass = _run_cuobjdump(["-sass", path])
        tc = parse_sass_tensor_ops(sass, arch)
        count = parse_sass_instruction_counts(sass, arch)
    fname = kernel.metadata.name
    res = usage.get(fname) or next(iter(usage.values()), None)
    if res is None:
        raise InspectError(f"{source}: cuobjdump reported no function for {spec['name']!r}")
    smem = int(kernel.metadata.shared) + res.get("SHARED", 0)
    warps = int(spec["num_warps"])
    return KernelReport(
        source=source, name=spec["name"], regs=res.get("REG", 0), spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
        smem_bytes=smem, tensor_core_ops=tc.get(fname, next(iter(tc.values()), {})), num_warps=warps,
        num_stages=int(spec["num_stages"]), hot=bool(spec["hot"]),
        occupancy=occupancy(res.get("REG", 0), smem, warps, arch),
        sass_instructions=count.get(fname, next(iter(count.values()), 0)),
    )


SpecSource = Tuple[str, Callable[[], list]]  # (op or file name, function returning its compile specs)


def shipped_specs() -> List[SpecSource]:
    """(op, spec function) of every shipped Triton op, from fastenc.triton_kernels.specs."""
    from fastenc.triton_kernels.specs import COMPILE_SPECS

    return list(COMPILE_SPECS.items())


def load_module_file(path: str):
    """Import a Python file (a kernel under development) to inspect its compile_specs()."""
    name = "_fastenc_inspect_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InspectError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "compile_specs", None)):
        raise InspectError(f"{path} defines no compile_specs()")
    return mod


_PENDING: List[Tuple[str, dict]] = []  # specs handed to forked compile workers


def _compile_pending(args: Tuple[int, str]) -> KernelReport:
    i, arch = args
    source, spec = _PENDING[i]
    return compile_triton_spec(spec, get_arch(arch), source)


def inspect_triton(arch: Arch, sources: Optional[List[SpecSource]] = None,
                   jobs: Optional[int] = None) -> List[KernelReport]:
    """Compile every spec of ``sources`` (default: the shipped ones), ``jobs`` compiles at a time.

    Triton's front end holds the GIL, so parallel compiles run in forked processes.
    """
    pending = []
    for name, compile_specs in shipped_specs() if sources is None else sources:
        specs = compile_specs()
        if not specs:
            raise InspectError(f"triton:{name}: its compile specs list no kernels")
        for spec in specs:
            _check_spec(spec, f"triton:{name}")
            pending.append((f"triton:{name}", spec))
    jobs = min(jobs or os.cpu_count() or 1, len(pending))
    if jobs <= 1:
        return [compile_triton_spec(spec, arch, source) for source, spec in pending]
    import multiprocessing

    _PENDING[:] = pending
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_pending, [(i, arch.name) for i in range(len(pending))], chunksize=1)
    finally:
        _PENDING.clear()


# ----------------------------------------------------------------------------- CUDA extension


def extension_path() -> Optional[str]:
    """Path of the built fastenc._C library (found without importing it), or None."""
    spec = importlib.util.find_spec("fastenc._C")
    return spec.origin if spec is not None and spec.origin else None


def inspect_extension(arch: Arch, path: Optional[str] = None) -> List[KernelReport]:
    """Kernels of the arch's cubins inside the extension library (empty if none match)."""
    path = path or extension_path()
    if path is None:
        raise InspectError("the fastenc._C extension is not built (pip install --no-build-isolation -e .)")
    usage = parse_resource_usage(_run_cuobjdump(["--dump-resource-usage", path]), arch)
    sass = _run_cuobjdump(["-sass", path]) if usage else ""
    tc = parse_sass_tensor_ops(sass, arch)
    count = parse_sass_instruction_counts(sass, arch)
    bounds = parse_launch_bounds(_run_cuobjdump(["-elf", path]), arch) if usage else {}
    names = _demangle(usage)
    source = f"cuda:{os.path.basename(path)}"
    reports = []
    for fn, res in usage.items():
        # Occupancy needs the block size: known only for kernels declared with __launch_bounds__.
        warps = math.ceil(bounds[fn] / 32) if fn in bounds else None
        occ = None if warps is None else occupancy(res.get("REG", 0), res.get("SHARED", 0), warps, arch)
        reports.append(KernelReport(
            source=source, name=names[fn], regs=res.get("REG", 0), spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
            smem_bytes=res.get("SHARED", 0), tensor_core_ops=tc.get(fn, {}), num_warps=warps, num_stages=None,
            hot=False, occupancy=occ, sass_instructions=count.get(fn, 0),
            note="static shared memory only (dynamic shared memory is chosen at launch)"
            + ("" if warps else "; no __launch_bounds__, so no block size for occupancy"),
        ))
    return reports


# ----------------------------------------------------------------------------- report


def format_table(reports: List[KernelReport], arch: Arch) -> str:
    head = (f"{'kernel':<44} {'regs':>4} {'spill':>5} {'smem KB':>7} {'warps':>5} {'occup.':>7} {'limit':<6} "
            f"{'instr':>6} tensor cores")
    lines = [f"Kernel resources for {arch.name} (compiled ahead of time, no GPU needed)", head, "-" * len(head)]
    source = None
    for r in reports:
        if r.source != source:
            source = r.source
            lines.append(f"[{source}]")
        occ = f"{100 * r.occupancy.fraction:5.1f}%" if r.occupancy else "   n/a"
        limit = (r.occupancy.limiter if r.occupancy else "")[:6]
        tc = ", ".join(f"{k}x{v}" for k, v in sorted(r.tensor_core_ops.items())) or "none"
        name = (r.name if len(r.name) <= 42 else r.name[:39] + "...") + ("*" if r.hot else "")
        warps = str(r.num_warps) if r.num_warps else "-"
        lines.append(f"  {name:<42} {r.regs:>4} {r.spill_bytes:>5} {r.smem_bytes / 1024:>7.1f} {warps:>5} "
                     f"{occ:>7} {limit:<6} {r.sass_instructions:>6} {tc}")
    lines.append("* hot Triton kernel (its compile spec says it runs in every step). "
                 "spill = local memory bytes per thread. instr = static SASS instructions.")
    return "\n".join(lines)
