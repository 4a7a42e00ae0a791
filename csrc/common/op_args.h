// Host-side argument handling shared by the CPU and CUDA op implementations: the route ops' k and grouping
// checks and RouteParams (csrc/cpu/routing.cpp, csrc/cuda/routing.cu), and the expert ops' activation
// arguments (csrc/cpu/experts.cpp, csrc/grouped_experts.cpp). Defined in op_args.cpp, compiled once by the C++
// compiler: nvcc's translation units call that copy instead of emitting their own inline one (the H200 of run 3
// crashed in exactly these checks, and only these were compiled by both compilers).
#pragma once

#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "common/activations.h"
#include "common/routing_row.h"

namespace moe_kernels {

// A float argument is finite. moe_kernels.ops tests this in eager Python; under torch.compile a float can reach the
// op as a traced value Python cannot test (validation.finite_or_traced), so the op tests the value it gets.
void check_finite(double value, const char* name);

namespace routing {

// route_forward's k and grouping against E. Cheap (no tensor data is read); moe_kernels.ops checks the same
// with its own messages, these keep a direct torch.ops.moe_kernels caller from choosing past a row.
void check_route_forward_args(int64_t num_experts, int64_t k, int64_t n_group, int64_t topk_group);

// The RouteParams of one op call. n_group <= 1 (the schema's 0: no groups) turns the group-limited choice off.
RouteParams make_params(int64_t num_experts, int64_t k, bool use_sigmoid, bool topk_first, bool renormalize,
                        int64_t n_group, int64_t topk_group, double scale);

// route_forward's output dtypes: weights float32 (None), float16 or bfloat16; ids int32 (None) or int64. A Hugging
// Face router returns its weights in a model dtype and int64 ids: written so, they need no conversion launches.
at::ScalarType route_weights_dtype(const std::optional<at::ScalarType>& dtype);
at::ScalarType route_ids_dtype(const std::optional<at::ScalarType>& dtype);

// route_backward's ids: int32 or int64 (route's two id dtypes).
void check_route_ids(const at::Tensor& ids);

// Calls f(W{}, I{}) with route's output storage types (checked by the two functions above): W float, c10::Half or
// c10::BFloat16, I int32_t or int64_t.
template <typename F>
void dispatch_route_outputs(at::ScalarType weights_dtype, at::ScalarType ids_dtype, F&& f) {
  const bool int32_ids = ids_dtype == at::kInt;
  auto with_ids = [&](auto w) { int32_ids ? f(w, int32_t{}) : f(w, int64_t{}); };
  if (weights_dtype == at::kFloat) {
    with_ids(float{});
  } else if (weights_dtype == at::kHalf) {
    with_ids(c10::Half{});
  } else {
    with_ids(c10::BFloat16{});
  }
}

}  // namespace routing

namespace act {

// The ActSpec of an expert op's (activation, gated, interleaved, limit, soft caps); names as moe_kernels/spec.py.
// gate_cap / up_cap: > 0 for softcap_swiglu, 0 (none) for every other activation. ``scale`` (the op's output scale)
// is only checked here, where every expert op passes.
ActSpec parse_activation(const std::string& name, bool gated, bool interleaved, const std::optional<double>& limit,
                         double gate_cap, double up_cap, double scale);

}  // namespace act

namespace experts {

// The sizes of an expert op's call: x [T, H], w1 [E, M1, H], w2 [E, H, M2], weights / ids [T, k], N = T*k slots.
struct Dims {
  int64_t T, H, E, M1, M2, k, N;
};

// The operands every expert op takes (the grouped and the decode path): ranks, one float dtype, sizes that agree
// (M1 = 2 * M2 gated, M1 = M2 not), weights float32 and ids int32 [T, k], biases [E, M1] / [E, H], one device.
// ``path`` names the op's path in the dtype error. ``routing_as_given``: a path that reads the routing as the
// caller stored it also takes weights in x's dtype and int64 ids (a Hugging Face router's).
Dims check_operands(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                    const at::Tensor& weights, const at::Tensor& ids, const act::ActSpec& spec, const char* path,
                    bool routing_as_given = false);

}  // namespace experts
}  // namespace moe_kernels
