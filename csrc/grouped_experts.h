// The grouped-GEMM expert path (csrc/grouped_experts.cpp): the row operations around the grouped GEMMs,
// implemented once per device -- CPU loops (csrc/cpu/grouped_rows.cpp) and CUDA kernels
// (csrc/cuda/grouped_rows.cu) -- over the shared per-row logic of csrc/common/grouped_rows.h.
//
// Conventions: N = T*k sorted rows (the plan's order); "rows" tensors are 2-D with unit column stride and
// any row stride (staging buffers pad rows to 16 bytes for the grouped GEMM); ids, sorted_slots,
// slot_positions int32 [T*k] contiguous; weights float32 [T*k] contiguous; biases float32 [E, C]
// contiguous (converted by the caller). No operation synchronises with the host.
#pragma once

#include <ATen/ATen.h>

#include "common/grouped_rows.h"

namespace moe_kernels {
namespace grouped {

struct RowOps {
  // out[p, :] = x[sorted_slots[p] / k, :]   (x [T, H], out [N, H])
  void (*gather)(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k, const at::Tensor& out);
  // a[p, i] = act(h[p] (+ b1[e])) at column i; keep (undefined, or [N, M1], may alias h) receives the biased
  // pre-activation. h [N, M1], a [N, M2].
  void (*act_forward)(const at::Tensor& h, const at::Tensor& b1, const at::Tensor& ids, const at::Tensor& sorted_slots,
                      const ActSpec& spec, const at::Tensor& keep, const at::Tensor& a);
  // Per sorted row p (slot s, expert e, row weight w = weights[s] * scale):
  //   grad_pre[p] = d act / d pre * (w * u[p]);   u[p] := w * act(pre[p])   (in place)
  //   grad_weights[s] = scale * (<u[p], act(pre[p])> + <gs[p], b2[e]>)      (b2 may be undefined)
  // hidden [N, M1], u [N, M2], gs [N, H], grad_pre [N, M1], grad_weights float [T*k].
  void (*act_backward)(const at::Tensor& hidden, const at::Tensor& u, const at::Tensor& gs, const at::Tensor& b2,
                       const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& sorted_slots, double scale,
                       const ActSpec& spec, const at::Tensor& grad_pre, const at::Tensor& grad_weights);
  // out[t, :] = sum_j w[t,j] * scale * (y[slot_positions[t*k+j], :] + b2[ids[t*k+j], :]), fp32, j ascending;
  // weights undefined: w = 1 (the gather's backward); b2 undefined: no bias. y [N, H], out [T, H] contiguous.
  void (*combine)(const at::Tensor& y, const at::Tensor& slot_positions, const at::Tensor& weights, double scale,
                  const at::Tensor& ids, const at::Tensor& b2, int64_t k, const at::Tensor& out);
  // out[e, c] = sum over sorted rows p of expert e of coef_p * m[p, c] (fp32, p ascending), coef_p =
  // weights[sorted_slots[p]] * scale, or 1 when weights is undefined. m [N, C], out float [E, C].
  void (*segment_column_sum)(const at::Tensor& m, const at::Tensor& expert_offsets, const at::Tensor& weights,
                             const at::Tensor& sorted_slots, double scale, const at::Tensor& out);
  // grad[e] = 0 for every expert e without rows (expert_offsets[e] == expert_offsets[e+1]). grad [E, R, C].
  void (*zero_empty_groups)(const at::Tensor& grad, const at::Tensor& expert_offsets);
};

const RowOps& cpu_row_ops();
#ifdef MOE_KERNELS_WITH_CUDA
const RowOps& cuda_row_ops();
#endif

}  // namespace grouped
}  // namespace moe_kernels
