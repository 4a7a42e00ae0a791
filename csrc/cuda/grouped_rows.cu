// CUDA row operations of the grouped-GEMM expert path (csrc/grouped_experts.h): gather into the staging
// rows, the activation and its backward, the weighted combine, per-expert column sums (bias gradients) and
// the zeroing of empty experts' weight gradients. Each kernel runs the per-element logic of
// csrc/common/grouped_rows.h, the code the CPU row ops run; none needs a host synchronisation, none uses
// atomics (results are deterministic). Row offsets are int64.
#include <ATen/ATen.h>

#include "cuda_utils.cuh"
#include "grouped_experts.h"

namespace moe_kernels {
namespace cuda {
namespace {

using grouped::ActSpec;
using grouped::act_backward_column;
using grouped::act_forward_column;
using grouped::add_rn;
using grouped::combine_column;
using grouped::gather_source_row;
using grouped::mul_rn;
using grouped::row_weight;

// Block shape for row kernels: threads_per_row a power of two covering `columns` (at most 256),
// rows_per_block filling 256 threads.
dim3 row_block(int64_t columns) {
  int threads_per_row = kWarpSize;
  while (threads_per_row < columns && threads_per_row < 256) threads_per_row *= 2;
  return dim3(threads_per_row, 256 / threads_per_row);
}

unsigned row_grid(int64_t rows, const dim3& block) {
  return static_cast<unsigned>(capped_grid(ceil_div(rows, block.y)));
}

// ------------------------------------------------------------------------------------------------ gather

// out[p, :] = x[sorted_slots[p] / k, :] in units of unit_t (16 bytes when rows and strides allow).
//   x [T, units] row stride x_stride; out [N, units] row stride out_stride (in units).
template <typename unit_t>
__global__ void gather_kernel(const unit_t* __restrict__ x, int64_t x_stride, const int* __restrict__ sorted_slots,
                              int64_t k, int64_t num_rows, int64_t units, unit_t* __restrict__ out,
                              int64_t out_stride) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; p < num_rows; p += int64_t(gridDim.x) * blockDim.y) {
    const unit_t* src = x + gather_source_row(sorted_slots, p, k) * x_stride;
    unit_t* dst = out + p * out_stride;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) dst[u] = src[u];
  }
}

template <typename unit_t>
void launch_gather(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k, const at::Tensor& out) {
  const int64_t scale = int64_t(sizeof(unit_t)) / x.element_size();
  const int64_t units = out.size(1) / scale;
  const dim3 block = row_block(units);
  gather_kernel<unit_t><<<row_grid(out.size(0), block), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const unit_t*>(x.data_ptr()), x.stride(0) / scale, sorted_slots.data_ptr<int>(), k, out.size(0),
      units, static_cast<unit_t*>(out.data_ptr()), out.stride(0) / scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool fits_16b(const at::Tensor& t, int64_t columns) {
  const int64_t e = t.element_size();
  return (columns * e) % 16 == 0 && (t.stride(0) * e) % 16 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void gather_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const int64_t H = out.size(1);
  if (fits_16b(x, H) && fits_16b(out, H)) {
    launch_gather<uint4>(x, sorted_slots, k, out);
  } else if (x.element_size() == 4) {
    launch_gather<uint32_t>(x, sorted_slots, k, out);
  } else {
    launch_gather<uint16_t>(x, sorted_slots, k, out);
  }
}

// -------------------------------------------------------------------------------------------- activation

// a[p, i] = act(h[p] + b1[e]) (act_forward_column); keep receives the biased pre-activation.
// Launch: row_block(M2); grid-stride over rows.
template <typename T>
__global__ void act_forward_kernel(const T* __restrict__ h, int64_t h_stride, const float* __restrict__ b1,
                                   const int* __restrict__ ids, const int* __restrict__ sorted_slots, ActSpec spec,
                                   T* keep, int64_t keep_stride, int64_t num_rows, int64_t M1, int64_t M2,
                                   T* __restrict__ a, int64_t a_stride) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; p < num_rows; p += int64_t(gridDim.x) * blockDim.y) {
    const float* bias_row = b1 != nullptr ? b1 + static_cast<int64_t>(ids[sorted_slots[p]]) * M1 : nullptr;
    const T* pre = h + p * h_stride;
    T* keep_row = keep != nullptr ? keep + p * keep_stride : nullptr;
    T* a_row = a + p * a_stride;
    for (int64_t i = threadIdx.x; i < M2; i += blockDim.x) {
      a_row[i] = static_cast<T>(act_forward_column(spec, pre, bias_row, keep_row, i, M2));
    }
  }
}

void act_forward_cuda(const at::Tensor& h, const at::Tensor& b1, const at::Tensor& ids, const at::Tensor& sorted_slots,
                      const ActSpec& spec, const at::Tensor& keep, const at::Tensor& a) {
  if (a.numel() == 0) return;
  const dim3 block = row_block(a.size(1));
  MOE_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "h", [&] {
    act_forward_kernel<scalar_t><<<row_grid(a.size(0), block), block, 0, at::cuda::getCurrentCUDAStream()>>>(
        h.data_ptr<scalar_t>(), h.stride(0), b1.defined() ? b1.data_ptr<float>() : nullptr, ids.data_ptr<int>(),
        sorted_slots.data_ptr<int>(), spec, keep.defined() ? keep.data_ptr<scalar_t>() : nullptr,
        keep.defined() ? keep.stride(0) : 0, a.size(0), h.size(1), a.size(1), a.data_ptr<scalar_t>(), a.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Backward of the activation, one block per sorted row (grid-stride): grad_pre, u := w * act, and the
// routing-weight gradient of the row's slot (a block_sum: fixed order, deterministic).
template <typename T>
__global__ void act_backward_kernel(const T* __restrict__ hidden, int64_t hidden_stride, T* __restrict__ u,
                                    int64_t u_stride, const T* __restrict__ gs, int64_t gs_stride,
                                    const float* __restrict__ b2, const float* __restrict__ weights,
                                    const int* __restrict__ ids, const int* __restrict__ sorted_slots, float scale,
                                    ActSpec spec, int64_t num_rows, int64_t M2, int64_t H, T* __restrict__ grad_pre,
                                    int64_t grad_pre_stride, float* __restrict__ grad_weights) {
  __shared__ float scratch[kWarpSize];
  for (int64_t p = blockIdx.x; p < num_rows; p += gridDim.x) {
    const float w = row_weight(weights, sorted_slots, p, scale);
    const T* pre = hidden + p * hidden_stride;
    T* u_row = u + p * u_stride;
    T* gp_row = grad_pre + p * grad_pre_stride;
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < M2; i += blockDim.x) {
      const float ui = static_cast<float>(u_row[i]);
      const float a = act_backward_column(spec, pre, ui, w, gp_row, i, M2);
      dot = add_rn(dot, mul_rn(ui, a));
      u_row[i] = static_cast<T>(mul_rn(w, a));
    }
    if (b2 != nullptr) {
      const float* bias_row = b2 + static_cast<int64_t>(ids[sorted_slots[p]]) * H;
      const T* g_row = gs + p * gs_stride;
      for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
        dot = add_rn(dot, mul_rn(static_cast<float>(g_row[c]), bias_row[c]));
      }
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) grad_weights[sorted_slots[p]] = mul_rn(scale, dot);
  }
}

void act_backward_cuda(const at::Tensor& hidden, const at::Tensor& u, const at::Tensor& gs, const at::Tensor& b2,
                       const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& sorted_slots, double scale,
                       const ActSpec& spec, const at::Tensor& grad_pre, const at::Tensor& grad_weights) {
  const int64_t N = u.size(0);
  if (N == 0) return;
  const int threads = row_block_threads(std::max<int64_t>(u.size(1), b2.defined() ? gs.size(1) : 0));
  const unsigned grid = static_cast<unsigned>(capped_grid(N));
  MOE_DISPATCH_FLOAT_HALF_BF16(u.scalar_type(), "u", [&] {
    act_backward_kernel<scalar_t><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        hidden.data_ptr<scalar_t>(), hidden.stride(0), u.data_ptr<scalar_t>(), u.stride(0), gs.data_ptr<scalar_t>(),
        gs.stride(0), b2.defined() ? b2.data_ptr<float>() : nullptr, weights.data_ptr<float>(), ids.data_ptr<int>(),
        sorted_slots.data_ptr<int>(), static_cast<float>(scale), spec, N, u.size(1), gs.size(1),
        grad_pre.data_ptr<scalar_t>(), grad_pre.stride(0), grad_weights.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// --------------------------------------------------------------------------------------------- combine

// out[t, c] = combine_column(...): the weighted sum of the token's k rows (+ their experts' b2).
// Launch: row_block(H); grid-stride over tokens.
template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, int64_t y_stride, const int* __restrict__ positions,
                               const float* __restrict__ weights, float scale, const int* __restrict__ ids,
                               const float* __restrict__ b2, int64_t num_tokens, int64_t k, int64_t H,
                               T* __restrict__ out) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < num_tokens;
       t += int64_t(gridDim.x) * blockDim.y) {
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
      out[t * H + c] = static_cast<T>(combine_column(y, y_stride, positions, weights, scale, ids, b2, H, t, k, c));
    }
  }
}

void combine_cuda(const at::Tensor& y, const at::Tensor& slot_positions, const at::Tensor& weights, double scale,
                  const at::Tensor& ids, const at::Tensor& b2, int64_t k, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const dim3 block = row_block(out.size(1));
  MOE_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "y", [&] {
    combine_kernel<scalar_t><<<row_grid(out.size(0), block), block, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), y.stride(0), slot_positions.data_ptr<int>(),
        weights.defined() ? weights.data_ptr<float>() : nullptr, static_cast<float>(scale), ids.data_ptr<int>(),
        b2.defined() ? b2.data_ptr<float>() : nullptr, out.size(0), k, out.size(1), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------------------------------ bias gradients

// out[e, c] = sum over expert e's sorted rows p (ascending) of coef_p * m[p, c]; coef_p = w[slot] * scale or 1.
// Launch: grid (E, ceil(C / blockDim.x)), one thread per column.
template <typename T>
__global__ void segment_column_sum_kernel(const T* __restrict__ m, int64_t m_stride, const int* __restrict__ offsets,
                                          const float* __restrict__ weights, const int* __restrict__ sorted_slots,
                                          float scale, int64_t C, float* __restrict__ out) {
  const int64_t e = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  for (int64_t p = offsets[e]; p < offsets[e + 1]; ++p) {
    const float coef = weights != nullptr ? row_weight(weights, sorted_slots, p, scale) : 1.f;
    acc = add_rn(acc, mul_rn(coef, static_cast<float>(m[p * m_stride + c])));
  }
  out[e * C + c] = acc;
}

void segment_column_sum_cuda(const at::Tensor& m, const at::Tensor& expert_offsets, const at::Tensor& weights,
                             const at::Tensor& sorted_slots, double scale, const at::Tensor& out) {
  const int64_t E = out.size(0), C = out.size(1);
  if (out.numel() == 0) return;
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(E), static_cast<unsigned>(ceil_div(C, kThreads)));
  MOE_DISPATCH_FLOAT_HALF_BF16(m.scalar_type(), "m", [&] {
    segment_column_sum_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        m.data_ptr<scalar_t>(), m.stride(0), expert_offsets.data_ptr<int>(),
        weights.defined() ? weights.data_ptr<float>() : nullptr, sorted_slots.data_ptr<int>(),
        static_cast<float>(scale), C, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad[e] = 0 where expert e has no rows; other experts are not touched. In units of unit_t (16 bytes when
// rows and strides allow). grad [E, R, units] with row stride s1 and expert stride s0 (in units).
// Launch: grid (E, min(R, 1024)); each block zeroes rows blockIdx.y, blockIdx.y + gridDim.y, ... of its
// expert, its threads striding over the row; blocks of experts with rows return at once.
template <typename unit_t>
__global__ void zero_empty_groups_kernel(unit_t* __restrict__ grad, int64_t s0, int64_t s1, int64_t R, int64_t units,
                                         const int* __restrict__ offsets) {
  const int64_t e = blockIdx.x;
  if (offsets[e] != offsets[e + 1]) return;
  const unit_t zero{};
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    unit_t* row = grad + e * s0 + r * s1;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) row[u] = zero;
  }
}

template <typename unit_t>
void launch_zero_empty_groups(const at::Tensor& grad, const at::Tensor& expert_offsets) {
  const int64_t scale = int64_t(sizeof(unit_t)) / grad.element_size();
  const dim3 grid(static_cast<unsigned>(grad.size(0)), static_cast<unsigned>(std::min<int64_t>(grad.size(1), 1024)));
  zero_empty_groups_kernel<unit_t><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<unit_t*>(grad.data_ptr()), grad.stride(0) / scale, grad.stride(1) / scale, grad.size(1),
      grad.size(2) / scale, expert_offsets.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zero_empty_groups_cuda(const at::Tensor& grad, const at::Tensor& expert_offsets) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.stride(2) == 1, "zero_empty_groups: rows must be contiguous");
  const int64_t e = grad.element_size();
  const bool vec = (grad.size(2) * e) % 16 == 0 && (grad.stride(1) * e) % 16 == 0 && (grad.stride(0) * e) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0;
  if (vec) {
    launch_zero_empty_groups<uint4>(grad, expert_offsets);
  } else if (e == 4) {
    launch_zero_empty_groups<uint32_t>(grad, expert_offsets);
  } else {
    launch_zero_empty_groups<uint16_t>(grad, expert_offsets);
  }
}

}  // namespace
}  // namespace cuda

namespace grouped {

const RowOps& cuda_row_ops() {
  static const RowOps ops{cuda::gather_cuda, cuda::act_forward_cuda, cuda::act_backward_cuda, cuda::combine_cuda,
                          cuda::segment_column_sum_cuda, cuda::zero_empty_groups_cuda};
  return ops;
}

}  // namespace grouped
}  // namespace moe_kernels
