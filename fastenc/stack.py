"""The stack executor: the one place where encoder layers are composed from fastenc's ops.

:func:`run` takes the layers as :class:`StackLayer` (a ``LayerSpec``, its ``LayerWeights``, the backend
setting of the module that owns them) and tokens, dense ``[B, L, d]`` with torch-style masks or packed
``[T, d]`` with their ``Padding`` maps, and runs them one of two ways, decided once per call by
:func:`fused_blocker`:

* **fused**: the whole stack in one C++ call (``fastenc.ops.encoder``): inference (no autograd) on CPU
  tensors, packed tokens (or a dense batch without masks), kernel activations, and no op forced to a
  backend other than ``cpu``;
* **op by op** otherwise (training, any device, any backend): :func:`layer_forward`, the composition
  written once below.  With every op on its ``reference`` backend it is the reference of the stack.

Padding removal (``unpad``): with a bool key padding mask and no dense mask, the real tokens are gathered
once before the first layer and scattered back once after the last (zeros at padding positions); ``None``
lets ``auto`` decide (at least ``UNPAD_MIN_PADDING`` of the batch is padding), True/False force it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import reference
from ._util import warn_once
from .backend_setting import BackendSetting
from .backends import BackendUnavailableError, requested_backend, resolve
from .backends import explain as explain_backend
from .layer import LayerSpec, LayerWeights, NormWeights, check_layer
from .ops import encoder as fused_encoder
from .ops._common import check_count
from .ops.attention import attention_unchecked, attention_varlen_unchecked, check_cu_seqlens
from .ops.ffn import ffn_unchecked
from .ops.layer_norm import residual_layer_norm_unchecked
from .ops.linear import linear_unchecked
from .ops.linear_int8 import QuantWeight, linear_int8_unchecked, quantize_weight
from .ops.padding import Padding, pad, padding_info, unpad
from .weight_cache import WeightCache, tensor_key

Tensor = torch.Tensor

# Padding removal pays when enough of the batch is padding: gathering and scattering the rows costs
# about one extra LayerNorm pass, removing them saves their share of every GEMM, LayerNorm and attention
# block.  Measured on CPU (see README): a win from ~10% padding on; re-measure on each GPU with
# `python -m fastenc bench --ops pad`.
UNPAD_MIN_PADDING = 0.1

# Ops a forced backend other than "cpu" takes away from the fused stack (it runs all of them in C++).
_FUSED_OPS = ("attention", "layer_norm", "ffn", "linear", "linear_int8")


# A process forked after OpenMP's thread pool started (GNU libgomp, PyTorch's CPU threads) hangs in its first
# parallel region: PyTorch's DataLoader runs its workers on one thread for this reason.  Once a stack has run
# here, a forked child does the same (it can raise the count again if it knows its parent never ran OpenMP), and
# says so when it first runs a stack (children that never do, say a compiler's worker pool, stay quiet).
_RAN = False
_FORKED = False


def _after_fork_in_child() -> None:
    global _FORKED
    if _RAN and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class StackOwner:
    """Mixin of the modules that run a stack (the torch twins, ModernBERT): their ``quantize`` setting, None or
    ``"int8"``, and the input ranges int8 calibrated (``fastenc.quantize``), passed to :func:`run`."""

    quantize: Optional[str] = None
    int8_ranges: Optional[List[dict]] = None  # per layer {"qkv" | "out" | "ffn1": max |input| per channel}


class StackLayer(NamedTuple):
    spec: LayerSpec
    weights: LayerWeights
    setting: Optional[BackendSetting] = None  # the owning module's backend setting (None: the context's)
    int8: Optional["Int8Layer"] = None  # the GEMMs run in int8 (inference; set by run() from its cache)


class Int8Layer(NamedTuple):
    """A layer's GEMM weights in int8 (``ops.linear_int8.QuantWeight``); None keeps a GEMM in float."""

    qkv: Optional[QuantWeight]
    out: Optional[QuantWeight]
    ffn1: Optional[QuantWeight]
    ffn2: Optional[QuantWeight]


QUANTIZE = (None, "int8")
# The GEMMs an int8 model runs in int8, chosen by the embeddings' quality on real text (all-MiniLM-L6-v2, 200
# texts, min cosine against fp32, ranges calibrated on random tokens; scripts/int8_placement.py): QKV, out and
# FFN1 smoothed (SmoothQuant, alpha 0.5) 0.99911; all four smoothed 0.99722: FFN2's input, the activated
# hidden, has outliers that neither per-token scales nor smoothing tame (Bondarenko et al., 2021); FFN2 not
# smoothed, its INT8_FFN2_FLOAT_CHANNELS widest input channels (by calibrated range) in float, 0.99879.  FFN2
# runs in int8 only where its input ranges were calibrated (they pick those channels), else in the model's
# dtype.  README, "int8 inference".
INT8_GEMMS = ("qkv", "out", "ffn1", "ffn2")
INT8_SMOOTHED = ("qkv", "out", "ffn1")
INT8_FFN2_FLOAT_CHANNELS = 32
SMOOTHING_ALPHA = 0.5


class Packed(NamedTuple):
    """Packed tokens' layout (a ``Padding`` has these fields too)."""

    cu_seqlens: Tensor  # int32 [B + 1]: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]
    max_seqlen: int


class StackResult(NamedTuple):
    last: Tensor  # the final norm's output: [B, L, d] for dense input (zeros at removed padding), [T, d] if packed
    hidden_states: Optional[Tuple[Tensor, ...]]  # the input, then each layer's output (before the final norm)


def padding_plan(unpad_: Optional[bool], attn_mask: Optional[Tensor],
                 key_padding_mask: Optional[Tensor]) -> Optional[Padding]:
    """The Padding maps when the stack should run on real tokens only, else None.

    Padding can be removed for a bool key padding mask without a dense attn_mask (a causal hint is
    fine: packing preserves causality within each sequence).
    """
    if unpad_ is False or key_padding_mask is None:
        return None
    if unpad_ is None and (torch.compiler.is_compiling() or key_padding_mask.device.type == "meta"):
        return None  # auto decides from the data (a host sync): the padded path inside torch.compile / on meta
    if key_padding_mask.dtype != torch.bool or attn_mask is not None:
        if unpad_:
            raise ValueError("unpad=True needs a bool src_key_padding_mask and no src_mask (a dense mask is indexed "
                             "by padded positions); pass unpad=None to fall back automatically")
        return None
    info = padding_info(key_padding_mask)
    if unpad_ is None and info.padding_ratio < UNPAD_MIN_PADDING:
        return None
    return info


# Stack calls inside recording_ranges(): id of the stack's WeightCache -> per layer {gemm: max |input|}.
_RECORDING: contextvars.ContextVar[Optional[Dict[int, List[dict]]]] = contextvars.ContextVar(
    "fastenc_int8_ranges", default=None)


@contextlib.contextmanager
def recording_ranges() -> Iterator[Dict[int, List[dict]]]:
    """Inside the block every stack call runs its float per-op path and records, per layer, the max |input| of
    each channel of the GEMMs of ``INT8_GEMMS`` (int8's calibration); the dict maps id(the stack's cache) to
    those ranges, the maxima over every call."""
    store: Dict[int, List[dict]] = {}
    token = _RECORDING.set(store)
    try:
        yield store
    finally:
        _RECORDING.reset(token)


def _note(call: "_Call", layer: StackLayer, name: str, x: Tensor) -> None:
    """Record a GEMM input's per-channel max |x| while calibrating int8 (a no-op otherwise)."""
    if call.record is None or name not in INT8_GEMMS:
        return
    ranges = call.record[id(layer.weights)]
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float() if x.numel() else x.new_zeros(x.shape[-1]).float()
    ranges[name] = torch.maximum(ranges[name], m) if name in ranges else m


class _Call(NamedTuple):
    """What every layer of one call shares: the token layout, masks and rotary tables (and, while int8 is being
    calibrated, where each layer's input ranges go)."""

    packed: Optional[Packed]  # the layout when x is packed [T, d] (a Packed or a Padding)
    attn_mask: Optional[Tensor]  # dense [B, H, L, S] view (dense layout only)
    key_padding_mask: Optional[Tensor]  # [B, S] (dense layout only)
    is_causal: bool
    rotary: dict  # (id of inv_freq, scaling) -> (cos, sin) in the activations' dtype
    record: Optional[dict] = None  # id(layer.weights) -> {gemm: max |input|}


def _op_backend(setting: Optional[BackendSetting], op: str) -> Optional[str]:
    return None if setting is None else setting._backend(op)


# --------------------------------------------------------------------------- the layer, op by op


def layer_forward(x: Tensor, layer: StackLayer, call: _Call) -> Tensor:
    """One layer on x ([B, L, d], or packed [T, d] when ``call.packed``); ``fastenc.layer`` states the math."""
    spec, w, s = layer.spec, layer.weights, layer.setting
    norm = _op_backend(s, "layer_norm")
    if spec.norm_first:
        h = residual_layer_norm_unchecked(x, None, w.norm1_weight, w.norm1_bias, None, spec.eps1, 0.0, False,
                                          norm) if spec.attn_norm else x
        h, x = residual_layer_norm_unchecked(x, _attention_block(h, layer, call), w.norm2_weight, w.norm2_bias,
                                             w.out_bias, spec.eps2, spec.dropout1, True, norm)
        if spec.dropout2 > 0:
            return x + F.dropout(_ffn(h, layer, call, None), spec.dropout2, training=True)
        return _ffn(h, layer, call, x)
    x = residual_layer_norm_unchecked(x, _attention_block(x, layer, call), w.norm1_weight, w.norm1_bias, w.out_bias,
                                      spec.eps1, spec.dropout1, False, norm)
    return residual_layer_norm_unchecked(x, _ffn(x, layer, call, None), w.norm2_weight, w.norm2_bias, None, spec.eps2,
                                         spec.dropout2, False, norm)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], q: Optional[QuantWeight],
            setting: Optional[BackendSetting]) -> Tensor:
    """x Wᵀ + b: the linear op, or the int8 one where the layer holds the weight in int8."""
    if q is None:
        return linear_unchecked(x, weight, bias, _op_backend(setting, "linear"))
    return linear_int8_unchecked(x, q, bias, None, None, _op_backend(setting, "linear_int8"))


def _attention_block(h: Tensor, layer: StackLayer, call: _Call) -> Tensor:
    """Attention without the out projection's bias (the residual + LayerNorm op adds it)."""
    spec, w, s, q8 = layer
    att = _op_backend(s, "attention")
    _note(call, layer, "qkv", h)
    qkv = _linear(h, w.qkv_weight, w.qkv_bias, q8 and q8.qkv, s)
    q, k, v = qkv.view(*h.shape[:-1], 3, spec.nhead, spec.head_dim).unbind(-3)
    rot = call.rotary[(id(w.rotary_inv_freq), spec.rotary_scaling)] if spec.rotary else None
    if call.packed is not None:
        cu, mx = call.packed.cu_seqlens, call.packed.max_seqlen
        o = attention_varlen_unchecked(q, k, v, cu, cu, mx, mx, call.is_causal, None, spec.attn_dropout, att,
                                       spec.window, rot)
    else:
        o = attention_unchecked(q, k, v, call.attn_mask, call.key_padding_mask, call.is_causal, None,
                                spec.attn_dropout, att, spec.window, rot)
    o = o.reshape(h.shape)
    _note(call, layer, "out", o)
    return _linear(o, w.out_weight, None, q8 and q8.out, s)


def _ffn(h: Tensor, layer: StackLayer, call: _Call, residual: Optional[Tensor]) -> Tensor:
    spec, w, s, q8 = layer
    _note(call, layer, "ffn1", h)
    if call.record is not None and spec.fused_activation:  # calibrating: GEMM2's input is recorded, so unfused
        hidden = reference.apply_activation(linear_unchecked(h, w.ffn1_weight, w.ffn1_bias, _op_backend(s, "linear")),
                                            spec.activation)
        _note(call, layer, "ffn2", hidden)
        y = linear_unchecked(hidden, w.ffn2_weight, w.ffn2_bias, _op_backend(s, "linear"))
        return y if residual is None else residual + y
    if q8 is not None and (q8.ffn1 is not None or q8.ffn2 is not None):  # inference: no dropout
        if q8.ffn2 is not None:  # the activation goes into the quantization of GEMM2's input
            pre = _linear(h, w.ffn1_weight, w.ffn1_bias, q8.ffn1, s)
            return linear_int8_unchecked(pre, q8.ffn2, w.ffn2_bias, spec.activation, residual,
                                         _op_backend(s, "linear_int8"))
        hidden = reference.apply_activation(_linear(h, w.ffn1_weight, w.ffn1_bias, q8.ffn1, s), spec.activation)
        y = linear_unchecked(hidden, w.ffn2_weight, w.ffn2_bias, _op_backend(s, "linear"))
        return y if residual is None else residual + y
    if spec.fused_activation:
        return ffn_unchecked(h, w.ffn1_weight, w.ffn1_bias, w.ffn2_weight, w.ffn2_bias, spec.activation,
                             spec.ffn_dropout, residual, _op_backend(s, "ffn"))
    warn_once(f"fastenc: activation {spec.activation!r} has no fused FFN kernel; running it in PyTorch")
    lin = _op_backend(s, "linear")  # a callable activation runs in PyTorch between the two linears
    y = spec.activation(linear_unchecked(h, w.ffn1_weight, w.ffn1_bias, lin))
    y = linear_unchecked(F.dropout(y, spec.ffn_dropout, training=spec.ffn_dropout > 0), w.ffn2_weight, w.ffn2_bias,
                         lin)
    return y if residual is None else residual + y


# --------------------------------------------------------------------------- the decision


def _needs_grad(x: Tensor, layers: Sequence[StackLayer]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for layer in layers
                                  for t in layer.weights.tensors())


def fused_blocker(layers: Sequence[StackLayer], x: Tensor, *, dense_masks: bool, training: bool,
                  per_layer_outputs: bool) -> Optional[str]:
    """Why these layers cannot run as one fused stack call now, or None (the one place this is decided)."""
    if training:
        return "the module is in training mode (the fused stack has no dropout and no autograd)"
    if x.device.type != "cpu":
        return f"it runs on CPU tensors, not {x.device.type}"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing (the per-op path's ops are custom ops it traces)"
    if torch.is_autocast_enabled("cpu"):
        return "torch.autocast is on (the per-op path casts each GEMM's operands as autocast does)"
    if dense_masks:
        return "a dense src_mask or a float / kept key padding mask is indexed by padded positions (the fused " \
               "stack runs on packed tokens: a bool key padding mask with padding removal)"
    if per_layer_outputs:
        return "per-layer outputs were asked for (output_hidden_states or gradient checkpointing)"
    settings = {}  # the layers' distinct backend settings: most layers share theirs (None, or one name)
    for i, layer in enumerate(layers):
        if not layer.spec.fused_activation:
            return f"layer {i}'s activation {layer.spec.activation!r} has no kernel (it runs in PyTorch)"
        spec = None if layer.setting is None else layer.setting.backend
        settings.setdefault(spec if spec is None or isinstance(spec, str) else id(layer.setting), layer.setting)
    asked = set()  # (op, a layer's own setting for it)
    for setting in settings.values():
        for op in _FUSED_OPS:
            own = _op_backend(setting, op)
            if (op, own) not in asked:
                asked.add((op, own))
                forced = requested_backend(op, own)[0]
                if forced not in ("auto", "cpu"):
                    return f"{op} is set to {forced!r}"
    return None


# --------------------------------------------------------------------------- running a stack


def run(layers: Sequence[StackLayer], x: Tensor, *, setting: Optional[BackendSetting] = None,
        final_norm: Union[NormWeights, Callable[[Tensor], Tensor], None] = None, attn_mask: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None, is_causal: bool = False, packed: Optional[Packed] = None,
        unpad_: Optional[bool] = None, training: bool = False, cache: Optional[WeightCache] = None,
        hidden_states: bool = False, checkpoint: Optional[Callable] = None,
        quantize: Optional[str] = None, int8_ranges: Optional[Sequence[dict]] = None) -> StackResult:
    """Run ``layers`` and the final norm on x: dense [B, L, d] (masks validated by the caller: attn_mask a
    [B, H, L, S] view, key_padding_mask [B, L]), or packed [T, d] laid out as ``packed`` (a :class:`Packed` or
    the ``Padding`` the caller packed with).

    final_norm: a LayerNorm's ``NormWeights`` (fastenc's op, fused), or any module (run in PyTorch on the real
    tokens).  setting: the stack owner's backend setting (``encoder`` and ``padding`` ops).  checkpoint: HF's
    gradient-checkpointing function, applied per layer in training.  quantize ``"int8"``: in inference, the
    GEMMs of ``INT8_GEMMS`` run in int8 on weights quantized once per weight generation (kept in ``cache``);
    training, and calls that need gradients, run the float weights; int8_ranges: per layer, the calibrated
    max |input| per channel of its int8 GEMMs (their SmoothQuant factors), or None.  Under
    :func:`recording_ranges` a call runs the float per-op path and records those ranges instead.  Dense input
    comes back dense (padding
    removed inside when ``unpad_`` / ``auto`` says so), packed input packed.
    """
    global _RAN
    _RAN = True
    if _FORKED:
        warn_once("fastenc: this process was forked after fastenc ran (OpenMP's thread pool is not usable after a "
                  "fork): it runs on one thread (torch.set_num_threads(1)), as PyTorch's DataLoader workers do; use "
                  "the 'spawn' or 'forkserver' start method for multi-threaded children")
    if quantize not in QUANTIZE:
        raise ValueError(f"fastenc: quantize must be one of {QUANTIZE}, got {quantize!r}")
    compiling = torch.compiler.is_compiling()  # traced code keeps no state: no cache, no recorded decision
    if compiling and quantize == "int8":
        raise RuntimeError("fastenc: an int8-quantized model cannot be traced by torch.compile (its weights are "
                           "quantized once, outside the graph); run it eagerly")
    cache = cache if (cache is not None or compiling) else WeightCache()
    recording = _RECORDING.get()
    record = None
    if recording is not None:
        ranges = recording.setdefault(id(cache), [{} for _ in layers])
        record = {id(layer.weights): r for layer, r in zip(layers, ranges)}
    weights_key = None  # what this call's derived weights are a function of (their caches' key), once per call
    if not training:
        layers = [StackLayer(layer.spec.with_dropout(False), layer.weights, layer.setting) for layer in layers]
        if quantize == "int8" and record is None:
            if _needs_grad(x, layers):
                warn_once("fastenc: int8 runs without autograd; a call that needs gradients runs the float weights "
                          "(call the model under torch.no_grad() or torch.inference_mode())")
            else:
                # the int8 weights are a function of the float weights and the calibration
                weights_key = (_weights_key(layers), None if int8_ranges is None else
                               tuple(tensor_key(r.values()) for r in int8_ranges))
                layers = [layer._replace(int8=q8) for layer, q8 in zip(layers, _int8_layers(
                    layers, cache, int8_ranges, weights_key))]
    # The fused stack runs on packed rows: a bool key padding mask is packed for it whatever the padding.
    packable = packed is not None or (attn_mask is None and unpad_ is not False and (
        key_padding_mask is None or key_padding_mask.dtype == torch.bool))
    ckpt = checkpoint if (checkpoint is not None and training) else None
    if record is not None:
        fused, why = False, "recording int8's calibration ranges (the float per-op path)"
    else:
        fused, why = _decide(layers, x, setting, packable=packable, training=training,
                             per_layer_outputs=hidden_states or ckpt is not None)
    if cache is not None:
        cache.last_decision = ("fused" if fused else "per-op", why)
    info = packed
    if packed is None and not (fused and key_padding_mask is not None and not key_padding_mask.any()):
        # (fused without padding: the dense rows are the packed rows, no maps to build)
        info = padding_plan(True if fused and key_padding_mask is not None else unpad_, attn_mask, key_padding_mask)
    tokens = x if (packed is not None or info is None) else unpad(x, info, backend=_op_backend(setting, "padding"))
    states = None
    if fused:
        fused_norm = final_norm if isinstance(final_norm, NormWeights) else None
        out = _apply_norm(_fused(tokens, info, layers, fused_norm, is_causal, cache,
                                 weights_key or (_weights_key(layers), None)),
                          None if fused_norm is not None else final_norm, setting)
    else:
        out, states = _per_op(tokens, info, layers, setting, final_norm, attn_mask, key_padding_mask, is_causal,
                              hidden_states, ckpt, record)
    if packed is None and info is not None:  # scatter back what this call packed
        back = (lambda t: pad(t, info, backend=_op_backend(setting, "padding")))  # noqa: E731
        out = back(out)
        states = None if states is None else tuple(back(t) for t in states)
    elif packed is None and out.dim() == 2:  # a dense batch run fused as packed rows
        out = out.view(x.shape)
    return StackResult(out, states)


def _decide(layers: Sequence[StackLayer], x: Tensor, setting: Optional[BackendSetting], *, packable: bool,
            training: bool, per_layer_outputs: bool) -> Tuple[bool, str]:
    """(fused, why): the one decision between the fused C++ stack and the per-op path, made once per call.
    A fused stack named for the encoder op ("cpu") that cannot run raises instead."""
    want, named = setting._requested("encoder") if setting is not None else requested_backend("encoder")
    if want == "reference":
        return False, "the encoder op is set to 'reference' (the per-op composition)"
    why = fused_blocker(layers, x, dense_masks=not packable, training=training, per_layer_outputs=per_layer_outputs)
    grad = why is None and _needs_grad(x, layers)
    if grad and not (want == "cpu" and named):  # a named "cpu" raises in resolve instead
        why = "autograd needs the per-op path (an input or a weight requires grad)"
    if why is not None:
        if want == "cpu" and named:
            raise BackendUnavailableError(f"fastenc encoder: backend 'cpu' is unavailable: {why}")
        return False, why
    shape = fused_encoder.shape_class(grad)
    if resolve("encoder", want if named else None, x.device, x.dtype, shape) != "cpu":
        return False, explain_backend("encoder", want if named else None, x.device, x.dtype, shape)[1]
    return True, "one C++ call for the whole stack"


def _weights_key(layers: Sequence[StackLayer]) -> Tuple:
    """The layers' weights' cache keys (each holding its tensors: ``fastenc.weight_cache.TensorKey``)."""
    return tuple(tensor_key(layer.weights.tensors()) for layer in layers)


def _int8_layers(layers: Sequence[StackLayer], cache: WeightCache, ranges: Optional[Sequence[dict]],
                 key: Tuple) -> List[Int8Layer]:
    """The layers' GEMM weights of ``INT8_GEMMS`` in int8, quantized once per weight generation, smoothed
    where calibrated input ranges exist; ``key``: the tensor keys of the layers' weights and of ``ranges``."""
    names = ("qkv", "out", "ffn1", "ffn2")
    if ranges is not None and len(ranges) != len(layers):
        raise ValueError(f"fastenc int8: calibrated ranges for {len(ranges)} layers, the stack has {len(layers)} "
                         "(calibrate again: fastenc.quantize)")

    def quantize(i, name, weight):
        if name not in INT8_GEMMS:
            return None
        absmax = None if ranges is None else ranges[i].get(name)
        if name not in INT8_SMOOTHED:  # FFN2: its widest channels in float, which needs its calibrated ranges
            if absmax is None:
                return None
            n = min(INT8_FFN2_FLOAT_CHANNELS, weight.shape[1] // 2)
            return quantize_weight(weight, None, absmax.topk(n).indices.sort().values if n else None)
        smoothing = None if absmax is None else reference.smoothing(absmax, weight, SMOOTHING_ALPHA)
        return quantize_weight(weight, smoothing)

    def build():
        return [Int8Layer(*(quantize(i, n, getattr(layer.weights, f"{n}_weight")) for n in names))
                for i, layer in enumerate(layers)]
    return cache.get(("int8", INT8_GEMMS), key, build)


def _per_op(tokens: Tensor, info: Optional[Packed], layers: Sequence[StackLayer],
            setting: Optional[BackendSetting], final_norm: Optional[NormWeights], attn_mask, key_padding_mask,
            is_causal: bool, hidden_states: bool, ckpt: Optional[Callable], record: Optional[dict]):
    length = info.max_seqlen if info is not None else tokens.shape[-2]
    call = _Call(info, None if info is not None else attn_mask, None if info is not None else key_padding_mask,
                 is_causal, _rotary_tables(layers, length, tokens.dtype), record)
    states: List[Tensor] = [tokens]
    h = tokens
    for layer in layers:
        if ckpt is not None:
            h = ckpt(_Step(layer, call), h)
        else:
            h = layer_forward(h, layer, call)
        if hidden_states:
            states.append(h)
    return _apply_norm(h, final_norm, setting), (tuple(states) if hidden_states else None)


def _apply_norm(h: Tensor, norm, setting: Optional[BackendSetting]) -> Tensor:
    if isinstance(norm, NormWeights):
        return residual_layer_norm_unchecked(h, None, norm.weight, norm.bias, None, norm.eps, 0.0, False,
                                             _op_backend(setting, "layer_norm"))
    return h if norm is None else norm(h)


class _Step:
    """One layer as the callable a checkpoint function re-runs (x is its only tensor argument)."""

    def __init__(self, layer: StackLayer, call: _Call) -> None:
        self.layer, self.call = layer, call

    def __call__(self, x: Tensor) -> Tensor:
        return layer_forward(x, self.layer, self.call)


def _rotary_tables(layers: Sequence[StackLayer], length: int, dtype: torch.dtype) -> dict:
    """(cos, sin) [length, D/2] per distinct rotary frequency table, rounded to the activations' dtype as HF
    rounds its tables."""
    out = {}
    for layer in layers:
        if layer.spec.rotary:
            key = (id(layer.weights.rotary_inv_freq), layer.spec.rotary_scaling)
            if key not in out:
                cos, sin = reference.rotary_tables(layer.weights.rotary_inv_freq, max(length, 1),
                                                   layer.spec.rotary_scaling)
                out[key] = (cos.to(dtype), sin.to(dtype))
    return out


def _fused(tokens: Tensor, info: Optional[Packed], layers: Sequence[StackLayer],
           final_norm: Optional[NormWeights], is_causal: bool, cache: WeightCache, weights_key: Tuple) -> Tensor:
    """The stack in one C++ call on packed rows (a dense batch without masks is B sequences of L rows)."""
    if info is not None:
        rows, cu, max_len = tokens, info.cu_seqlens, info.max_seqlen
    else:
        B, L, d = tokens.shape
        rows, cu, max_len = tokens.reshape(B * L, d), fused_encoder.uniform_cu(B, L), L
    handles = fused_encoder.layers_for(cache, [(layer.spec, layer.weights, layer.int8) for layer in layers],
                                       rows.dtype, weights_key)
    tables = _rotary_tables(layers, max_len, rows.dtype)
    rotary = [tables[(id(layer.weights.rotary_inv_freq), layer.spec.rotary_scaling)] if layer.spec.rotary else None
              for layer in layers]
    return fused_encoder.forward(rows, cu, max_len, handles, final_norm, is_causal, rotary)


# --------------------------------------------------------------------------- functional entry point


def encoder_stack(x: Tensor, cu_seqlens: Tensor, max_seqlen: int, layers: Sequence[Tuple[LayerSpec, LayerWeights]],
                  *, final_norm: Optional[NormWeights] = None, is_causal: bool = False,
                  quantize: Optional[str] = None, int8_ranges: Optional[Sequence[dict]] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Inference of a stack of layers on packed tokens x [T, d] (sequence b = rows cu_seqlens[b]:cu_seqlens[b+1],
    int32; no sequence longer than max_seqlen); returns [T, d].

    backend ``"cpu"``: the fused C++ stack (raises ``BackendUnavailableError`` when it cannot run);
    ``"reference"``: the per-op composition with every op on its reference backend (the stack's reference);
    None: ``auto`` (and the context's ``use_backend``).  quantize, int8_ranges: as for :func:`run` (a float
    call inside :func:`recording_ranges` records the ranges: the one entry of its dict).
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"encoder_stack: x must be a floating-point [tokens, d_model] tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    for i, pair in enumerate(layers):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], LayerSpec)
                and isinstance(pair[1], LayerWeights)):
            raise TypeError(f"encoder_stack: layers[{i}] must be a (LayerSpec, LayerWeights) pair")
        spec, w = pair
        if spec.d_model != x.shape[1]:
            raise ValueError(f"encoder_stack: layers[{i}] has d_model {spec.d_model} but x is [T, {x.shape[1]}]")
        check_layer(spec, w, f"encoder_stack: layers[{i}]")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1 or cu_seqlens.device != x.device:
        raise TypeError(f"encoder_stack: cu_seqlens must be a 1-D int32 tensor [B + 1] on {x.device}")
    max_seqlen = check_count(max_seqlen, "max_seqlen", "encoder_stack")
    cu_seqlens = cu_seqlens.contiguous()
    check_cu_seqlens((("cu_seqlens", cu_seqlens, x.shape[0], max_seqlen),), "encoder_stack")
    setting = _Fixed(backend)
    return run([StackLayer(s, w, setting) for s, w in layers], x, setting=setting, final_norm=final_norm,
               is_causal=is_causal, packed=Packed(cu_seqlens, max_seqlen), quantize=quantize,
               int8_ranges=int8_ranges).last


class _Fixed(BackendSetting):
    """The setting of a functional call: "reference" for every op, or a backend for the encoder op only."""

    def __init__(self, backend: Optional[str]) -> None:
        self.backend = backend if backend in (None, "reference") else {"encoder": backend}


def explain(model: torch.nn.Module) -> str:
    """How each encoder stack inside ``model`` ran its last call: fused or per op, and why."""
    lines = []
    for name, m in model.named_modules():
        cache = m.__dict__.get("_weight_cache")
        if isinstance(m, StackOwner) and cache is not None and cache.last_decision is not None:
            path, why = cache.last_decision
            q = f", quantize={m.quantize}" if m.quantize else ""
            lines.append(f"{name or type(m).__name__}: {path} ({why}){q}")
    return "\n".join(lines) if lines else "no fastenc stack inside this model has run yet"
