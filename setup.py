"""Build the fastenc._C extension (metadata: pyproject.toml; helpers: build_tools/).

Install with the torch already in the environment (never a second one in an isolated build environment):

    pip install --no-build-isolation -e .

Environment variables (the README's "Build options"):
  FASTENC_SKIP_NATIVE=1      build no extension (reference and Triton paths still work)
  FASTENC_FORCE_CPU=1        build fastenc._C without its CUDA part even when nvcc is found
  FASTENC_CUDA_ARCHS="80;90a" CUDA architectures to compile (default sm_80 and sm_90a); the
                             CUTLASS sm90 FFN kernels are built only when 90a is listed
  FASTENC_CPU_CAPABILITIES="avx2;avx512;avx512_bf16;amx"  the x86 capabilities the CPU kernels are compiled for (the
                             default; "default" elsewhere), one object each, chosen at run time (build_tools/cpu_kernels.py;
                             the run-time cap: FASTENC_CPU_CAPABILITY)
  FASTENC_CUTLASS_DIR=...    CUTLASS checkout (its include/ and tools/util/include/); default:
                             the headers of the ``nvidia-cutlass`` wheel (cutlass_library)
  FASTENC_NO_CUTLASS=1       build without the CUTLASS kernels (the FFN uses cuBLASLt / unfused)
  FASTENC_CUTLASS_PREBUILT=DIR  link the CUTLASS sm90 objects prebuilt in DIR (scripts/prebuild_cutlass.py)
                             when their stamps match this checkout; a stale one is rebuilt from source
                             (needs the CUTLASS headers; without them the build says so and goes on without CUTLASS)
  FASTENC_DEBUG_INFO=1       keep debug information (-g; the default build has none: half the compile time)
  MAX_JOBS                   parallel compile jobs (default: cores, capped by memory)

Objects live in build/ext-<python>-<torch>/ (ignored), so ninja recompiles only what changed (a header, a flag)
and the CUTLASS objects are cached there with their stamps (build_tools/cutlass_objects.py), the CPU kernel objects
in cpu_kernels/<capability>/.  Without a CUDA toolkit (and without a GPU) the build is CPU-only and says so.
"""
from __future__ import annotations

import glob
import os
import sys

import setuptools
from setuptools import find_packages, setup

if int(setuptools.__version__.split(".")[0]) < 77:  # else an obscure error from pyproject.toml's validation
    raise RuntimeError(f"setuptools {setuptools.__version__}: pyproject.toml's SPDX licence needs setuptools>=77")
ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # setuptools' PEP 517 backend runs this file without its folder on sys.path

from build_tools import constants_header, cpu_kernels, precompiled_header  # noqa: E402
from build_tools import cutlass_objects as cutlass  # noqa: E402
from build_tools.toolchain import (  # noqa: E402
    cublas_paths, cuda_arch_flags, cuda_archs, cuda_runtime_include, default_max_jobs, env_flag,
)

# The package layout lives here, not in pyproject.toml: the Triton kernels of the top-level triton_kernels/
# install as fastenc.triton_kernels (the name triton_kernels belongs to Triton and vLLM), beside find_packages.
PACKAGES = ["fastenc", "fastenc.triton_kernels"] + ["fastenc." + p for p in find_packages("fastenc")]
PACKAGE_DIR = {"fastenc": "fastenc", "fastenc.triton_kernels": "triton_kernels"}
PACKAGE_DATA = {"fastenc.data": ["*"]}  # every file in fastenc/data/ (data sets, their README)


def build_temp_dir(torch_version: str) -> str:
    """The persistent object folder of this Python and torch (pip's editable build otherwise gets a fresh one)."""
    return os.path.join(ROOT, "build", f"ext-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}")


def _build_ext_class(BuildExtension, nvcc: str, cutlass_plan, kernel_plan):
    """BuildExtension (ninja) compiling in build_temp_dir(), with fastenc_constants.h generated under it (generated/,
    from fastenc/constants.py), after the CUTLASS objects (cached with their stamps under it in cutlass_sm90/),
    which it links with the prebuilt ones; and the CPU kernel objects, one per (kernel file, capability) in
    kernel_plan, compiled under it in cpu_kernels/ with the extension's own flags (build_tools/cpu_kernels.py) and
    linked after the extension's objects."""
    import torch
    from torch.utils.cpp_extension import get_cxx_compiler

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            if os.access(ROOT, os.W_OK):
                self.build_temp = build_temp_dir(torch.__version__)
            self.force = True  # ninja decides what to recompile; setuptools' own check ignores headers and flags
            generated = os.path.join(os.path.abspath(self.build_temp), "generated")
            constants_header.write_header(generated)
            for ext in self.extensions:
                ext.include_dirs = list(ext.include_dirs) + [generated]
            if cutlass_plan is not None:
                prebuilt, to_compile, includes = cutlass_plan
                objs = prebuilt + cutlass.build_cutlass_objects(
                    os.path.join(os.path.abspath(self.build_temp), "cutlass_sm90"), to_compile, includes, nvcc,
                    int(os.environ["MAX_JOBS"]))
                for ext in self.extensions:
                    ext.extra_objects = list(ext.extra_objects or []) + objs
            super().build_extensions()

        def build_extension(self, ext):
            # Called by BuildExtension after it added its flags to ext: the kernel objects get the same ones.
            cxx_args = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            includes = [f"-I{d}" for d in list(ext.include_dirs) + list(self.compiler.include_dirs)]
            temp = os.path.abspath(self.build_temp)
            cflags = self.compiler.compiler_so[1:] + includes
            # Three ninjas at once, so that no core idles at one's tail: the precompiled header (the binding
            # sources wait for it), the kernel objects (the link waits for them) and torch's, of the other sources.
            pch = precompiled_header.start(os.path.join(temp, "generated"), os.path.join(temp, "pch"),
                                           get_cxx_compiler(), cflags, cxx_args)
            kernels, objs = cpu_kernels.start_objects(os.path.join(temp, "cpu_kernels"), kernel_plan,
                                                      get_cxx_compiler(), cflags, cxx_args,
                                                      int(os.environ["MAX_JOBS"]), ROOT)
            if pch is not None and pch.wait() != 0:
                kernels.wait()
                raise RuntimeError("fastenc: compiling the precompiled torch/extension.h failed (see above)")
            ext.extra_objects = list(ext.extra_objects or []) + objs
            link = self.compiler.link_shared_object

            def link_after_kernels(*args, **kwargs):
                if kernels.wait() != 0:
                    raise RuntimeError("fastenc: compiling the CPU kernel objects failed (see above)")
                return link(*args, **kwargs)
            self.compiler.link_shared_object = link_after_kernels
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                kernels.wait()  # a failed compile of the other sources: no ninja left running

    return BuildExt


def _ext_modules():
    # Baseline sources (compiled once, no -m flags) and the CPU kernel files (compiled per capability).
    cpp_sources = sorted(s for s in glob.glob("csrc/**/*.cpp", recursive=True)
                         if "/cuda/" not in s and s not in cpu_kernels.KERNEL_SOURCES)
    if env_flag("FASTENC_SKIP_NATIVE") or not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    try:  # the ninja of the build requirements before any other on PATH: ninjas of other versions discard the log
        import ninja  # of build/ (its .ninja_log) and recompile everything

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cutlass_cu = {os.path.relpath(s, ROOT) for s in cutlass.cutlass_sources()}
    cu_sources = [s for s in sorted(glob.glob("csrc/**/*.cu", recursive=True)) if s not in cutlass_cu]
    # -fopenmp: at::parallel_for only runs in parallel under _OPENMP; libgomp.so.1 resolves to the one torch loaded.
    # -g0: no debug information (Python's CFLAGS bring -g): it doubles the compile time and the size of the
    # extension; FASTENC_DEBUG_INFO=1 keeps it.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"] + ([] if env_flag("FASTENC_DEBUG_INFO") else ["-g0"])
    kernel_plan = cpu_kernels.plan(cpu_kernels.build_capabilities(log=print))
    use_cuda = not env_flag("FASTENC_FORCE_CPU") and torch.version.cuda is not None and CUDA_HOME is not None
    if not (use_cuda and cu_sources):
        if not env_flag("FASTENC_FORCE_CPU"):
            gpu = torch.cuda.is_available()
            why = ("this torch has no CUDA" if torch.version.cuda is None else
                   f"no CUDA toolkit (nvcc) found{', although a GPU is present' if gpu else ''}: set CUDA_HOME to "
                   "build the CUDA kernels")
            print(f"fastenc: building fastenc._C without its CUDA part ({why})", flush=True)
        ext = CppExtension("fastenc._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": _build_ext_class(BuildExtension, "", None, kernel_plan)}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    rel, _ = cutlass.nvcc_release(nvcc)
    if rel.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise RuntimeError(
            f"nvcc at {CUDA_HOME} is CUDA {rel}, but torch was built with CUDA {torch.version.cuda}: "
            "the major versions must match (set CUDA_HOME, or FASTENC_FORCE_CPU=1 / FASTENC_SKIP_NATIVE=1)"
        )
    cublas_inc, cublaslt_lib = cublas_paths(CUDA_HOME)
    # Archs as one preprocessor token (80_90a) so no quoting reaches ninja's shell.
    defines = ["-DFASTENC_WITH_CUDA", "-DFASTENC_CUDA_ARCHS=" + "_".join(cuda_archs())]
    cutlass_plan = cutlass.cutlass_plan(rel)
    if cutlass_plan:
        defines.append("-DFASTENC_WITH_CUTLASS_SM90")
    # -DNDEBUG: device-side asserts in CUTLASS are calls inside the mainloop (ptxas C7510:
    # "wgmma serialized ... function call"); the same optimisation flags for every .cu.
    nvcc_flags = cutlass.NVCC_OPT_FLAGS + defines + cuda_arch_flags()
    ext = CUDAExtension(
        "fastenc._C",
        cpp_sources + sorted(glob.glob("csrc/**/cuda/*.cpp", recursive=True)) + cu_sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include"), cublas_inc],
        extra_compile_args={"cxx": cxx_flags + defines + cuda_runtime_include(CUDA_HOME), "nvcc": nvcc_flags},
        library_dirs=[d for d in (os.path.join(CUDA_HOME, "lib64"), "/usr/local/cuda/lib64")
                      if os.path.exists(os.path.join(d, "libcudart.so"))][:1],
        # cuBLASLt by file: torch's wheels ship only the versioned libcublasLt.so.N.
        extra_link_args=[cublaslt_lib, "-Wl,-rpath," + os.path.dirname(cublaslt_lib), "-fopenmp"],
    )
    return [ext], {"build_ext": _build_ext_class(BuildExtension, nvcc, cutlass_plan, kernel_plan)}


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__
    ext_modules, cmdclass = _ext_modules()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
          cmdclass=cmdclass)
