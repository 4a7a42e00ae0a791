// CPU dispatch ops: the plan (stable counting sort of slots by expert), the row gather into expert
// order and its backward, and the weighted combine back to token order and its backward.
// Offsets are int64 throughout: T*k*H may exceed 2^31 elements.
#include <algorithm>
#include <cstring>
#include <vector>

#include <torch/library.h>

#include <ATen/OpMathType.h>

#include "cpu/dispatch.h"

namespace moe_kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(const at::Tensor& ids_in, int64_t num_experts) {
  check_cpu(ids_in, "ids", 2);
  check_int32(ids_in, "ids");
  TORCH_CHECK(num_experts >= 1, "num_experts must be positive, got ", num_experts);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t N = ids.numel(), E = num_experts;
  TORCH_CHECK(N < (int64_t(1) << 31), "plan: T*k = ", N, " slots do not fit int32 slot numbers");
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor offsets = at::empty({E + 1}, opts);
  at::Tensor sorted_slots = at::empty({N}, opts);
  at::Tensor slot_positions = at::empty({N}, opts);
  const int32_t* id = ids.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  int32_t* position = slot_positions.data_ptr<int32_t>();

  // Contiguous chunks of slots, one histogram per chunk; the chunk order keeps the scatter stable.
  const int64_t max_chunks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t num_chunks = std::min<int64_t>(max_chunks, std::max<int64_t>(1, N / 4096));
  const int64_t chunk = (N + num_chunks - 1) / num_chunks;
  std::vector<int64_t> counts(num_chunks * E, 0);  // counts[c*E + e], then each chunk's write cursor
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* count = counts.data() + c * E;
      for (int64_t s = c * chunk; s < std::min(N, (c + 1) * chunk); ++s) {
        const int32_t e = id[s];
        TORCH_CHECK(e >= 0 && e < E, "plan: ids must lie in [0, ", E, "), found ", e);
        ++count[e];
      }
    }
  });
  // Exclusive scan over (expert, chunk): expert-major, so each expert's slots stay contiguous.
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = static_cast<int32_t>(running);
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t n = counts[c * E + e];
      counts[c * E + e] = running;
      running += n;
    }
  }
  off[E] = static_cast<int32_t>(running);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* cursor = counts.data() + c * E;
      for (int64_t s = c * chunk; s < std::min(N, (c + 1) * chunk); ++s) {
        const int64_t p = cursor[id[s]]++;
        sorted[p] = static_cast<int32_t>(s);
        position[s] = static_cast<int32_t>(p);
      }
    }
  });
  return {offsets, sorted_slots, slot_positions};
}

at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& sorted_slots_in, int64_t k) {
  check_cpu(x_in, "x", 2);
  check_cpu(sorted_slots_in, "sorted_slots", 1);
  check_int32(sorted_slots_in, "sorted_slots");
  TORCH_CHECK(k >= 1, "k must be positive, got ", k);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_slots = sorted_slots_in.contiguous();
  const int64_t N = sorted_slots.numel(), H = x.size(1), T = x.size(0);
  at::Tensor out = at::empty({N, H}, x.options());
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const int64_t row_bytes = H * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, N, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = slots[p] / k;
      TORCH_CHECK(slots[p] >= 0 && t < T, "gather_rows: slot ", slots[p], " out of range for T = ", T, ", k = ", k);
      std::memcpy(dst + p * row_bytes, src + t * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor scatter_rows_sum(const at::Tensor& grad_rows_in, const at::Tensor& slot_positions_in, int64_t k) {
  check_cpu(grad_rows_in, "grad_rows", 2);
  check_cpu(slot_positions_in, "slot_positions", 1);
  check_int32(slot_positions_in, "slot_positions");
  TORCH_CHECK(k >= 1 && slot_positions_in.numel() % k == 0, "slot_positions length ", slot_positions_in.numel(),
              " must be a multiple of k = ", k);
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const at::Tensor slot_positions = slot_positions_in.contiguous();
  const int64_t N = slot_positions.numel(), T = N / k, H = grad_rows.size(1);
  TORCH_CHECK(grad_rows.size(0) == N, "grad_rows must have T*k = ", N, " rows, got ", grad_rows.size(0));
  check_index_range(slot_positions, "slot_positions", N);
  at::Tensor out = at::empty({T, H}, grad_rows.options());
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_rows.scalar_type(), "scatter_rows_sum_cpu", [&] {
    const scalar_t* src = grad_rows.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16, fp64 for double
    at::parallel_for(0, T, grain_rows(H * k), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      sum_token_rows<scalar_t>(src, pos, k, H, begin, end, dst, acc.data());
    });
  });
  return out;
}

static void check_combine_args(const at::Tensor& y_sorted, const at::Tensor& slot_positions, const at::Tensor& weights) {
  check_cpu(y_sorted, "y_sorted", 2);
  check_cpu(slot_positions, "slot_positions", 1);
  check_cpu(weights, "weights", 2);
  check_int32(slot_positions, "slot_positions");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32, got ", weights.scalar_type());
  TORCH_CHECK(weights.numel() == slot_positions.numel() && y_sorted.size(0) == slot_positions.numel(),
              "combine: weights ", weights.sizes(), ", slot_positions ", slot_positions.sizes(), " and y_sorted ",
              y_sorted.sizes(), " must hold T*k slots");
  check_index_range(slot_positions, "slot_positions", slot_positions.numel());
}

at::Tensor combine(const at::Tensor& y_sorted_in, const at::Tensor& slot_positions_in, const at::Tensor& weights_in) {
  check_combine_args(y_sorted_in, slot_positions_in, weights_in);
  const at::Tensor y_sorted = y_sorted_in.contiguous();
  const at::Tensor slot_positions = slot_positions_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y_sorted.size(1);
  at::Tensor out = at::empty({T, H}, y_sorted.options());
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  const float* w = weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "combine_cpu", [&] {
    const scalar_t* src = y_sorted.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16, fp64 for double
    at::parallel_for(0, T, grain_rows(H * k), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H);
      combine_token_rows<scalar_t>(src, pos, w, 1.0f, k, H, begin, end, dst, acc.data());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out_in, const at::Tensor& y_sorted_in,
                                                    const at::Tensor& slot_positions_in,
                                                    const at::Tensor& weights_in) {
  check_combine_args(y_sorted_in, slot_positions_in, weights_in);
  check_cpu(grad_out_in, "grad_out", 2);
  const at::Tensor y_sorted = y_sorted_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(y_sorted.scalar_type()).contiguous();
  const at::Tensor slot_positions = slot_positions_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y_sorted.size(1);
  TORCH_CHECK(grad_out.size(0) == T && grad_out.size(1) == H, "grad_out must be [T, H] = [", T, ", ", H, "], got ",
              grad_out.sizes());
  at::Tensor grad_y = at::empty_like(y_sorted);
  at::Tensor grad_weights = at::empty({T, k}, weights.options());
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  const float* w = weights.data_ptr<float>();
  float* gw = grad_weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "combine_backward_cpu", [&] {
    const scalar_t* y = y_sorted.data_ptr<scalar_t>();
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, T, grain_rows(H * k), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g_row = g + t * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t p = pos[t * k + j];
          const acc_t wj = w[t * k + j];
          const scalar_t* y_row = y + p * H;
          scalar_t* gy_row = gy + p * H;
          acc_t dot = 0;
          for (int64_t h = 0; h < H; ++h) {
            const acc_t gh = static_cast<acc_t>(g_row[h]);
            dot += gh * static_cast<acc_t>(y_row[h]);
            gy_row[h] = static_cast<scalar_t>(wj * gh);
          }
          gw[t * k + j] = static_cast<float>(dot);
        }
      }
    });
  });
  return {grad_y, grad_weights};
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("plan", &plan);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows_sum", &scatter_rows_sum);
  m.impl("combine", &combine);
  m.impl("combine_backward", &combine_backward);
}

}  // namespace cpu
}  // namespace moe_kernels
