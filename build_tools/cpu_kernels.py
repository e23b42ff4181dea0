"""Run-time CPU dispatch, build side: each C++ CPU kernel file is compiled once per x86 capability.

As ATen's DispatchStub: a kernel file (``csrc/<op>/cpu/*.cpp``, listed in KERNEL_SOURCES) is compiled once per
capability of the build, with that capability's ``-m`` flags and ``-DCPU_CAPABILITY=<NAME>``, into its own
namespace ``fastenc::cpu::<NAME>``, and fills one constant table of function pointers there; at run time the
extension takes, per table, the highest variant that the CPU runs and ``FASTENC_CPU_CAPABILITY`` allows
(``csrc/common/cpu_kernels.h``). Every other source is compiled once, for the baseline x86-64: it contains no
vector code, and it is linked before the kernel objects so that the C++ inline functions both share resolve to
the baseline copy (``tests/test_build.py`` disassembles the extension to check that no wider instruction
leaked out of the kernel namespaces).

A new kernel file joins by: its code in ``namespace fastenc::cpu::CPU_CAPABILITY``, a table type
declared in its op's header with ``FASTENC_DECLARE_CPU_KERNELS``, ``FASTENC_DEFINE_CPU_KERNELS`` at its end, and
a line in KERNEL_SOURCES giving the lowest and highest capability it is built for (the highest one whose flags
change its code: say, ``amx`` for an AMX GEMM, with ``avx512_vnni`` as its lowest if it has no code below VNNI).

FASTENC_CPU_CAPABILITIES (default ``avx2;avx512;avx512_bf16;amx`` on x86-64, ``default`` elsewhere) lists the
capabilities of the build (``native``: this machine's highest one, for a quick local build); a file is compiled for each of them clamped to its range, and the ones its compiler
lacks flags for are left out (said in one line).
"""
from __future__ import annotations

import functools
import os
import platform
import re
import shlex
import shutil
import subprocess

from .files import ninja_path, write_if_changed

# Lowest first; each implies every one before it (what the CPU must have to run its objects).
CAPABILITIES = ("default", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
_ADDED_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "avx512_vnni": ["-mavx512vnni"],
    "avx512_bf16": ["-mavx512bf16"],
    "amx": ["-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
# ATen's capability macro of each, which fixes at::vec's vector width.
_ATEN_CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512", "avx512_vnni": "AVX512",
                    "avx512_bf16": "AVX512", "amx": "AVX512"}

# Each kernel source and the (lowest, highest) capability it is compiled for.
KERNEL_SOURCES = {
    "csrc/attention/cpu/flash_fwd.cpp": ("default", "avx512_bf16"),  # bf16 pair dot products (vdpbf16ps)
    "csrc/attention/cpu/flash_bwd.cpp": ("default", "avx512_bf16"),  # rounds rotated rows as the bf16 forward
    "csrc/embeddings/cpu/embeddings.cpp": ("default", "avx512_bf16"),  # vcvtneps2bf16 (common/vec_io.h)
    "csrc/layer_norm/cpu/layer_norm.cpp": ("default", "avx512_bf16"),  # vcvtneps2bf16 (common/vec_io.h)
    "csrc/ffn/cpu/act_dropout.cpp": ("default", "avx512"),
    "csrc/linear/cpu/int8_quantize.cpp": ("default", "avx512"),
}

_DEFAULT_X86 = "avx2;avx512;avx512_bf16;amx"

# oneDNN's cap of each (ONEDNN_MAX_CPU_ISA), so a capped test run caps torch's GEMMs too.
ONEDNN_MAX_CPU_ISA = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI",
                      "avx512_bf16": "AVX512_CORE_BF16", "amx": "AVX512_CORE_AMX"}


def rank(cap: str) -> int:
    return CAPABILITIES.index(cap)


def capability_flags(cap: str) -> list:
    """Compiler flags of a kernel object for `cap`: the -m flags of it and every capability below, its namespace
    (CPU_CAPABILITY), ATen's vector width, and FASTENC_CPU_<C> for each C from avx2 up to it."""
    flags = [f for c in CAPABILITIES[: rank(cap) + 1] for f in _ADDED_FLAGS[c]]
    flags += [f"-DCPU_CAPABILITY={cap.upper()}", f"-DCPU_CAPABILITY_{_ATEN_CAPABILITY[cap]}"]
    return flags + [f"-DFASTENC_CPU_{c.upper()}" for c in CAPABILITIES[1: rank(cap) + 1]]


@functools.lru_cache(maxsize=None)
def compiler_has_flags(cxx: str, flags: tuple) -> bool:
    """Whether `cxx` compiles an empty file with these flags."""
    try:
        out = subprocess.run(shlex.split(cxx) + ["-x", "c++", "-c", "-o", os.devnull, *flags, "-"], input="int x;\n",
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


# /proc/cpuinfo flags each capability needs (on top of the ones below it).
_CPUINFO_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
                  "avx512_vnni": {"avx512_vnni"}, "avx512_bf16": {"avx512_bf16"},
                  "amx": {"amx_tile", "amx_bf16", "amx_int8"}}


def native_capability(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The highest capability this machine's CPU has, from the kernel's flags (``default`` where none can be read:
    not Linux, not x86-64)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        line = ""
    flags, best = set(line.partition(":")[2].split()), "default"
    for cap in CAPABILITIES[1:]:
        if not _CPUINFO_FLAGS[cap] <= flags:
            break
        best = cap
    return best


def requested_capabilities() -> list:
    """FASTENC_CPU_CAPABILITIES as a list (lowest first), checked; ``native``: this machine's highest capability
    only (a quick local build, whose kernels run on this CPU and the ones that have all it has)."""
    default = _DEFAULT_X86 if platform.machine().lower() in ("x86_64", "amd64") else "default"
    caps = [c.lower() for c in re.split(r"[;, ]+", os.environ.get("FASTENC_CPU_CAPABILITIES", default)) if c]
    caps = [native_capability() if c == "native" else c for c in caps]
    bad = [c for c in caps if c not in CAPABILITIES]
    if bad or not caps:
        raise RuntimeError(f"FASTENC_CPU_CAPABILITIES={os.environ.get('FASTENC_CPU_CAPABILITIES')!r}: expected "
                           f"native or a ';'-separated list of {', '.join(CAPABILITIES)}")
    return sorted(set(caps), key=rank)


def build_capabilities(cxx: str | None = None, log=None) -> list:
    """The requested capabilities the compiler has flags for; the others are left out, said once through log."""
    cxx = cxx or os.environ.get("CXX", "c++")
    caps, missing = [], []
    for cap in requested_capabilities():
        (caps if compiler_has_flags(cxx, tuple(capability_flags(cap))) else missing).append(cap)
    if missing and log is not None:
        log(f"fastenc: {cxx} has no flags for the CPU capabilities {', '.join(missing)}: their kernels are not built")
    if not caps:
        raise RuntimeError(f"{cxx} compiles none of the CPU capabilities {requested_capabilities()}")
    return caps


def plan(caps, sources=None) -> list:
    """[(source, capability)] of the kernel objects: each source at each build capability clamped to its range
    (none below its lowest), lowest capability first (the link order)."""
    out = set()
    for src, (lo, hi) in (sources or KERNEL_SOURCES).items():
        for cap in caps:
            if rank(cap) >= rank(lo):
                out.add((src, CAPABILITIES[min(rank(cap), rank(hi))]))
    return sorted(out, key=lambda sc: (rank(sc[1]), sc[0]))


def object_path(out_dir: str, source: str, cap: str) -> str:
    rel = os.path.splitext(os.path.relpath(source, "csrc"))[0]
    return os.path.join(out_dir, cap, rel + ".o")


def write_ninja(out_dir: str, objects, cxx: str, cflags, post_cflags, root: str) -> str:
    """out_dir/build.ninja compiling each (source, capability) as torch's extension build compiles a source
    (cflags before -c, post_cflags after), plus the capability's flags; header dependencies through depfiles."""
    q = " ".join
    lines = ["ninja_required_version = 1.3", f"cxx = {cxx}", f"cflags = {q(shlex.quote(f) for f in cflags)}",
             f"post_cflags = {q(shlex.quote(f) for f in post_cflags)}", "",
             "rule compile", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out $post_cflags $cap_flags",
             "  depfile = $out.d", "  deps = gcc", ""]
    for src, cap in objects:
        obj = object_path(out_dir, src, cap)
        lines += [f"build {ninja_path(obj)}: compile {ninja_path(os.path.join(root, src))}",
                  f"  cap_flags = {q(shlex.quote(f) for f in capability_flags(cap))}"]
    return write_if_changed(os.path.join(out_dir, "build.ninja"), "\n".join(lines) + "\n")


def start_objects(out_dir: str, objects, cxx: str, cflags, post_cflags, jobs: int, root: str):
    """Starts ninja on the kernel objects (it compiles only the stale ones); returns (the process, the objects'
    paths in link order): wait() for it before they are linked."""
    write_ninja(out_dir, objects, cxx, cflags, post_cflags, root)
    ninja = shutil.which("ninja") or "ninja"
    return (subprocess.Popen([ninja, "-C", out_dir, "-j", str(max(1, jobs))]),
            [object_path(out_dir, src, cap) for src, cap in objects])


def dispatch_levels(report: dict) -> list:
    """The capabilities at which the built extension's kernels change and every kernel table has a variant
    (``fastenc._C.cpu_capability()`` is `report`): from the lowest such one, those a table was compiled for and those
    gating a kernel chosen in baseline code (a native build compiles each table for one capability only)."""
    tables = [k["compiled"] for k in report["kernels"].values()]
    lowest = max((min(rank(c) for c in t) for t in tables if t), default=len(CAPABILITIES))
    compiled = {c for t in tables for c in t}
    return [c for c in CAPABILITIES if rank(c) >= lowest and (c in compiled or c in report["gated"])]


def lower_capabilities(report: dict) -> list:
    """The dispatch levels below the one in use: what this CPU can also run, each a capped test run of its own."""
    return [c for c in dispatch_levels(report) if rank(c) < rank(report["selected"])]


def main(argv) -> int:
    if argv == ["plan"]:  # the objects this machine's build compiles
        for src, cap in plan(build_capabilities(log=print)):
            print(f"{cap:<12} {src}")
        return 0
    if argv == ["lower"]:  # "capability ONEDNN_MAX_CPU_ISA" lines for the capped test runs (scripts/run.sh)
        import fastenc._C as ext

        for cap in lower_capabilities(ext.cpu_capability()):
            print(cap, ONEDNN_MAX_CPU_ISA[cap])
        return 0
    print("usage: python -m build_tools.cpu_kernels plan|lower")
    return 2


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
