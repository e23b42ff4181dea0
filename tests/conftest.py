"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set
here, before any fastenc import.
"""
import copy
import io
import itertools
import os
import pickle

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # xdist workers share the cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

SKIPPED_NATIVE = os.environ.get("FASTENC_SKIP_NATIVE", "0").lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    """auto falling back from a fast kernel to the reference (fastenc.backends._decide's warning) is an error in
    tests: a test that means it says so (pytest.warns, or a filterwarnings mark).  Not in a build without the
    extension (FASTENC_SKIP_NATIVE=1), where every CPU op falls back by design.  ("." stands for the colon,
    which the filter syntax cannot hold.)"""
    if not SKIPPED_NATIVE:
        config.addinivalue_line("filterwarnings", FALLBACK_IS_AN_ERROR)


FALLBACK_IS_AN_ERROR = "error:fastenc [a-z_]+. falling back to the PyTorch reference:UserWarning"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
# What auto runs on this device's tensors when fastenc._C is built: padding has no CPU kernel, linear and the
# fused encoder stack no CUDA one.  (A fallback from a fast kernel to the reference is an error in tests:
# pyproject.toml's filterwarnings.)
AUTO = ({"attention": "triton", "layer_norm": "triton", "ffn": "cuda", "linear": "reference", "encoder": "reference",
         "padding": "triton", "embeddings": "reference", "pooler": "reference"} if ON_GPU else
        {"attention": "cpu", "layer_norm": "cpu", "ffn": "cpu", "linear": "cpu", "encoder": "cpu",
         "padding": "reference", "embeddings": "cpu", "pooler": "cpu"})
# dtypes the Triton kernels can be checked in here (the interpreter has no bf16 arithmetic).
TRITON_DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def state_dict_grads(model):
    """Parameter gradients under the state_dict names (Hugging Face's, for an optimized HF model: its
    state_dict hooks split fused parameters): each parameter's data is swapped for its gradient."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    return model.state_dict()


def build_hf(cls, config):
    """An HF model with non-trivial biases and LayerNorm parameters (HF inits them to 0 / 1), on DEVICE."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(DEVICE)


def copied(model, how: str):
    """A copy of model made the way a user would: ``deepcopy``, ``pickle`` (dumps then loads) or ``torch.save``
    (to a buffer, then torch.load)."""
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    assert how == "torch.save", how
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def pairwise(*factors):
    """Rows (tuples, one value per factor) in which every pair of values of any two factors occurs at least
    once: a greedy covering array, deterministic, a few times the product of the two largest factors
    instead of the full product (bugs that need three factors at once are rarer than the time they cost)."""
    n = len(factors)
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(n), 2)
                 for a in range(len(factors[i])) for b in range(len(factors[j]))}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(n):
            if k not in row:  # the value that covers most new pairs with the values chosen so far
                row[k] = max(range(len(factors[k])), key=lambda v: sum(  # noqa: B023 (used in this iteration)
                    (min(k, m), v if k < m else row[m], max(k, m), row[m] if k < m else v) in uncovered for m in row))
        uncovered -= {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(n), 2)}
        rows.append(tuple(factors[k][row[k]] for k in range(n)))
    return rows


def assert_auto_kernels(seen, must_run=("attention", "layer_norm", "ffn")):
    """After ``with fastenc.backends.record() as seen``: every op that ran under auto ran AUTO's kernel (never
    the reference where a fast kernel exists), and the ops of ``must_run`` ran (training runs op by op; CPU
    inference runs the fused stack, op "encoder")."""
    from fastenc.backends import extension

    if extension() is None and SKIPPED_NATIVE:
        pytest.skip("fastenc._C deliberately not built (FASTENC_SKIP_NATIVE=1): auto runs the reference")
    wrong = {op: ran for op, ran in seen.items() if ran != {AUTO[op]}}
    assert not wrong, f"auto ran {wrong}; expected {AUTO}"
    missing = set(must_run) - set(seen)
    assert not missing, f"{sorted(missing)} never ran (ran: {seen})"


def base_error(base, oracle) -> float:
    """Plain PyTorch's largest error against the oracle, where both are finite (as fastenc.testing counts it)."""
    ok = torch.isfinite(base) & torch.isfinite(oracle)
    return torch.where(ok, base.double() - oracle.double(), 0.0).abs().max().item() if base.numel() else 0.0


def typical_relative_error(base: dict, oracle: dict) -> float:
    """The median over tensors of plain PyTorch's largest error relative to the oracle's magnitude: how precise
    the dtype is through this computation, measured on all its gradients at once.  A tensor of a few elements
    (a LayerNorm weight of width 4, a bias of one) measures it by a few samples, which its rounding can bring
    near 0 by chance; its bound takes this instead when larger."""
    rel = sorted(base_error(base[n], r) / r.abs().max().item() for n, r in oracle.items()
                 if r.numel() and r.abs().max() > 0)
    return rel[len(rel) // 2] if rel else 0.0


def assert_grads_parity(fast: dict, oracle: dict, base: dict, where: str = "",
                        skip=("position_ids", "token_type_ids", "inv_freq")) -> None:
    """Every floating gradient of ``oracle`` ({name: gradient}, float64) by the parity rule against ``fast`` and
    ``base``: |fast - oracle| <= 2 max(base error, typical_relative_error · magnitude) + atol · magnitude, the
    magnitude that gradient's largest.  A gradient that is 0 in exact arithmetic has no magnitude of its own (the
    attention key bias's: softmax ignores a shift of all of a query's scores; the fp64 oracle gives ~1e-20, both
    fp32 runs rounding noise): there the scale is the model's largest gradient.  Names ending with one of
    ``skip`` (buffers: ids, rotary frequencies) are not compared."""
    from fastenc.testing import ATOL, assert_parity

    grads = {n: g for n, g in oracle.items() if g.is_floating_point() and g.numel() and not n.endswith(skip)}
    top = max(g.abs().max().item() for g in grads.values())
    zero = {n for n, r in grads.items() if r.abs().max().item() <= 1e-9 * top}  # zero up to fp64 rounding
    typical = typical_relative_error(base, {n: r for n, r in grads.items() if n not in zero})
    for name, r in grads.items():
        f, b = fast[name], base[name]
        atol, label = ATOL.get(f.dtype, 1e-5), f"{where}grad {name}"
        if name in zero:
            assert_parity(f, r, b, atol=atol * top, name=label)
        else:
            mag = r.abs().max().item()
            floor = 2 * max(0.0, typical * mag - base_error(b, r))  # raises 2 x base error to 2 x typical · mag
            assert_parity(f, r, b, scaled=True, atol=atol + floor / mag, name=label)
