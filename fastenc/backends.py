"""Backend selection: the one place that decides which implementation runs an op.

Each op (``fastenc/ops/*.py``) registers its fast backends with a check that
returns ``None`` when the backend can run a call, or a sentence saying what is
missing.  The requested backend comes from, in order of precedence:

1. the module's ``backend`` attribute (``TransformerEncoderLayer(..., backend=...)``);
2. the innermost ``with fastenc.use_backend(...)`` block;
3. the ``FASTENC_BACKEND`` environment variable (``"triton"`` or
   ``"attention=triton,ffn=cuda"``), read at every call;
4. ``"auto"``.

``"auto"`` picks the first usable backend of the op's preference list for the
tensor's device (the reference on CPU); when none can run a call on a device that
has one (an unsupported head dim, say), it warns once and runs the reference.  A forced backend that cannot run raises
:class:`BackendUnavailableError` naming the reason.  A backend an op does not
implement at all (e.g. ``"triton"`` for the FFN, which is a CUDA extension) is
not an error when it comes from a global setting: that op runs ``"auto"``, and
``backend_report()`` says so.  Naming it for that op alone is an error.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
ENV_VAR = "FASTENC_BACKEND"

Check = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (no GPU, extension not built, unsupported shape...)."""


@dataclasses.dataclass
class _Op:
    name: str
    checks: Dict[str, Check]  # fast backend -> check(**call_info) -> None | reason
    auto_cuda: Tuple[str, ...]  # preference order on CUDA tensors
    auto_cpu: Tuple[str, ...]  # preference order on CPU tensors


_OPS: Dict[str, _Op] = {}
# Settings of the active use_backend blocks: {"*": default, op: backend}.
_SETTING: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("fastenc_backend", default={})


def register_op(name: str, checks: Dict[str, Check], auto_cuda: Sequence[str], auto_cpu: Sequence[str] = ()) -> None:
    """Declare an op's fast backends (the reference is implicit and always last)."""
    _OPS[name] = _Op(name, dict(checks), tuple(auto_cuda), tuple(auto_cpu))


def registered_ops() -> Tuple[str, ...]:
    return tuple(_OPS)


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def _parse(spec: str) -> Dict[str, str]:
    """'triton' -> {'*': 'triton'}; 'attention=triton,ffn=cuda' -> per-op entries."""
    out: Dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, _, b = part.partition("=")
            out[op.strip()] = _validate(b.strip())
        else:
            out["*"] = _validate(part)
    return out


@contextlib.contextmanager
def use_backend(default: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Choose backends inside a block: ``use_backend("reference")``, ``use_backend(attention="triton")``."""
    setting = dict(_SETTING.get())
    if default is not None:
        setting = {"*": _validate(default)}  # a new default overrides outer per-op choices
    for op, b in per_op.items():
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {tuple(_OPS)}")
        setting[op] = _validate(b)
    token = _SETTING.set(setting)
    try:
        yield
    finally:
        _SETTING.reset(token)


@torch.compiler.assume_constant_result
def _active_setting() -> Tuple[Tuple[str, str], ...]:
    """The innermost use_backend block's setting, as items.  Under torch.compile it is read once, when
    the graph is traced (torch 2.11's dynamo cannot trace ContextVar.get): a compiled model keeps the
    backends it was traced with."""
    return tuple(_SETTING.get().items())


def requested_backend(op: str, module_backend: Optional[str] = None) -> Tuple[str, bool]:
    """(backend, named_for_this_op) after applying the precedence rules."""
    if module_backend is not None:
        return _validate(module_backend), False
    for setting in (dict(_active_setting()), _parse(os.environ.get(ENV_VAR, ""))):
        if op in setting:
            return setting[op], True
        if "*" in setting:
            return setting["*"], False
    return "auto", False


def resolve(op: str, module_backend: Optional[str] = None, **call_info) -> str:
    """The concrete backend ('reference', 'triton' or 'cuda') that runs this call."""
    return explain(op, module_backend, **call_info)[0]


def explain(op: str, module_backend: Optional[str] = None, **call_info) -> Tuple[str, str]:
    """(backend, why) for one call; raises BackendUnavailableError for an unusable forced backend.

    call_info is passed to each backend's check; it always holds ``device``.
    """
    spec = _OPS[op]
    want, named = requested_backend(op, module_backend)
    if want == "reference":
        return "reference", "requested"
    if want != "auto":
        if want in spec.checks:
            reason = spec.checks[want](**call_info)
            if reason is not None:
                raise BackendUnavailableError(f"fastenc {op}: backend {want!r} is unavailable: {reason}")
            return want, "requested"
        if named:
            raise BackendUnavailableError(
                f"fastenc {op}: has no {want!r} backend (it has {('reference',) + tuple(spec.checks)})"
            )
    device = torch.device(call_info.get("device", "cpu"))
    order = spec.auto_cuda if device.type == "cuda" else spec.auto_cpu
    skipped = []
    for b in order:
        reason = spec.checks[b](**call_info)
        if reason is None:
            return b, "auto" + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{b}: {reason}")
    prefix = f"{want!r} is not a backend of this op; " if want not in ("auto",) else ""
    why = "; ".join(skipped) if skipped else f"auto prefers the reference on {device.type}"
    if skipped:  # a fast backend exists for this device but cannot run this call: say so, once
        _warn_once(f"fastenc {op}: falling back to the PyTorch reference ({why})")
    return "reference", f"{prefix}auto: {why}"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def backend_report(device: Optional[str] = None, dtype: torch.dtype = torch.float16, head_dim: int = 64) -> str:
    """Which backend each op uses for a typical call on ``device``, and why."""
    from . import ops  # noqa: F401  (registers the ops)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and dtype in (torch.float16, torch.bfloat16) and os.environ.get("TRITON_INTERPRET") != "1":
        dtype = torch.float32
    lines = [f"fastenc backends for device={device}, dtype={str(dtype).replace('torch.', '')}, head_dim={head_dim}"]
    for op, spec in _OPS.items():
        info = dict(device=device, dtype=dtype, head_dim=head_dim)
        try:
            chosen, why = explain(op, **info)
        except BackendUnavailableError as e:
            chosen, why = "error", str(e)
        lines.append(f"  {op:<12} -> {chosen:<9} ({why})")
        for b, check in spec.checks.items():
            reason = check(**info)
            lines.append(f"      {b:<9} {'available' if reason is None else 'unavailable: ' + reason}")
        if op == "ffn" and chosen == "cuda":
            from .ops.ffn import gemm_path

            path, why = gemm_path(device, dtype)
            lines.append(f"      gemm path {path} ({why})")
    return "\n".join(lines)


# ----------------------------------------------------------------- common availability checks


def triton_check(device, dtype=None, **_) -> Optional[str]:
    """Can Triton kernels run on this device/dtype at all?"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    dev = torch.device(device)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if dev.type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if torch.cuda.get_device_capability(dev)[0] < 8:
            return "Triton kernels need compute capability 8.0 or newer"
        return None
    if dev.type == "cpu":
        if not interpret:
            return "tensor is on CPU (set TRITON_INTERPRET=1 before importing fastenc to run Triton kernels on CPU)"
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16 arithmetic"
        return None
    return f"Triton kernels do not run on {dev.type} tensors"


def extension():
    """The compiled fastenc._C module, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C
