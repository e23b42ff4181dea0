"""Launch policy of the row-gather kernel (``padding.py``), as data: one rule for every
architecture, by row width and element size."""
from __future__ import annotations

import dataclasses

import triton


@dataclasses.dataclass(frozen=True)
class GatherConfig:
    """Columns per program and warps of _gather_rows_kernel."""

    BLOCK: int
    num_warps: int

    @classmethod
    def for_rows(cls, n_cols: int, elem_size: int) -> GatherConfig:
        """Up to 16 KB of a row per program, 16-byte vectors per thread: 1 warp below 1 KB of
        columns, 2 below 4 KB, 4 above."""
        block = min(triton.next_power_of_2(max(n_cols, 1)), 16384 // elem_size)
        tile = block * elem_size
        return cls(BLOCK=block, num_warps=4 if tile >= 4096 else 2 if tile >= 1024 else 1)
