"""Backend selection: the registry and the per-call decision (a leaf: it imports no op).

Each op (``fastenc/ops/*.py``) registers its fast backends, each with a check that returns
``None`` when the backend can run a call or a sentence saying what is missing, and its
``auto`` preference per device type.  The requested backend comes from, in order of precedence:

1. the call's ``backend=`` argument (a module passes its own setting for that op);
2. the innermost ``with fastenc.use_backend(...)`` block;
3. the ``FASTENC_BACKEND`` environment variable (``"triton"`` or ``"attention=triton,ffn=cuda"``);
4. ``"auto"``.

A backend named for one op (the call's argument, ``use_backend(ffn="cuda")``, ``"ffn=cuda"``,
a module's ``{"ffn": "cuda"}``) runs or raises :class:`BackendUnavailableError`; it is never
replaced by another.  A default for every op (``use_backend("triton")``, ``FASTENC_BACKEND=triton``,
a module's ``backend="triton"``) applies to the ops that implement it; the others run ``auto``
(there is no Triton FFN), which ``backend_report()`` shows.  ``"auto"`` picks the first usable
backend of the op's preference list for the tensor's device; when a device has fast backends but
none can run a call (an unsupported head dim, say), it warns once and runs the reference.
Unknown backend or op names raise ``ValueError`` wherever they appear.

The decision is cached per (op, request, device, dtype, shape class): a call costs a context
lookup and a dict lookup.  The shape class is what an op's checks read (head dim, hidden size...).
``with record() as seen:`` collects which backend each op resolved to inside a block (tests use it
to check that the intended kernels ran).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch

from . import constants
from ._util import warn_once

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "FASTENC_BACKEND"

# check(device, dtype, shape) -> None if the backend can run such a call, else the reason it cannot.
Check = Callable[[torch.device, torch.dtype, tuple], Optional[str]]
BackendSpec = Union[None, str, Mapping[str, str]]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (no GPU, extension not built, unsupported shape...)."""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    checks: Mapping[str, Check]  # fast backend -> its check (the reference is implicit and always last)
    auto: Mapping[str, Tuple[str, ...]]  # device type -> preference order of fast backends
    example: Callable[[int], tuple]  # head_dim -> a typical shape class, for backend_report()
    describe: Optional[Callable[[torch.device, torch.dtype], Sequence[str]]] = None  # extra report lines


_OPS: Dict[str, OpSpec] = {}
_DECISIONS: Dict[tuple, Tuple[str, str, bool]] = {}  # key -> (backend or error text, why, is_error)
_RECORDERS: List[Dict[str, Set[str]]] = []  # the open record() blocks' {op: backends resolved}


def register_op(name: str, checks: Mapping[str, Check], auto: Mapping[str, Sequence[str]],
                example: Callable[[int], tuple] = lambda head_dim: (),
                describe: Optional[Callable[[torch.device, torch.dtype], Sequence[str]]] = None) -> None:
    """Declare an op's fast backends and its auto preference per device type."""
    for b in checks:
        if b not in BACKENDS or b in ("auto", "reference"):
            raise ValueError(f"op {name!r}: {b!r} is not a fast backend name ({BACKENDS[2:]})")
    _OPS[name] = OpSpec(name, dict(checks), {d: tuple(o) for d, o in auto.items()}, example, describe)
    _DECISIONS.clear()


def registered_ops() -> Tuple[str, ...]:
    return tuple(_OPS)


def clear_cache() -> None:
    """Forget cached decisions and availability (after changing what is available, e.g. in tests)."""
    _DECISIONS.clear()
    _triton_check.cache_clear()
    _cpu_check.cache_clear()


# ----------------------------------------------------------------- settings and their validation


def _check_name(backend: object, where: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend  # type: ignore[return-value]


def _check_op(op: object, where: str) -> str:
    if op not in _OPS:
        raise ValueError(f"{where}: unknown op {op!r}; expected one of {tuple(_OPS)}")
    return op  # type: ignore[return-value]


def check_spec(spec: BackendSpec, where: str = "backend") -> BackendSpec:
    """Validate a module's ``backend=`` setting: None, a backend name, or {op: backend}."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return _check_name(spec, where)
    if isinstance(spec, Mapping):
        return {_check_op(op, where): _check_name(b, f"{where}[{op!r}]") for op, b in spec.items()}
    raise TypeError(f"{where} must be None, a backend name or a dict {{op: backend}}, got {type(spec).__name__}")


def op_backends(spec: BackendSpec) -> Dict[str, Optional[str]]:
    """Per-op ``backend=`` arguments a module with setting ``spec`` passes (None: follow the context).

    A name for every op applies to the ops that implement it; the others get ``"auto"``.
    """
    spec = check_spec(spec)
    out: Dict[str, Optional[str]] = {}
    for op, s in _OPS.items():
        if spec is None:
            out[op] = None
        elif isinstance(spec, str):
            out[op] = spec if spec in ("auto", "reference") or spec in s.checks else "auto"
        else:
            out[op] = spec.get(op)
    return out


@functools.lru_cache(maxsize=64)
def _parse_env(value: str) -> Tuple[Tuple[str, str], ...]:
    """'triton' -> (('*', 'triton'),); 'attention=triton,ffn=cuda' -> per-op entries."""
    out = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        if "=" in part:
            op, _, b = part.partition("=")
            out[_check_op(op.strip(), ENV_VAR)] = _check_name(b.strip(), ENV_VAR)
        else:
            out["*"] = _check_name(part, ENV_VAR)
    return tuple(out.items())


# Settings of the active use_backend blocks, as items (("*", default), (op, backend)...).
_SETTING: contextvars.ContextVar[Tuple[Tuple[str, str], ...]] = contextvars.ContextVar("fastenc_backend", default=())


@contextlib.contextmanager
def use_backend(default: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Choose backends inside a block: ``use_backend("reference")``, ``use_backend(attention="triton")``."""
    setting = dict(_SETTING.get())
    if default is not None:
        setting = {"*": _check_name(default, "use_backend")}  # a new default overrides outer per-op choices
    for op, b in per_op.items():
        setting[_check_op(op, "use_backend")] = _check_name(b, f"use_backend({op}=...)")
    token = _SETTING.set(tuple(setting.items()))
    try:
        yield
    finally:
        _SETTING.reset(token)


@torch.compiler.assume_constant_result
def _active_setting() -> Tuple[Tuple[str, str], ...]:
    """The innermost use_backend block's setting.  Under torch.compile it is read once, when the graph is
    traced (torch 2.11's dynamo cannot trace ContextVar.get): a compiled model keeps the backends it was traced with."""
    return _SETTING.get()


def requested_backend(op: str, backend: Optional[str] = None) -> Tuple[str, bool]:
    """(backend, named_for_this_op) after the precedence rules; ``backend`` is the call's argument."""
    if backend is not None:
        return _check_name(backend, f"fastenc {op}: backend"), True
    env = os.environ.get(ENV_VAR, "")
    for setting in (_active_setting(), _parse_env(env) if env else ()):
        default = None
        for key, value in setting:
            if key == op:
                return value, True
            if key == "*":
                default = value
        if default is not None:
            return default, False
    return "auto", False


# ----------------------------------------------------------------- the decision


def resolve(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype, shape: tuple = ()) -> str:
    """The concrete backend ('reference', 'triton', 'cuda' or 'cpu') that runs this call (cached)."""
    want, named = requested_backend(op, backend)
    key = (op, want, named, device, dtype, shape)
    hit = _DECISIONS.get(key)
    if hit is None:
        hit = _DECISIONS[key] = _decide(op, want, named, device, dtype, shape)
    if hit[2]:
        raise BackendUnavailableError(hit[0])
    if _RECORDERS:  # only while a record() block is open: the hot path stays one dict lookup
        for seen in _RECORDERS:
            seen.setdefault(op, set()).add(hit[0])
    return hit[0]


@contextlib.contextmanager
def record() -> Iterator[Dict[str, Set[str]]]:
    """Collect the backend each op resolves to inside the block: ``{op: {"cpu", ...}}``.

    Every resolved call is recorded, from any thread (a process-wide list, not a context variable:
    a model served by a thread pool is recorded too); an auto call that fell back records
    ``"reference"``.  The fused encoder stack records ``"encoder"`` only: its layers make no op calls.
    """
    seen: Dict[str, Set[str]] = {}
    _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is seen)]  # by identity: dicts compare by value


def explain(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype,
            shape: tuple = ()) -> Tuple[str, str]:
    """(backend, why) for one call; raises BackendUnavailableError for an unusable forced backend."""
    want, named = requested_backend(op, backend)
    chosen, why, error = _decide(op, want, named, torch.device(device), dtype, shape)
    if error:
        raise BackendUnavailableError(chosen)
    return chosen, why


def _decide(op: str, want: str, named: bool, device: torch.device, dtype: torch.dtype,
            shape: tuple) -> Tuple[str, str, bool]:
    spec = _OPS[op]
    if want == "reference":
        return "reference", "requested", False
    note = ""
    if want != "auto":
        if want in spec.checks:
            reason = spec.checks[want](device, dtype, shape)
            if reason is not None:
                return f"fastenc {op}: backend {want!r} is unavailable: {reason}", "", True
            return want, "requested", False
        if named:
            return f"fastenc {op}: has no {want!r} backend (it has {('reference',) + tuple(spec.checks)})", "", True
        note = f"{want!r} is not a backend of this op; "
    skipped = []
    for b in spec.auto.get(device.type, ()):
        reason = spec.checks[b](device, dtype, shape)
        if reason is None:
            return b, note + "auto" + (f" ({'; '.join(skipped)})" if skipped else ""), False
        skipped.append(f"{b}: {reason}")
    if skipped:  # a fast backend exists for this device but cannot run this call: say so, once
        warn_once(f"fastenc {op}: falling back to the PyTorch reference ({'; '.join(skipped)})")
        return "reference", note + "auto: " + "; ".join(skipped), False
    return "reference", note + f"auto: no fast backend for {device.type} tensors", False


def backend_report(device: Optional[str] = None, dtype: torch.dtype = torch.float16, head_dim: int = 64) -> str:
    """Which backend each op uses for a typical call on ``device``, and why."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPU encoders run fp32 (bf16 opt-in)
    lines = [f"fastenc backends for device={dev}, dtype={str(dtype).replace('torch.', '')}, head_dim={head_dim}"]
    if dev.type == "cpu":
        lines.append("  " + cpu_kernels_summary())
    for op, spec in _OPS.items():
        shape = spec.example(head_dim)
        try:
            chosen, why = explain(op, None, dev, dtype, shape)
        except BackendUnavailableError as e:
            chosen, why = "error", str(e)
        lines.append(f"  {op:<12} -> {chosen:<9} ({why})")
        for b, check in spec.checks.items():
            reason = check(dev, dtype, shape)
            lines.append(f"      {b:<9} {'available' if reason is None else 'unavailable: ' + reason}")
        if spec.describe is not None and chosen != "reference":
            lines += [f"      {line}" for line in spec.describe(dev, dtype)]
    return "\n".join(lines)


# ----------------------------------------------------------------- common availability checks


def triton_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Can Triton kernels run on this device/dtype at all?"""
    return _triton_check(device.type, device.index, dtype)


@functools.lru_cache(maxsize=None)
def _triton_check(device_type: str, index: Optional[int], dtype: torch.dtype) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        if torch.cuda.get_device_capability(torch.device("cuda", index))[0] < 8:
            return "Triton kernels need compute capability 8.0 or newer"
        return None
    if device_type == "cpu":
        if not interpret:
            return "tensor is on CPU (set TRITON_INTERPRET=1 before importing fastenc to run Triton kernels on CPU)"
        if dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16 arithmetic"
        return None
    return f"Triton kernels do not run on {device_type} tensors"


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled fastenc._C module, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def cpu_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Can the extension's C++ CPU kernels run on this device/dtype?"""
    if device.type != "cpu":
        return f"the C++ CPU kernels run on CPU tensors, not {device.type}"
    return _cpu_check(dtype)


def cpu_inference_check(why: str) -> Check:
    """The ``cpu`` check of an op without autograd, whose shape class is ``(needs_grad,)``: :func:`cpu_check`,
    then ``why`` for a call that needs gradients."""
    def check(device: torch.device, dtype: torch.dtype, shape: tuple) -> Optional[str]:
        reason = cpu_check(device, dtype)
        return reason if reason is not None or not (shape and shape[0]) else why
    return check


@torch.compiler.assume_constant_result  # read eagerly when first met while torch.compile traces (a pybind call)
@functools.lru_cache(maxsize=None)
def _cpu_check(dtype: torch.dtype) -> Optional[str]:
    ext = extension()
    if ext is None:
        return "the fastenc._C extension is not built (pip install without FASTENC_SKIP_NATIVE)"
    if str(dtype).replace("torch.", "") not in constants.KERNEL_DTYPES:
        return f"dtype {dtype} is not one of {', '.join(constants.KERNEL_DTYPES)}"
    # Run-time dispatch (csrc/common/cpu_kernels.h): each kernel runs its variant for the highest instruction set
    # this CPU has and FASTENC_CPU_CAPABILITY allows (a bad value is a ValueError naming it).
    report = ext.cpu_capability()
    missing = sorted(name for name, k in report["kernels"].items() if k["runs"] is None)
    if missing:
        built = sorted({c for k in report["kernels"].values() for c in k["compiled"]},
                       key=("default", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx").index)
        return (f"fastenc._C has no CPU kernels for the instruction set {report['selected']} (this CPU: "
                f"{report['cpu']}, FASTENC_CPU_CAPABILITY: {report['limit'] or 'unset'}; built for {', '.join(built)})")
    return None


def cpu_kernels_summary() -> str:
    """One line: the instruction set the C++ CPU kernels run at, why, and each kernel's variant."""
    ext = extension()
    if ext is None:
        return "CPU kernels: the fastenc._C extension is not built"
    r = ext.cpu_capability()
    runs = ", ".join(f"{name} {k['runs'] or 'none'}" for name, k in r["kernels"].items())
    return (f"CPU kernels: {r['selected']} (this CPU: {r['cpu']}; FASTENC_CPU_CAPABILITY: {r['limit'] or 'unset'}): "
            f"{runs}")
