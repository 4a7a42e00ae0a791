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

}  // namespace moe_kernels
