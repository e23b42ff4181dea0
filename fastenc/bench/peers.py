"""The runtimes users deploy an encoder with instead of PyTorch, as benchmark providers of a
:class:`~fastenc.bench.model_workload.ModelSuite` (CPU, inference, optional packages):

* ONNX Runtime fp32 (``onnxruntime``): the model exported once by torch's TorchScript exporter
  (``dynamo=False``) from its eager-attention twin, then ORT's transformer optimizer
  (``model_type="bert"``: fused ``Attention``, ``SkipLayerNormalization``, ``BiasGelu``...).  Eager
  attention and the TorchScript exporter because the optimizer fused no attention in SDPA's export
  nor in the dynamo exporter's graph.
* ONNX Runtime int8 (``onnxruntime-int8``): ``onnxruntime.quantization.quantize_dynamic`` of that
  optimized graph, per-channel symmetric s8 weights, u8 activations quantized per tensor at run time,
  full 8-bit range (``reduce_range=False``): optimum's dynamic ``avx512_vnni`` configuration, which
  sentence-transformers' ``export_dynamic_quantized_onnx_model`` applies.
* OpenVINO (``openvino-fp32``: ``INFERENCE_PRECISION_HINT=f32``; ``openvino``: its default, bf16 on
  CPUs with AVX512-BF16 or AMX; the row says which it ran, read back with ``get_property``):
  ``openvino.convert_model`` of the same ONNX export.  Converting the PyTorch model directly (the
  TorchScript route) gave the same runtime graph here: per layer six ``FullyConnected`` (Q, K, V,
  output, FFN with GELU fused, FFN), one ``Subgraph`` holding the whole attention (scale, mask,
  softmax and both matmuls), two ``MVN`` (LayerNorm) and the residual adds; the row counts them.

Threads: ORT's intra-op and OpenVINO's inference threads = torch's, one stream, no pinning;
ORT's workers do not spin (they slowed the next provider 1.7-3.5x in interleaved timing), and the
suites pause briefly before each timed call so OpenVINO's TBB workers go idle too.  Inputs are the
tokenizer's numpy arrays (converted outside the timing); the timed call runs the session and
mean-pools its last hidden state with torch, as sentence-transformers does.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .model_workload import ModelSuite, mean_pool
from .registry import Impl, Unavailable
from .workload import Workload

OV_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OnnxExport:
    """One model exported to ONNX, and the ORT sessions and OpenVINO models built from it (on first use)."""

    def __init__(self, model: nn.Module, tokens: tuple):
        self.tmpdir = tempfile.mkdtemp(prefix="fastenc-onnx-")
        self.raw = os.path.join(self.tmpdir, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_LastHidden(model), tokens, self.raw, input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "seq"}
                                            for n in ("input_ids", "attention_mask", "last_hidden_state")})
        model.eval()  # the export leaves the model in training mode
        self.built: dict = {}

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _once(self, key: str, build: Callable[[], object]):
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]

    def ort_optimized(self, heads: int, d_model: int, model_type: str) -> tuple:
        """(path of the optimizer's graph, what it fused)."""
        def build():
            from onnxruntime.transformers.optimizer import optimize_model

            path = os.path.join(self.tmpdir, "model.opt.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimized = optimize_model(self.raw, model_type=model_type, num_heads=heads, hidden_size=d_model)
            optimized.save_model_to_file(path)
            fused = optimized.get_fused_operator_statistics()
            return path, ", ".join(f"{k} {v}" for k, v in fused.items() if v)
        return self._once("ort-optimized", build)

    def ort_session(self, heads: int, d_model: int, model_type: str, int8: bool) -> tuple:
        """(session, note): the optimized graph, or its dynamic int8 quantization."""
        def build():
            import onnxruntime as ort

            path, fused = self.ort_optimized(heads, d_model, model_type)
            note = f"onnxruntime {ort.__version__}, optimizer fused: {fused}"
            if int8:
                import onnx
                from onnxruntime.quantization import QuantType, quantize_dynamic

                q = os.path.join(self.tmpdir, "model.opt.int8.onnx")
                # DefaultTensorType: ONNX's shape inference gives no type to the outputs of ORT's fused ops
                with _quiet_root_logger():  # "consider pre-processing": for static quantization of CNNs
                    quantize_dynamic(path, q, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                path, note = q, note + "; quantize_dynamic: per-channel s8 weights, dynamic u8 activations"
            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), note
        return self._once(f"ort-{'int8' if int8 else 'fp32'}", build)

    def openvino(self, hint: Optional[str]) -> tuple:
        """(infer request, precision it runs in, note) of the export compiled for the CPU; hint None: the default
        precision."""
        def build():
            import openvino as ov

            config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1,
                      "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
            if hint is not None:
                config["INFERENCE_PRECISION_HINT"] = hint
            compiled = ov.Core().compile_model(ov.convert_model(self.raw), "CPU", config)
            ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            ops = collections.Counter(op.get_rt_info()["layerType"].astype(str)
                                      for op in compiled.get_runtime_model().get_ops())
            kernels = ", ".join(f"{k} {ops[k]}" for k in ("FullyConnected", "Subgraph", "MVN", "Eltwise") if ops[k])
            note = (f"openvino {ov.__version__}, INFERENCE_PRECISION_HINT={ran}"
                    f"{'' if hint else ' (its default)'}, runtime graph: {kernels}")
            return compiled.create_infer_request(), OV_PRECISIONS.get(ran, ran), note
        return self._once(f"openvino-{hint}", build)


def _cpu_inference(w: Workload, what: str) -> None:
    if w.mode != "fwd":
        raise Unavailable("inference only")
    if w.dtype != torch.float32:
        raise Unavailable(f"the fp32 rows only ({what} runs the model exported in fp32, at the precision its "
                          "provider names)")
    if w.device.type != "cpu":
        raise Unavailable(f"{what}'s CPU runtime only")


def _require(*modules: str) -> None:
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            raise Unavailable(f"{name} is not installed (pip install fastenc[bench])") from None


def _export(suite: ModelSuite, w: Workload) -> OnnxExport:
    spec = suite.model_spec(w)
    return suite.cached(("onnx", spec), lambda: OnnxExport(suite.hf_model(spec, w.device, attn="eager"),
                                                          suite.random_tokens(spec, [8, 5], "cpu")))


def _numpy(inputs: tuple) -> tuple:
    """The tokenizer's numpy arrays (``return_tensors="np"``), made outside the timing, and the torch mask."""
    return {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}, inputs[1]


def onnxruntime(suite: ModelSuite, *, int8: bool, model_type: str = "bert") -> Callable[[Workload], Impl]:
    def build(w: Workload) -> Impl:
        _cpu_inference(w, "ONNX Runtime")
        _require("onnx", "onnxruntime")
        spec = suite.model_spec(w)
        session, note = _export(suite, w).ort_session(spec.heads, spec.d_model, model_type, int8)
        return Impl(lambda i: mean_pool(torch.from_numpy(session.run(None, i[0])[0]), i[1]), prepare=_numpy,
                    inference_only=True, precision="int8" if int8 else None, note=note)
    return build


def openvino(suite: ModelSuite, *, hint: Optional[str]) -> Callable[[Workload], Impl]:
    def build(w: Workload) -> Impl:
        _cpu_inference(w, "OpenVINO")
        _require("onnx", "openvino")  # onnx: torch's exporter
        request, precision, note = _export(suite, w).openvino(hint)

        def forward(i):
            return mean_pool(torch.from_numpy(request.infer(i[0])[0]), i[1])
        return Impl(forward, prepare=_numpy, inference_only=True, precision=precision, note=note)
    return build


def close(obj: object) -> None:
    """ModelCache.clear's hook: remove an export's files."""
    if isinstance(obj, OnnxExport):
        obj.close()
