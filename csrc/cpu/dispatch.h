// The CPU dispatch ops (csrc/cpu/dispatch.cpp), callable from the other CPU implementations.
#pragma once

#include <algorithm>
#include <tuple>

#include <ATen/OpMathType.h>

#include "cpu/common.h"

namespace moe_kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(const at::Tensor& ids, int64_t num_experts);
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k);
at::Tensor scatter_rows_sum(const at::Tensor& grad_rows, const at::Tensor& slot_positions, int64_t k);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& slot_positions, const at::Tensor& weights);
// Weighted combine of tokens [t0, t1): out[t] = sum_j (w[t*k+j] * scale) * ys[pos[t*k+j]], accumulated in
// opmath precision in choice order. The body of `combine`, also run per token chunk by the expert path.
template <typename scalar_t>
void combine_token_rows(const scalar_t* ys, const int32_t* pos, const float* w, float scale, int64_t k, int64_t H,
                        int64_t t0, int64_t t1, scalar_t* out, at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc, acc + H, acc_t(0));
    for (int64_t j = 0; j < k; ++j) {
      const acc_t wj = w[t * k + j] * scale;
      const scalar_t* row = ys + static_cast<int64_t>(pos[t * k + j]) * H;
      for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(row[h]);
    }
    scalar_t* out_row = out + t * H;
    for (int64_t h = 0; h < H; ++h) out_row[h] = static_cast<scalar_t>(acc[h]);
  }
}

// Sum over choices for tokens [t0, t1): out[t] = sum_j rows[pos[t*k+j]], in opmath precision in choice
// order. The body of `scatter_rows_sum`, also run per token chunk by the expert path's backward.
template <typename scalar_t>
void sum_token_rows(const scalar_t* rows, const int32_t* pos, int64_t k, int64_t H, int64_t t0, int64_t t1,
                    scalar_t* out, at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc, acc + H, acc_t(0));
    for (int64_t j = 0; j < k; ++j) {
      const scalar_t* row = rows + static_cast<int64_t>(pos[t * k + j]) * H;
      for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(row[h]);
    }
    scalar_t* out_row = out + t * H;
    for (int64_t h = 0; h < H; ++h) out_row[h] = static_cast<scalar_t>(acc[h]);
  }
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                    const at::Tensor& slot_positions, const at::Tensor& weights);

}  // namespace cpu
}  // namespace moe_kernels
