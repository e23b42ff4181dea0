"""The kernel inspector (fastenc/apps/inspector.py), and the resource rules the shipped kernels must meet.

On sm_90, compiled ahead of time on this CPU:
  * no hot Triton kernel spills registers;
  * the attention kernels and the FFN use tensor-core instructions (HGMMA/HMMA).
Attention missing from ``triton_kernels/specs.py`` or a missing (or CUDA-less) ``fastenc._C`` is
a failure here, not a skip: the rule cannot be checked.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before fastenc is imported)

from fastenc.apps import inspector as ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90 = ins.get_arch("sm_90")

# A small tiled matmul with the compile_specs() contract; compiled in the inspector's process
# (this test process runs Triton's interpreter, whose kernels cannot be compiled).
MATMUL_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def _matmul_kernel(A, B, C, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(B + (k + rk)[:, None] * N + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(C + rm[:, None] * N + rn[None, :], acc.to(tl.float16))


    @triton.jit
    def _scale_kernel(X, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < N) * 2.0, mask=offs < N)


    def compile_specs():
        sig = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "i32", "N": "i32", "K": "i32",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        return [
            dict(name="test_matmul_128x128", fn=_matmul_kernel, signature=sig,
                 constexprs=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), num_warps=8, num_stages=3, hot=True),
            dict(name="test_scale", fn=_scale_kernel, signature={"X": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                 constexprs=dict(BLOCK=1024), num_warps=4, num_stages=1, hot=False),
        ]
''')


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    """One `python -m fastenc inspect --arch sm_90` run over the shipped kernels plus the test matmul.

    It is started with TRITON_INTERPRET=1 (inherited), so it also shows the CLI re-running itself
    without the interpreter.
    """
    tmp = tmp_path_factory.mktemp("inspect")
    kernels = tmp / "test_matmul_kernels.py"
    kernels.write_text(MATMUL_KERNELS)
    out = tmp / "sm90.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastenc", "inspect", "--arch", "sm_90", "--module", str(kernels), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _by_source(report, prefix):
    return [k for k in report["kernels"] if k["source"].startswith(prefix)]


def test_inspector_reads_a_compiled_matmul(sm90_report):
    report, stdout = sm90_report
    assert report["arch"] == "sm_90"
    kernels = {k["name"]: k for k in _by_source(report, "triton:test_matmul_kernels.py")}
    mm, scale = kernels["test_matmul_128x128"], kernels["test_scale"]
    assert 32 < mm["regs"] <= 255 and mm["spill_bytes"] == 0
    assert mm["uses_tensor_cores"] and "HGMMA" in mm["tensor_core_ops"]  # Hopper warpgroup MMA
    assert mm["smem_bytes"] >= 128 * 64 * 2 * 2  # at least one A and one B tile in shared memory
    assert mm["num_warps"] == 8 and 0 < mm["occupancy"]["fraction"] <= 1
    expected = ins.occupancy(mm["regs"], mm["smem_bytes"], 8, SM90)
    assert mm["occupancy"]["blocks_per_sm"] == expected.blocks_per_sm
    assert not scale["uses_tensor_cores"] and scale["regs"] > 0
    assert "test_matmul_128x128" in stdout and "HGMMA" in stdout


def test_shipped_hot_triton_kernels_do_not_spill_on_sm90(sm90_report):
    report, _ = sm90_report
    shipped = [k for k in _by_source(report, "triton:") if not k["source"].endswith(".py")]
    assert shipped, "fastenc.triton_kernels.specs gives no kernels to inspect"
    spilling = [f"{k['source']} {k['name']}: {k['spill_bytes']} B/thread" for k in shipped
                if k["hot"] and k["spill_bytes"] > 0]
    assert not spilling, "hot kernels spill registers on sm_90:\n" + "\n".join(spilling)
    unlaunchable = [k["name"] for k in shipped if k["occupancy"]["blocks_per_sm"] == 0]
    assert not unlaunchable, f"kernels that cannot launch on sm_90: {unlaunchable}"


def test_attention_kernels_use_tensor_cores_on_sm90(sm90_report):
    report, _ = sm90_report
    attn = _by_source(report, "triton:attention")
    assert attn, "triton_kernels/specs.py lists no attention specs: the attention kernels cannot be inspected"
    no_tc = [k["name"] for k in attn if k["hot"] and not k["uses_tensor_cores"]]
    assert not no_tc, f"hot attention kernels without tensor-core instructions on sm_90: {no_tc}"


def test_ffn_uses_tensor_cores_on_sm90(sm90_report):
    report, _ = sm90_report
    assert not any("extension is not built" in m for m in report["missing"]), report["missing"]
    ffn = _by_source(report, "cuda:") + _by_source(report, "triton:ffn")
    assert ffn, f"no FFN kernels to inspect for sm_90: {report['missing']}"
    assert any(k["uses_tensor_cores"] for k in ffn), (
        "no FFN kernel uses tensor-core instructions on sm_90: " + ", ".join(k["name"] for k in ffn)
    )


# --------------------------------------------------------------------------- pure functions


def test_occupancy_math():
    # 8 warps at 254 registers: 8192 registers per warp -> 8 warps per SM -> one block, 12.5%.
    occ = ins.occupancy(254, 33 * 1024, 8, SM90)
    assert (occ.blocks_per_sm, occ.fraction, occ.limiter) == (1, 0.125, "regs")
    # small kernel: the 64-warp limit binds
    occ = ins.occupancy(32, 0, 4, SM90)
    assert (occ.blocks_per_sm, occ.fraction, occ.limiter) == (16, 1.0, "warps")
    # 100 KB of shared memory (+1 KB reserve): two blocks fit in 228 KB
    occ = ins.occupancy(64, 100 * 1024, 4, SM90)
    assert (occ.blocks_per_sm, occ.limiter) == (2, "smem") and occ.fraction == 8 / 64
    # the same on sm_80 (164 KB per SM): one block
    assert ins.occupancy(64, 100 * 1024, 4, ins.get_arch("sm_80")).blocks_per_sm == 1
    # one warp per block: the 32-block limit binds
    occ = ins.occupancy(16, 0, 1, SM90)
    assert (occ.blocks_per_sm, occ.limiter) == (32, "blocks")
    # registers round up to 256 per warp and warps to groups of 4: 72 regs -> 2304/warp -> 28 warps -> 7 blocks
    assert ins.occupancy(72, 0, 4, SM90).blocks_per_sm == 7
    too_big = ins.occupancy(64, 230 * 1024, 4, SM90)
    assert too_big.blocks_per_sm == 0 and "shared memory" in too_big.limiter
    assert ins.occupancy(255, 0, 32, SM90).blocks_per_sm == 0
    with pytest.raises(ValueError, match="num_warps"):
        ins.occupancy(32, 0, 0, SM90)
    assert ins.get_arch("sm_90a") is SM90 and ins.get_arch("90") is SM90
    with pytest.raises(ValueError, match="unknown architecture"):
        ins.get_arch("sm_75")


FATBIN_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,7]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4gemmv:
  REG:128 STACK:0 SHARED:16384 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z4gemmv:
  REG:168 STACK:8 SHARED:0 LOCAL:24 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z4biasv:
  REG:16 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

FATBIN_SASS = """
arch = sm_90a
		Function : _Z4gemmv
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;   /* 0x00e0ff */
        /*0110*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;        /* 0x00e0ff */
        /*0120*/                   FFMA R1, R2, R3, R4 ;                                  /* 0x0000 */
		Function : _Z4biasv
        /*0100*/                   FADD R1, R2, R3 ;                                      /* 0x0000 */
                                                                                          /* 0x0001 */
        /*0110*/                   NOP;                                                   /* 0x0000 */
"""


def test_cuobjdump_parsing_picks_the_target_arch():
    usage = ins.parse_resource_usage(FATBIN_USAGE, SM90)
    assert usage["_Z4gemmv"] == {"REG": 168, "STACK": 8, "SHARED": 0, "LOCAL": 24, "CONSTANT[0]": 552,
                                 "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert usage["_Z4biasv"]["REG"] == 16
    assert ins.parse_resource_usage(FATBIN_USAGE, ins.get_arch("sm_80"))["_Z4gemmv"]["REG"] == 128
    tc = ins.parse_sass_tensor_ops(FATBIN_SASS, SM90)
    assert tc == {"_Z4gemmv": {"HGMMA": 2}, "_Z4biasv": {}}
    assert ins.parse_sass_tensor_ops(FATBIN_SASS, ins.get_arch("sm_80")) == {}
    assert ins.parse_sass_instruction_counts(FATBIN_SASS, SM90) == {"_Z4gemmv": 3, "_Z4biasv": 1}


def test_compile_refuses_interpreted_kernels():
    # Under TRITON_INTERPRET=1 kernels are Python functions; the error says what to do.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    def _k(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), 1.0)

    spec = dict(name="k", fn=InterpretedFunction(_k), signature={"X": "*fp32"}, constexprs={"BLOCK": 16},
                num_warps=1, num_stages=1, hot=False)
    with pytest.raises(ins.InspectError, match="TRITON_INTERPRET"):
        ins.compile_triton_spec(spec, SM90, "test")
    with pytest.raises(ins.InspectError, match="lacks"):
        ins.compile_triton_spec({"name": "k", "fn": spec["fn"]}, SM90, "test")


def test_cli_ops_selects_kernels(tmp_path):
    out = tmp_path / "padding.json"
    proc = subprocess.run([sys.executable, "-m", "fastenc", "inspect", "--ops", "padding", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sources = {k["source"] for k in json.loads(out.read_text())["kernels"]}
    assert sources == {"triton:padding"}, sources  # neither the other Triton modules nor the extension
    bad = subprocess.run([sys.executable, "-m", "fastenc", "inspect", "--ops", "padding,softmax"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown --ops softmax; choose from" in bad.stderr, bad.stderr
