"""Build and install fastenc.

Install with the torch already in the environment (never a second one in an
isolated build environment):

    pip install --no-build-isolation -e .

Environment variables:
  FASTENC_SKIP_NATIVE=1      build no extension (reference and Triton paths still work)
  FASTENC_FORCE_CPU=1        build fastenc._C without its CUDA part even when nvcc is found
  FASTENC_CUDA_ARCHS="80;90a" CUDA architectures to compile (default sm_80 and sm_90a); the
                             CUTLASS sm90 FFN kernels are built only when 90a is listed
  FASTENC_CUTLASS_DIR=...    CUTLASS checkout (its include/ and tools/util/include/); default:
                             the headers of the ``nvidia-cutlass`` wheel (cutlass_library)
  FASTENC_NO_CUTLASS=1       build without the CUTLASS kernels (the FFN uses cuBLASLt / unfused)
  MAX_JOBS                   parallel compile jobs (default: cores, capped by memory)

The Triton kernels in ``triton_kernels/`` install as ``fastenc.triton_kernels``: the
top-level name ``triton_kernels`` belongs to other projects (Triton, vLLM).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["fastenc", "fastenc.triton_kernels"] + ["fastenc." + p for p in find_packages("fastenc")]
PACKAGE_DIR = {"fastenc": "fastenc", "fastenc.triton_kernels": "triton_kernels"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_version(cuda_home: str):
    out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_archs():
    archs = os.environ.get("FASTENC_CUDA_ARCHS", "80;90a")
    return [a.replace("sm_", "").replace(".", "") for a in filter(None, re.split(r"[;, ]+", archs))]


def _cuda_arch_flags():
    flags = []
    for arch in _cuda_archs():
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _cublas_paths(cuda_home: str):
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


def _cuda_runtime_include(cuda_home: str):
    """["-I<toolkit include>"] for g++: torch's nvidia/cuNN/include has runtime headers without
    crt/, which g++ then finds in the toolkit (nvcc adds its own include dir itself)."""
    for inc in (os.path.join(cuda_home, "include"), os.path.join(cuda_home, "cuda", "include"), "/usr/local/cuda/include"):
        if os.path.exists(os.path.join(inc, "crt", "host_defines.h")):
            return ["-I" + inc]
    return []


def _cutlass_includes():
    """CUTLASS 3.x include dirs (FASTENC_CUTLASS_DIR, else the nvidia-cutlass wheel), or None."""
    root = os.environ.get("FASTENC_CUTLASS_DIR")
    if root:
        dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    else:
        try:
            import cutlass_library
        except ImportError:
            return None
        src = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
        dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
    return dirs if os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")) else None


def _ext_modules():
    if _env_flag("FASTENC_SKIP_NATIVE"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    if "MAX_JOBS" not in os.environ:
        # nvcc on template-heavy code takes ~2-4 GB per job.
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cutlass_sources = sorted(glob.glob("csrc/cuda/cutlass/*.cu"))
    cxx_flags = ["-O3", "-std=c++20"]
    use_cuda = (
        not _env_flag("FASTENC_FORCE_CPU") and torch.version.cuda is not None and CUDA_HOME is not None and cu_sources
    )
    if use_cuda:
        nvcc = _nvcc_version(CUDA_HOME)
        torch_major = int(torch.version.cuda.split(".")[0])
        if nvcc is None or nvcc[0] != torch_major:
            raise RuntimeError(
                f"nvcc at {CUDA_HOME} is CUDA {nvcc}, but torch was built with CUDA {torch.version.cuda}: "
                "the major versions must match (set CUDA_HOME, or FASTENC_FORCE_CPU=1 / FASTENC_SKIP_NATIVE=1)"
            )
        cublas_inc, cublaslt_lib = _cublas_paths(CUDA_HOME)
        # Archs as one preprocessor token (80_90a) so no quoting reaches ninja's shell.
        defines = ["-DFASTENC_WITH_CUDA", "-DFASTENC_CUDA_ARCHS=" + "_".join(_cuda_archs())]
        include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include"), cublas_inc]
        cutlass = None if _env_flag("FASTENC_NO_CUTLASS") or "90a" not in _cuda_archs() else _cutlass_includes()
        if cutlass:
            defines.append("-DFASTENC_WITH_CUTLASS_SM90")
            include_dirs += cutlass
        else:
            cu_sources = [s for s in cu_sources if s not in cutlass_sources]
        # -DNDEBUG: device-side asserts in CUTLASS are calls inside the mainloop (ptxas C7510:
        # "wgmma serialized ... function call").
        nvcc_flags = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo"]
        nvcc_flags += defines + _cuda_arch_flags()
        ext = CUDAExtension(
            "fastenc._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + defines + _cuda_runtime_include(CUDA_HOME), "nvcc": nvcc_flags},
            library_dirs=[d for d in (os.path.join(CUDA_HOME, "lib64"), "/usr/local/cuda/lib64")
                          if os.path.exists(os.path.join(d, "libcudart.so"))][:1],
            # cuBLASLt by file: torch's wheels ship only the versioned libcublasLt.so.N.
            extra_link_args=[cublaslt_lib, "-Wl,-rpath," + os.path.dirname(cublaslt_lib)],
        )
    else:
        ext = CppExtension(
            "fastenc._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    if not cpp_sources:
        return [], {}
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="fastenc",
    version="0.1.0",
    description="Fast Transformer encoders for PyTorch: Triton attention and LayerNorm, a CUDA FFN, drop-in modules",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
        "hf": ["transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastenc=fastenc.__main__:main"]},
)
