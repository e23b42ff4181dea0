"""Test setup: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set
here, before any fastenc import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # xdist workers share the cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
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
