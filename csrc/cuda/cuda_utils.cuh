// Small helpers shared by the CUDA kernels of moe_kernels: checks, dtype dispatch, packed loads,
// deterministic block reductions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <initializer_list>

namespace moe_kernels {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline void check_cuda(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor, got device ", tensor.device());
}

inline void check_dtype(const at::Tensor& tensor, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must be ", dtype, ", got ", tensor.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b, " must be on one device, got ", a.device(),
              " and ", b.device());
}

// A tensor and its name for error messages.
struct Named {
  const at::Tensor& tensor;
  const char* name;
};

// Checks that every tensor is a CUDA tensor on the first one's device.
inline void check_cuda_same_device(std::initializer_list<Named> tensors) {
  const Named& first = *tensors.begin();
  for (const Named& t : tensors) {
    check_cuda(t.tensor, t.name);
    check_same_device(first.tensor, t.tensor, first.name, t.name);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for grid-stride loops: enough blocks to fill the GPU, never more than there is work.
inline int64_t capped_grid(int64_t work_items, int64_t blocks_per_sm = 32) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = sms * blocks_per_sm;
  return std::max<int64_t>(1, std::min(work_items, cap));
}

// Dispatch over the three floating dtypes the ops take (float, half, bfloat16); a narrower and faster-to-
// compile set than AT_DISPATCH_FLOATING_TYPES_AND2, which adds double.
#define MOE_DISPATCH_FLOAT_HALF_BF16(dtype, arg_name, ...)                                               \
  [&] {                                                                                                  \
    switch (dtype) {                                                                                     \
      case at::ScalarType::Float: {                                                                      \
        using scalar_t = float;                                                                          \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::ScalarType::Half: {                                                                       \
        using scalar_t = at::Half;                                                                       \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case at::ScalarType::BFloat16: {                                                                   \
        using scalar_t = at::BFloat16;                                                                   \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      default:                                                                                           \
        TORCH_CHECK(false, arg_name, " must be float32, float16 or bfloat16, got ", dtype);              \
    }                                                                                                    \
  }()

// N elements of T packed into one aligned load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of scalar_t per 128-bit access.
template <typename scalar_t>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// True when every row of a contiguous [rows, row_elems] tensor starts on a 16-byte boundary, so rows can be
// read with 128-bit accesses.
inline bool rows_16b_aligned(const at::Tensor& tensor, int64_t row_elems) {
  const int64_t row_bytes = row_elems * static_cast<int64_t>(tensor.element_size());
  return row_bytes % 16 == 0 && reinterpret_cast<std::uintptr_t>(tensor.data_ptr()) % 16 == 0;
}

// Sum over a warp, every lane gets the total; fixed butterfly order, so deterministic.
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), in a fixed order; every thread gets the
// total. `scratch` holds 32 floats of shared memory; the call ends with a barrier so it can be reused.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();
  return total;
}

// Threads per block for row kernels whose threads each take one packed vector of a row: a multiple of
// 32, at least 32, at most `max_threads`.
inline int row_block_threads(int64_t vectors_per_row, int max_threads = 256) {
  int64_t threads = ceil_div(vectors_per_row, kWarpSize) * kWarpSize;
  return static_cast<int>(std::max<int64_t>(kWarpSize, std::min<int64_t>(threads, max_threads)));
}

}  // namespace cuda
}  // namespace moe_kernels
