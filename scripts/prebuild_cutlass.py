"""Prebuild the torch-free CUTLASS sm90 objects so a GPU session links them instead of spending
~6 min of nvcc per kernel (and so a GPU image without CUTLASS headers still gets the kernels).

    python scripts/prebuild_cutlass.py                  # -> .prebuilt/cutlass/*.o + *.o.stamp.json
    python scripts/prebuild_cutlass.py --out DIR --jobs 2

No GPU and no torch needed: nvcc (the GPU machine's CUDA release, e.g. 13.0) and the CUTLASS
headers (the nvidia-cutlass wheel or FASTENC_CUTLASS_DIR).  Flags, stamps and the compile
itself come from build_tools/cutlass_objects.py (cutlass_nvcc_flags, build_cutlass_objects), as in
setup.py, so an object built here is what `pip install -e .` would build.  Up-to-date objects are kept.  Then build the extension
with FASTENC_CUTLASS_PREBUILT=DIR (benchmarks/gpu_suite.sh does when .prebuilt/cutlass exists).
"""
import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # build_tools/ (not installed) from any working directory

from build_tools import cutlass_objects  # noqa: E402


def _nvcc() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"prebuild_cutlass: nvcc not found (looked at {cands}); set CUDA_HOME")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, ".prebuilt", "cutlass"), help="object folder")
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at a time (~3 GB each)")
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)")
    args = parser.parse_args(argv)

    includes = cutlass_objects.cutlass_includes()
    if includes is None:
        sys.exit("prebuild_cutlass: no CUTLASS headers (pip install nvidia-cutlass, or set FASTENC_CUTLASS_DIR)")
    nvcc = args.nvcc or _nvcc()
    rel, version = cutlass_objects.nvcc_release(nvcc)
    print(f"prebuild_cutlass: nvcc {version} (release {rel}) at {nvcc}; CUTLASS headers {includes[0]}")
    t0 = time.time()
    objs = cutlass_objects.build_cutlass_objects(os.path.abspath(args.out), cutlass_objects.cutlass_sources(),
                                                 includes, nvcc, args.jobs)
    print(f"prebuild_cutlass: {len(objs)} objects in {os.path.abspath(args.out)} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
