"""A benchmark workload: one sweep point of one suite (inputs, reference, FLOP/byte count), and input helpers.

A workload is shared by every provider that runs it; its reference is
``fastenc.reference`` (an fp32 run and a same-dtype run, for the parity rule of
``fastenc.testing``), or the suite's own ``check`` where the comparison is not an
op's output (end-to-end embeddings).  Workloads are built by the suite modules in
``fastenc/bench/ops/``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Workload:
    suite: str
    mode: str  # "fwd" | "bwd" (backward alone) | "train" (forward + backward + optimizer step)
    # which parameter this point varies: "seqlen" | "batch" | "headdim" | "dtype" | "padding" | "hidden" |
    # "activation" | "dropout" | "compile" | "latency" | "real" | "op"
    sweep: str
    params: Dict[str, object]  # row columns: batch, seqlen, heads, head_dim, d_model, d_ff, activation, layers,
    # padding, dropout, model, op, window
    device: torch.device
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]  # one fresh random input copy
    grad_inputs: Tuple[int, ...]  # inputs differentiated in "bwd"/"train" (the first one is checked)
    reference: Optional[Callable[[tuple, bool], Tensor]] = None  # (inputs, upcast) -> output
    valid: Optional[Callable[[tuple], Tensor]] = None  # bool mask (broadcastable) of output positions to compare
    flops: Optional[float] = None
    bytes: Optional[float] = None
    tokens: int = 0  # real (non-padding) tokens per call
    model: Optional[dict] = None  # layer/encoder: constructor args and the shared state_dict
    # (workload, impl, inputs) -> None or what is wrong; replaces the op parity check (runner.check)
    check: Optional[Callable] = None
    check_slice: Optional[Callable[[tuple], tuple]] = None  # inputs -> smaller inputs for the parity check
    inference_mode: bool = False  # "fwd" runs under torch.inference_mode() instead of torch.no_grad()

    @property
    def key(self) -> tuple:
        return (self.suite, self.mode, self.sweep, str(self.dtype), tuple(sorted(self.params.items())))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def padded_lengths(batch: int, seqlen: int, padding: float) -> List[int]:
    """Per-sequence lengths whose mean padding ratio is ``padding``, spread evenly around it, each >= 1."""
    if not 0.0 <= padding < 1.0:
        raise ValueError(f"padding ratio must be in [0, 1), got {padding}")
    spread = min(padding, 1.0 - padding)
    out = []
    for b in range(batch):
        frac = padding + spread * ((b + 0.5) / batch * 2 - 1) if batch > 1 else padding
        out.append(max(1, seqlen - round(frac * seqlen)))
    return out


def key_padding_mask(lengths: Sequence[int], seqlen: int, device) -> Optional[Tensor]:
    """bool [B, L], True = padding (torch.nn's convention); None when nothing is padded."""
    if all(n == seqlen for n in lengths):
        return None
    pos = torch.arange(seqlen, device=device)
    return pos[None, :] >= torch.tensor(list(lengths), device=device)[:, None]


def randn(shape, device, dtype, scale=1.0) -> Tensor:
    return torch.randn(shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def valid_tokens(inputs: tuple, mask_index: int, trailing: int) -> Optional[Tensor]:
    """Real-token positions of an output (the inverse of the key padding mask at ``mask_index``)."""
    kpm = inputs[mask_index]
    if kpm is None:
        return None
    return (~kpm).reshape(*kpm.shape, *([1] * trailing))


def by_mode(fwd: float, mode: str, bwd_factor: float) -> float:
    """A count for ``mode`` from the forward's: "bwd" = bwd_factor x, "fwd+bwd"/"train" = (1 + bwd_factor) x."""
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd_factor * fwd
    if mode in ("fwd+bwd", "train"):
        return (1 + bwd_factor) * fwd
    raise ValueError(f"unknown mode {mode!r}")


class ModelCache:
    """Objects a suite builds once per run and shares between its workloads (models, compiled models,
    sessions), keyed by tuples whose first item names the kind ("compile" entries reset dynamo)."""

    def __init__(self) -> None:
        self._items: Dict[tuple, object] = {}

    def get(self, key: tuple, build: Callable[[], object]) -> object:
        if key not in self._items:
            with torch.inference_mode(False):  # built on first use, maybe in a check under inference mode
                self._items[key] = build()
        return self._items[key]

    def clear(self, close: Callable[[object], None] = lambda obj: None) -> None:
        for obj in self._items.values():
            close(obj)
        if any(k[0] == "compile" for k in self._items):
            torch._dynamo.reset()
        self._items.clear()
