// The fastenc._C Python module: the bindings of every op (see bindings.h).
#include "fastenc_torch_extension.h"  // first: GCC uses a precompiled header only there
#include "bindings/bindings.h"
#include "common/cpu_kernels.h"
#include "fastenc_constants.h"

namespace {

// fastenc/constants.py's values as Python objects.
py::object to_py(int64_t v) { return py::int_(v); }
template <size_t N>
py::object to_py(const std::array<const char*, N>& names) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = py::str(names[i]);
  return t;
}

// The run-time CPU dispatch (common/cpu_kernels.h): what this CPU has, the FASTENC_CPU_CAPABILITY cap, the
// capability in use, the capabilities that gate kernels chosen in baseline code, and per kernel table the
// capabilities it was compiled for and the one it runs.
py::dict cpu_capability_report() {
  using namespace fastenc::cpu;
  py::dict d;
  d["cpu"] = capability_name(cpu_capability());
  const int limit = capability_limit();  // ValueError on a bad FASTENC_CPU_CAPABILITY
  d["limit"] = limit < 0 ? py::object(py::none()) : py::object(py::str(capability_name(Capability(limit))));
  d["selected"] = capability_name(capability());
  py::list gated;
  for (const Capability c : kGatedCapabilities) gated.append(capability_name(c));
  d["gated"] = py::tuple(gated);
  py::dict kernels;
  for (const KernelVariants* v : kernel_registry()) {
    py::list compiled;
    for (int c = 0; c < kCapabilities; ++c) {
      if (v->tables[c] != nullptr) compiled.append(capability_name(Capability(c)));
    }
    py::object chosen = py::none();
    const void* best = best_table(*v);
    for (int c = 0; c < kCapabilities; ++c) {
      if (best != nullptr && v->tables[c] == best) chosen = py::str(capability_name(Capability(c)));
    }
    py::dict k;
    k["compiled"] = py::tuple(compiled);
    k["runs"] = chosen;
    kernels[v->name] = k;
  }
  d["kernels"] = kernels;
  return d;
}

// What identifies the values of some tensors while they are alive (fastenc/weight_cache.py's TensorKey, per
// call on every weight of a stack): per item, None as one word, a tensor as its device, data pointer, version
// (-1: an inference tensor, which keeps none), dtype, dim, sizes and strides; one bytes object, compared and
// hashed as a whole.  In C++ because reading six attributes of 78 tensors costs a MiniLM call 45 us in Python.
py::bytes tensor_fingerprint(const py::tuple& items) {
  std::vector<int64_t> words;
  words.reserve(items.size() * 12);
  for (const py::handle h : items) {
    if (h.is_none()) {
      words.push_back(-2);
      continue;
    }
    if (!THPVariable_Check(h.ptr())) {
      throw py::type_error(std::string("tensor_fingerprint: items must be tensors or None, got ") +
                           Py_TYPE(h.ptr())->tp_name);
    }
    const at::Tensor& t = THPVariable_Unpack(h.ptr());
    words.push_back(static_cast<int64_t>(t.device().type()) * 65536 + t.device().index());
    words.push_back(reinterpret_cast<intptr_t>(t.data_ptr()));
    words.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
    words.push_back(static_cast<int64_t>(t.scalar_type()));
    words.push_back(t.dim());
    for (const int64_t v : t.sizes()) words.push_back(v);
    for (const int64_t v : t.strides()) words.push_back(v);
  }
  return py::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

}  // namespace


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc native ops: CPU kernels and, in CUDA builds, CUDA kernels";
  m.def("cpu_isa", []() { return std::string(fastenc::cpu::capability_name(fastenc::cpu::capability())); },
        "the instruction set the CPU kernels run at: this CPU's (default, avx2, avx512, avx512_vnni, avx512_bf16 or "
        "amx), capped by FASTENC_CPU_CAPABILITY");
  m.def("cpu_capability", &cpu_capability_report,
        "{cpu, limit, selected, gated, kernels: {table: {compiled, runs}}}: the run-time CPU dispatch (gated: the "
        "levels at which a kernel chosen outside the tables changes)");
  m.def("tensor_fingerprint", &tensor_fingerprint, py::arg("items"),
        "bytes identifying a tuple of tensors (device, data pointer, version, dtype, sizes, strides) or None: the "
        "weight caches' keys");
  py::dict constants;  // every constant the build generated from fastenc/constants.py, to check they agree
#define FASTENC_BIND_CONSTANT(py_name, cpp_name) constants[#py_name] = to_py(fastenc::constants::cpp_name);
  FASTENC_CONSTANTS(FASTENC_BIND_CONSTANT)
#undef FASTENC_BIND_CONSTANT
  m.attr("CONSTANTS") = constants;
  fastenc::bind_ffn(m);
  fastenc::bind_attention(m);
  fastenc::bind_layer_norm(m);
  fastenc::bind_encoder(m);
  fastenc::bind_linear(m);
  fastenc::bind_int8_linear(m);
  fastenc::bind_panel_gemm(m);
  fastenc::bind_embeddings(m);
}
