"""BERT's pooler op (fastenc/ops/pooler.py): the cpu backend (the panel GEMM on a packed weight, ATen's GEMM where it
has no kernel) against the reference (fastenc.reference.bert_pooler) by the parity rule against fp64, odd shapes,
with and without bias; the packed weight kept in a WeightCache and rebuilt when the weight changes; the dispatch
(inference only); bad input named; HF's pooler classes run through it in inference; the packed weight is never
copied, pickled or saved."""
import inspect

import pytest
import torch

import fastenc
from fastenc import backends, ops, reference
from fastenc.models import hf
from fastenc.testing import assert_parity
from fastenc.weight_cache import WeightCache, cache_of
from tests.conftest import copied

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _inputs(batch, seqlen, d, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seqlen, d, generator=g)
    w = torch.randn(n, d, generator=g) / d ** 0.5
    b = 0.1 * torch.randn(n, generator=g) if bias else None
    return [None if t is None else t.to(dtype) for t in (h, w, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,seqlen,d,n", [(1, 1, 384, 384), (1, 32, 384, 384), (7, 5, 1000, 1000),
                                              (3, 127, 96, 80), (2, 513, 32, 70)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_matches_reference(dtype, batch, seqlen, d, n, bias):
    h, w, b = _inputs(batch, seqlen, d, n, dtype, bias)
    with torch.inference_mode():
        fast = ops.bert_pooler(h, w, b, backend="cpu")
        base = ops.bert_pooler(h, w, b, backend="reference")
        exact = reference.bert_pooler(*(None if t is None else t.double() for t in (h, w, b)))
    assert fast.dtype == dtype and fast.shape == (batch, n)
    assert_parity(fast, exact, base, name="pooler")


def _packs(dtype=torch.float32) -> bool:
    """Whether the cpu backend packs the weight here (the panel GEMM: AVX-512; ATen's GEMM, unpacked, below)."""
    return backends.extension().cpu_panel_gemm_supported(dtype)


def test_packed_weight_is_kept_and_follows_the_weight(monkeypatch):
    """One packed weight per weight generation in the cache: reused by later calls, rebuilt after an in-place update
    (the version counter) and for a new tensor."""
    if not _packs():
        pytest.skip("no packed weight below AVX-512: the cpu backend runs ATen's GEMM on the weight itself")
    h, w, b = _inputs(2, 3, 64, 64, torch.float32)
    cache = WeightCache()
    ext, packs = backends.extension(), []
    real = ext.PanelWeight
    monkeypatch.setattr(ext, "PanelWeight", lambda t: packs.append(1) or real(t))
    with torch.no_grad():
        first = ops.bert_pooler(h, w, b, cache=cache, backend="cpu")
        again = ops.bert_pooler(h, w, b, cache=cache, backend="cpu")
        assert packs == [1] and torch.equal(again, first)
        w.mul_(2)  # an in-place update bumps the version
        doubled = ops.bert_pooler(h, w, b, cache=cache, backend="cpu")
        assert packs == [1, 1]
        assert_parity(doubled, reference.bert_pooler(h.double(), w.double(), b.double()),
                      reference.bert_pooler(h, w, b), name="after w.mul_(2)")
        fresh = ops.bert_pooler(h, w.clone(), b, cache=cache, backend="cpu")
        assert packs == [1, 1, 1] and torch.equal(fresh, doubled)


@pytest.mark.filterwarnings("ignore:fastenc pooler. falling back to the PyTorch reference")  # meant: auto's
def test_dispatch_inference_only():
    h, w, b = _inputs(2, 3, 32, 32, torch.float32)
    w.requires_grad_(True)
    with backends.record() as seen:
        out = ops.bert_pooler(h, w, b)
    assert seen["pooler"] == {"reference"} and out.requires_grad  # autograd: the reference
    out.sum().backward()
    assert w.grad is not None
    with pytest.raises(fastenc.BackendUnavailableError, match="inference only"):
        ops.bert_pooler(h, w, b, backend="cpu")
    with torch.inference_mode(), backends.record() as seen:
        ops.bert_pooler(h, w, b)
    assert seen["pooler"] == {"cpu"}


def test_bad_input_is_named():
    h, w, b = _inputs(2, 3, 32, 16, torch.float32)
    cases = [
        (dict(hidden=h[:, 0]), ValueError, r"hidden must be \[B, L >= 1, d\]"),
        (dict(hidden=h[:, :0]), ValueError, r"hidden must be \[B, L >= 1, d\]"),
        (dict(weight=w[:, :8]), ValueError, r"weight \(16, 8\)"),
        (dict(bias=b[:4]), ValueError, r"bias must have shape \(16,\)"),
        (dict(weight=w.double()), TypeError, "weight .* must match hidden"),
        (dict(bias=b.bfloat16()), TypeError, "bias .* must match hidden"),
        (dict(hidden=h.long()), TypeError, "hidden must be a floating-point tensor"),
        (dict(weight=None), TypeError, "weight must be a tensor"),
    ]
    for kw, error, match in cases:
        args = dict(hidden=h, weight=w, bias=b)
        args.update(kw)
        with torch.inference_mode(), pytest.raises(error, match=match):
            ops.bert_pooler(**args, backend="cpu")


def test_hf_poolers_share_bert_code():
    """The pooler classes fastenc runs as the op compute what BertPooler does (same __init__ and forward)."""
    for cls in hf.POOLERS:
        assert inspect.getsource(cls.forward) == inspect.getsource(hf.POOLERS[0].forward), cls
        assert inspect.getsource(cls.__init__) == inspect.getsource(hf.POOLERS[0].__init__), cls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hf_model_pools_through_the_op_in_inference(dtype):
    """An optimized BertModel in inference runs its pooler as the op (once packed), matching HF's pooler_output by
    the parity rule; with a hook on the pooler, HF's module runs (and the hook sees it)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    fast = fastenc.optimize(BertModel(cfg).eval().to(dtype))
    fast.load_state_dict(model.state_dict())
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.inference_mode():
        with backends.record() as seen:
            out = fast(input_ids=ids, attention_mask=mask).pooler_output
        exact = model.double()(input_ids=ids, attention_mask=mask).pooler_output
        base = model.to(dtype)(input_ids=ids, attention_mask=mask).pooler_output
        assert seen["pooler"] == {"cpu"}
        assert_parity(out, exact, base, name="pooler_output", scaled=True)
        hooked = []
        handle = fast.pooler.register_forward_hook(lambda m, a, o: hooked.append(1))
        try:
            with backends.record() as seen:
                again = fast(input_ids=ids, attention_mask=mask).pooler_output
        finally:
            handle.remove()
        assert hooked == [1] and "pooler" not in seen
        assert_parity(again, exact, base, name="pooler_output (HF's module)", scaled=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_packed_pooler_weight_is_not_state(how):
    """The packed pooler weight (in the model's WeightCache) is derived data: a copy, pickle or torch.save of a model
    that ran starts without it and answers from its own weights; an in-place update or a new Parameter is seen."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    model = fastenc.optimize(BertModel(cfg)).eval()
    ids = torch.randint(1, 100, (2, 7))

    def pooled(m):
        with torch.inference_mode():
            out = m(input_ids=ids)
            ref = reference.bert_pooler(out.last_hidden_state, m.pooler.dense.weight, m.pooler.dense.bias)
        torch.testing.assert_close(out.pooler_output, ref)  # the op against the reference on the same hidden state
        return out.pooler_output

    first = pooled(model)
    assert len(cache_of(model)) == int(_packs())  # the packed weight, where the panel GEMM runs
    other = copied(model, how)
    assert len(cache_of(other)) == 0, "derived weights are not state"
    torch.testing.assert_close(pooled(other), first)
    with torch.no_grad():
        other.pooler.dense.weight.mul_(-1.0)
    assert not torch.allclose(pooled(other), first)  # the copy answers from its own, updated weight...
    torch.testing.assert_close(pooled(model), first)  # ...and the original from its own
    model.pooler.dense.weight = torch.nn.Parameter(torch.zeros_like(model.pooler.dense.weight))
    torch.testing.assert_close(pooled(model), torch.tanh(model.pooler.dense.bias).expand(2, -1))
