// One bind_<op>(m) per op: each op's bindings file (<op>_api.cpp) defines its m.def calls; module.cpp
// is the extension's only PYBIND11_MODULE and calls them all.
#pragma once

#include "fastenc_torch_extension.h"  // <torch/extension.h>, precompiled by the build

namespace fastenc {

void bind_ffn(py::module_& m);
void bind_attention(py::module_& m);
void bind_layer_norm(py::module_& m);
void bind_encoder(py::module_& m);
void bind_linear(py::module_& m);
void bind_int8_linear(py::module_& m);
void bind_panel_gemm(py::module_& m);
void bind_embeddings(py::module_& m);

}  // namespace fastenc
