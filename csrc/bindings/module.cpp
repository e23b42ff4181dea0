// The fastenc._C Python module: the bindings of every op (see bindings.h).
#include "bindings/bindings.h"
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

}  // namespace

// setup.py passes the CPU instruction set the C++ kernels were compiled for (FASTENC_CPU_ISA).
#define FASTENC_STR_(x) #x
#define FASTENC_STR(x) FASTENC_STR_(x)
#ifdef FASTENC_CPU_ISA
constexpr const char* kCpuIsa = FASTENC_STR(FASTENC_CPU_ISA);
#else
constexpr const char* kCpuIsa = "default";
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc native ops: CPU kernels and, in CUDA builds, CUDA kernels";
  m.def("cpu_isa", []() { return std::string(kCpuIsa); },
        "the x86 instruction set the CPU kernels were compiled for: avx512, avx2 or default");
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
