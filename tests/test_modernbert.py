"""fastenc.optimize on Hugging Face ModernBERT (fastenc/models/modernbert.py) vs the original (sdpa).

Small randomly initialised models (never downloaded): hidden 64, 4 heads (head dim 16), 3 layers
(one global, two local), a local window of 8 tokens (4 on each side) and sequences of 23 tokens, so
every local layer cuts through the sequences.  Ragged batches: 19 real tokens, 1, and no padding;
right padding and left padding.  Parity rule: optimized model in dtype vs the original in fp64,
bounded by the original in the same dtype, atol scaled by the magnitude; hidden states on real tokens,
every parameter gradient under the HF names.
"""
import copy
import warnings

import pytest
import torch

import fastenc
from fastenc import backends
from fastenc.testing import assert_parity
from tests.conftest import DEVICE, ON_GPU, assert_auto_kernels, assert_grads_parity, build_hf, state_dict_grads

transformers = pytest.importorskip("transformers", reason="the HF adapter needs transformers (requirements/dev.txt)")
from transformers import (  # noqa: E402
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    ModernBertModel,
)

from fastenc.models import modernbert  # noqa: E402

VOCAB, B, S = 97, 3, 23


def make_config(*, layers=3, dropout=0.0, act="gelu", bias=False, hidden=64, heads=4, **extra):
    return ModernBertConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=80, num_hidden_layers=layers,
                            num_attention_heads=heads, local_attention=8, global_attn_every_n_layers=3,
                            max_position_embeddings=64, hidden_activation=act, attention_dropout=dropout,
                            mlp_dropout=dropout, embedding_dropout=dropout, attention_bias=bias, mlp_bias=bias,
                            norm_bias=bias, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                            sep_token_id=2, num_labels=3, attn_implementation="sdpa", **extra)


def inputs(left=False, seqlen=S):
    """Ragged batch: 19 real tokens, 1 real token, no padding (right- or left-padded)."""
    ids = torch.randint(3, VOCAB, (B, seqlen), device=DEVICE)
    lengths = torch.tensor([min(19, seqlen), 1, seqlen], device=DEVICE)[:, None]
    pos = torch.arange(seqlen, device=DEVICE)[None, :]
    mask = (pos >= seqlen - lengths) if left else (pos < lengths)
    mask = mask.long()
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def triple(model, dtype, backend=None, unpad=None):
    """(reference: the original in fp64; original in dtype; optimized copy)."""
    base = copy.deepcopy(model).to(dtype)
    fast = fastenc.optimize(copy.deepcopy(model).to(dtype), backend=backend)
    for m in fast.modules():
        if isinstance(m, modernbert.FastModernBertModel):
            m.unpad = unpad
    ref = model.to(torch.float64)
    return ref, base, fast


def _check_model(ref, base, fast, kw, dtype, hidden=64, backend="auto"):
    """Parity of the last hidden state and every parameter gradient; the kernels of ``backend`` ran (auto:
    conftest.AUTO's; a forced one: attention and LayerNorm on it)."""
    keep = kw["attention_mask"].bool()
    weight = torch.randn(int(keep.sum()), hidden, device=DEVICE)
    with backends.record() as seen:
        outs = [m(**kw).last_hidden_state for m in (ref, base, fast)]
    if backend == "auto":
        assert_auto_kernels(seen)
    else:
        assert seen["attention"] == seen["layer_norm"] == {backend}, seen
    assert outs[2].dtype == dtype
    assert_parity(outs[2][keep], outs[0][keep], outs[1][keep], name="last_hidden_state", scaled=True)
    for o in outs:
        (o.float()[keep] * weight).sum().backward()
    gr, gb, gf = state_dict_grads(ref), state_dict_grads(base), state_dict_grads(fast)
    assert set(gf) == set(gr)
    assert_grads_parity(gf, gr, gb)


CASES = [("reference", torch.float32, False, False), ("reference", torch.float32, True, True),
         ("auto", torch.float32, True, False), ("auto", torch.float32, False, True),
         ("triton", torch.float32, True, False), ("triton", torch.float16, False, False),
         ("triton", torch.float16, True, True), ("cpu", torch.float32, True, True),
         ("cpu", torch.bfloat16, False, False)]


@pytest.mark.parametrize("backend,dtype,unpad,left", CASES,
                         ids=[f"{b}-{str(d)[6:]}-{'unpad' if u else 'padded'}-{'left' if lp else 'right'}"
                              for b, d, u, lp in CASES])
def test_base_model_parity(backend, dtype, unpad, left):
    """Last hidden state on real tokens and every parameter gradient, against HF's sdpa model."""
    if ON_GPU and backend == "cpu":
        pytest.skip("the extension's CPU path runs on CPU tensors")
    ref, base, fast = triple(build_hf(ModernBertModel, make_config()), dtype, backend, unpad)
    assert type(fast).__name__ == "ModernBertModel" and isinstance(fast, modernbert.FastModernBertModel)
    for m in (ref, base, fast):
        m.train()  # dropout 0: train mode only changes which paths run
    _check_model(ref, base, fast, inputs(left), dtype, backend=backend)


@pytest.mark.skipif(ON_GPU, reason="the fused stack is the CPU inference path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("left,act,bias", [(False, "gelu", False), (True, "silu", True)])
def test_inference_runs_the_fused_stack(dtype, left, act, bias):
    """In inference on a CPU the whole ModernBERT stack (window, rotary, gated FFN, layer 0 without attention
    norm) is one C++ call: parity with HF on real tokens, sequences longer than the window."""
    from fastenc.weight_cache import cache_of

    if dtype == torch.bfloat16 and not fastenc.backends.extension().cpu_linear_supported(dtype):
        pytest.skip("no bf16 GEMMs on this CPU")
    torch.manual_seed(0)
    model = build_hf(ModernBertModel, make_config(act=act, bias=bias)).eval()
    ref, base, fast = triple(model, dtype)
    kw = inputs(left=left)
    keep = kw["attention_mask"].bool()
    with torch.inference_mode():
        outs = [m(**kw).last_hidden_state for m in (ref, base, fast)]
    assert cache_of(fast).last_decision == ("fused", "one C++ call for the whole stack")
    assert_parity(outs[2][keep], outs[0][keep], outs[1][keep], name="fused last_hidden_state")


def test_biases_and_swiglu():
    """attention_bias / mlp_bias / norm_bias and a SiLU-gated FFN (swiglu)."""
    ref, base, fast = triple(build_hf(ModernBertModel, make_config(act="silu", bias=True)), torch.float32, unpad=True)
    assert fast.layers[1].attn.Wqkv.bias is not None and fast.final_norm.bias is not None
    _check_model(ref, base, fast, inputs(), torch.float32)


def test_masked_lm_and_classification_heads():
    torch.manual_seed(1)
    kw = inputs()
    labels = torch.randint(3, VOCAB, (B, S), device=DEVICE).masked_fill(kw["attention_mask"] == 0, -100)
    for cls, lab in ((ModernBertForMaskedLM, labels), (ModernBertForSequenceClassification,
                                                       torch.tensor([0, 2, 1], device=DEVICE))):
        for pooling in (("cls", "mean") if cls is ModernBertForSequenceClassification else ("cls",)):
            ref, base, fast = triple(build_hf(cls, make_config(classifier_pooling=pooling)), torch.float32)
            assert isinstance(fast.model, modernbert.FastModernBertModel) and type(fast) is cls
            outs = [m(**kw, labels=lab) for m in (ref, base, fast)]
            keep = kw["attention_mask"].bool() if cls is ModernBertForMaskedLM else slice(None)
            r, b, f = (o.logits[keep] for o in outs)
            assert_parity(f, r, b, name=f"{cls.__name__} logits", scaled=True)
            assert_parity(outs[2].loss, outs[0].loss, outs[1].loss, name=f"{cls.__name__} loss", scaled=True)
            for o in outs:
                o.loss.backward()
            gr, gb, gf = state_dict_grads(ref), state_dict_grads(base), state_dict_grads(fast)
            assert_grads_parity(gf, gr, gb, where=f"{cls.__name__} ")


def test_state_dict_save_pretrained_and_to_hf(tmp_path):
    model = build_hf(ModernBertForSequenceClassification, make_config())
    keys = list(model.state_dict())
    fast = fastenc.optimize(copy.deepcopy(model))
    assert list(fast.state_dict()) == keys, "the HF names are kept"
    fast.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ModernBertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="sdpa").to(DEVICE)
    assert type(loaded.model) is ModernBertModel, "save_pretrained writes a plain HF checkpoint"
    kw = inputs()
    expected = model(**kw).logits
    assert torch.equal(loaded(**kw).logits, expected), "the saved checkpoint holds HF's weights, bit for bit"
    fastenc.to_torch(fast)
    assert type(fast.model) is ModernBertModel and "unpad" not in fast.model.__dict__
    assert torch.equal(fast(**kw).logits, expected), "to_torch: HF's classes on HF's weights"


def test_hidden_states_return_dict_and_inputs_embeds():
    ref, base, fast = triple(build_hf(ModernBertModel, make_config()), torch.float32, unpad=True)
    kw = inputs()
    r, b, f = (m(**kw, output_hidden_states=True) for m in (ref, base, fast))
    assert len(f.hidden_states) == len(r.hidden_states) == 4
    keep = kw["attention_mask"].bool()
    for hr, hb, hf_ in zip(r.hidden_states, b.hidden_states, f.hidden_states):
        assert_parity(hf_[keep], hr[keep], hb[keep], name="hidden_states", scaled=True)
    tup = fast(**kw, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    emb = [m.embeddings.tok_embeddings(kw["input_ids"]) for m in (ref, base, fast)]
    r, b, f = (m(inputs_embeds=e, attention_mask=kw["attention_mask"]).last_hidden_state
               for m, e in zip((ref, base, fast), emb))
    assert_parity(f[keep], r[keep], b[keep], name="inputs_embeds", scaled=True)
    no_mask = {k: v[2:] for k, v in kw.items() if k == "input_ids"}  # the unpadded row alone, no mask
    r, b, f = (m(**no_mask).last_hidden_state for m in (ref, base, fast))
    assert_parity(f, r, b, name="no attention_mask", scaled=True)


def test_dropout_in_train_mode():
    model = build_hf(ModernBertModel, make_config(dropout=0.2))
    fast = fastenc.optimize(copy.deepcopy(model))
    kw = inputs()
    keep = kw["attention_mask"].bool()
    fast.train()
    a, b = (fast(**kw).last_hidden_state for _ in range(2))
    assert torch.isfinite(a).all() and (a - b)[keep].abs().max() > 1e-3
    fast.eval()
    e = fast(**kw).last_hidden_state
    assert (a - e)[keep].abs().mean() < e[keep].abs().mean()

    def deviation(m):  # train-vs-eval deviation: dropout on and scaled as in HF
        m.eval()
        ev = m(**kw).last_hidden_state
        m.train()
        return torch.stack([(m(**kw).last_hidden_state - ev)[keep].abs().mean() for _ in range(4)]).mean()

    ratio = (deviation(fast) / deviation(model)).item()
    assert 0.75 < ratio < 1.33, ratio
    fast.train()
    fast(**kw).last_hidden_state.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


def test_gradient_checkpointing():
    """Gradients with checkpointing against HF's model in fp64 by the parity rule (baseline: HF's in fp32)."""
    model = build_hf(ModernBertModel, make_config()).train()
    ckpt = fastenc.optimize(copy.deepcopy(model)).train()
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    assert ckpt.gradient_checkpointing
    kw = inputs()
    keep = kw["attention_mask"].bool()
    models = (copy.deepcopy(model).double(), model, ckpt)
    for m in models:
        m(**kw).last_hidden_state[keep].square().sum().backward()
    g_oracle, g_base, g_ckpt = (state_dict_grads(m) for m in models)
    assert_grads_parity(g_ckpt, g_oracle, g_base)


def test_unsupported_and_call_errors():
    with pytest.warns(UserWarning, match="hidden_activation 'relu'"):
        model = fastenc.optimize(build_hf(ModernBertModel, make_config(act="relu")))
    assert type(model) is ModernBertModel
    with pytest.raises(ValueError, match="hidden_activation"):
        modernbert.optimize_modernbert(build_hf(ModernBertModel, make_config(act="relu")), strict=True)
    fast = fastenc.optimize(build_hf(ModernBertModel, make_config()))
    kw = inputs()
    with pytest.raises(ValueError, match="position_ids"):
        fast(**kw, position_ids=torch.arange(S, device=DEVICE)[None])
    with pytest.raises(ValueError, match="output_attentions"):
        fast(**kw, output_attentions=True)
    with pytest.raises(ValueError, match="2D"):
        fast(kw["input_ids"], attention_mask=kw["attention_mask"][:, None, None, :])
    with pytest.raises(ValueError, match="exactly one"):
        fast()


def test_sentence_transformers_on_modernbert(tmp_path, monkeypatch):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (requirements/dev.txt)")
    from transformers import BertTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    words = "the movie was great not good a very bad film plot is awful".split()
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + words + [f"w{i}" for i in range(VOCAB - 5 - len(words))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    build_hf(ModernBertModel, make_config()).cpu().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Transformer(str(tmp_path), model_args={"attn_implementation": "sdpa"})
        model = st.SentenceTransformer(modules=[tr, Pooling(64, pooling_mode="mean"), Normalize()], device=DEVICE)
    model.eval()
    sentences = ["the movie was great", "not good", "a very very bad film , the plot is awful " * 2, "good"]
    ref = model.encode(sentences, convert_to_tensor=True, batch_size=4)
    fastenc.optimize(model)
    assert isinstance(tr.model if hasattr(tr, "model") else tr.auto_model, modernbert.FastModernBertModel)
    fast = model.encode(sentences, convert_to_tensor=True, batch_size=4)
    assert_parity(fast, ref, ref, name="sentence embeddings", scaled=True)


@pytest.mark.skipif(not ON_GPU, reason="low-precision GPU parity at ModernBERT-base shapes needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_modernbert_base_shape(dtype):
    """ModernBERT-base sized layers (hidden 768, 12 heads, window 128) on the GPU backends, 8 x 512 ragged."""
    config = make_config(hidden=768, heads=12, layers=3)
    config.intermediate_size, config.local_attention = 1152, 128
    ref, base, fast = triple(build_hf(ModernBertModel, config), dtype, unpad=None)
    ids = torch.randint(3, VOCAB, (8, 512), device=DEVICE)
    mask = (torch.arange(512, device=DEVICE) < torch.randint(1, 513, (8, 1), device=DEVICE)).long()
    kw = dict(input_ids=ids, attention_mask=mask)
    _check_model(ref, base, fast, kw, dtype, hidden=768)
