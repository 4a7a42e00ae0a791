// Small helpers shared by the CPU implementations.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>

namespace moe_kernels {
namespace cpu {

// Checks that a tensor is on the CPU and has the given rank. It does not check contiguity: the ops take
// any strides and make what they read contiguous themselves (`.contiguous()`, free when it already is).
inline void check_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
}

// Debug mode: MOE_KERNELS_DEBUG set and not "0", as moe_kernels/validation.py reads it (read per call, as
// the other MOE_KERNELS_* switches of the CPU ops are).
inline bool debug_checks() {
  const char* flag = std::getenv("MOE_KERNELS_DEBUG");
  return flag != nullptr && flag[0] != '\0' && !(flag[0] == '0' && flag[1] == '\0');
}

// In debug mode, checks that every value of an integer index tensor lies in [0, limit) (an out-of-range
// one would read or write outside a buffer). Otherwise the ops trust the values, as the CUDA ops do: ids
// are validated once by moe_kernels.ops, and the plan tensors come from `plan`, right by construction; the
// check is a separate pass over the tensor on every call, kept off the hot path.
inline void check_index_range(const at::Tensor& index, const char* name, int64_t limit) {
  if (index.numel() == 0 || !debug_checks()) return;
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
