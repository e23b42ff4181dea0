// The names of the FFN activations (activation.h): fastenc/constants.py's ACTIVATIONS then GATED_ACTIVATIONS, in
// the order of the enum Act, which the static_asserts below check name by name at build time (the math of a name
// is ActOp<Act> in activation.h).
#include "common/activation.h"

#include <c10/util/Exception.h>

#include <sstream>
#include <string_view>

#include "fastenc_constants.h"

namespace fastenc {

namespace {

using constants::kActivations;
using constants::kGatedActivations;
constexpr int kCount = static_cast<int>(kActivations.size() + kGatedActivations.size());

constexpr const char* name_at(int i) {
  return i < static_cast<int>(kActivations.size()) ? kActivations[i] : kGatedActivations[i - kActivations.size()];
}

constexpr bool named(Act a, std::string_view name) { return name_at(static_cast<int>(a)) == name; }

static_assert(kCount == 5 && static_cast<int>(kActivations.size()) == static_cast<int>(Act::kGeGLU),
              "fastenc/constants.py's activations must match the enum Act (common/activation.h)");
static_assert(named(Act::kReLU, "relu") && named(Act::kGelu, "gelu") && named(Act::kGeluTanh, "gelu_tanh") &&
                  named(Act::kGeGLU, "geglu") && named(Act::kSwiGLU, "swiglu"),
              "fastenc/constants.py's activations must name the enum Act in its order (common/activation.h)");

}  // namespace

Act parse_activation(const std::string& name) {
  for (int i = 0; i < kCount; ++i) {
    if (name == name_at(i)) return static_cast<Act>(i);
  }
  std::ostringstream names;
  for (int i = 0; i < kCount; ++i) names << (i ? ", " : "") << name_at(i);
  TORCH_CHECK_VALUE(false, "fastenc ffn: unknown activation '", name, "'; expected one of ", names.str());
}

const char* activation_name(Act act) { return name_at(static_cast<int>(act)); }

}  // namespace fastenc
