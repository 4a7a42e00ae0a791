// The decode expert path: op decode_mlp_forward (schema in csrc/ops.cpp, implementation in
// csrc/decode_experts.cpp, CUDA kernels in csrc/cuda/decode.cu).
//
// For a few routed slots without gradients (a decode step) the grouped path's plan, gather and grouped GEMMs
// cost more launches than the work needs. This path runs two GEMV passes over the slots in slot order:
//   a[s, i]   = act(x[t] . w1[e][gate row of i] (+ b1), x[t] . w1[e][up row of i] (+ b1))   s = t*k + j, e = ids[s]
//   out[t, c] = sum_j (w[s] * scale) * (a[s] . w2[e][c] (+ b2[e, c])), fp32, j ascending
// with the per-element steps of the grouped path (csrc/common/grouped_rows.h: decode_act_column, combine_term):
// dot products in fp32, rounded to the storage type where the grouped path stores a GEMM output. Both
// expert ops use it (moe_mlp: gated or not; adapter_moe: w1 = down [E, r, H], w2 = up [E, H, r]).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "common/grouped_rows.h"
#include "common/op_args.h"

namespace moe_kernels {
namespace decode {

// One call's operands, checked, and its sizes (experts::Dims): x [T, H] contiguous; w1 [E, M1, H] and w2 [E, H, M2]
// with any strides; b1 [E, M1] / b2 [E, H] float32 contiguous or undefined; weights (float32 or x's dtype) and ids
// (int32 or int64), [T*k] contiguous, as the caller stored them (a Hugging Face router's bf16 weights and int64 ids
// are read without a conversion launch); a [T*k, M2] (x's dtype, contiguous) receives the activation rows, out
// [T, H] (contiguous) the result.
struct Call : experts::Dims {
  at::Tensor x, w1, w2, b1, b2, weights, ids, a, out;
  act::ActSpec spec;
  float scale;
};

// Calls f(W{}, I{}) with the routing's storage types: W float or T (the data type), I int32_t or int64_t.
template <typename T, typename F>
void dispatch_routing(const Call& c, F&& f) {
  const bool float_weights = c.weights.scalar_type() == at::kFloat, int32_ids = c.ids.scalar_type() == at::kInt;
  if (float_weights) {
    int32_ids ? f(float{}, int32_t{}) : f(float{}, int64_t{});
  } else if constexpr (!std::is_same_v<T, float>) {  // weights in T (checked: float32 or x's dtype)
    int32_ids ? f(T{}, int32_t{}) : f(T{}, int64_t{});
  }
}

// Output elements per CUDA block (one per warp) along grid y, whose size is limited to 65535 blocks.
constexpr int64_t kCudaColumnsPerBlock = 8;
constexpr int64_t kCudaMaxGridY = 65535;

#ifdef MOE_KERNELS_WITH_CUDA
void run_cuda(const Call& call);  // csrc/cuda/decode.cu
#endif

}  // namespace decode
}  // namespace moe_kernels
