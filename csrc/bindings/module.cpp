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
// capability in use, and per kernel table the capabilities it was compiled for and the one it runs.
py::dict cpu_capability_report() {
  using namespace fastenc::cpu;
  py::dict d;
  d["cpu"] = capability_name(cpu_capability());
  const int limit = capability_limit();  // ValueError on a bad FASTENC_CPU_CAPABILITY
  d["limit"] = limit < 0 ? py::object(py::none()) : py::object(py::str(capability_name(Capability(limit))));
  d["selected"] = capability_name(capability());
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

}  // namespace


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc native ops: CPU kernels and, in CUDA builds, CUDA kernels";
  m.def("cpu_isa", []() { return std::string(fastenc::cpu::capability_name(fastenc::cpu::capability())); },
        "the instruction set the CPU kernels run at: this CPU's (default, avx2, avx512, avx512_bf16 or amx), capped "
        "by FASTENC_CPU_CAPABILITY");
  m.def("cpu_capability", &cpu_capability_report,
        "{cpu, limit, selected, kernels: {table: {compiled, runs}}}: the run-time CPU dispatch");
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
}
