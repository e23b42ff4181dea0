"""Launch policy of the fused residual + LayerNorm kernels (``layer_norm.py``), as data.

One rule for every architecture, by hidden size N (the backward also by dropout and the widest
activation element): whole rows in registers where they fit, at most 16 values per thread in the
forward and 8 in the backward (three accumulators per value there).  The limits come from
registers: no config spills on sm_90 (Triton 3.6 and 3.8).  tests/test_inspector.py compiles every
bucket, and tests/test_layer_norm.py::test_no_register_spills_sm90_bf16_fp32_aligned the configs
at the register limit in bf16, fp32 and with the JIT's divisibility hints; their registers are in
benchmarks/README.md ("Kernel resource figures").
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import triton

MAX_HIDDEN = 16384
# Wider rows (and 4096 < N <= 8192 with dropout or fp32 activations) take the two-kernel backward.
WIDE_HIDDEN = 8192


def _block_n(n: int) -> int:
    """Whole-row tile: the next power of two >= N (at least 16)."""
    if not 1 <= n <= MAX_HIDDEN:
        raise ValueError(f"hidden size {n} is outside the supported range 1..{MAX_HIDDEN}")
    return max(16, triton.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class LayerNormFwdConfig:
    """Forward (and ``dropout_keep_mask``): ROWS whole rows per program, [ROWS, BLOCK_N] tiles."""

    BLOCK_N: int
    ROWS: int
    num_warps: int
    num_stages: int = 1

    @classmethod
    def for_hidden(cls, n: int) -> LayerNormFwdConfig:
        """At least 1K elements per tile, <= 16 values per thread up to 8192 columns; 32 values (16
        warps, 128 registers) at 16384, where 32 warps spill in bf16."""
        block_n = _block_n(n)
        rows = max(1, 1024 // block_n)
        return cls(BLOCK_N=block_n, ROWS=rows, num_warps=min(16, max(4, rows * block_n // 512)))


@dataclasses.dataclass(frozen=True)
class LayerNormParamsConfig:
    """_ln_bwd_params_kernel: BLOCK_C-column tiles, ROWS rows per step, a grid of at most
    programs_per_sm programs per SM spread over the column tiles."""

    BLOCK_C: int = 512
    ROWS: int = 2
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 4


@dataclasses.dataclass(frozen=True)
class LayerNormBwdConfig:
    """Backward: whole rows (_ln_bwd_kernel, a persistent grid of ROWS-row tiles), or ``wide`` rows
    (_ln_bwd_wide_kernel over BLOCK_C-column chunks).  ``params`` launches _ln_bwd_params_kernel
    after either: all parameter sums after the wide kernel, dbranch_bias alone with ``dbb_pass``."""

    BLOCK_N: int
    wide: bool
    num_warps: int
    ROWS: int = 1  # whole-row kernel: rows per tile
    programs_per_sm: int = 1  # whole-row kernel: persistent programs per SM
    dbb_pass: bool = False  # whole-row kernel: dbranch_bias summed by _ln_bwd_params_kernel
    BLOCK_C: int = 2048  # wide kernel: columns per chunk
    num_stages: int = 1
    params: Optional[LayerNormParamsConfig] = None

    @classmethod
    def for_hidden(cls, n: int, dropout: bool = False, element_size: int = 2) -> LayerNormBwdConfig:
        """The backward path and its launch for N columns; element_size: the widest activation
        (dy, x or s, d_residual, branch) in bytes.

        N <= 4096: whole rows with three register accumulators (dweight, dbias, dbranch_bias;
        <= 8 values per thread).  4096 < N <= 8192, 16-bit rows, no dropout: whole rows, one per
        program at 32 warps (8 values per thread, 64 registers, the whole register file of an
        SM); dweight and dbias stay in registers, but a third accumulator spills there, so
        dbranch_bias is a second pass over dbranch (``dbb_pass``).  With dropout the post-norm keep
        mask must also stay live across the row sums and spills, and so do fp32 rows (post-norm
        without divisibility hints, Triton 3.6): dropout, fp32 activations there and every
        N > 8192 take the two-kernel path, where at 16384 even two rows' worth of state (xhat and
        g) fill a 32-warp program's 64 registers.
        """
        block_n = _block_n(n)
        if block_n <= 4096:
            rows = max(1, 512 // block_n)
            return cls(BLOCK_N=block_n, wide=False, num_warps=min(32, max(4, rows * block_n // 128)), ROWS=rows,
                       programs_per_sm=2)
        if block_n <= WIDE_HIDDEN and not dropout and element_size <= 2:
            return cls(BLOCK_N=block_n, wide=False, num_warps=32, ROWS=1, programs_per_sm=1, dbb_pass=True,
                       params=LayerNormParamsConfig())
        return cls(BLOCK_N=block_n, wide=True, num_warps=8, BLOCK_C=2048, params=LayerNormParamsConfig())
