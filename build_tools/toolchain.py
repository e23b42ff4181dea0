"""Compiler flags of fastenc._C and where the CUDA pieces are (the environment variables: setup.py's docstring)."""
from __future__ import annotations

import glob
import os
import re

# Every environment variable that changes what the build makes: ours, where torch finds CUDA, and the compiler's
# own (MAX_JOBS only changes how fast). The rebuild stamp (build_stamp.py) records their values.
BUILD_ENV = ("FASTENC_SKIP_NATIVE", "FASTENC_FORCE_CPU", "FASTENC_CUDA_ARCHS", "FASTENC_CPU_ISA", "FASTENC_NO_CUTLASS",
             "FASTENC_CUTLASS_DIR", "FASTENC_CUTLASS_PREBUILT", "CUDA_HOME", "CUDA_PATH", "CC", "CXX", "CFLAGS",
             "CPPFLAGS", "CXXFLAGS", "LDFLAGS")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# CPU kernels (csrc/cpu/) use ATen's at::vec types, whose width is fixed at compile time by these macros
# (as torch.compile's C++ code does): FASTENC_CPU_ISA=avx512|avx2|default|auto (auto: the build machine's best).
_CPU_ISAS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"], "AVX512"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], "AVX2"),
    "default": ([], None),
}


def cpu_isa_flags():
    isa = os.environ.get("FASTENC_CPU_ISA", "auto").lower()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            have = set(f.read().split())
    except OSError:
        have = set()
    if isa == "auto":
        isa = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= have
               else "avx2" if {"avx2", "fma", "f16c"} <= have else "default")
    if isa not in _CPU_ISAS:
        raise RuntimeError(f"FASTENC_CPU_ISA={isa!r}: expected one of auto, {', '.join(_CPU_ISAS)}")
    flags, cap = _CPU_ISAS[isa]
    flags = list(flags) + ([f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] if cap else [])
    if isa == "avx512" and "avx512_bf16" in have:  # dot products on bf16 pairs (vdpbf16ps)
        flags += ["-mavx512bf16", "-DFASTENC_AVX512BF16"]
    return flags + [f"-DFASTENC_CPU_ISA={isa}"]


def cuda_archs():
    archs = os.environ.get("FASTENC_CUDA_ARCHS", "80;90a")
    return [a.replace("sm_", "").replace(".", "") for a in filter(None, re.split(r"[;, ]+", archs))]


def cuda_arch_flags():
    flags = []
    for arch in cuda_archs():
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def default_max_jobs() -> int:
    """Compile jobs: the cores, capped by memory (nvcc on template-heavy code takes ~2-4 GB per job)."""
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(os.cpu_count() or 1, int(mem_gb // 4)))


def cublas_paths(cuda_home: str):
    """(include dir, libcublasLt file) of the cuBLAS that torch uses.

    torch's pip wheels ship cuBLAS as nvidia-* wheels (nvidia/cu13/ for CUDA 13,
    nvidia/cublas/ for CUDA 12); a local toolkit has it under CUDA_HOME.
    """
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    major = torch.version.cuda.split(".")[0]
    for root in (os.path.join(site, "nvidia", f"cu{major}"), os.path.join(site, "nvidia", "cublas"), cuda_home):
        inc = os.path.join(root, "include")
        libs = sorted(glob.glob(os.path.join(root, "lib*", f"libcublasLt.so.{major}*")))
        if os.path.exists(os.path.join(inc, "cublasLt.h")) and libs:
            return inc, libs[0]
    raise RuntimeError(f"cuBLASLt {major}.x (cublasLt.h, libcublasLt.so.{major}) not found next to torch or in "
                       f"{cuda_home}; set CUDA_HOME, or FASTENC_FORCE_CPU=1 / FASTENC_SKIP_NATIVE=1")


def cuda_runtime_include(cuda_home: str):
    """["-I<toolkit include>"] for g++: torch's nvidia/cuNN/include has runtime headers without
    crt/, which g++ then finds in the toolkit (nvcc adds its own include dir itself)."""
    for inc in (os.path.join(cuda_home, "include"), os.path.join(cuda_home, "cuda", "include"), "/usr/local/cuda/include"):
        if os.path.exists(os.path.join(inc, "crt", "host_defines.h")):
            return ["-I" + inc]
    return []
