"""Dropout decisions from Philox words, shared by the attention and LayerNorm kernels.

An element whose 32-bit Philox word is r is dropped when r < t, t = round(p * 2^32), so
P(drop) = t / 2^32 (within 2^-33 of p).  The kernels get t - 2^31 (an int32 argument;
t itself may not fit) and compare r with t unsigned: one ISETP per element, where tl.rand's
uniform float cost about five instructions.  p = 1 gives t = 2^32 - 1 (a word of all ones is
kept, with probability 2^-32): the kernels then scale every kept value by 0, and
``keep_threshold`` callers that materialise masks treat p >= 1 as "nothing kept".
Each op chooses which elements share a Philox call (its kernels' register layout).
"""
from __future__ import annotations

import triton
import triton.language as tl


def keep_threshold(p: float) -> int:
    """t - 2^31 as an int32 kernel argument, t = round(p * 2^32) clamped to [0, 2^32 - 1]."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return min(int(round(p * 2**32)), 2**32 - 1) - 2**31


@triton.jit
def kept(word, threshold):
    """Keep flags of uint32 Philox words: word >= t, with threshold = t - 2^31 (keep_threshold)."""
    return word >= (threshold ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def kept_signed(word, threshold):
    """``kept`` as a signed compare of word - 2^31 with t - 2^31: the same flags.  At the register
    limit Triton 3.6's ptxas spills less with one or the other form: attention takes this one, the
    LayerNorm kernels ``kept`` (spill figures: benchmarks/README.md, "Kernel resource figures")."""
    return (word.to(tl.int32, bitcast=True) ^ -2147483648) >= threshold
