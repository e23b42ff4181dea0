"""A model's whole life with derived weights (fastenc/weight_cache.py): copies, pickles, saves, weight changes
of every kind, threads, forks and long runs all give the answers of the current weights.

The model is an optimized HF BertModel sized so that every GEMM of the fused stack runs on packed weights (the
panel GEMM's, or oneDNN's above the oneDNN threshold where the panel GEMM stops: a stale packed copy would show).
"Current" means: equal, under the parity rule, to the same model's per-op reference path (which reads the
parameters directly) against an fp64 copy.
"""
import copy
import multiprocessing
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import fastenc
from fastenc import backends
from fastenc.ops.linear import ONEDNN_MIN_MACS
from fastenc.testing import assert_parity
from fastenc import weight_cache
from fastenc.weight_cache import WeightCache, cache_of, tensor_key
from tests.conftest import copied

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")

D, LAYERS, FFN = 128, 2, 512
BATCH, LENGTHS = 6, [40, 33, 64, 7, 64, 21]


def _model(seed=0):
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return fastenc.optimize(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (BATCH, max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, mask


def _embed(model, inputs):
    ids, mask = inputs
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return out[mask.bool()]  # real tokens only (padding positions are unspecified)


def assert_current(model, inputs=None):
    """The fused stack answers from the model's current weights (the parity rule against its fp64 reference)."""
    inputs = inputs or _inputs()
    assert sum(LENGTHS) * D * D >= ONEDNN_MIN_MACS  # packed weights, not ATen's GEMM on the parameters
    with torch.inference_mode():
        fast = _embed(model, inputs)
    assert cache_of(model.encoder).last_decision[0] == "fused"
    with torch.inference_mode(), fastenc.use_backend("reference"):
        base = _embed(model, inputs)
        oracle = _embed(copy.deepcopy(model).double(), inputs)
    assert_parity(fast, oracle, base, name="fused stack vs the current weights")
    return fast


def _ran(model):
    with torch.inference_mode():
        return _embed(model, _inputs())


# --------------------------------------------------------------------------- the cache object


def test_cache_is_never_copied_or_pickled():
    cache = WeightCache()
    cache.get("k", (1,), lambda: "derived")
    assert len(cache) == 1
    for other in (copy.copy(cache), copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(other, WeightCache) and len(other) == 0


def test_cache_rebuilds_on_a_new_key_and_stays_bounded():
    cache, built = WeightCache(), []
    for i in range(3):
        assert cache.get("k", (i,), lambda: built.append(1) or len(built)) == i + 1
        assert cache.get("k", (i,), lambda: built.append(1) or len(built)) == i + 1  # a hit
    for kind in range(WeightCache.MAX_KINDS + 5):
        cache.get(kind, (), lambda: None)
    assert len(cache) == WeightCache.MAX_KINDS


def test_key_sees_in_place_updates_and_new_tensors_not_recycled_addresses():
    w = torch.randn(4, 4)
    key = tensor_key([w])
    with torch.no_grad():
        w.mul_(2)
    assert tensor_key([w]) != key  # the version counter
    # An entry holds its source tensors: a new tensor made the same way cannot take the freed address of the
    # old one and match its pointer, fresh version, dtype and shape (without the hold, it does here: a stale hit).
    cache = WeightCache()
    for n in (64, 384):
        old = torch.empty(n, n).normal_()
        cache.get("k", (tensor_key([old]),), lambda: "old")
        address = old.data_ptr()
        del old
        new = torch.empty(n, n).normal_()
        assert new.data_ptr() != address
        assert cache.get("k", (tensor_key([new]),), lambda: "new") == "new"


def _changes():
    """(name, key of some tensors, tensors after a change): the keys must differ, or be equal ("same ...")."""
    def key(*tensors):
        return tensor_key(tensors).key
    w, b = torch.randn(4, 4), torch.randn(4)
    with torch.inference_mode():
        frozen = torch.randn(3)
    yield "same tensors", key(w, None, b), (w, None, b)
    yield "same frozen (inference) tensor", key(frozen), (frozen,)
    before = key(w, b)
    with torch.no_grad():
        w.add_(1)
    yield "in-place update", before, (w, b)
    yield "transposed view of the same memory", key(w), (w.t(),)
    yield "other dtype", key(w), (w.view(torch.int32),)
    yield "other shape", key(w), (w.view(16),)
    yield "other pointer", key(w), (w[1:],)
    yield "None for a tensor", key(w, b), (w, None)
    yield "fewer tensors", key(w, b), (w,)
    yield "other device", key(torch.empty(4, 4, device="meta")), (torch.empty(4, 4),)


@pytest.mark.parametrize("fingerprint", ["extension", "python"])
def test_fingerprints_tell_the_same_changes(fingerprint, monkeypatch):
    """The C++ fingerprint (fastenc._C.tensor_fingerprint) and the Python one used without the extension see
    the same changes: each field of a tensor, None, the tuple's length."""
    if fingerprint == "python":
        monkeypatch.setattr(weight_cache, "_FINGERPRINT", weight_cache._python_fingerprint)
    else:
        assert weight_cache._FINGERPRINT is backends.extension().tensor_fingerprint
    for name, before, after in _changes():
        assert (before == tensor_key(after).key) == name.startswith("same"), name
    with pytest.raises((TypeError, AttributeError)):
        tensor_key([torch.randn(2), "not a tensor"])


def test_threads_build_an_entry_once():
    cache, built = WeightCache(), []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        return cache.get("k", (0,), lambda: built.append(1) or "v")

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: worker(), range(4))) == ["v"] * 4
    assert built == [1]


# --------------------------------------------------------------------------- copies, pickles, saves


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_work_after_inference_and_answer_from_their_own_weights(how):
    model = _model()
    first = _ran(model)  # the original now holds packed weights
    other = copied(model, how)
    assert len(cache_of(other.encoder)) == 0, "derived weights are not state"
    torch.testing.assert_close(_ran(other), first)
    with torch.no_grad():
        other.encoder.layers[0].linear1.weight.mul_(3.0)
    assert not torch.allclose(_ran(other), first)  # the copy answers from its own weights...
    torch.testing.assert_close(_ran(model), first)  # ...and the original from its own
    assert_current(other)


def test_state_dict_round_trips_and_never_holds_derived_weights():
    model = _model()
    _ran(model)
    sd = model.state_dict()
    assert all(t.layout == torch.strided for t in sd.values())
    fresh = _model(seed=7)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(_ran(fresh), _ran(model))


def test_to_torch_after_inference():
    model = _model()
    first = _ran(model)
    back = fastenc.to_torch(copy.deepcopy(model))
    assert type(back) is transformers.BertModel
    with torch.inference_mode():
        torch.testing.assert_close(_embed(back, _inputs()), first, atol=2e-5, rtol=1e-4)


def test_share_memory():
    model = _model()
    _ran(model)
    model.share_memory()
    assert_current(model)


# --------------------------------------------------------------------------- every way of changing weights


def _optimizer_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    ids, mask = _inputs(5)
    model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
    opt.step()
    model.eval()


def _in_place(model):
    with torch.no_grad():
        model.encoder.layers[1].self_attn.in_proj_weight.mul_(0.5)
        model.encoder.layers[0].linear2.bias.add_(0.3)


def _data_assign(model):
    lin = model.encoder.layers[0].linear1
    lin.weight.data = torch.randn_like(lin.weight) * 0.05


def _data_assign_transposed(model):
    """A square weight replaced by its own transpose: the same pointer, version, dtype and shape."""
    out = model.encoder.layers[0].self_attn.out_proj
    out.weight.data = out.weight.data.t()


def _load_copy(model):
    model.load_state_dict(_model(seed=11).state_dict())


def _load_assign(model):
    model.load_state_dict(_model(seed=12).state_dict(), assign=True)


def _init(model):
    nn.init.normal_(model.encoder.layers[1].linear2.weight, std=0.05)
    nn.init.ones_(model.encoder.layers[0].norm2.weight)


def _dtype_round_trip(model):
    model.to(torch.bfloat16)
    _ran(model)  # a bf16 stack of its own (another entry kind)
    model.to(torch.float32)


def _replace_module(model):
    model.encoder.layers[1].linear1 = nn.Linear(D, FFN)


WAYS = {"optimizer step": _optimizer_step, "in-place under no_grad": _in_place, ".data =": _data_assign,
        ".data = its transpose": _data_assign_transposed,
        "load_state_dict": _load_copy, "load_state_dict(assign=True)": _load_assign, "nn.init": _init,
        "dtype round trip": _dtype_round_trip, "a replaced module": _replace_module}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_changing_weights_is_seen(way):
    model = _model()
    before = _ran(model)
    WAYS[way](model)
    after = assert_current(model)
    assert not torch.allclose(after, before), "the change must change the answer (else the test sees nothing)"


def test_weights_shared_between_two_models():
    a = _model()
    b = _model(seed=3)
    b.encoder.layers[0] = a.encoder.layers[0]  # one layer object in both stacks
    _ran(a), _ran(b)
    with torch.no_grad():
        a.encoder.layers[0].linear1.weight.mul_(-1.0)
    assert_current(a)
    assert_current(b)


def test_tied_weights():
    model = _model()
    layers = model.encoder.layers
    layers[1].linear1.weight = layers[0].linear1.weight  # one Parameter in two layers
    _ran(model)
    with torch.no_grad():
        layers[0].linear1.weight.add_(0.1)
    assert_current(model)


def test_writes_through_data_need_clear_caches():
    """``p.data.mul_()`` bypasses PyTorch's version counter (as it bypasses autograd): the documented limit,
    and ``fastenc.clear_caches`` is the remedy."""
    model = _model()
    _ran(model)
    model.encoder.layers[0].linear1.weight.data.mul_(2.0)
    fastenc.clear_caches(model)
    assert_current(model)


# --------------------------------------------------------------------------- threads, forks, long runs


def test_one_model_served_from_threads():
    model = _model()
    inputs = [_inputs(seed) for seed in range(12)]
    with torch.inference_mode():
        serial = [_embed(model, i) for i in inputs]
    fastenc.clear_caches(model)  # the threads race to build the entries

    def call(i):
        with torch.inference_mode():
            return _embed(model, inputs[i])

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(call, range(len(inputs))), serial):
                torch.testing.assert_close(got, want)


def _child(model, conn):
    with torch.inference_mode():
        conn.send((torch.get_num_threads(), _embed(model, _inputs()).tolist()))  # plain values: no shared memory


def test_fork_after_the_model_ran():
    """Without fastenc's at-fork handler the child hangs in GNU OpenMP (seen here: in the embeddings' first
    parallel region); the parent runs on two threads so that its pool exists when it forks."""
    model = _model()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _ran(model)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(model, child))
        proc.start()
    finally:
        torch.set_num_threads(threads)
    assert parent.poll(120), "the forked child did not answer"
    threads, got = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert threads == 1, "fastenc runs a forked child on one thread (OpenMP's pool is not usable after a fork)"
    torch.testing.assert_close(torch.tensor(got), expected)


@pytest.mark.parametrize("calls", [300, pytest.param(10_000, marks=pytest.mark.slow)])
def test_long_run_stays_correct_and_bounded(calls):
    """Mixed batch sizes and lengths: the answers stay correct and fastenc's own state stays bounded (one
    cache entry per dtype and weight format; the decision cache bounded by its shape classes)."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    decisions = None
    for i in range(calls):
        b, length = int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(1, 129, (1,), generator=g))
        ids = torch.randint(1, 300, (b, length), generator=g)
        mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)).long()
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.isfinite(out).all()
        if i == 20:
            decisions = len(backends._DECISIONS)
    assert len(cache_of(model.encoder)) == 1
    assert len(backends._DECISIONS) == decisions, "the decision cache grew with the shapes"
    assert_current(model)


def test_int8_weights_follow_weight_changes():
    """The int8 copies (and the C++ layers holding them) are rebuilt after a weight changes, as the float ones."""
    model = _model()
    fastenc.quantize(model)
    before = _ran(model)
    with torch.no_grad():
        model.encoder.layers[0].linear1.weight.mul_(-1.5)
    after = _ran(model)
    with torch.inference_mode(), fastenc.use_backend(encoder="reference"):
        per_op = _embed(model, _inputs())  # the same int8 math op by op, from the current weights
    assert ((after - per_op).norm() / per_op.norm()).item() < 1e-3
    assert ((after - before).norm() / before.norm()).item() > 1e-2
