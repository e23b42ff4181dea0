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
  FASTENC_CUTLASS_PREBUILT=DIR  link the CUTLASS sm90 objects prebuilt in DIR (by
                             scripts/prebuild_cutlass.py) instead of compiling them; each object
                             is linked only if its stamp (sha256 of the object, of its .cu and
                             every header it includes from csrc/, the nvcc flags, the nvcc
                             release, the CUTLASS version where headers are installed) matches
                             this checkout; a stale one is rebuilt from source
                             (needs the CUTLASS headers; without them the build says so and goes
                             on without CUTLASS)
  MAX_JOBS                   parallel compile jobs (default: cores, capped by memory)

The CUTLASS translation units (csrc/cuda/cutlass/*.cu) are torch-free and compiled by
``build_cutlass_objects`` with ``cutlass_nvcc_flags()`` (sm_90a only), whether prebuilt or
built here (then cached under build_temp with the same stamps); the extension links the objects.

The Triton kernels in ``triton_kernels/`` install as ``fastenc.triton_kernels``: the
top-level name ``triton_kernels`` belongs to other projects (Triton, vLLM).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["fastenc", "fastenc.triton_kernels"] + ["fastenc." + p for p in find_packages("fastenc")]
PACKAGE_DIR = {"fastenc": "fastenc", "fastenc.triton_kernels": "triton_kernels"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


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


# ---------------------------------------------------------------- CUTLASS sm90 objects
# The torch-free CUTLASS translation units take ~2 min of CPU each in nvcc (far more wall time on a
# busy machine), so they can be prebuilt
# (scripts/prebuild_cutlass.py) and linked.  One source of truth for how they are compiled:
# cutlass_nvcc_flags() and build_cutlass_objects(), used by this file and the script.
CUTLASS_SOURCES = "csrc/cuda/cutlass/*.cu"
_NVCC_OPT_FLAGS = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"]
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def cutlass_nvcc_flags():
    """nvcc flags of the CUTLASS objects: sm_90a only (the kernels use wgmma/TMA), no torch defines."""
    return _NVCC_OPT_FLAGS + ["-gencode", "arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC"]


def cutlass_sources(root: str = ROOT):
    return sorted(glob.glob(os.path.join(root, CUTLASS_SOURCES)))


def nvcc_release(nvcc: str):
    """("13.0", "V13.0.88") from `nvcc --version`."""
    out = subprocess.check_output([nvcc, "--version"], text=True)
    m = re.search(r"release (\d+\.\d+), (V[\w.]+)", out)
    if not m:
        raise RuntimeError(f"cannot read the CUDA release from `{nvcc} --version`:\n{out}")
    return m.group(1), m.group(2)


def source_dependencies(source: str, root: str = ROOT):
    """The source and every file it includes with #include "..." (transitively), resolved next to
    the including file or in csrc/ (the -I of the build); <...> includes (CUDA, CUTLASS) are not ours."""
    seen, todo = [], [os.path.abspath(source)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for inc in _QUOTED_INCLUDE.findall(text):
            for base in (os.path.dirname(path), os.path.join(root, "csrc")):
                cand = os.path.normpath(os.path.join(base, inc))
                if os.path.isfile(cand):
                    todo.append(cand)
                    break
    return sorted(os.path.relpath(p, root) for p in seen)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cutlass_version(include_dirs):
    """"4.2.0" from cutlass/version.h in the first include dir that has it, else None."""
    for d in include_dirs or ():
        path = os.path.join(d, "cutlass", "version.h")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
            return ".".join(m.group(1) for m in parts) if all(parts) else None
    return None


def cutlass_stamp(source: str, nvcc_rel: str, root: str = ROOT, flags=None, cutlass_ver=None):
    """What an object of `source` was built from; compared key by key by stamp_mismatch().
    cutlass_ver is None where no CUTLASS headers are installed (a GPU image): then not compared."""
    deps = source_dependencies(source, root)
    h = hashlib.sha256()
    for rel in deps:
        h.update(rel.encode() + b"\0" + _sha256_file(os.path.join(root, rel)).encode() + b"\0")
    return {"source": os.path.relpath(os.path.abspath(source), root), "inputs": deps, "inputs_sha256": h.hexdigest(),
            "flags": list(cutlass_nvcc_flags() if flags is None else flags), "nvcc_release": nvcc_rel,
            "cutlass_version": cutlass_ver}


def object_path(out_dir: str, source: str) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".o")


def stamp_mismatch(obj: str, expected: dict):
    """None if `obj` and its `obj.stamp.json` match `expected` (a cutlass_stamp()), else why not."""
    stamp_file = obj + ".stamp.json"
    if not os.path.isfile(obj):
        return f"no object {obj}"
    if not os.path.isfile(stamp_file):
        return f"no stamp {stamp_file}"
    try:
        with open(stamp_file, encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable stamp {stamp_file}: {e}"
    if stamp.get("object_sha256") != _sha256_file(obj):
        return f"{obj} is not the object its stamp describes (modified or truncated)"
    for key, what in (("source", "source"), ("inputs_sha256", "sources"), ("flags", "nvcc flags"),
                      ("nvcc_release", "nvcc release")):
        if stamp.get(key) != expected[key]:
            if key == "inputs_sha256":
                old, new = stamp.get("inputs", []), expected["inputs"]
                detail = "; files: " + ", ".join(new) if old == new else f"; files {old} -> {new}"
                return f"{expected['source']}: its sources changed since the object was built{detail}"
            return f"{expected['source']}: {what} changed: {stamp.get(key)!r} -> {expected[key]!r}"
    if expected.get("cutlass_version") is not None and stamp.get("cutlass_version") != expected["cutlass_version"]:
        return (f"{expected['source']}: CUTLASS headers changed: {stamp.get('cutlass_version')!r} -> "
                f"{expected['cutlass_version']!r}")
    return None


def _write_stamp(obj: str, stamp: dict, extra: dict) -> None:
    data = {**stamp, **extra, "object_sha256": _sha256_file(obj)}
    tmp = obj + ".stamp.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, obj + ".stamp.json")


def build_cutlass_objects(out_dir: str, sources, include_dirs, nvcc: str, jobs: int = 2, root: str = ROOT, log=print):
    """Compile each source into out_dir/<name>.o (+ .stamp.json) unless a matching object is there;
    at most `jobs` nvcc at a time.  Returns the object paths in source order."""
    os.makedirs(out_dir, exist_ok=True)
    rel, version = nvcc_release(nvcc)
    cutlass_ver = cutlass_version(include_dirs)
    extra = {"nvcc_version": version, "cutlass_include": list(include_dirs),
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    objs, todo = [], []
    for src in sources:
        obj, stamp = object_path(out_dir, src), cutlass_stamp(src, rel, root, cutlass_ver=cutlass_ver)
        objs.append(obj)
        why = stamp_mismatch(obj, stamp)
        if why is None:
            log(f"fastenc: CUTLASS object up to date: {obj}")
        else:
            log(f"fastenc: CUTLASS object to (re)build: {why}")
            todo.append((src, obj, stamp))
    running = []

    def reap():
        for item in list(running):
            proc, src, obj, stamp, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                raise RuntimeError(f"nvcc failed on {src} (exit {proc.returncode}); command: {' '.join(proc.args)}")
            _write_stamp(obj, stamp, extra)
            log(f"fastenc: compiled {os.path.relpath(src, root)} -> {obj} in {time.time() - t0:.0f} s")

    for src, obj, stamp in todo:
        while len(running) >= max(1, jobs):
            reap()
            time.sleep(0.5)
        cmd = [nvcc, "-c", src, "-o", obj, "-I", os.path.join(root, "csrc")]
        cmd += [f for d in include_dirs for f in ("-I", d)] + cutlass_nvcc_flags()
        log(f"fastenc: {' '.join(cmd)}")
        if os.path.exists(obj + ".stamp.json"):
            os.remove(obj + ".stamp.json")  # a failed compile must not leave an old stamp next to a new object
        running.append((subprocess.Popen(cmd), src, obj, stamp, time.time()))
    while running:
        reap()
        time.sleep(0.5)
    return objs


def plan_cutlass(sources, prebuilt_dir, nvcc_rel: str, include_dirs, root: str = ROOT):
    """How to get each CUTLASS object: ({source: prebuilt object}, [sources to compile], [reasons]).
    include_dirs: the CUTLASS headers, or None where there are none.

    Raises RuntimeError (the reasons) when some object must be compiled but there are no headers."""
    cutlass_ver = cutlass_version(include_dirs)
    prebuilt, compile_, reasons = {}, [], []
    for src in sources:
        why = "FASTENC_CUTLASS_PREBUILT is not set"
        if prebuilt_dir:
            obj = object_path(prebuilt_dir, src)
            why = stamp_mismatch(obj, cutlass_stamp(src, nvcc_rel, root, cutlass_ver=cutlass_ver))
            if why is None:
                prebuilt[src] = obj
                continue
        compile_.append(src)
        reasons.append(why)
    if compile_ and include_dirs is None:
        raise RuntimeError("; ".join(reasons) + "; and no CUTLASS headers to compile from "
                           "(pip install nvidia-cutlass, or set FASTENC_CUTLASS_DIR)")
    return prebuilt, compile_, reasons


def _banner(msg: str) -> None:
    print("=" * 78 + f"\nfastenc: {msg}\n" + "=" * 78, file=sys.stderr, flush=True)


def _cutlass_plan(nvcc_rel: str):
    """(prebuilt objects, sources to compile, include dirs) of the CUTLASS sm90 kernels, or None
    (built without them; the reason is printed)."""
    if _env_flag("FASTENC_NO_CUTLASS"):
        return None
    if "90a" not in _cuda_archs():
        print("fastenc: FASTENC_CUDA_ARCHS lacks 90a: no CUTLASS sm90 kernels", flush=True)
        return None
    includes = _cutlass_includes()
    prebuilt_dir = os.environ.get("FASTENC_CUTLASS_PREBUILT")
    prebuilt_dir = os.path.abspath(prebuilt_dir) if prebuilt_dir else None
    try:
        prebuilt, to_compile, reasons = plan_cutlass(cutlass_sources(), prebuilt_dir, nvcc_rel, includes)
    except RuntimeError as e:
        _banner(f"building WITHOUT the CUTLASS sm90 kernels: {e}")
        return None
    for src, obj in prebuilt.items():
        print(f"fastenc: CUTLASS: linking prebuilt {obj}", flush=True)
    for src, why in zip(to_compile, reasons):
        print(f"fastenc: CUTLASS: compiling {os.path.relpath(src, ROOT)} from source ({why})", flush=True)
    return list(prebuilt.values()), to_compile, includes or []


def _build_ext_class(BuildExtension, cuda_home: str, cutlass):
    """BuildExtension (ninja) that first compiles the CUTLASS objects (cached with their stamps
    under build_temp/cutlass_sm90) and links them with the prebuilt ones."""
    base = BuildExtension.with_options(use_ninja=True)
    if cutlass is None:
        return base
    prebuilt, to_compile, includes = cutlass

    class _BuildExt(base):
        def build_extensions(self):
            jobs = int(os.environ.get("MAX_JOBS", "2"))
            out = os.path.join(os.path.abspath(self.build_temp), "cutlass_sm90")
            objs = prebuilt + build_cutlass_objects(out, to_compile, includes, os.path.join(cuda_home, "bin", "nvcc"),
                                                    jobs)
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objs
                ext.depends = list(ext.depends or []) + objs  # relink when an object changes
            super().build_extensions()

    return _BuildExt


def _ext_modules():
    if _env_flag("FASTENC_SKIP_NATIVE"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    if "MAX_JOBS" not in os.environ:
        # nvcc on template-heavy code takes ~2-4 GB per job.
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cutlass_cu = {os.path.relpath(s, ROOT) for s in cutlass_sources()}
    cu_sources = [s for s in sorted(glob.glob("csrc/**/*.cu", recursive=True)) if s not in cutlass_cu]
    # -fopenmp: at::parallel_for only runs in parallel under _OPENMP; libgomp.so.1 resolves to the one torch loaded.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    use_cuda = (
        not _env_flag("FASTENC_FORCE_CPU") and torch.version.cuda is not None and CUDA_HOME is not None and cu_sources
    )
    cutlass = None
    if use_cuda:
        rel, _ = nvcc_release(os.path.join(CUDA_HOME, "bin", "nvcc"))
        if rel.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise RuntimeError(
                f"nvcc at {CUDA_HOME} is CUDA {rel}, but torch was built with CUDA {torch.version.cuda}: "
                "the major versions must match (set CUDA_HOME, or FASTENC_FORCE_CPU=1 / FASTENC_SKIP_NATIVE=1)"
            )
        cublas_inc, cublaslt_lib = _cublas_paths(CUDA_HOME)
        # Archs as one preprocessor token (80_90a) so no quoting reaches ninja's shell.
        defines = ["-DFASTENC_WITH_CUDA", "-DFASTENC_CUDA_ARCHS=" + "_".join(_cuda_archs())]
        include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include"), cublas_inc]
        cutlass = _cutlass_plan(rel)
        if cutlass:
            defines.append("-DFASTENC_WITH_CUTLASS_SM90")
        # -DNDEBUG: device-side asserts in CUTLASS are calls inside the mainloop (ptxas C7510:
        # "wgmma serialized ... function call"); the same optimisation flags for every .cu.
        nvcc_flags = _NVCC_OPT_FLAGS + defines + _cuda_arch_flags()
        ext = CUDAExtension(
            "fastenc._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + cu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + defines + _cuda_runtime_include(CUDA_HOME), "nvcc": nvcc_flags},
            library_dirs=[d for d in (os.path.join(CUDA_HOME, "lib64"), "/usr/local/cuda/lib64")
                          if os.path.exists(os.path.join(d, "libcudart.so"))][:1],
            # cuBLASLt by file: torch's wheels ship only the versioned libcublasLt.so.N.
            extra_link_args=[cublaslt_lib, "-Wl,-rpath," + os.path.dirname(cublaslt_lib), "-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastenc._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    if not cpp_sources:
        return [], {}
    return [ext], {"build_ext": _build_ext_class(BuildExtension, CUDA_HOME, cutlass)}


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__; scripts/ import its helpers
    ext_modules, cmdclass = _ext_modules()

    setup(
        name="fastenc",
        version="0.1.0",
        description="Fast Transformer encoders for PyTorch: Triton attention and LayerNorm, a CUDA FFN, drop-in modules",
        packages=PACKAGES,
        package_data={"fastenc.data": ["*.tsv", "README.md"]},
        package_dir=PACKAGE_DIR,
        python_requires=">=3.10",
        install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'"],
        extras_require={
            "test": ["pytest", "pytest-benchmark"],
            # onnx + onnxruntime: the CPU main job's ONNX Runtime peer (skipped with the reason without them)
            "bench": ["matplotlib", "tqdm", "pytest-benchmark", "onnx", "onnxruntime"],
            "hf": ["transformers"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={"console_scripts": ["fastenc=fastenc.__main__:main"]},
    )
