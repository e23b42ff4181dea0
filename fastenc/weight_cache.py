"""Derived copies of a stack's weights (packed for the panel GEMM or oneDNN, quantized, the fused stack's C++ layers).

They are derived data, never state: one :class:`WeightCache` per front end owns them, a deep copy, a
pickle (``torch.save(model)``) or ``copy.copy`` of the module gets an empty cache, and ``state_dict``
never sees them.  An entry is rebuilt when any source tensor changes, which the key sees as:

* a new tensor (``param.data = t``, ``load_state_dict(..., assign=True)``, ``model.to(dtype)``,
  ``share_memory()``): a new data pointer, or new strides on the same memory (``param.data =
  param.data.t()``).  The entry holds the tensors it was built from, so their
  memory cannot be reused by a new tensor while the entry lives: an address cannot be recycled into a
  false hit;
* an in-place update through the parameter (an optimizer step, ``load_state_dict`` copying, ``nn.init``,
  ``p.mul_(2)`` under ``no_grad``): PyTorch's version counter.

Not seen: in-place writes through ``param.data`` (``p.data.mul_(2)``), which bypass the version counter
by design (as they bypass autograd's checks), and in-place writes to inference tensors (weights created under
``torch.inference_mode``, which keep no version counter); call :meth:`WeightCache.clear` (``fastenc.clear_caches(model)``)
after such writes.  Bound: one entry per kind (dtype and weight format), each holding one copy of the
derived weights and a reference to the source tensors of its generation.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Hashable, Iterable, Optional, Tuple

import torch

Tensor = torch.Tensor


class TensorKey:
    """What identifies the values of some tensors while they are alive: equal when their devices, data pointers,
    versions, dtypes, shapes and strides are (``w.data = w.data.t()`` keeps a square weight's pointer, version
    and shape: only the strides tell).  It holds the tensors, so that an entry keyed by it keeps their memory from
    being taken by a new tensor (whose pointer, fresh version, dtype and shape could all match: a stale hit).
    Inference tensors (made under ``torch.inference_mode``) have no version counter: only their identity."""

    __slots__ = ("key", "tensors")

    def __init__(self, tensors: Iterable[Optional[Tensor]]) -> None:
        self.tensors = tuple(tensors)
        self.key = _FINGERPRINT(self.tensors)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorKey) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _python_fingerprint(tensors: Tuple[Optional[Tensor], ...]) -> tuple:
    """fastenc._C.tensor_fingerprint's fields as a tuple (when the extension is not built)."""
    return tuple(None if t is None else (t.device, t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype,
                                         t.shape, t.stride()) for t in tensors)


try:  # the same fields packed in C++: 6x faster (the weights of a MiniLM call: 45 -> 7 us)
    from ._C import tensor_fingerprint as _FINGERPRINT  # type: ignore[attr-defined]
except ImportError:
    _FINGERPRINT = _python_fingerprint


def tensor_key(tensors: Iterable[Optional[Tensor]]) -> TensorKey:
    """The cache key of ``tensors`` (see :class:`TensorKey` and the module docstring)."""
    return TensorKey(tensors)


class WeightCache:
    """Derived weights of one front end, per kind; empty in every copy or pickle of its owner.

    Thread-safe: readers see a complete entry or build one under the lock (a model served from a
    thread pool builds each entry once).
    """

    MAX_KINDS = 8  # dtypes x weight formats a model alternates between; beyond it the oldest kind goes

    def __init__(self) -> None:
        self._entries: Dict[Hashable, Tuple[Tuple, object]] = {}
        self._lock = threading.Lock()
        self.last_decision: Optional[Tuple[str, str]] = None  # (path, why) of the last stack call

    def get(self, kind: Hashable, key: Tuple, build: Callable[[], object]) -> object:
        """The entry of ``kind`` built for ``key``, built now when missing or stale."""
        hit = self._entries.get(kind)
        if hit is not None and hit[0] == key:
            return hit[1]
        with self._lock:
            hit = self._entries.get(kind)
            if hit is None or hit[0] != key:
                value = build()
                self._entries.pop(kind, None)
                if len(self._entries) >= self.MAX_KINDS:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[kind] = hit = (key, value)
        return hit[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # Derived data is not copied or pickled: the copy rebuilds from its own weights.
    def __deepcopy__(self, memo) -> "WeightCache":
        return WeightCache()

    def __copy__(self) -> "WeightCache":
        return WeightCache()

    def __reduce__(self):
        return (WeightCache, ())


def cache_of(module: torch.nn.Module) -> Optional[WeightCache]:
    """The module's cache (created on first use; kept out of ``state_dict``, parameters and buffers); None while
    torch.compile traces (the traced per-op path keeps no derived weights, and a lock cannot be traced)."""
    if torch.compiler.is_compiling():
        return None
    cache = module.__dict__.get("_weight_cache")
    if cache is None:
        cache = module.__dict__["_weight_cache"] = WeightCache()
    return cache


def clear_caches(model: torch.nn.Module) -> torch.nn.Module:
    """Drop every derived weight inside ``model`` (after writing to parameters through ``.data``)."""
    for m in model.modules():
        cache = m.__dict__.get("_weight_cache")
        if cache is not None:
            cache.clear()
    return model
