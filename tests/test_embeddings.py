"""BERT's embeddings op (fastenc/ops/embeddings.py, csrc/embeddings/): the C++ kernel against the reference
(HF's ops, fastenc.reference.bert_embeddings) by the parity rule against fp64, odd shapes, token types and
position ids given or not; the dispatch (inference only, int32 ids widened); bad input named."""
import pytest
import torch

import fastenc
from fastenc import backends, ops, reference
from fastenc.testing import assert_parity

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _tables(d, dtype, vocab=50, types=3, positions=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(n, d, generator=g) for n in (vocab, types, positions)]
    norm = [1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g)]
    return [x.to(dtype) for x in t], [x.to(dtype) for x in norm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,seqlen,d", [(1, 1, 384), (1, 32, 384), (3, 7, 1000), (2, 127, 96), (1, 513, 384),
                                            (2, 5, 10)])
@pytest.mark.parametrize("types,positions", [(False, False), (True, False), (False, "shared"), (True, "per_row")])
def test_cpu_matches_reference(dtype, batch, seqlen, d, types, positions):
    (word, tt_table, pos), (w, b) = _tables(d, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (batch, seqlen), generator=g)
    tt = torch.randint(0, 3, (batch, seqlen), generator=g) if types else None
    pid = None if not positions else torch.randint(0, 600, (1 if positions == "shared" else batch, seqlen),
                                                    generator=g)
    args = (ids, tt, pid)
    with torch.inference_mode():
        fast = ops.bert_embeddings(*args, word, tt_table, pos, w, b, 1e-12, backend="cpu")
        base = ops.bert_embeddings(*args, word, tt_table, pos, w, b, 1e-12, backend="reference")
        exact = reference.bert_embeddings(*args, *(t.double() for t in (word, tt_table, pos, w, b)), 1e-12)
    assert fast.dtype == dtype and fast.shape == (batch, seqlen, d)
    assert_parity(fast, exact, base, name="embeddings")


def test_fp32_parameters_and_absent_ones():
    """LayerNorm weight and bias in fp32 on bf16 tables, or None (HF's elementwise_affine=False)."""
    (word, tt_table, pos), (w, b) = _tables(64, torch.bfloat16)
    ids = torch.randint(0, 50, (2, 9))
    with torch.inference_mode():
        for params in ((w.float(), b.float()), (None, None), (w, None)):
            fast = ops.bert_embeddings(ids, None, None, word, tt_table, pos, *params, 1e-5, backend="cpu")
            exact = reference.bert_embeddings(ids, None, None, word.double(), tt_table.double(), pos.double(),
                                              *(None if p is None else p.double() for p in params), 1e-5)
            base = reference.bert_embeddings(ids, None, None, word, tt_table, pos,
                                             *(None if p is None else p.to(word.dtype) for p in params), 1e-5)
            assert_parity(fast, exact, base, name=str([p is None for p in params]))


@pytest.mark.filterwarnings("ignore:fastenc embeddings. falling back to the PyTorch reference")  # meant: auto's
def test_dispatch_inference_only_and_int32_ids():
    (word, tt_table, pos), (w, b) = _tables(32, torch.float32)
    ids = torch.randint(0, 50, (2, 5))
    word.requires_grad_(True)
    with backends.record() as seen:
        out = ops.bert_embeddings(ids, None, None, word, tt_table, pos, w, b, 1e-12)
    assert seen["embeddings"] == {"reference"} and out.requires_grad  # autograd: the reference
    out.sum().backward()
    assert word.grad is not None
    with pytest.raises(fastenc.BackendUnavailableError, match="inference only"):
        ops.bert_embeddings(ids, None, None, word, tt_table, pos, w, b, 1e-12, backend="cpu")
    word.requires_grad_(False)
    with torch.inference_mode():
        ref = ops.bert_embeddings(ids, None, None, word, tt_table, pos, w, b, 1e-12, backend="reference")
        with backends.record() as seen:
            torch.testing.assert_close(ops.bert_embeddings(ids.int(), None, None, word, tt_table, pos, w, b, 1e-12),
                                       ref)  # int32 ids widened: still the kernel
        assert seen["embeddings"] == {"cpu"}
        with pytest.raises(TypeError, match="input_ids must be int64"):
            ops.bert_embeddings(ids.short(), None, None, word, tt_table, pos, w, b, 1e-12, backend="cpu")


def test_bad_input_is_named():
    (word, tt_table, pos), (w, b) = _tables(32, torch.float32, positions=8)
    ids = torch.randint(0, 50, (2, 5))
    ext = backends.extension()

    def call(**kw):
        a = dict(input_ids=ids, token_type_ids=None, position_ids=None, word=word, types=tt_table, pos=pos,
                 weight=w, bias=b, eps=1e-12)
        a.update(kw)
        return ext.bert_embeddings_cpu(**a)
    cases = [
        (dict(input_ids=torch.tensor([[0, 50]])), IndexError, "input_ids holds 50 .* word table's 50 rows"),
        (dict(input_ids=torch.tensor([[-1, 0]])), IndexError, "input_ids holds -1"),
        (dict(token_type_ids=torch.full((2, 5), 3)), IndexError, "token_type_ids holds 3"),
        (dict(token_type_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "token_type_ids must have"),
        (dict(position_ids=torch.full((1, 5), 8)), IndexError, "position_ids holds 8"),
        (dict(position_ids=torch.zeros(3, 5, dtype=torch.long)), ValueError, r"position_ids must be \[1 or 2, 5\]"),
        (dict(input_ids=torch.zeros(1, 9, dtype=torch.long)), IndexError, "9 positions but the position table has 8"),
        (dict(input_ids=torch.zeros(5, dtype=torch.long)), ValueError, r"input_ids must be \[batch, seq\]"),
        (dict(types=tt_table.double()), TypeError, "types must be float32, float16 or bfloat16"),
        (dict(pos=pos.bfloat16()), TypeError, "pos has dtype BFloat16 but word has Float"),
        (dict(pos=pos[:, :16]), ValueError, r"pos must be \[rows >= 1, 32\]"),
        (dict(word=word.t().contiguous().t()), ValueError, "word must be"),
        (dict(weight=w[:16]), ValueError, r"weight must have shape \[32\]"),
        (dict(bias=b.half()), TypeError, "bias must be float32 or the tables' dtype"),
        (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (dict(word=word[:, :0], types=tt_table[:, :0], pos=pos[:, :0], weight=None, bias=None), ValueError,
         r"word must be \[rows >= 1, cols >= 1\]"),
        (dict(eps=float("nan")), ValueError, "eps must be finite and >= 0"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            call(**kw)
