"""Build health of fastenc._C: CUDA code for every requested arch, no register spills in the
handwritten kernels.  Reads the built .so with cuobjdump (no GPU needed).  Also the stamps that
keep a stale prebuilt CUTLASS object from being linked (setup.py's helpers, no nvcc run).

The .so tests skip only when the extension was deliberately built without CUDA
(FASTENC_SKIP_NATIVE=1 or FASTENC_FORCE_CPU=1 in the environment); CI builds with CUDA.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess

import pytest

from fastenc.backends import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS = [v for v in ("FASTENC_SKIP_NATIVE", "FASTENC_FORCE_CPU")
          if os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")]
needs_cuda_build = pytest.mark.skipif(bool(_FLAGS),
                                      reason=f"extension deliberately built without CUDA ({', '.join(_FLAGS)})")

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


@needs_cuda_build
def test_cuda_objects_for_every_arch():
    # The ELF headers name the arch exactly; --list-elf file names do not (CUDA 12.8's cuobjdump,
    # Triton 3.6's, calls an sm_90a cubin "x.sm_90.cubin").
    archs = extension().cuda_archs().split("_") if extension() is not None else []
    assert archs, "the build recorded no CUDA archs"
    built = {arch for arch, _ in _resource_usage()}
    for arch in archs:
        assert f"sm_{arch}" in built, f"no sm_{arch} cubin in {_so()}: {sorted(built)}"


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


@needs_cuda_build
def test_handwritten_kernels_do_not_spill():
    usage = _resource_usage()
    archs = {"sm_" + a for a in extension().cuda_archs().split("_")}
    for frag in HANDWRITTEN:
        for arch in archs:
            found = {fn: u for (a, fn), u in usage.items() if a == arch and frag in fn}
            assert found, f"kernel {frag} not found for {arch} in {_so()}"
            for fn, u in found.items():
                assert u.get("STACK", 0) == 0 and u.get("LOCAL", 0) == 0, f"{fn} ({arch}) spills: {u}"


@needs_cuda_build
def test_cutlass_sm90_kernels_built_when_requested():
    ext = extension()
    if "90a" not in ext.cuda_archs().split("_") or os.environ.get("FASTENC_NO_CUTLASS", "0") == "1":
        assert not ext.cutlass_sm90_built()
        return
    assert ext.cutlass_sm90_built(), "90a was built but not the CUTLASS kernels (is nvidia-cutlass installed?)"
    usage = _resource_usage()
    cutlass = [fn for (a, fn) in usage if a == "sm_90a" and "cutlass" in fn and "GemmUniversal" in fn]
    assert len(cutlass) >= 2, f"expected the CUTLASS sm90 GEMMs (plain + aux) in the sm_90a cubin, got {cutlass}"



# ---------------------------------------------------------------- prebuilt CUTLASS objects
@pytest.fixture(scope="module")
def setup_py():
    """setup.py's helpers (imported, not run: its setup() call is under __main__)."""
    spec = importlib.util.spec_from_file_location("fastenc_setup_under_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path):
    """A tiny source tree shaped like csrc/: a .cu including a header that includes another."""
    cut = tmp_path / "csrc" / "cuda" / "cutlass"
    cut.mkdir(parents=True)
    (tmp_path / "csrc" / "common.h").write_text("#pragma once\n#include <cuda_runtime_api.h>\n")
    (cut / "k.cuh").write_text('#pragma once\n#include "common.h"\n#include <cutlass/cutlass.h>\n')
    (cut / "k.cu").write_text('  #  include "cuda/cutlass/k.cuh"\nint f() { return 1; }\n')
    (cut / "other.cuh").write_text("// not included by k.cu\n")
    return tmp_path


def _prebuild(setup_py, tree, out, nvcc_rel="13.0"):
    """Stand-in for build_cutlass_objects' output: an object and its stamp, no nvcc."""
    src = str(tree / "csrc" / "cuda" / "cutlass" / "k.cu")
    obj = setup_py.object_path(str(out), src)
    os.makedirs(out, exist_ok=True)
    with open(obj, "wb") as f:
        f.write(os.urandom(256))
    setup_py._write_stamp(obj, setup_py.cutlass_stamp(src, nvcc_rel, root=str(tree)), {"nvcc_version": "V" + nvcc_rel})
    return src, obj


def test_dependencies_follow_quoted_includes(setup_py, tree):
    deps = setup_py.source_dependencies(str(tree / "csrc/cuda/cutlass/k.cu"), root=str(tree))
    assert deps == ["csrc/common.h", "csrc/cuda/cutlass/k.cu", "csrc/cuda/cutlass/k.cuh"]


def test_fresh_stamp_matches(setup_py, tree, tmp_path):
    src, obj = _prebuild(setup_py, tree, tmp_path / "pre")
    assert setup_py.stamp_mismatch(obj, setup_py.cutlass_stamp(src, "13.0", root=str(tree))) is None
    stamp = json.loads(open(obj + ".stamp.json").read())
    assert stamp["flags"] == setup_py.cutlass_nvcc_flags() and stamp["nvcc_release"] == "13.0"


@pytest.mark.parametrize("change, why", [
    ("header", r"sources changed.*csrc/common\.h"),
    ("source", r"sources changed"),
    ("nvcc", r"nvcc release changed: '13\.0' -> '12\.8'"),
    ("flags", r"nvcc flags changed"),
    ("object", r"not the object its stamp describes"),
    ("no_stamp", r"no stamp"),
    ("no_object", r"no object"),
    ("bad_stamp", r"unreadable stamp"),
])
def test_stale_object_is_detected(setup_py, tree, tmp_path, change, why):
    src, obj = _prebuild(setup_py, tree, tmp_path / "pre")
    nvcc_rel, flags = "13.0", None
    if change == "header":
        (tree / "csrc" / "common.h").write_text("#pragma once\n#define CHANGED 1\n")
    elif change == "source":
        (tree / "csrc/cuda/cutlass/k.cu").write_text('#include "cuda/cutlass/k.cuh"\nint f() { return 2; }\n')
    elif change == "nvcc":
        nvcc_rel = "12.8"
    elif change == "flags":
        flags = setup_py.cutlass_nvcc_flags() + ["-G"]
    elif change == "object":
        with open(obj, "ab") as f:
            f.write(b"\0")
    elif change == "no_stamp":
        os.remove(obj + ".stamp.json")
    elif change == "no_object":
        os.remove(obj)
    elif change == "bad_stamp":
        with open(obj + ".stamp.json", "w") as f:
            f.write("{truncated")
    expected = setup_py.cutlass_stamp(src, nvcc_rel, root=str(tree), flags=flags)
    reason = setup_py.stamp_mismatch(obj, expected)
    assert reason is not None and re.search(why, reason), reason


def test_unrelated_header_does_not_invalidate(setup_py, tree, tmp_path):
    src, obj = _prebuild(setup_py, tree, tmp_path / "pre")
    (tree / "csrc/cuda/cutlass/other.cuh").write_text("// edited\n")
    assert setup_py.stamp_mismatch(obj, setup_py.cutlass_stamp(src, "13.0", root=str(tree))) is None


def test_plan_links_fresh_and_rebuilds_stale(setup_py, tree, tmp_path):
    src, obj = _prebuild(setup_py, tree, tmp_path / "pre")
    prebuilt, todo, _ = setup_py.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    assert prebuilt == {src: obj} and todo == []
    (tree / "csrc" / "common.h").write_text("#pragma once\n// edited\n")
    prebuilt, todo, reasons = setup_py.plan_cutlass([src], str(tmp_path / "pre"), "13.0", [], root=str(tree))
    assert prebuilt == {} and todo == [src] and "sources changed" in reasons[0]
    # Stale and no headers to compile from: the build must go on without CUTLASS, saying why.
    with pytest.raises(RuntimeError, match=r"sources changed.*no CUTLASS headers"):
        setup_py.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    _, todo, reasons = setup_py.plan_cutlass([src], None, "13.0", [], root=str(tree))
    assert todo == [src] and "FASTENC_CUTLASS_PREBUILT is not set" in reasons[0]


def test_cutlass_version_is_compared_only_where_headers_exist(setup_py, tree, tmp_path):
    src, obj = _prebuild(setup_py, tree, tmp_path / "pre")  # stamped without a CUTLASS version
    inc = tmp_path / "cutlass_inc"
    (inc / "cutlass").mkdir(parents=True)
    (inc / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 3\n#define CUTLASS_PATCH 1\n")
    assert setup_py.cutlass_version([str(tmp_path), str(inc)]) == "4.3.1"
    prebuilt, _, _ = setup_py.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    assert prebuilt == {src: obj}  # a GPU image without headers cannot compare: links
    _, todo, reasons = setup_py.plan_cutlass([src], str(tmp_path / "pre"), "13.0", [str(inc)], root=str(tree))
    assert todo == [src] and re.search(r"CUTLASS headers changed: None -> '4\.3\.1'", reasons[0]), reasons


def test_cutlass_units_are_torch_free(setup_py):
    """The prebuilt objects must not depend on torch's ABI: no ATen/c10/torch header anywhere in
    the CUTLASS translation units' own include closure, and the flags carry no torch defines."""
    sources = setup_py.cutlass_sources()
    assert len(sources) >= 2, sources
    for src in sources:
        for rel in setup_py.source_dependencies(src):
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
            bad = re.findall(r"#\s*include\s*[<\"]((?:ATen|c10|torch)/[^>\"]+)", text)
            assert not bad, f"{rel} (a dependency of {src}) includes {bad}"
    assert not [f for f in setup_py.cutlass_nvcc_flags() if "TORCH" in f or "FASTENC_CUDA_ARCHS" in f]
    assert "arch=compute_90a,code=sm_90a" in setup_py.cutlass_nvcc_flags()


def _fake_nvcc(tmp_path, fail_on=None):
    """An nvcc stand-in: reports release 13.0, 'compiles' by writing the source's bytes to -o, and
    counts calls; exits 1 on a source whose name contains fail_on."""
    log = tmp_path / "nvcc_calls"
    script = tmp_path / "nvcc"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0; fi
echo "$2" >> {log}
case "$2" in *{fail_on or "@@none@@"}*) exit 1 ;; esac
cat "$2" > "$4"
""")
    script.chmod(0o755)
    return str(script), log


def _quiet(msg):
    pass


def test_build_objects_compiles_only_stale_ones(setup_py, tree, tmp_path):
    nvcc, log = _fake_nvcc(tmp_path)
    src = str(tree / "csrc/cuda/cutlass/k.cu")
    out = str(tmp_path / "objs")
    objs = setup_py.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, jobs=2, root=str(tree), log=_quiet)
    assert objs == [os.path.join(out, "k.o")] and log.read_text().count("k.cu") == 1
    stamp = json.loads(open(objs[0] + ".stamp.json").read())
    assert stamp["nvcc_version"] == "V13.0.88" and stamp["inputs"] == setup_py.source_dependencies(src, str(tree))
    setup_py.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, root=str(tree), log=_quiet)
    assert log.read_text().count("k.cu") == 1, "an up-to-date object was recompiled"
    (tree / "csrc/cuda/cutlass/k.cuh").write_text('#pragma once\n#include "common.h"\n// edited\n')
    setup_py.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, root=str(tree), log=_quiet)
    assert log.read_text().count("k.cu") == 2, "a stale object was not recompiled"
    assert setup_py.stamp_mismatch(objs[0], setup_py.cutlass_stamp(src, "13.0", root=str(tree))) is None


def test_failed_compile_leaves_no_stamp(setup_py, tree, tmp_path):
    nvcc, _ = _fake_nvcc(tmp_path, fail_on="k.cu")
    src = str(tree / "csrc/cuda/cutlass/k.cu")
    out = tmp_path / "objs"
    _prebuild(setup_py, tree, out)
    (tree / "csrc" / "common.h").write_text("#pragma once\n// edited\n")
    with pytest.raises(RuntimeError, match=r"nvcc failed on .*k\.cu"):
        setup_py.build_cutlass_objects(str(out), [src], [], nvcc, root=str(tree), log=_quiet)
    assert not (out / "k.o.stamp.json").exists()
    assert "no stamp" in setup_py.stamp_mismatch(str(out / "k.o"), setup_py.cutlass_stamp(src, "13.0", root=str(tree)))
