// The definitions of csrc/common/op_args.h (comments there). One copy, compiled by the C++ compiler only: the
// setup.py glob builds csrc/common/*.cpp with the CPU sources, never with nvcc.
#include "common/op_args.h"

#include <cmath>

#include <c10/util/Exception.h>

namespace moe_kernels {

void check_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value), name, " must be a finite number, got ", value);
}

namespace routing {

void check_route_forward_args(int64_t num_experts, int64_t k, int64_t n_group, int64_t topk_group) {
  TORCH_CHECK(k >= 1 && k <= num_experts, "k must be in [1, E = ", num_experts, "], got ", k);
  if (n_group > 1) {
    TORCH_CHECK(num_experts % n_group == 0, "n_group = ", n_group, " must divide E = ", num_experts);
    TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group], got ", topk_group);
    TORCH_CHECK(k <= topk_group * (num_experts / n_group), "k = ", k, " exceeds the experts of the kept groups");
  }
}

RouteParams make_params(int64_t num_experts, int64_t k, bool use_sigmoid, bool topk_first, bool renormalize,
                        int64_t n_group, int64_t topk_group, double scale) {
  check_finite(scale, "scale");
  RouteParams p;
  p.num_experts = num_experts;
  p.k = k;
  p.use_sigmoid = use_sigmoid;
  p.topk_first = topk_first;
  p.renormalize = renormalize;
  p.n_group = n_group > 1 ? n_group : 0;
  p.topk_group = n_group > 1 ? topk_group : 0;
  p.scale = static_cast<float>(scale);
  return p;
}

at::ScalarType route_weights_dtype(const std::optional<at::ScalarType>& dtype) {
  const at::ScalarType w = dtype.value_or(at::kFloat);
  TORCH_CHECK(w == at::kFloat || w == at::kHalf || w == at::kBFloat16,
              "weights_dtype must be float32, float16 or bfloat16, got ", w);
  return w;
}

at::ScalarType route_ids_dtype(const std::optional<at::ScalarType>& dtype) {
  const at::ScalarType i = dtype.value_or(at::kInt);
  TORCH_CHECK(i == at::kInt || i == at::kLong, "ids_dtype must be int32 or int64, got ", i);
  return i;
}

void check_route_ids(const at::Tensor& ids) {
  const at::ScalarType i = ids.scalar_type();
  TORCH_CHECK(i == at::kInt || i == at::kLong, "ids must be int32 or int64, got ", i);
}

}  // namespace routing

namespace act {

ActSpec parse_activation(const std::string& name, bool gated, bool interleaved, const std::optional<double>& limit,
                         double gate_cap, double up_cap, double scale) {
  check_finite(scale, "scale");
  TORCH_CHECK(gated || !interleaved, "interleaved applies to gated activations only");
  check_finite(gate_cap, "gate_cap");
  check_finite(up_cap, "up_cap");
  if (limit.has_value()) {
    check_finite(*limit, "swiglu_limit");
    TORCH_CHECK(*limit > 0.0, "swiglu_limit must be > 0, got ", *limit);
  }
  ActSpec spec{0, gated, interleaved, limit.has_value(), limit.has_value() ? static_cast<float>(*limit) : 0.f,
               static_cast<float>(gate_cap), static_cast<float>(up_cap)};
  if (name == "silu") spec.code = act::kSilu;
  else if (name == "gelu") spec.code = act::kGelu;
  else if (name == "gelu_tanh") spec.code = act::kGeluTanh;
  else if (name == "relu") spec.code = act::kRelu;
  else if (name == "relu2" && !gated) spec.code = act::kRelu2;
  else if (name == "identity" && !gated) spec.code = act::kIdentity;
  else if (name == "gpt_oss" && gated) spec.code = act::kGptOss;
  else if (name == "softcap_swiglu" && gated) spec.code = act::kSoftcapSwiglu;
  else TORCH_CHECK(false, "unknown ", gated ? "gated" : "adapter", " activation '", name, "'");
  if (spec.code == act::kSoftcapSwiglu) {
    TORCH_CHECK(gate_cap > 0.0 && up_cap > 0.0, "softcap_swiglu needs gate_cap > 0 and up_cap > 0, got ", gate_cap,
                ", ", up_cap);
    TORCH_CHECK(!limit.has_value(), "softcap_swiglu takes no clamp limit");
  } else {
    TORCH_CHECK(gate_cap == 0.0 && up_cap == 0.0, "gate_cap / up_cap apply to softcap_swiglu only");
  }
  return spec;
}

}  // namespace act

namespace experts {

Dims check_operands(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                    const at::Tensor& weights, const at::Tensor& ids, const act::ActSpec& spec, const char* path,
                    bool routing_as_given) {
  TORCH_CHECK(x.dim() == 2, "x must be [T, H], got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, "w1 and w2 must be 3-D, got ", w1.sizes(), " and ", w2.sizes());
  if (routing_as_given) {
    TORCH_CHECK(weights.dim() == 2 && (weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type()),
                "weights must be float32 or x's dtype, [T, k]");
  } else {
    TORCH_CHECK(weights.dim() == 2 && weights.scalar_type() == at::kFloat, "weights must be float32 [T, k]");
  }
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "w1, w2 and x must share a dtype");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, path,
              " takes float32, float16 or bfloat16, got ", dtype);
  Dims d{x.size(0), x.size(1), w1.size(0), w1.size(1), w2.size(2), weights.size(1), weights.numel()};
  TORCH_CHECK(w1.size(2) == d.H, "w1 must be [E, M1, H] with H = ", d.H, ", got ", w1.sizes());
  TORCH_CHECK(w2.size(0) == d.E && w2.size(1) == d.H, "w2 must be [E, H, M2], got ", w2.sizes());
  TORCH_CHECK(spec.gated ? d.M1 == 2 * d.M2 : d.M1 == d.M2, "w1 ", w1.sizes(), " and w2 ", w2.sizes(),
              " disagree on the hidden width");
  TORCH_CHECK(weights.size(0) == d.T && d.k >= 1, "weights must be [T, k] with T = ", d.T, " and k >= 1");
  TORCH_CHECK(ids.sizes() == weights.sizes() &&
                  (ids.scalar_type() == at::kInt || (routing_as_given && ids.scalar_type() == at::kLong)),
              routing_as_given ? "ids must be int32 or int64 [T, k]" : "ids must be int32 [T, k]");
  if (b1.has_value()) {
    TORCH_CHECK(b1->dim() == 2 && b1->size(0) == d.E && b1->size(1) == d.M1, "b1 must be [E, M1]");
  }
  if (b2.has_value()) {
    TORCH_CHECK(b2->dim() == 2 && b2->size(0) == d.E && b2->size(1) == d.H, "b2 must be [E, H]");
  }
  for (const at::Tensor* t : {&w1, &w2, &weights, &ids}) {
    TORCH_CHECK(t->device() == x.device(), "every tensor must be on x's device ", x.device(), ", got ", t->device());
  }
  for (const std::optional<at::Tensor>* b : {&b1, &b2}) {
    if (b->has_value()) {
      TORCH_CHECK((*b)->device() == x.device(), "every tensor must be on x's device ", x.device(), ", got ",
                  (*b)->device());
    }
  }
  return d;
}

}  // namespace experts

}  // namespace moe_kernels
