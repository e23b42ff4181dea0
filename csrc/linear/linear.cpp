// oneDNN linear layers through torch's registered mkldnn ops (see linear.h).
#include "linear/linear.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <string_view>

#include "common/cpu_kernels.h"

namespace fastenc {

namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<std::string_view>);
using LinearAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::string_view);

std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

bool call_bool_op(const char* name) {
  const auto op = find_op(name, "");
  return op && op->typed<bool()>().call();
}

const c10::TypedOperatorHandle<LinearFn>& linear_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise", "")->typed<LinearFn>();
  return op;
}

const c10::TypedOperatorHandle<LinearAddFn>& linear_add_op() {
  static const auto op = find_op("mkldnn::_linear_pointwise", "binary")->typed<LinearAddFn>();
  return op;
}

}  // namespace

bool onednn_linear_supported(at::ScalarType dtype) {
  static const bool ops = find_op("mkldnn::_linear_pointwise", "").has_value() &&
                          find_op("mkldnn::_linear_pointwise", "binary").has_value();
  if (!ops) return false;
  switch (dtype) {
    case at::kFloat: return true;
    case at::kBFloat16: {
      static const bool bf16 = call_bool_op("mkldnn::_is_mkldnn_bf16_supported");
      return bf16;
    }
    case at::kHalf: {
      static const bool fp16 = call_bool_op("mkldnn::_is_mkldnn_fp16_supported");
      return fp16;
    }
    default: return false;
  }
}

bool onednn_unpacked_preferred(at::ScalarType dtype) {
  return onednn_linear_supported(dtype) && cpu::capability() >= cpu::Capability::kAvx512;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         std::optional<Act> act, const at::Tensor& add) {
  TORCH_CHECK(!(act && add.defined()), "fastenc onednn_linear: an activation and an add cannot both be fused");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, "fastenc onednn_linear: empty problem ", x.sizes(),
              " (route it to ATen)");
  // Below autograd: the mkldnn ops have no autograd kernels, and our callers do their own backward.
  at::AutoDispatchBelowADInplaceOrView guard;
  if (add.defined()) return linear_add_op().call(x, add, w, b, "add");
  const c10::List<std::optional<at::Scalar>> no_scalars;
  if (!act) return linear_op().call(x, w, b, "none", no_scalars, std::nullopt);
  switch (*act) {
    case Act::kReLU: return linear_op().call(x, w, b, "relu", no_scalars, std::nullopt);
    case Act::kGelu: return linear_op().call(x, w, b, "gelu", no_scalars, "none");
    case Act::kGeluTanh: return linear_op().call(x, w, b, "gelu", no_scalars, "tanh");
  }
  TORCH_CHECK(false, "fastenc onednn_linear: unknown activation");
}

}  // namespace fastenc
