"""Small helpers shared by every layer (a leaf: imports nothing from fastenc)."""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A UserWarning per distinct message per process (fastenc's only warn-once)."""
    warnings.warn(message, stacklevel=3)
