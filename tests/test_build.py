"""Build health of fastenc._C: CUDA code for every requested arch, no register spills in the
handwritten kernels (the built .so read with cuobjdump, no GPU needed), one OpenMP runtime, no vector
instruction outside the CPU kernels compiled for it (the .so disassembled).  Also the plan of the CPU kernel
objects (build_tools/cpu_kernels.py), the stamps that keep a stale prebuilt CUTLASS object from being linked
(build_tools/cutlass_objects.py, no nvcc run), the rebuild stamp of scripts/run.sh, the wheel's contents and
the linter.

The .so tests skip only when the extension was deliberately built without CUDA
(FASTENC_SKIP_NATIVE=1 or FASTENC_FORCE_CPU=1 in the environment); CI builds with CUDA.
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from fastenc.backends import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # build_tools/ is not installed
from build_tools import build_stamp, cpu_kernels, link_installed, precompiled_header, toolchain  # noqa: E402
from build_tools import cutlass_objects as co  # noqa: E402
_FLAGS = [v for v in ("FASTENC_SKIP_NATIVE", "FASTENC_FORCE_CPU")
          if os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")]
needs_cuda_build = pytest.mark.skipif(bool(_FLAGS),
                                      reason=f"extension deliberately built without CUDA ({', '.join(_FLAGS)})")

# Name fragments of the handwritten kernels (csrc/ffn/cuda/: act_kernels.cuh, glu_kernels.cuh, act_fwd.cu).
HANDWRITTEN = ("_ffn_act_fwd_kernel", "_ffn_dact_bgrad_kernel", "_ffn_glu_fwd_kernel", "_ffn_dglu_bgrad_kernel",
               "_ffn_dropout_mask_kernel")


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


def _prebuild(tree, out, nvcc_rel="13.0"):
    """Stand-in for build_cutlass_objects' output: an object and its stamp, no nvcc."""
    src = str(tree / "csrc" / "cuda" / "cutlass" / "k.cu")
    obj = co.object_path(str(out), src)
    os.makedirs(out, exist_ok=True)
    with open(obj, "wb") as f:
        f.write(os.urandom(256))
    co.write_stamp(obj, co.cutlass_stamp(src, nvcc_rel, root=str(tree)), {"nvcc_version": "V" + nvcc_rel})
    return src, obj


def test_dependencies_follow_quoted_includes(tree):
    deps = co.source_dependencies(str(tree / "csrc/cuda/cutlass/k.cu"), root=str(tree))
    assert deps == ["csrc/common.h", "csrc/cuda/cutlass/k.cu", "csrc/cuda/cutlass/k.cuh"]


def test_fresh_stamp_matches(tree, tmp_path):
    src, obj = _prebuild(tree, tmp_path / "pre")
    assert co.stamp_mismatch(obj, co.cutlass_stamp(src, "13.0", root=str(tree))) is None
    stamp = json.loads(open(obj + ".stamp.json").read())
    assert stamp["flags"] == co.cutlass_nvcc_flags() and stamp["nvcc_release"] == "13.0"


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
def test_stale_object_is_detected(tree, tmp_path, change, why):
    src, obj = _prebuild(tree, tmp_path / "pre")
    nvcc_rel, flags = "13.0", None
    if change == "header":
        (tree / "csrc" / "common.h").write_text("#pragma once\n#define CHANGED 1\n")
    elif change == "source":
        (tree / "csrc/cuda/cutlass/k.cu").write_text('#include "cuda/cutlass/k.cuh"\nint f() { return 2; }\n')
    elif change == "nvcc":
        nvcc_rel = "12.8"
    elif change == "flags":
        flags = co.cutlass_nvcc_flags() + ["-G"]
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
    expected = co.cutlass_stamp(src, nvcc_rel, root=str(tree), flags=flags)
    reason = co.stamp_mismatch(obj, expected)
    assert reason is not None and re.search(why, reason), reason


def test_unrelated_header_does_not_invalidate(tree, tmp_path):
    src, obj = _prebuild(tree, tmp_path / "pre")
    (tree / "csrc/cuda/cutlass/other.cuh").write_text("// edited\n")
    assert co.stamp_mismatch(obj, co.cutlass_stamp(src, "13.0", root=str(tree))) is None


def test_plan_links_fresh_and_rebuilds_stale(tree, tmp_path):
    src, obj = _prebuild(tree, tmp_path / "pre")
    prebuilt, todo, _ = co.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    assert prebuilt == {src: obj} and todo == []
    (tree / "csrc" / "common.h").write_text("#pragma once\n// edited\n")
    prebuilt, todo, reasons = co.plan_cutlass([src], str(tmp_path / "pre"), "13.0", [], root=str(tree))
    assert prebuilt == {} and todo == [src] and "sources changed" in reasons[0]
    # Stale and no headers to compile from: the build must go on without CUTLASS, saying why.
    with pytest.raises(RuntimeError, match=r"sources changed.*no CUTLASS headers"):
        co.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    _, todo, reasons = co.plan_cutlass([src], None, "13.0", [], root=str(tree))
    assert todo == [src] and "FASTENC_CUTLASS_PREBUILT is not set" in reasons[0]


def test_cutlass_version_is_compared_only_where_headers_exist(tree, tmp_path):
    src, obj = _prebuild(tree, tmp_path / "pre")  # stamped without a CUTLASS version
    inc = tmp_path / "cutlass_inc"
    (inc / "cutlass").mkdir(parents=True)
    (inc / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 3\n#define CUTLASS_PATCH 1\n")
    assert co.cutlass_version([str(tmp_path), str(inc)]) == "4.3.1"
    prebuilt, _, _ = co.plan_cutlass([src], str(tmp_path / "pre"), "13.0", None, root=str(tree))
    assert prebuilt == {src: obj}  # a GPU image without headers cannot compare: links
    _, todo, reasons = co.plan_cutlass([src], str(tmp_path / "pre"), "13.0", [str(inc)], root=str(tree))
    assert todo == [src] and re.search(r"CUTLASS headers changed: None -> '4\.3\.1'", reasons[0]), reasons


def test_cutlass_units_are_torch_free():
    """The prebuilt objects must not depend on torch's ABI: no ATen/c10/torch header anywhere in
    the CUTLASS translation units' own include closure, and the flags carry no torch defines."""
    sources = co.cutlass_sources()
    assert len(sources) >= 2, sources
    for src in sources:
        for rel in co.source_dependencies(src):
            text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
            bad = re.findall(r"#\s*include\s*[<\"]((?:ATen|c10|torch)/[^>\"]+)", text)
            assert not bad, f"{rel} (a dependency of {src}) includes {bad}"
    assert not [f for f in co.cutlass_nvcc_flags() if "TORCH" in f or "FASTENC_CUDA_ARCHS" in f]
    assert "arch=compute_90a,code=sm_90a" in co.cutlass_nvcc_flags()


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


def test_build_objects_compiles_only_stale_ones(tree, tmp_path):
    nvcc, log = _fake_nvcc(tmp_path)
    src = str(tree / "csrc/cuda/cutlass/k.cu")
    out = str(tmp_path / "objs")
    objs = co.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, jobs=2, root=str(tree), log=_quiet)
    assert objs == [os.path.join(out, "k.o")] and log.read_text().count("k.cu") == 1
    stamp = json.loads(open(objs[0] + ".stamp.json").read())
    assert stamp["nvcc_version"] == "V13.0.88" and stamp["inputs"] == co.source_dependencies(src, str(tree))
    co.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, root=str(tree), log=_quiet)
    assert log.read_text().count("k.cu") == 1, "an up-to-date object was recompiled"
    (tree / "csrc/cuda/cutlass/k.cuh").write_text('#pragma once\n#include "common.h"\n// edited\n')
    co.build_cutlass_objects(out, [src], ["/cutlass/include"], nvcc, root=str(tree), log=_quiet)
    assert log.read_text().count("k.cu") == 2, "a stale object was not recompiled"
    assert co.stamp_mismatch(objs[0], co.cutlass_stamp(src, "13.0", root=str(tree))) is None


def test_failed_compile_leaves_no_stamp(tree, tmp_path):
    nvcc, _ = _fake_nvcc(tmp_path, fail_on="k.cu")
    src = str(tree / "csrc/cuda/cutlass/k.cu")
    out = tmp_path / "objs"
    _prebuild(tree, out)
    (tree / "csrc" / "common.h").write_text("#pragma once\n// edited\n")
    with pytest.raises(RuntimeError, match=r"nvcc failed on .*k\.cu"):
        co.build_cutlass_objects(str(out), [src], [], nvcc, root=str(tree), log=_quiet)
    assert not (out / "k.o.stamp.json").exists()
    assert "no stamp" in co.stamp_mismatch(str(out / "k.o"), co.cutlass_stamp(src, "13.0", root=str(tree)))


# ---------------------------------------------------------------- one OpenMP runtime
_OMP_PROBE = """import json, os, re
def omp():  # the OpenMP runtimes mapped in this process
    return sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(r"lib[gi]omp|libomp", l)})
def ticks():  # user CPU time of each thread of this process, in clock ticks
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            out[tid] = int(f.read().rsplit(")", 1)[1].split()[11])
    return out
import torch
with_torch = omp()
import fastenc._C as C
with_fastenc = omp()
torch.set_num_threads(2)
C.ffn_dropout_mask(64, 64, 0.1, 0, torch.device("cpu"))  # starts the OpenMP workers
before = ticks()
for _ in range(2):
    C.ffn_dropout_mask(8192, 8192, 0.1, 0, torch.device("cpu"))  # one at::parallel_for, nothing else
after = ticks()
busy = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
print(json.dumps({"with_torch": with_torch, "with_fastenc": with_fastenc, "busy": busy}))
"""


@pytest.fixture(scope="module")
def omp_probe():
    """What a fresh process importing torch, then fastenc._C, sees (one subprocess for the tests below)."""
    if os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("extension deliberately not built (FASTENC_SKIP_NATIVE)")
    assert extension() is not None, "fastenc._C is not built: pip install --no-build-isolation -e ."
    out = subprocess.run([sys.executable, "-c", _OMP_PROBE], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_extension_uses_torchs_openmp(omp_probe):
    """at::parallel_for runs in parallel only when compiled with OpenMP (a GOMP_parallel call in _C), and the
    process must keep ONE OpenMP runtime: _C's libgomp.so.1 resolves to the one torch loaded."""
    so = extension().__file__
    needed = subprocess.run(["readelf", "-d", so], check=True, capture_output=True, text=True).stdout
    assert "[libgomp.so.1]" in needed, f"{so} does not link libgomp.so.1 (built without -fopenmp?)"
    undefined = subprocess.run(["nm", "-D", "--undefined-only", so], check=True, capture_output=True, text=True).stdout
    assert re.search(r"\bGOMP_parallel\b", undefined), f"{so} has no OpenMP parallel region: parallel_for is serial"
    with_torch, with_fastenc = omp_probe["with_torch"], omp_probe["with_fastenc"]
    assert len(with_torch) == 1 and with_fastenc == with_torch, (
        f"OpenMP runtimes: torch alone {with_torch}, with fastenc._C {with_fastenc}")


def test_parallel_for_splits_work_across_threads(omp_probe):
    """With 2 threads, the CPU dropout-mask kernel (an at::parallel_for) runs on 2 threads: each of the two busiest
    threads does at least a quarter of the work (CPU time per thread, so a busy machine does not matter)."""
    busy = omp_probe["busy"]
    assert sum(busy) >= 5, f"too little work to measure: {busy}"
    assert busy[1] >= 0.25 * sum(busy), f"per-thread CPU ticks {busy}: at::parallel_for ran on one thread"


# ---------------------------------------------------------------- CPU kernels per capability
def test_kernel_plan_clamps_each_file_to_its_range():
    sources = {"a.cpp": ("default", "avx512"), "b.cpp": ("avx2", "avx512_bf16"), "c.cpp": ("avx512_bf16", "amx")}
    caps = ["avx2", "avx512", "avx512_bf16", "amx"]
    assert cpu_kernels.plan(caps, sources) == [
        ("a.cpp", "avx2"), ("b.cpp", "avx2"), ("a.cpp", "avx512"), ("b.cpp", "avx512"), ("b.cpp", "avx512_bf16"),
        ("c.cpp", "avx512_bf16"), ("c.cpp", "amx")]  # lowest capability first: the link order
    assert cpu_kernels.plan(["avx512_bf16"], sources) == [("a.cpp", "avx512"), ("b.cpp", "avx512_bf16"),
                                                           ("c.cpp", "avx512_bf16")]
    assert cpu_kernels.plan(["default"], sources) == [("a.cpp", "default")]


def test_dispatch_levels_and_the_capped_runs():
    """The capped test runs: from the lowest level at which every table has a variant, the levels with compiled
    tables and the gated ones (a native build has no run below its own level)."""
    gated = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")

    def report(selected, *compiled):
        return {"selected": selected, "gated": gated, "kernels": {"T": {"compiled": compiled, "runs": selected}}}
    full = report("avx512_bf16", "avx2", "avx512", "avx512_bf16", "amx")
    assert cpu_kernels.dispatch_levels(full) == list(gated)
    assert cpu_kernels.lower_capabilities(full) == ["avx2", "avx512", "avx512_vnni"]
    native = report("avx512_vnni", "avx512_vnni")
    assert cpu_kernels.dispatch_levels(native) == ["avx512_vnni", "avx512_bf16", "amx"]
    assert cpu_kernels.lower_capabilities(native) == []
    # a native build's tables clamped below it (an avx512 table beside avx512_vnni ones): nothing runs at avx512
    native["kernels"]["U"] = {"compiled": ("avx512",), "runs": "avx512"}
    assert cpu_kernels.lower_capabilities(native) == []


def test_capability_flags_are_cumulative():
    flags = cpu_kernels.capability_flags("avx512_bf16")
    assert {"-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
            "-mavx512vnni"} <= set(flags)
    assert {"-DCPU_CAPABILITY=AVX512_BF16", "-DCPU_CAPABILITY_AVX512", "-DFASTENC_CPU_AVX2", "-DFASTENC_CPU_AVX512",
            "-DFASTENC_CPU_AVX512_BF16"} <= set(flags) and "-DFASTENC_CPU_AMX" not in flags
    assert cpu_kernels.capability_flags("default") == ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


@pytest.mark.parametrize("flags, cap", [
    ("fpu sse2", "default"),
    ("avx2 fma f16c", "avx2"),
    ("avx2 fma f16c avx512f avx512bw avx512vl avx512dq", "avx512"),
    ("avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_vnni", "avx512_vnni"),  # Cascade Lake, Ice Lake
    ("avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_bf16", "avx512"),  # BF16 without VNNI: none such
    ("avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512_vnni", "default"),  # no f16c: not even avx2
    ("avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512_vnni amx_tile amx_bf16", "avx512_bf16"),
    ("avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8", "amx"),
])
def test_native_capability_reads_the_cpu_flags(tmp_path, monkeypatch, flags, cap):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_kernels.native_capability(str(info)) == cap
    assert cpu_kernels.native_capability(str(tmp_path / "missing")) == "default"
    monkeypatch.setattr(cpu_kernels, "native_capability", lambda: cap)
    monkeypatch.setenv("FASTENC_CPU_CAPABILITIES", "native")
    assert cpu_kernels.requested_capabilities() == [cap]


def test_build_capabilities_checks_the_request_and_the_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTENC_CPU_CAPABILITIES", "avx512; avx2,avx3")
    with pytest.raises(RuntimeError, match=r"FASTENC_CPU_CAPABILITIES=.*avx3.*expected"):
        cpu_kernels.requested_capabilities()
    monkeypatch.setenv("FASTENC_CPU_CAPABILITIES", "amx;avx2")
    assert cpu_kernels.requested_capabilities() == ["avx2", "amx"]
    fake = tmp_path / "cxx"  # a compiler without AMX flags
    fake.write_text('#!/bin/sh\ncase "$*" in *-mamx*) exit 1 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    said = []
    assert cpu_kernels.build_capabilities(str(fake), log=said.append) == ["avx2"]
    assert said and "amx" in said[0]


def _functions(so: str):
    """{mangled name: (binding, ISA level of its instructions)} of the .so's functions: 0 baseline x86-64, 1 AVX
    (VEX encoding, ymm), 2 AVX-512 (zmm, opmask, xmm/ymm 16-31); binding from nm: T global, W/V weak, t local."""
    nm = subprocess.run(["nm", "--defined-only", so], check=True, capture_output=True, text=True).stdout
    binding = {parts[2]: parts[1] for parts in (line.split() for line in nm.splitlines()) if len(parts) == 3}
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-j", ".text", so], check=True, capture_output=True,
                         text=True).stdout
    avx512 = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}")
    out, fn = {}, None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            out[fn] = (binding.get(fn, "?"), 0)
            continue
        if fn is None or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1].strip()
        level = 2 if avx512.search(insn) else 1 if insn.startswith("v") or "%ymm" in insn else 0
        if level > out[fn][1]:
            out[fn] = (out[fn][0], level)
    return out


def test_no_vector_instruction_outside_its_kernels():
    """The baseline code must run on any x86-64 and each kernel only on a CPU of its capability.  Functions in a
    capability namespace (fastenc::cpu::<NAME>, at::vec::<NAME>) may use its instructions.  A strong global
    function outside them comes from a baseline source (a kernel file defines everything in its namespace): no
    AVX at all.  A weak one (an inline function or template instance, one copy kept by the linker) or a local
    clone may come from a kernel object: the baseline and kernel objects are linked in that order, lowest
    capability first, and the linker keeps the first copy, so a copy with wider instructions than the baseline is
    one that no baseline source instantiates, called by kernels only: at most the lowest compiled capability's
    instructions (here AVX for avx2).  An AVX-512 instruction in an AVX2 kernel or in such a copy means a kernel
    of a higher capability won the link, and an AVX2 CPU would fault on it."""
    ext = extension()
    if ext is None:
        pytest.skip("fastenc._C is not built")
    if cpu_kernels.platform.machine() != "x86_64" or not (shutil.which("objdump") and shutil.which("nm")):
        pytest.skip("needs an x86-64 extension, objdump and nm")
    caps = cpu_kernels.CAPABILITIES
    lowest = min((c for k in ext.cpu_capability()["kernels"].values() for c in k["compiled"]), key=caps.index)
    isa = {"default": 0, "avx2": 1}.get(lowest, 2)  # the ISA level its objects may use
    # A capability's namespace in a mangled name: <length><NAME> (4AVX2, 11AVX512_BF16).
    names = [re.compile(rf"(?<![0-9]){len(n)}{n}(?![a-z])") for n in (c.upper() for c in caps)]
    bad, seen = {}, set()
    for fn, (bind, level) in _functions(ext.__file__).items():
        cap = max((i for i, n in enumerate(names) if n.search(fn)), default=-1)
        seen.add(cap)
        allowed = {-1: 0 if bind == "T" else isa, 0: 0, 1: 1}.get(cap, 2)
        if level > allowed:
            bad[fn] = (bind, level)
    assert {-1, 1} <= seen, f"no baseline or no avx2 functions found: {sorted(seen)}"
    assert not bad, f"{len(bad)} functions use wider instructions than they may: " + "; ".join(
        f"{f[:160]} ({b}, level {lv})" for f, (b, lv) in list(bad.items())[:8])


def _ninja_var(text: str, name: str) -> list:
    return shlex.split(re.search(rf"^{name} = (.*)$", text, re.M).group(1))


def test_binding_sources_use_the_precompiled_header():
    """Each binding source includes the generated torch/extension.h first (GCC uses a .gch only there), and the
    built tree's .gch is valid for the build's own flags: GCC's -H marks a precompiled header it used with '!'."""
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cpp"))):
        first = re.search(r"^#include\s+\S+", open(src, encoding="utf-8").read(), re.M).group(0)
        assert precompiled_header.HEADER in first, f"{src}: first include is {first}"
    import torch

    ninja = os.path.join(ROOT, "build", f"ext-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}",
                         "build.ninja")
    if not os.path.exists(ninja) or not precompiled_header.is_gcc("c++"):
        pytest.skip("no GCC build tree here (an installed wheel, or another compiler)")
    text = open(ninja, encoding="utf-8").read()
    cflags = [f for f in _ninja_var(text, "cflags") if f != "-c"]
    src = os.path.join(ROOT, "csrc", "bindings", "module.cpp")
    out = subprocess.run(["c++", *cflags, "-fsyntax-only", "-H", src, *_ninja_var(text, "post_cflags")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.match(rf"! \S*{precompiled_header.HEADER}\.gch\n", out.stderr), out.stderr[:500]


# ---------------------------------------------------------------- rebuild stamp (scripts/run.sh)
@pytest.fixture
def build_tree(tmp_path):
    """A copy of the files the build reads, with a stand-in extension."""
    for d in build_stamp.INPUT_DIRS:
        shutil.copytree(os.path.join(ROOT, d), tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in build_stamp.INPUT_FILES:
        os.makedirs(os.path.dirname(tmp_path / f), exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    os.makedirs(tmp_path / "fastenc", exist_ok=True)
    (tmp_path / "fastenc" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"built")
    return tmp_path


@pytest.mark.parametrize("change, why", [
    ("header", r"changed: csrc/ffn/ffn\.h$"),
    ("constants", r"changed: fastenc/constants\.py$"),
    ("new_source", r"changed: csrc/cpu/new_kernel\.cpp$"),
    ("build_tools", r"changed: build_tools/toolchain\.py$"),
    ("env", r"env changed: .*'FASTENC_FORCE_CPU': '1'"),
    ("capabilities", r"env changed: .*'FASTENC_CPU_CAPABILITIES': 'avx2'"),
    ("extension", r"extension changed"),
    ("no_extension", r"extension changed: .* -> \{\}"),
    ("bad_stamp", r"no usable stamp"),
])
def test_rebuild_stamp_sees_every_change(build_tree, monkeypatch, change, why):
    root, stamp = str(build_tree), str(build_tree / "stamp.json")
    monkeypatch.delenv("FASTENC_FORCE_CPU", raising=False)
    monkeypatch.delenv("FASTENC_CPU_CAPABILITIES", raising=False)
    assert re.search(r"no usable stamp", build_stamp.check(stamp, root))  # first build
    build_stamp.commit(stamp, root)
    assert build_stamp.check(stamp, root) is None, "an unchanged tree must not rebuild"
    so = build_tree / "fastenc" / "_C.cpython-311-x86_64-linux-gnu.so"
    if change == "header":
        header = build_tree / "csrc" / "ffn" / "ffn.h"
        header.write_text(header.read_text() + "// edited\n")
    elif change == "constants":  # the source of the generated fastenc_constants.h
        (build_tree / "fastenc" / "constants.py").write_text("ONEDNN_MIN_MACS = 1 << 20\n")
    elif change == "new_source":
        (build_tree / "csrc" / "cpu").mkdir(exist_ok=True)
        (build_tree / "csrc" / "cpu" / "new_kernel.cpp").write_text("// new\n")
    elif change == "build_tools":
        (build_tree / "build_tools" / "toolchain.py").write_text("# edited\n")
    elif change == "env":
        monkeypatch.setenv("FASTENC_FORCE_CPU", "1")
    elif change == "capabilities":
        monkeypatch.setenv("FASTENC_CPU_CAPABILITIES", "avx2")
    elif change == "extension":  # e.g. rebuilt by hand with other flags
        so.write_bytes(b"rebuilt")
    elif change == "no_extension":
        so.unlink()
    elif change == "bad_stamp":
        (build_tree / "stamp.json").write_text("{truncated")
    reason = build_stamp.check(stamp, root)
    assert reason is not None and re.search(why, reason), reason
    assert not os.path.exists(stamp), "a stale stamp must be gone before the rebuild starts"
    build_stamp.commit(stamp, root)
    assert build_stamp.check(stamp, root) is None


def test_rebuild_stamp_lists_every_build_variable():
    """Every environment variable setup.py and build_tools/ read is in the stamp, but MAX_JOBS (speed only) and
    PATH (the stamp records the compilers found on it)."""
    paths = [os.path.join(ROOT, "setup.py")] + glob.glob(os.path.join(ROOT, "build_tools", "*.py"))
    text = "".join(open(p, encoding="utf-8").read() for p in paths)
    read = set(re.findall(r'(?:environ\.get\(|environ\[|environ\.setdefault\(|env_flag\()\s*"(\w+)"', text))
    assert {"FASTENC_SKIP_NATIVE", "FASTENC_CPU_CAPABILITIES", "CUDA_HOME"} <= read, read  # the regex finds them
    assert read - {"MAX_JOBS", "PATH"} <= set(toolchain.BUILD_ENV), read - set(toolchain.BUILD_ENV)


# ---------------------------------------------------------------- packaging
_BACKEND = """import sys, setuptools.build_meta as backend
print("BUILT=" + getattr(backend, sys.argv[1])(sys.argv[2]))
"""


def test_sdist_and_wheel_contents(tmp_path):
    """The wheel installs fastenc with its Triton kernels as fastenc.triton_kernels, every subpackage, its data
    and licence; the sdist has what setup.py needs to build the extension.  Built from a copy of the tree by
    setuptools' PEP 517 backend with no working directory on sys.path (`python -I`), as pip runs it."""
    import tarfile
    import zipfile

    import fastenc

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o")
    for d in ("fastenc", "triton_kernels", "build_tools", "csrc"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    built = {}
    for hook in ("build_sdist", "build_wheel"):  # one process per hook, as pip does
        out = subprocess.run([sys.executable, "-I", "-c", _BACKEND, hook, str(tmp_path / "dist")], cwd=src,
                             env={**os.environ, "FASTENC_SKIP_NATIVE": "1"}, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        built[hook] = [line[6:] for line in out.stdout.splitlines() if line.startswith("BUILT=")][-1]
    wheel = zipfile.ZipFile(tmp_path / "dist" / built["build_wheel"]).namelist()

    def tree(folder, prefix, ext=None):
        return {prefix + os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))
                for d, dirs, files in os.walk(os.path.join(ROOT, folder)) if "__pycache__" not in d
                for f in files if not f.endswith((".so", ".pyc")) and (ext is None or f.endswith(ext))}

    expected = tree("fastenc", "fastenc/", ".py") | tree("fastenc/data", "fastenc/data/")
    missing = (expected | tree("triton_kernels", "fastenc/triton_kernels/", ".py")) - set(wheel)
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert not [n for n in wheel if n.split("/")[0] in ("triton_kernels", "build_tools", "csrc", "tests")], wheel
    dist_info = f"fastenc-{fastenc.__version__}.dist-info/"
    assert dist_info + "licenses/LICENSE" in wheel
    with zipfile.ZipFile(tmp_path / "dist" / built["build_wheel"]) as z:
        meta = z.read(dist_info + "METADATA").decode()
        entry_points = z.read(dist_info + "entry_points.txt").decode()
    assert "License-Expression: BSD-3-Clause" in meta and "Requires-Dist: torch>=2.11" in meta, meta[:2000]
    assert re.search(r"fastenc\s*=\s*fastenc\.__main__:main", entry_points), entry_points
    with tarfile.open(tmp_path / "dist" / built["build_sdist"]) as t:
        sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = (tree("csrc", "csrc/") | tree("build_tools", "build_tools/") | {"LICENSE", "setup.py"}) - sdist
    assert not missing, f"not in the sdist: {sorted(missing)}"



def _names(dists):
    return {d.metadata["Name"].lower() for d in dists}


def test_link_installed_follows_requirements_markers_and_versions():
    import importlib.metadata as md
    assert {"pytest", "pluggy", "iniconfig", "packaging"} <= _names(link_installed.closure("pytest"))
    assert "colorama" not in _names(link_installed.closure("pytest"))  # `sys_platform == "win32"`: not here
    with pytest.raises(SystemExit, match="0.0.1"):
        link_installed.closure("pytest==0.0.1")
    with pytest.raises(SystemExit, match="not installed"):
        link_installed.closure("fastenc-no-such-distribution")
    if any("extra ==" in r for r in md.distribution("torch").requires or ()) and sys.platform == "linux" \
            and "+cu" in md.version("torch"):  # a CUDA build: its CUDA libraries come through cuda-toolkit's extras
        assert {"triton", "nvidia-cublas", "nvidia-cuda-runtime"} <= _names(link_installed.closure("torch"))


def test_link_installed_hard_links_files_and_metadata():
    import importlib.metadata as md
    into = tempfile.mkdtemp(dir=sys.prefix)  # beside this environment: one file system
    try:
        dists = link_installed.closure("iniconfig")
        files, size = link_installed.link(dists, into)
        assert files >= 3 and size > 0
        (linked,) = [d for d in md.distributions(path=[into]) if d.metadata["Name"] == "iniconfig"]
        assert linked.version == md.version("iniconfig")
        src = md.distribution("iniconfig").locate_file("iniconfig/__init__.py")
        dst = os.path.join(into, "iniconfig", "__init__.py")
        assert os.path.samefile(src, dst) and os.stat(dst).st_nlink >= 2  # a link, not a copy
        with pytest.raises(SystemExit, match="not a folder"):
            link_installed.main(["iniconfig", "--into", os.path.join(into, "missing")])
    finally:
        shutil.rmtree(into)

def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is a dev requirement (requirements/dev.txt)")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
