// The names of the FFN activations (activation.h).
#include "common/activation.h"

#include <c10/util/Exception.h>

namespace fastenc {

Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kReLU;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "geglu") return Act::kGeGLU;
  if (name == "swiglu") return Act::kSwiGLU;
  TORCH_CHECK_VALUE(false, "fastenc ffn: unknown activation '", name,
                    "'; expected one of relu, gelu, gelu_tanh, geglu, swiglu");
}

const char* activation_name(Act act) {
  switch (act) {
    case Act::kReLU: return "relu";
    case Act::kGelu: return "gelu";
    case Act::kGeluTanh: return "gelu_tanh";
    case Act::kGeGLU: return "geglu";
    case Act::kSwiGLU: return "swiglu";
  }
  return "?";
}

}  // namespace fastenc
