"""Build health of fastenc._C: CUDA code for every requested arch, no register spills in the
handwritten kernels.  Reads the built .so with cuobjdump (no GPU needed).

These tests skip only when the extension was deliberately built without CUDA
(FASTENC_SKIP_NATIVE=1 or FASTENC_FORCE_CPU=1 in the environment); CI builds with CUDA.
"""
import os
import re
import shutil
import subprocess

import pytest

from fastenc.backends import extension

_FLAGS = [v for v in ("FASTENC_SKIP_NATIVE", "FASTENC_FORCE_CPU")
          if os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")]
pytestmark = pytest.mark.skipif(bool(_FLAGS), reason=f"extension deliberately built without CUDA ({', '.join(_FLAGS)})")

# Name fragments of the handwritten kernels (csrc/cuda/ffn_act_*.cu).
HANDWRITTEN = ("_ffn_act_fwd_kernel", "_ffn_dact_bgrad_kernel", "_ffn_dropout_mask_kernel")


def _cuobjdump() -> str:
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.fail(f"cuobjdump not found (looked at {candidates}); install triton or set CUDA_HOME")


def _so() -> str:
    ext = extension()
    assert ext is not None, "fastenc._C is not built: pip install --no-build-isolation -e . (CI builds it with CUDA)"
    assert ext.has_cuda(), (
        "fastenc._C was built without CUDA although neither FASTENC_FORCE_CPU nor FASTENC_SKIP_NATIVE is set "
        "(nvcc/CUDA_HOME not found at build time?)"
    )
    return ext.__file__


def _run(*args) -> str:
    return subprocess.run([_cuobjdump(), *args, _so()], check=True, capture_output=True, text=True).stdout


def test_cuda_objects_for_every_arch():
    archs = extension().cuda_archs().split("_") if extension() is not None else []
    elfs = _run("--list-elf")
    assert archs, "the build recorded no CUDA archs"
    for arch in archs:
        assert re.search(rf"\.sm_{arch}\.cubin", elfs), f"no sm_{arch} cubin in {_so()}:\n{elfs}"


def _resource_usage():
    """{(arch, function): {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage.

    A function's counters follow its "Function <name>:" header, on the same or the next line.
    """
    out = _run("--dump-resource-usage")
    usage, arch, fn = {}, None, None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch, fn = m.group(1), None
        m = re.match(r"\s*Function (\S+?):", line)
        if m:
            fn = (arch, m.group(1))
            usage[fn] = {}
        if fn is not None:
            usage[fn].update((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line))
    return usage


def test_handwritten_kernels_do_not_spill():
    usage = _resource_usage()
    archs = {"sm_" + a for a in extension().cuda_archs().split("_")}
    for frag in HANDWRITTEN:
        for arch in archs:
            found = {fn: u for (a, fn), u in usage.items() if a == arch and frag in fn}
            assert found, f"kernel {frag} not found for {arch} in {_so()}"
            for fn, u in found.items():
                assert u.get("STACK", 0) == 0 and u.get("LOCAL", 0) == 0, f"{fn} ({arch}) spills: {u}"


def test_cutlass_sm90_kernels_built_when_requested():
    ext = extension()
    if "90a" not in ext.cuda_archs().split("_") or os.environ.get("FASTENC_NO_CUTLASS", "0") == "1":
        assert not ext.cutlass_sm90_built()
        return
    assert ext.cutlass_sm90_built(), "90a was built but not the CUTLASS kernels (is nvidia-cutlass installed?)"
    usage = _resource_usage()
    cutlass = [fn for (a, fn) in usage if a == "sm_90a" and "cutlass" in fn and "GemmUniversal" in fn]
    assert len(cutlass) >= 2, f"expected the CUTLASS sm90 GEMMs (plain + aux) in the sm_90a cubin, got {cutlass}"
