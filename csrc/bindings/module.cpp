// The fastenc._C Python module: the bindings of every op (see bindings.h).
#include "bindings/bindings.h"

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
  fastenc::bind_ffn(m);
  fastenc::bind_attention(m);
  fastenc::bind_layer_norm(m);
  fastenc::bind_encoder(m);
  fastenc::bind_linear(m);
  fastenc::bind_int8_linear(m);
  fastenc::bind_panel_gemm(m);
}
