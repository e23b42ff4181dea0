"""fastenc models with the PyTorch training ecosystem: autocast, torch.compile(fullgraph=True),
activation checkpointing, DistributedDataParallel and FSDP2 (two gloo processes on CPU).

Distributed tests compare gradients with a single-process run on the whole batch.
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

import fastenc
from fastenc.models import SequenceClassifier
from fastenc.testing import assert_close, assert_parity
from tests.conftest import DEVICE, ON_GPU, build_hf

VOCAB = 61
AUTOCAST_DTYPE = torch.float16 if ON_GPU else torch.bfloat16


def make_classifier(dropout=0.0, d_model=48, nhead=4, layers=2):
    torch.manual_seed(0)
    model = SequenceClassifier(3, vocab_size=VOCAB, d_model=d_model, nhead=nhead, num_layers=layers,
                               dim_feedforward=80, dropout=dropout, max_position=32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(n=4, seqlen=11, seed=1, device=DEVICE):
    """Ragged padded batch: lengths seqlen, 1, 6, 9, ... and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seqlen), generator=g)
    lengths = torch.tensor([seqlen, 1, 6, 9, 4, 11, 2, 7][:n])
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (n,), generator=g)
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device), labels.to(device)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------- autocast


def test_autocast_training_step_encoder_model():
    """Under autocast: fast backends vs the reference backend under the same autocast, both vs fp32."""
    model = make_classifier().to(DEVICE)
    ids, mask, labels = batch()
    with fastenc.use_backend("reference"):
        ref = model(ids, mask, labels=labels)
        ref.loss.backward()
    g_ref = grads(model)
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE), fastenc.use_backend("reference"):
        base = model(ids, mask, labels=labels)
    base.loss.backward()
    g_base = grads(model)
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
        fast = model(ids, mask, labels=labels)
    fast.loss.backward()
    g_fast = grads(model)
    assert fast.logits.dtype in (AUTOCAST_DTYPE, torch.float32)
    assert_parity(fast.logits, ref.logits, base.logits, name="logits")
    assert torch.isfinite(fast.loss)
    for name in g_ref:
        assert g_fast[name].dtype == torch.float32  # parameters and their grads stay fp32
        assert_parity(g_fast[name], g_ref[name], g_base[name], name=f"grad {name}")


def test_autocast_optimized_hf_model():
    """An optimized HF classifier under autocast vs the original under the same autocast."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements/dev.txt)")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                                     intermediate_size=130, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    orig = transformers.BertForSequenceClassification(config).to(DEVICE)
    fast = fastenc.optimize(copy.deepcopy(orig))
    ids, mask, labels = batch()
    ref = orig(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
        base = orig(input_ids=ids, attention_mask=mask, labels=labels)
        out = fast(input_ids=ids, attention_mask=mask, labels=labels)
    assert_parity(out.logits, ref.logits, base.logits, name="logits")
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


# ----------------------------------------------------------------- torch.compile


def _compile(model):
    # CPU: aot_eager traces the whole graph (fullgraph) and its backward without a C++ toolchain.
    return torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padded"])
def test_compile_fullgraph_encoder_model(padded):
    model = make_classifier().to(DEVICE)
    ids, mask, labels = batch()
    if not padded:
        mask = torch.ones_like(mask)
    eager = model(ids, mask, labels=labels)
    eager.loss.backward()
    g_eager = grads(model)
    model.zero_grad()
    torch._dynamo.reset()
    compiled = _compile(model)(ids, mask, labels=labels)
    compiled.loss.backward()
    g_compiled = grads(model)
    assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-4, name="logits")
    for name in g_eager:
        assert_close(g_compiled[name], g_eager[name], atol=1e-5, rtol=1e-4, name=f"grad {name}")


# ----------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_with_dropout():
    """checkpoint() recomputes the layer in backward with the same RNG state: same grads as without."""
    layer = fastenc.TransformerEncoderLayer(48, 4, 80, dropout=0.1, activation="gelu", batch_first=True).to(DEVICE)
    x = torch.randn(4, 11, 48, device=DEVICE)
    _, mask, _ = batch()
    kpm = mask == 0
    runs = []
    for use_ckpt in (False, True):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        y = checkpoint(layer, xi, None, kpm, use_reentrant=False) if use_ckpt else layer(xi, None, kpm)
        (y[mask.bool()] ** 2).sum().backward()
        runs.append((y.detach(), xi.grad, grads(layer)))
    (y0, gx0, g0), (y1, gx1, g1) = runs
    assert torch.equal(y0, y1)
    assert_close(gx1, gx0, atol=1e-6, rtol=1e-5, name="input grad")
    for name in g0:
        assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, name=name)


# ----------------------------------------------------------------- distributed (2 gloo processes on CPU)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, out_path):
    """One rank: a train step on its share of the batch under DDP, then under FSDP2 (fully_shard).

    Rank 0 saves the full gradients of each run (FSDP2's sharded DTensor grads are gathered).
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        ids, mask, labels = batch(device="cpu")
        half = ids.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        results = {}
        for mode in ("ddp", "fsdp2"):
            model = make_classifier()
            if mode == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
            else:
                mesh = init_device_mesh("cpu", (world,))
                for layer in model.encoder.encoder.layers:
                    fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            wrapped(ids[sl], mask[sl], labels=labels[sl]).loss.backward()
            results[mode] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                             for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(results, out_path)
        # Both ranks done before either tears gloo down: a rank that destroys the group while its peer's
        # (or its own async) work is in flight can abort in gloo's worker threads (SIGABRT, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_gradients_match_single_process(tmp_path):
    """Two gloo processes, two sequences each: averaged gradients equal one process on all four."""
    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    out = str(tmp_path / "grads.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    results = torch.load(out)
    model = make_classifier()
    ids, mask, labels = batch(device="cpu")
    model(ids, mask, labels=labels).loss.backward()
    single = grads(model)
    for mode in ("ddp", "fsdp2"):
        assert set(results[mode]) == set(single), mode
        for name, g in single.items():
            assert_close(results[mode][name], g, atol=1e-6, rtol=1e-5, name=f"{mode} grad {name}")


# ----------------------------------------------------------------- Hugging Face Trainer


def _trainer_losses(model, out_dir, data, steps):
    """transformers.Trainer on CPU for ``steps`` steps (batch 8, AdamW, linear decay, no dropout in the
    model): the loss of every step, read from the model's own output (the Trainer logs rounded values)."""
    from transformers import Trainer, TrainingArguments

    losses = []
    hook = model.register_forward_hook(lambda m, args, out: losses.append(out.loss.item()) if m.training else None)
    args = TrainingArguments(output_dir=str(out_dir), use_cpu=True, per_device_train_batch_size=8, max_steps=steps,
                             learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01,
                             seed=0, data_seed=0, logging_steps=1, save_strategy="no", report_to=[],
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    hook.remove()
    return losses


def test_hf_trainer_fine_tunes_an_optimized_model(tmp_path):
    """transformers.Trainer fine-tunes an optimized BertForSequenceClassification on CPU (padded batches,
    shuffled by the Trainer's seeded sampler): the loss of every step matches the unoptimized model
    under the same Trainer within the parity rule, the unoptimized model in float64 as the oracle and in
    float32 as the same-precision baseline (both runs see the same batches and start from the same weights,
    so their difference is the floating-point error of the steps, which the rule bounds), and it falls."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements/dev.txt)")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements/dev.txt)")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     max_position_embeddings=32, num_labels=3)
    model = build_hf(transformers.BertForSequenceClassification, config).cpu()
    data = []
    for seed in range(4):  # 32 ragged examples; label = whether token 7 occurs (a learnable rule)
        ids, mask, _ = batch(n=8, seed=seed, device="cpu")
        labels = (ids == 7).any(1).long() + (ids == 11).any(1).long()
        data += [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    steps = 8
    ref = _trainer_losses(copy.deepcopy(model).double(), tmp_path / "ref", data, steps)
    base = _trainer_losses(copy.deepcopy(model), tmp_path / "base", data, steps)
    fast_model = fastenc.optimize(copy.deepcopy(model))
    fast = _trainer_losses(fast_model, tmp_path / "fast", data, steps)
    assert isinstance(fast_model.bert.encoder, fastenc.TransformerEncoder) and len(fast) == steps
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # slack: 4 float32 roundings of the loss (a float32 scalar), not the op-level atol of 1e-5, which let a
    # 1e-3 relative noise planted in the CPU LayerNorm's input gradient pass (errors of 4e-6 vs 1e-7)
    assert_parity(as_tensor(fast), as_tensor(ref), as_tensor(base), atol=0.0, rtol=4 * torch.finfo(torch.float32).eps,
                  name="per-step training loss")
    assert sum(fast[-2:]) < 0.9 * sum(fast[:2]), fast  # it learns
