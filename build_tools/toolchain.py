"""Compiler flags of fastenc._C and where the CUDA pieces are (the environment variables: setup.py's docstring)."""
from __future__ import annotations

import glob
import os
import re

# Every environment variable that changes what the build makes: ours, where torch finds CUDA, and the compiler's
# own (MAX_JOBS only changes how fast). The rebuild stamp (build_stamp.py) records their values.
BUILD_ENV = ("FASTENC_SKIP_NATIVE", "FASTENC_FORCE_CPU", "FASTENC_CUDA_ARCHS", "FASTENC_CPU_CAPABILITIES", "FASTENC_NO_CUTLASS",
             "FASTENC_DEBUG_INFO", "FASTENC_CUTLASS_DIR", "FASTENC_CUTLASS_PREBUILT", "CUDA_HOME", "CUDA_PATH", "CC", "CXX", "CFLAGS",
             "CPPFLAGS", "CXXFLAGS", "LDFLAGS")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


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
