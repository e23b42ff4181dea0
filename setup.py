"""Build and install fastenc.

Install with the torch already in the environment (never a second one in an
isolated build environment):

    pip install --no-build-isolation -e .

Environment variables:
  FASTENC_SKIP_NATIVE=1      build no extension (reference and Triton paths still work)
  FASTENC_FORCE_CPU=1        build fastenc._C without its CUDA part even when nvcc is found
  FASTENC_CUDA_ARCHS="80;90a" CUDA architectures to compile (default sm_80 and sm_90a)
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


def _cuda_arch_flags():
    archs = os.environ.get("FASTENC_CUDA_ARCHS", "80;90a")
    flags = []
    for arch in filter(None, re.split(r"[;, ]+", archs)):
        arch = arch.replace("sm_", "").replace(".", "")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


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
    cxx_flags = ["-O3", "-std=c++17"]
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
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo",
                      "-DFASTENC_WITH_CUDA"] + _cuda_arch_flags()
        ext = CUDAExtension(
            "fastenc._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags + ["-DFASTENC_WITH_CUDA"], "nvcc": nvcc_flags},
            libraries=["cublasLt", "cublas"],
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
