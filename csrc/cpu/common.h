// Small helpers shared by the CPU implementations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace moe_kernels {
namespace cpu {

// Checks that a tensor is on the CPU, has the given rank and is contiguous (the ops' contract;
// the Python wrappers pass contiguous tensors).
inline void check_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

// Rows per parallel task so that one task moves roughly `target` elements.
inline int64_t grain_rows(int64_t row_elements, int64_t target = 16384) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, row_elements));
}

}  // namespace cpu
}  // namespace moe_kernels
