// The fastenc._C Python module: the bindings of every op (see bindings.h).
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc native ops: CPU kernels and, in CUDA builds, CUDA kernels";
  fastenc::bind_ffn(m);
}
