"""The fused encoder op (fastenc/ops/encoder.py, csrc/cpu/encoder.cpp): the C++ stack against the per-op
composition of the same LayerSpec/LayerWeights on reference ops (its reference), below and above the size
where its GEMMs switch from ATen's to the panel GEMM's or oneDNN's; its argument checks."""
import sys

import pytest
import torch

import fastenc
from fastenc import backends, ops
from fastenc.ops.linear import ONEDNN_MIN_MACS
from fastenc.testing import assert_parity
from fastenc.weight_cache import tensor_key
from tests.layer_cases import cu_seqlens, random_layer, to_dtype

pytestmark = pytest.mark.skipif(backends.cpu_check(torch.device("cpu"), torch.float32) is not None,
                                reason="the extension's CPU kernels are not built")


def _check(layers, lengths, dtype, final=None, causal=False):
    """Fused (cpu) vs the reference composition: the parity rule against an fp64 oracle."""
    d = layers[0][0].d_model
    x = torch.randn(sum(lengths), d, generator=torch.Generator().manual_seed(1)).to(dtype)
    cu, mx = cu_seqlens(lengths), max(lengths)
    kw = dict(is_causal=causal)
    with torch.inference_mode():
        fast = fastenc.encoder_stack(x, cu, mx, to_dtype(layers, dtype), final_norm=final, backend="cpu", **kw)
        final64 = final and fastenc.NormWeights(*(None if t is None else t.double() for t in final[:2]), final.eps)
        oracle = fastenc.encoder_stack(x.double(), cu, mx, to_dtype(layers, torch.float64), backend="reference",
                                       final_norm=final64, **kw)
        base = fastenc.encoder_stack(x, cu, mx, to_dtype(layers, dtype), final_norm=final, backend="reference", **kw)
    assert fast.dtype == dtype and fast.shape == x.shape
    assert_parity(fast, oracle, base, name="encoder stack")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_first,activation,bias,causal", [
    (False, "gelu", True, False), (True, "relu", False, False), (False, "gelu_tanh", True, True),
    (True, "gelu", True, False)])
def test_small_stack_matches_reference(dtype, norm_first, activation, bias, causal):
    """53 tokens, d=64: every GEMM below the oneDNN threshold (the panel GEMM, else ATen's, + the activation pass)."""
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(64, 4, 96, activation=activation, norm_first=norm_first, bias=bias, generator=g)
              for _ in range(3)]
    final = fastenc.NormWeights(1 + 0.1 * torch.randn(64), 0.1 * torch.randn(64), 1e-6)
    _check(layers, [7, 1, 0, 33, 12], dtype, final, causal)


def _weights_key(layers):
    """The caches' key fastenc.stack.run computes for (spec, weights) layers, uncalibrated."""
    return tuple(tensor_key(w.tensors()) for _, w in layers), None


# Above the oneDNN threshold, 428 rows: every GEMM runs the panel GEMM (fp32 with AVX-512; bf16 with AVX512-BF16
# but no AMX) or else oneDNN with its prepacked weights and fused epilogue (bias, activation; pre-norm: the
# residual add in GEMM2), as under FASTENC_CPU_CAPABILITY=avx2 (CI's capped run); head dims 64 and 80.
LARGE = [(384, 6, 1536, False, "gelu"), (480, 6, 1920, True, "gelu_tanh"), (384, 6, 1536, True, "relu")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d,nhead,f,norm_first,activation", LARGE)
def test_large_stack_gemms(dtype, d, nhead, f, norm_first, activation):
    lengths = [200, 77, 1, 150]
    assert min(sum(lengths) * d * d, sum(lengths) * d * f) >= ONEDNN_MIN_MACS
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(d, nhead, f, activation=activation, norm_first=norm_first, generator=g) for _ in range(2)]
    typed = to_dtype(layers, dtype)
    built = ops.encoder.layers_for(fastenc.stack.WeightCache(), [(s, w, None) for s, w in typed], dtype,
                                   _weights_key(typed))
    ext = backends.extension()
    panel = ext.cpu_panel_gemm_supported(dtype)
    every_row = panel and (dtype == torch.float32 or ext.cpu_isa() != "amx")
    for layer in built:
        assert layer.panel_rows == (sys.maxsize if every_row else 128 if panel else 0)
        assert layer.prepacked == (not every_row and ext.cpu_linear_supported(dtype))  # no copy it never reads
    _check(layers, lengths, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["geglu", "swiglu"])
def test_modernbert_like_stack(dtype, activation):
    """Pre-norm without biases, a first layer without attention norm, gated FFN, rotary embeddings on every
    layer and a sliding window (sequences longer than it) on every other, above the oneDNN threshold."""
    g = torch.Generator().manual_seed(0)
    kw = dict(activation=activation, norm_first=True, bias=False, norm_bias=False, rotary=True, generator=g)
    layers = [random_layer(384, 6, 576, attn_norm=False, window=(16, 16), **kw), random_layer(384, 6, 576, **kw),
              random_layer(384, 6, 576, window=(16, 16), **kw)]
    final = fastenc.NormWeights(1 + 0.1 * torch.randn(384), None, 1e-5)
    _check(layers, [140, 3, 97, 64], dtype, final)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_chunks_of_whole_sequences(dtype, quantize, monkeypatch):
    """A batch run in chunks of whole sequences (ops.encoder.CHUNK_ELEMENTS, shrunk to a few rows here) gives the
    rows of the whole batch run at once: chunks of several sequences, a sequence longer than a chunk on its own,
    empty sequences, the last chunk ending at the last row; pre-norm with rotary and post-norm; against the
    reference by the parity rule, and against the unchunked stack (fp32: to rounding)."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 9, 1, 40, 3, 3, 0, 12]
    for norm_first in (False, True):
        layers = [random_layer(128, 4, 256, norm_first=norm_first, rotary=norm_first, generator=g)
                  for _ in range(2)]
        typed = to_dtype(layers, dtype)
        x = torch.randn(sum(lengths), 128, generator=g).to(dtype)
        cu, mx = cu_seqlens(lengths), max(lengths)
        outs = {}
        with torch.inference_mode():
            for chunk in (0, 256 * 10):  # 10 rows of FFN1's 256 columns (the widest: QKV has 384 -> 6 rows)
                monkeypatch.setattr(ops.encoder, "CHUNK_ELEMENTS", chunk)
                outs[chunk] = fastenc.encoder_stack(x, cu, mx, typed, quantize=quantize, backend="cpu")
            ref = fastenc.encoder_stack(x, cu, mx, typed, quantize=quantize, backend="reference")
            exact = fastenc.encoder_stack(x.double(), cu, mx, to_dtype(layers, torch.float64), backend="reference")
        whole, chunked = outs[0], outs[256 * 10]
        assert torch.isfinite(chunked).all()
        assert_parity(chunked, exact, ref, name=f"chunked, norm_first={norm_first}")
        if quantize is None and dtype == torch.float32:
            torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_elements must be >= 0"):
        backends.extension().encoder_forward_cpu(x, cu, mx, [], False, None, None, None, [], [], -1)


def _in_new_thread(fn):
    """fn() on a thread of its own (whose kept scratch is empty), its result."""
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_scratch_kept_between_calls():
    """The stack keeps a thread's buffers for its next call (encoder.cpp, Scratch::kept): calls that grow and shrink
    them, switch dtype and int8, and two threads calling at once give bit for bit what each call gives on a fresh
    thread."""
    import threading
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(128, 4, 256, generator=g) for _ in range(2)]
    calls = []
    for dtype, quantize, lengths in [(torch.float32, None, [3, 9]), (torch.float32, None, [40, 77, 2]),
                                     (torch.float32, None, [5]), (torch.bfloat16, None, [60, 61]),
                                     (torch.bfloat16, "int8", [33, 128]), (torch.float32, None, [130, 7, 1, 90])]:
        x = torch.randn(sum(lengths), 128, generator=g).to(dtype)
        calls.append((x, cu_seqlens(lengths), max(lengths), to_dtype(layers, dtype), quantize))

    def run(c):
        with torch.inference_mode():
            return fastenc.encoder_stack(c[0], c[1], c[2], c[3], quantize=c[4], backend="cpu")
    fresh = [_in_new_thread(lambda c=c: run(c)) for c in calls]
    for c, want in zip(calls, fresh):
        assert torch.equal(run(c), want)
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, [run(c) for c in calls[i::2]])) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for out, want in zip(got[i], fresh[i::2]):
            assert torch.equal(out, want)


def test_no_layers_and_no_tokens():
    x = torch.randn(5, 16)
    with torch.inference_mode():
        out = fastenc.encoder_stack(x, cu_seqlens([2, 3]), 3, [], backend="cpu")
        torch.testing.assert_close(out, x)
        assert out.data_ptr() != x.data_ptr()
        layers = [random_layer(16, 2, 32) for _ in range(2)]
        empty = fastenc.encoder_stack(x[:0], cu_seqlens([0, 0]), 0, layers, backend="cpu")
    assert empty.shape == (0, 16)


def test_refuses_autograd_and_bad_input():
    layers = [random_layer(16, 2, 32)]
    x = torch.randn(5, 16, requires_grad=True)
    with pytest.raises(fastenc.BackendUnavailableError, match="inference only"):
        fastenc.encoder_stack(x, cu_seqlens([5]), 5, layers, backend="cpu")
    x = x.detach()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="longer than max_seqlen 4"):
            fastenc.encoder_stack(x, cu_seqlens([5]), 4, layers, backend="cpu")
        with pytest.raises(ValueError, match="end at most at the packed length 5"):
            fastenc.encoder_stack(x, cu_seqlens([3, 4]), 4, layers, backend="cpu")
        spec, w = layers[0]
        w.ffn2_weight = w.ffn2_weight[:, :31]
        with pytest.raises(ValueError, match=r"layers\[0\]: ffn2_weight must have shape \(16, 32\)"):
            fastenc.encoder_stack(x, cu_seqlens([5]), 5, [(spec, w)], backend="cpu")
        with pytest.raises(ValueError, match="nhead 3 must divide d_model 16"):
            fastenc.encoder_stack(x, cu_seqlens([5]), 5, [random_layer(16, 3, 32)], backend="cpu")
        with pytest.raises(ValueError, match="activation must be one of"):
            fastenc.encoder_stack(x, cu_seqlens([5]), 5, [random_layer(16, 2, 32, activation="swish")],
                                  backend="cpu")
        with pytest.raises(TypeError, match=r"layers\[0\] must be a \(LayerSpec, LayerWeights\) pair"):
            fastenc.encoder_stack(x, cu_seqlens([5]), 5, [tuple(range(12))], backend="cpu")


def test_cpp_layer_checks_name_the_field():
    """The C++ EncoderLayer (built by the weight cache) checks what Python handed it."""
    ext = backends.extension()
    spec, w = random_layer(16, 2, 32)
    w.out_bias = torch.zeros(15)
    with pytest.raises(ValueError, match=r"layers\[3\]\.out_bias must have shape \[16\], got \[15\]"):
        ext.EncoderLayer(spec, w, "layers[3].")
    spec, w = random_layer(16, 2, 32)
    w.norm2_weight = w.norm2_weight.double()
    with pytest.raises(TypeError, match="norm2_weight has dtype Double, expected Float"):
        ext.EncoderLayer(spec, w, "")
    spec, w = random_layer(16, 2, 32)
    with pytest.raises(ValueError, match="activation must be a kernel activation name"):
        ext.EncoderLayer(spec._replace(activation=torch.relu), w, "")
    layer = ext.EncoderLayer(spec, w, "")
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match=r"layers\[0\] was built for Float but x has BFloat16"):
        ext.encoder_forward_cpu(x.bfloat16(), cu_seqlens([4]), 4, [layer], False, None, None, None, [None], [None])
    rot_spec, rot_w = random_layer(16, 2, 32, rotary=True)
    rot = ext.EncoderLayer(rot_spec, rot_w, "")
    with pytest.raises(ValueError, match="its tables are missing"):
        ext.encoder_forward_cpu(x, cu_seqlens([4]), 4, [rot], False, None, None, None, [None], [None])
    short = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"rotary tables must be fp32 \[P >= max_seqlen"):
        ext.encoder_forward_cpu(x, cu_seqlens([4]), 4, [rot], False, None, None, None, [short], [short])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_first,activation", [(False, "gelu"), (True, "geglu"), (False, "relu")])
@pytest.mark.parametrize("calibrated", [False, True], ids=["uncalibrated", "calibrated"])
def test_int8_stack_matches_its_reference(dtype, norm_first, activation, calibrated):
    """The fused int8 stack against the per-op composition on the int8 reference: within the parity rule of the
    exact float stack, and in fp32 closer to the same quantized math than int8 is to float.  (Exact agreement
    is checked per GEMM in test_linear_int8.py; through layers, a last-bit difference of attention or an
    activation moves some operand across a rounding tie of the next quantization, and that spreads.)
    Calibrated: smoothed GEMMs, and FFN2 in int8 with its widest input channels in float."""
    g = torch.Generator().manual_seed(0)
    layers = [random_layer(128, 4, 256, activation=activation, norm_first=norm_first, rotary=norm_first,
                           generator=g) for _ in range(2)]
    lengths = [70, 1, 33, 64]
    x = torch.randn(sum(lengths), 128, generator=g).to(dtype)
    cu, mx = cu_seqlens(lengths), max(lengths)
    typed = to_dtype(layers, dtype)
    ranges = None
    with torch.inference_mode():
        if calibrated:
            with fastenc.stack.recording_ranges() as store:
                fastenc.encoder_stack(x, cu, mx, typed, quantize="int8")
            (ranges,) = store.values()
            assert all(set(r) == set(fastenc.stack.INT8_GEMMS) for r in ranges), ranges
        fast = fastenc.encoder_stack(x, cu, mx, typed, quantize="int8", int8_ranges=ranges, backend="cpu")
        ref = fastenc.encoder_stack(x, cu, mx, typed, quantize="int8", int8_ranges=ranges, backend="reference")
        exact = fastenc.encoder_stack(x.double(), cu, mx, to_dtype(layers, torch.float64), backend="reference")
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    quant_error = _rel(ref, exact)
    assert quant_error < 0.05, quant_error
    assert_parity(fast, exact, ref, name="int8 stack")  # the parity rule, the int8 reference as the baseline
    if dtype == torch.float32:  # and, in fp32, the same quantized math: closer to it than int8 is to float
        assert _rel(fast, ref) < 0.5 * quant_error, (_rel(fast, ref), quant_error)
    built = ops.encoder.layers_for(fastenc.stack.WeightCache(), [(s, w, q) for (s, w), q in zip(
        typed, fastenc.stack._int8_layers([fastenc.stack.StackLayer(s, w) for s, w in typed],
                                          fastenc.stack.WeightCache(), ranges, _weights_key(typed)))], dtype,
        _weights_key(typed))
    gemms = fastenc.stack.INT8_GEMMS if calibrated else fastenc.stack.INT8_SMOOTHED  # FFN2 needs its ranges
    assert [layer.int8_gemms for layer in built] == [list(gemms)] * 2
