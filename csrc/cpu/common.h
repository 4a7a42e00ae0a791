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

// Checks that every value of an integer index tensor lies in [0, limit): indices from Python are
// never trusted, an out-of-range one would read or write outside a buffer.
inline void check_index_range(const at::Tensor& index, const char* name, int64_t limit) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const int64_t min_value = lo.item<int64_t>(), max_value = hi.item<int64_t>();
  TORCH_CHECK(min_value >= 0 && max_value < limit, name, " must lie in [0, ", limit, "), got values in [", min_value,
              ", ", max_value, "]");
}

// Checks an optional per-expert tensor (a bias) is on the CPU with the given 2-D shape.
inline void check_optional_shape(const std::optional<at::Tensor>& t, const char* name, int64_t rows, int64_t cols) {
  if (!t.has_value()) return;
  check_cpu(*t, name, 2);
  TORCH_CHECK(t->size(0) == rows && t->size(1) == cols, name, " must have shape [", rows, ", ", cols, "], got ",
              t->sizes());
}

// Rows per parallel task so that one task moves roughly `target` elements.
inline int64_t grain_rows(int64_t row_elements, int64_t target = 16384) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, row_elements));
}

}  // namespace cpu
}  // namespace moe_kernels
