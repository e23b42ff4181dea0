"""Small helpers shared by every layer (a leaf: imports nothing from fastenc)."""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A UserWarning per distinct message per process (fastenc's only warn-once)."""
    warnings.warn(message, stacklevel=3)


def either(names) -> str:
    """"a, b or c" (the names as str)."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def convertible(model: object, reason: "str | None", strict: bool) -> bool:
    """Whether a model can be optimized: True when ``reason`` is None; otherwise ``ValueError`` naming
    the reason when ``strict``, else a warning that the model is left unchanged and False."""
    if reason is None:
        return True
    msg = f"fastenc: cannot optimize {type(model).__name__}: {reason}"
    if strict:
        raise ValueError(msg)
    warnings.warn(msg + "; left unchanged", stacklevel=3)
    return False


# Keyword arguments Hugging Face task models hand on to their base model for the loss alone (transformers'
# Trainer passes num_items_in_batch, the token count of a gradient-accumulation step): the encoder ignores them.
HF_LOSS_ONLY_KWARGS = frozenset({"num_items_in_batch"})


def unsupported_hf_kwargs(extra: dict) -> list:
    """Sorted names of the extra keyword arguments of an optimized HF base model's forward that are set
    (neither None nor False) and would change its output: decoder, cache and cross-attention inputs..."""
    return sorted(k for k, v in extra.items() if v is not None and v is not False and k not in HF_LOSS_ONLY_KWARGS)
