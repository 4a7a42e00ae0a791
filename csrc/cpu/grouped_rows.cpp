// CPU row operations of the grouped-GEMM expert path (csrc/grouped_experts.h): loops over rows (OpenMP via
// at::parallel_for) around the per-element logic of csrc/common/grouped_rows.h that the CUDA kernels run too.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>

#include "grouped_experts.h"

namespace moe_kernels {
namespace grouped {
namespace {

#define MOE_GROUPED_DISPATCH(dtype, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grouped", __VA_ARGS__)

int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

void gather_cpu(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k, const at::Tensor& out) {
  const int64_t N = out.size(0), H = out.size(1);
  const int64_t out_stride = out.stride(0), x_stride = x.stride(0);
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const size_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t elem = x.element_size();
  at::parallel_for(0, N, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      std::memcpy(dst + p * out_stride * elem, src + gather_source_row(slots, p, k) * x_stride * elem, row_bytes);
    }
  });
}

void act_forward_cpu(const at::Tensor& h, const at::Tensor& b1, const at::Tensor& ids, const at::Tensor& sorted_slots,
                     const ActSpec& spec, const at::Tensor& keep, const at::Tensor& a) {
  const int64_t N = a.size(0), M2 = a.size(1), M1 = h.size(1);
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const int32_t* expert = ids.data_ptr<int32_t>();
  const float* bias = b1.defined() ? b1.data_ptr<float>() : nullptr;
  MOE_GROUPED_DISPATCH(h.scalar_type(), [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    scalar_t* keep_ptr = keep.defined() ? keep.data_ptr<scalar_t>() : nullptr;
    scalar_t* a_ptr = a.data_ptr<scalar_t>();
    const int64_t hs = h.stride(0), ks = keep.defined() ? keep.stride(0) : 0, as = a.stride(0);
    at::parallel_for(0, N, grain(M1), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float* bias_row = bias ? bias + static_cast<int64_t>(expert[slots[p]]) * M1 : nullptr;
        scalar_t* keep_row = keep_ptr ? keep_ptr + p * ks : nullptr;
        for (int64_t i = 0; i < M2; ++i) {
          a_ptr[p * as + i] = static_cast<scalar_t>(act_forward_column(spec, h_ptr + p * hs, bias_row, keep_row, i, M2));
        }
      }
    });
  });
}

void act_backward_cpu(const at::Tensor& hidden, const at::Tensor& u, const at::Tensor& gs, const at::Tensor& b2,
                      const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& sorted_slots, double scale,
                      const ActSpec& spec, const at::Tensor& grad_pre, const at::Tensor& grad_weights) {
  const int64_t N = u.size(0), M2 = u.size(1), M1 = hidden.size(1), H = gs.size(1);
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const int32_t* expert = ids.data_ptr<int32_t>();
  const float* w = weights.data_ptr<float>();
  const float* bias = b2.defined() ? b2.data_ptr<float>() : nullptr;
  float* gw = grad_weights.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  MOE_GROUPED_DISPATCH(u.scalar_type(), [&] {
    const scalar_t* pre = hidden.data_ptr<scalar_t>();
    scalar_t* u_ptr = u.data_ptr<scalar_t>();
    const scalar_t* g_ptr = gs.data_ptr<scalar_t>();
    scalar_t* gp = grad_pre.data_ptr<scalar_t>();
    const int64_t ps = hidden.stride(0), us = u.stride(0), gss = gs.stride(0), gps = grad_pre.stride(0);
    at::parallel_for(0, N, grain(M1), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float rw = row_weight(w, slots, p, sc);
        scalar_t* u_row = u_ptr + p * us;
        float dot = 0.0f;
        for (int64_t i = 0; i < M2; ++i) {
          const float ui = static_cast<float>(u_row[i]);
          const float a = act_backward_column(spec, pre + p * ps, ui, rw, gp + p * gps, i, M2);
          dot = add_rn(dot, mul_rn(ui, a));
          u_row[i] = static_cast<scalar_t>(mul_rn(rw, a));
        }
        if (bias) {
          const float* bias_row = bias + static_cast<int64_t>(expert[slots[p]]) * H;
          for (int64_t c = 0; c < H; ++c) dot = add_rn(dot, mul_rn(static_cast<float>(g_ptr[p * gss + c]), bias_row[c]));
        }
        gw[slots[p]] = mul_rn(sc, dot);
      }
    });
  });
}

void combine_cpu(const at::Tensor& y, const at::Tensor& slot_positions, const at::Tensor& weights, double scale,
                 const at::Tensor& ids, const at::Tensor& b2, int64_t k, const at::Tensor& out) {
  const int64_t T = out.size(0), H = out.size(1);
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
  const int32_t* expert = ids.data_ptr<int32_t>();
  const float* bias = b2.defined() ? b2.data_ptr<float>() : nullptr;
  MOE_GROUPED_DISPATCH(y.scalar_type(), [&] {
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ys = y.stride(0);
    at::parallel_for(0, T, grain(H * k), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t c = 0; c < H; ++c) {
          o[t * H + c] = static_cast<scalar_t>(
              combine_column(y_ptr, ys, pos, w, static_cast<float>(scale), expert, bias, H, t, k, c));
        }
      }
    });
  });
}

void segment_column_sum_cpu(const at::Tensor& m, const at::Tensor& expert_offsets, const at::Tensor& weights,
                            const at::Tensor& sorted_slots, double scale, const at::Tensor& out) {
  const int64_t E = out.size(0), C = out.size(1);
  const int32_t* off = expert_offsets.data_ptr<int32_t>();
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  const float* w = weights.defined() ? weights.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  MOE_GROUPED_DISPATCH(m.scalar_type(), [&] {
    const scalar_t* m_ptr = m.data_ptr<scalar_t>();
    const int64_t ms = m.stride(0);
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        float* row = o + e * C;
        std::fill(row, row + C, 0.0f);
        for (int64_t p = off[e]; p < off[e + 1]; ++p) {
          const float coef = w ? row_weight(w, slots, p, static_cast<float>(scale)) : 1.0f;
          for (int64_t c = 0; c < C; ++c) row[c] = add_rn(row[c], mul_rn(coef, static_cast<float>(m_ptr[p * ms + c])));
        }
      }
    });
  });
}

void zero_empty_groups_cpu(const at::Tensor& grad, const at::Tensor& expert_offsets) {
  const int32_t* off = expert_offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e < grad.size(0); ++e) {
    if (off[e] == off[e + 1]) grad[e].zero_();
  }
}

}  // namespace

const RowOps& cpu_row_ops() {
  static const RowOps ops{gather_cpu, act_forward_cpu, act_backward_cpu, combine_cpu, segment_column_sum_cpu,
                          zero_empty_groups_cpu};
  return ops;
}

}  // namespace grouped
}  // namespace moe_kernels
