"""Launch policy of the attention kernels (``attention.py``): per-architecture tiles and
shared-memory fitting, as data.

An ``AttentionConfig`` holds the launch knobs of one kernel ("fwd", "bwd_dq", "bwd_dkdv"): query
tile, key tile, warps, pipeline stages.  Tiles come from fixed tables (no autotuning), keyed by
kernel and head-dim bucket (the head dim's next power of two, at least 64), one table per
architecture family and one for fp32; a config over the device's shared memory per block shrinks
until it fits.  The comments beside each table say why it holds what it holds; the registers and
shared memory every shipped config compiles to are in benchmarks/README.md ("Kernel resource
figures").  tests/test_attention.py compiles every config of ``specs.attention_specs()`` for sm_90
and checks tensor-core use, spills, ptxas's C7515 warning and ``smem_bytes`` against the real
allocation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton

KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Launch knobs of one attention kernel."""

    BLOCK_M: int  # queries per tile
    BLOCK_N: int  # keys per tile
    num_warps: int
    num_stages: int  # pipeline depth of the streamed tiles

    @classmethod
    def for_launch(cls, kernel: str, head_dim: int, seqlen_q: int, dtype: torch.dtype,
                   arch: Optional[Tuple[int, int]], masked: bool = False, smem_limit: Optional[int] = None,
                   mask_elt: int = 0, dropout: bool = False) -> AttentionConfig:
        """The config of one kernel ("fwd", "bwd_dq", "bwd_dkdv") for a call.

        arch: (major, minor) compute capability, or None under the Triton interpreter (CPU).
        seqlen_q <= 64 picks the forward's short-sequence tiles.  masked: an attn_mask is streamed
        (the forward then halves its key tile at head dim > 64).  smem_limit: the device's opt-in
        shared memory per block in bytes, which the launchers pass (None: no check); a config over
        it shrinks (``fit_smem``).  mask_elt: bytes per attn_mask element (0 = no attn_mask).
        dropout: the kernel draws a keep mask (its layout-conversion scratch counts in
        ``smem_bytes``).  fp32 runs IEEE FMA dots on small tiles: exact but slow; fp16/bf16 is the
        fast path.
        """
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
        if arch is None:
            return cls.interpreter()
        if dtype == torch.float32:
            cfg = cls.fp32(head_dim)
        elif arch[0] >= 9:
            cfg = cls.sm90(kernel, head_dim, seqlen_q, masked)
        else:
            cfg = cls.sm80(kernel, head_dim, seqlen_q, masked)
        if smem_limit is not None:
            cfg = cfg.fit_smem(kernel, head_dim, dtype.itemsize, mask_elt, dropout, smem_limit)
        return cfg

    @classmethod
    def interpreter(cls) -> AttentionConfig:
        """Triton's interpreter (CPU): small tiles, so the tests cross many block boundaries."""
        return cls(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)

    @classmethod
    def sm90(cls, kernel: str, head_dim: int, seqlen_q: int, masked: bool) -> AttentionConfig:
        """Hopper and newer, fp16/bf16: _SM90 (async wgmma)."""
        return _from_table(_SM90, kernel, head_dim, seqlen_q, masked)

    @classmethod
    def sm80(cls, kernel: str, head_dim: int, seqlen_q: int, masked: bool) -> AttentionConfig:
        """Ampere and Ada, fp16/bf16: _SM80 (mma.sync)."""
        return _from_table(_SM80, kernel, head_dim, seqlen_q, masked)

    @classmethod
    def fp32(cls, head_dim: int) -> AttentionConfig:
        """fp32 inputs on any GPU: _FP32 (IEEE FMA dots), one tile for every kernel."""
        return _FP32[_bucket(head_dim)]

    def smem_bytes(self, kernel: str, head_dim: int, elt: int, mask_elt: int = 0, dropout: bool = False) -> int:
        """Upper bound of this config's shared memory in bytes (what Triton's pipeliner allocates).

        The resident tile (q; q and dO; k and v) once, the two streamed tiles and the attn_mask tile
        (mask_elt bytes per element, 0 = none) once per stage, the dK/dV kernel's two fp32 row
        statistics per stage, and with dropout, when the warps outnumber the tile's 16-row blocks (so
        they also split its columns and the keep mask's layout is not the accumulator's), one fp32
        score tile of layout-conversion scratch.  elt: bytes per q/k/v element.
        """
        d = max(16, triton.next_power_of_2(head_dim))
        bm, bn, stages = self.BLOCK_M, self.BLOCK_N, self.num_stages
        if kernel == "fwd":
            resident, streamed, stats = bm * d, 2 * bn * d, 0
        elif kernel == "bwd_dq":
            resident, streamed, stats = 2 * bm * d, 2 * bn * d, 0
        else:
            resident, streamed, stats = 2 * bn * d, 2 * bm * d, 8 * bm
        split_cols = (bn if kernel == "bwd_dkdv" else bm) // 16 < self.num_warps
        scratch = 4 * bm * bn if dropout and split_cols else 0
        return elt * resident + stages * (elt * streamed + bm * bn * mask_elt + stats) + scratch

    def fit_smem(self, kernel: str, head_dim: int, elt: int, mask_elt: int, dropout: bool,
                 smem_limit: int) -> AttentionConfig:
        """This config shrunk until ``smem_bytes`` fits in smem_limit (GPUs with ~100 KB per block:
        sm_86/89/120): fewer stages first, then the streamed tile, then the resident one (never
        below 16).  No H200 config shrinks."""
        cfg = self
        stream = "BLOCK_M" if kernel == "bwd_dkdv" else "BLOCK_N"
        resident = "BLOCK_N" if kernel == "bwd_dkdv" else "BLOCK_M"
        while cfg.smem_bytes(kernel, head_dim, elt, mask_elt, dropout) > smem_limit:
            if cfg.num_stages > 1:
                cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
            elif getattr(cfg, stream) > 16:
                cfg = dataclasses.replace(cfg, **{stream: getattr(cfg, stream) // 2})
            elif getattr(cfg, resident) > 16:
                cfg = dataclasses.replace(cfg, **{resident: getattr(cfg, resident) // 2})
            else:
                raise ValueError(f"attention kernel {kernel}: no tile for head dim {head_dim} fits in "
                                 f"{smem_limit} bytes of shared memory")
        return cfg


def _bucket(head_dim: int) -> int:
    return max(64, triton.next_power_of_2(head_dim))


def _from_table(table: dict, kernel: str, head_dim: int, seqlen_q: int, masked: bool) -> AttentionConfig:
    name = "fwd_short" if kernel == "fwd" and seqlen_q <= 64 else kernel
    cfg = table[(name, _bucket(head_dim))]
    if masked and kernel == "fwd" and _bucket(head_dim) > 64:  # the mask tile's registers would spill
        cfg = dataclasses.replace(cfg, BLOCK_N=cfg.BLOCK_N // 2)
    return cfg


def _table(rows: dict) -> dict:
    """{key: (BLOCK_M, BLOCK_N, num_warps, num_stages)} as AttentionConfigs."""
    return {key: AttentionConfig(*knobs) for key, knobs in rows.items()}


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, head-dim bucket); "fwd_short": <= 64 queries.
# sm_90: picked so the fp32 accumulators stay in registers; every entry compiles to HGMMA with zero
# spills, <= 255 registers and no ptxas C7515 "wgmma serialized" warning (Triton 3.6 and 3.8), with
# one exception: with dropout the dK/dV kernel at head dim 256 sits at 255 registers, where Triton
# 3.8's ptxas serialises its wgmma pipeline (C7515) and Triton 3.6's spills a little instead.  Every
# other tile tried there spills more (16x64 on 4 warps or 1 stage, 32x64, 16x128) or drops to
# mma.sync (32 keys), so it keeps this table's tile; tests/test_attention.py allows exactly that.
_SM90 = _table({
    ("fwd", 64): (128, 64, 8, 3), ("fwd", 128): (128, 64, 8, 3), ("fwd", 256): (128, 32, 8, 2),
    ("fwd_short", 64): (64, 64, 4, 3), ("fwd_short", 128): (64, 64, 4, 3), ("fwd_short", 256): (128, 32, 8, 2),
    ("bwd_dq", 64): (128, 64, 8, 2), ("bwd_dq", 128): (128, 64, 8, 2), ("bwd_dq", 256): (64, 32, 8, 2),
    ("bwd_dkdv", 64): (32, 128, 8, 2), ("bwd_dkdv", 128): (32, 128, 8, 2), ("bwd_dkdv", 256): (16, 64, 8, 2),
})
# sm_80 (mma.sync keeps both operands in registers): narrower tiles, fewer stages.
_SM80 = _table({
    ("fwd", 64): (128, 64, 8, 2), ("fwd", 128): (128, 32, 8, 2), ("fwd", 256): (64, 32, 8, 1),
    ("fwd_short", 64): (64, 64, 8, 2), ("fwd_short", 128): (64, 64, 8, 2), ("fwd_short", 256): (64, 32, 8, 1),
    ("bwd_dq", 64): (128, 64, 8, 1), ("bwd_dq", 128): (64, 32, 4, 2), ("bwd_dq", 256): (64, 32, 8, 1),
    ("bwd_dkdv", 64): (32, 128, 8, 1), ("bwd_dkdv", 128): (64, 64, 8, 1), ("bwd_dkdv", 256): (16, 64, 8, 1),
})
# fp32 (IEEE FMA dots, both operands in registers): 64x32 tiles on 4 warps spilled on sm_90 at every
# head dim; these compile with no spills on sm_90.
_FP32 = _table({64: (32, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2)})
