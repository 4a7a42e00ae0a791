// The CPU dispatch ops (csrc/cpu/dispatch.cpp), callable from the other CPU implementations.
#pragma once

#include <tuple>

#include "cpu/common.h"

namespace moe_kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(const at::Tensor& ids, int64_t num_experts);
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k);
at::Tensor scatter_rows_sum(const at::Tensor& grad_rows, const at::Tensor& slot_positions, int64_t k);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& slot_positions, const at::Tensor& weights);
std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                    const at::Tensor& slot_positions, const at::Tensor& weights);

}  // namespace cpu
}  // namespace moe_kernels
