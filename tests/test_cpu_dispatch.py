"""Run-time CPU dispatch (csrc/common/cpu_kernels.h, build_tools/cpu_kernels.py): the capability this CPU reports,
the FASTENC_CPU_CAPABILITY cap, the kernel variant each table runs, and the kernels of every capability this
machine can execute, each in a process of its own, against the reference.  scripts/run.sh also runs the CPU kernel
test files under each lower capability (this file among them: test_capability_in_use checks the cap took)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from fastenc.backends import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # build_tools/ is not installed
from build_tools import cpu_kernels  # noqa: E402

CAPS = cpu_kernels.CAPABILITIES


def _ext():
    if os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
        pytest.skip("extension deliberately not built (FASTENC_SKIP_NATIVE)")
    ext = extension()
    assert ext is not None, "fastenc._C is not built: pip install --no-build-isolation -e ."
    return ext


def _from_cpuinfo() -> str:
    """The capability /proc/cpuinfo's flags imply (the kernel reports what the OS enabled)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    cap = "default"
    for name, need in (("avx2", {"avx2", "fma", "f16c"}), ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
                       ("avx512_vnni", {"avx512_vnni"}), ("avx512_bf16", {"avx512_bf16"}),
                       ("amx", {"amx_tile", "amx_bf16", "amx_int8"})):
        if not need <= flags:
            break
        cap = name
    return cap


def _cap_env():
    value = os.environ.get("FASTENC_CPU_CAPABILITY")
    return value.lower() if value else None


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or cpu_kernels.platform.machine() != "x86_64",
                    reason="reads x86 flags from Linux's /proc/cpuinfo")
def test_cpu_capability_is_what_the_cpu_reports():
    assert _ext().cpu_capability()["cpu"] == _from_cpuinfo()


def test_capability_in_use():
    """The capability in use is the CPU's capped by FASTENC_CPU_CAPABILITY, and each table runs its highest variant
    at or below it: this test runs in each capped run of scripts/run.sh, so a cap that did not take fails here."""
    r = _ext().cpu_capability()
    limit = _cap_env()
    assert r["limit"] == limit
    expected = r["cpu"] if limit is None else CAPS[min(CAPS.index(r["cpu"]), CAPS.index(limit))]
    assert r["selected"] == expected == _ext().cpu_isa()
    assert r["kernels"], "no kernel table registered"
    for name, k in r["kernels"].items():
        below = [c for c in k["compiled"] if CAPS.index(c) <= CAPS.index(r["selected"])]
        assert k["runs"] == (below[-1] if below else None), (name, k)


def test_tables_hold_the_planned_objects():
    """Every csrc/<op>/cpu/*.cpp is a kernel file of the plan, and the built tables have exactly the planned
    variants (with this environment's FASTENC_CPU_CAPABILITIES, the build's)."""
    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("compares the build plan with csrc/: not in a run of the installed wheel's tests")
    on_disk = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "cpu", "*.cpp"))}
    assert on_disk == set(cpu_kernels.KERNEL_SOURCES)
    planned = {}
    for src, cap in cpu_kernels.plan(cpu_kernels.build_capabilities()):
        planned.setdefault(src, []).append(cap)
    built = sorted(tuple(k["compiled"]) for k in _ext().cpu_capability()["kernels"].values())
    assert built == sorted(tuple(v) for v in planned.values())


_PROBE = r"""
import json, torch
import fastenc._C as C
from fastenc import reference
from fastenc.testing import assert_parity
out = {"isa": C.cpu_isa(), "report": C.cpu_capability()}
torch.manual_seed(0)
cu = torch.tensor([0, 4, 11], dtype=torch.int32)
for dt in (torch.float32, torch.bfloat16):
    # attention forward and backward (two sequences, a sliding window), residual + LayerNorm, FFN passes (gated too)
    q, k, v = (torch.randn(11, 2, 16, dtype=dt) for _ in range(3))
    o, lse = C.attention_forward_cpu(q, k, v, cu, cu, 7, 7, window_left=3)
    dq, dk, dv = C.attention_backward_cpu(torch.ones_like(o), q, k, v, o, lse, cu, cu, 7, 7, window_left=3)
    runs = []
    for t in (torch.float32, dt):  # the fp32 reference, then plain torch in dt
        qkv = [x.detach().to(t).requires_grad_() for x in (q, k, v)]
        r = reference.attention_varlen(*qkv, cu, cu, window=(3, -1))
        r.sum().backward()
        runs.append([r] + [x.grad for x in qkv])
    for name, fast, ref, base in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), *runs):
        assert_parity(fast, ref, base, name=f"attention {name} {dt}")
    x = torch.randn(5, 40, dtype=dt)
    y = C.residual_layer_norm_fwd(x, x, None, None, None, 1e-5, 0.0, 0, False)[0]
    ref, base = (reference.residual_layer_norm(x.to(t), x.to(t)) for t in (torch.float32, dt))
    assert_parity(y, ref, base, name=f"layer_norm {dt}")
    w1, w2 = torch.randn(64, 40, dtype=dt) / 6, torch.randn(40, 32, dtype=dt) / 6
    for act, w in (("gelu", w1[:32]), ("swiglu", w1)):
        y = C.ffn_forward(x, w, None, w2, None, None, act, 0.0, 0, "unfused", False)[0]
        ref, base = (reference.ffn(x.to(t), w.to(t), None, w2.to(t), None, activation=act) for t in (torch.float32, dt))
        assert_parity(y, ref, base, name=f"ffn {act} {dt}")
print("RESULT=" + json.dumps(out))
"""


def _probe(cap):
    env = {**os.environ, "FASTENC_CPU_CAPABILITY": cap}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT=")))


def test_every_capability_this_cpu_runs():
    """Each dispatch level up to this CPU's (cpu_kernels.dispatch_levels: from the lowest level at which every table
    has a variant, those a table was compiled for and those gating a kernel chosen in baseline code), in its own
    process (the cap is read once): it is the one in use, and its kernels match the reference (fp32 and bf16, gated
    and ungated FFN passes)."""
    r = _ext().cpu_capability()
    runnable = [c for c in cpu_kernels.dispatch_levels(r) if CAPS.index(c) <= CAPS.index(r["cpu"])]
    assert runnable, r
    for cap in runnable:
        got = _probe(cap)
        assert got["isa"] == cap and got["report"]["selected"] == cap, got


def test_a_cap_above_the_cpu_changes_nothing():
    got = _probe("amx")
    assert got["report"]["limit"] == "amx" and got["isa"] == got["report"]["cpu"]


def test_below_every_kernel_the_cpu_backend_steps_aside():
    """Capped below the lowest compiled capability, no table has a kernel: the cpu backend reports itself
    unavailable (auto runs the reference) and a direct call raises naming the kernel."""
    lowest = min((c for k in _ext().cpu_capability()["kernels"].values() for c in k["compiled"]), key=CAPS.index)
    if lowest == "default":
        pytest.skip("the build has kernels for every capability (default compiled)")
    code = r"""
import torch, fastenc
from fastenc.backends import cpu_check
import fastenc._C as C
reason = cpu_check(torch.device("cpu"), torch.float32)
assert reason is not None and "instruction set" in reason, reason
y = fastenc.ops.residual_layer_norm(torch.randn(3, 8), None, None, None)  # auto: the reference
try:
    C.residual_layer_norm_fwd(torch.randn(3, 8), None, None, None, None, 1e-5, 0.0, 0, False)
except ValueError as e:
    assert "no CPU kernel LayerNormKernels" in str(e), e
else:
    raise AssertionError("a kernel ran below its lowest capability")
print("OK")
"""
    env = {**os.environ, "FASTENC_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_bad_cap_names_the_variable():
    code = r"""
import torch, fastenc
import fastenc._C as C
for call in (C.cpu_capability, lambda: fastenc.backend_report("cpu")):
    try:
        call()
    except ValueError as e:
        assert "FASTENC_CPU_CAPABILITY='avx3'" in str(e) and "avx512_bf16" in str(e), e
    else:
        raise AssertionError("a bad FASTENC_CPU_CAPABILITY was accepted")
print("OK")
"""
    env = {**os.environ, "FASTENC_CPU_CAPABILITY": "avx3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_torch_agrees_on_avx512():
    """torch's own dispatch (ATen) sees the same vector width on this CPU."""
    cpu = _ext().cpu_capability()["cpu"]
    torch_cap = torch.backends.cpu.get_cpu_capability()
    if "ATEN_CPU_CAPABILITY" in os.environ or torch_cap not in ("DEFAULT", "AVX2", "AVX512"):
        pytest.skip(f"torch's capability {torch_cap} is capped or not x86")
    assert (CAPS.index(cpu) >= CAPS.index("avx512")) == (torch_cap == "AVX512")
