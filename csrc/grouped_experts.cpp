// The grouped-GEMM expert path: ops grouped_mlp_forward / grouped_mlp_backward (schemas in csrc/ops.cpp), one
// implementation registered for CPU and CUDA tensors.
//
// One implementation serves both expert ops of moe_kernels (as csrc/cpu/experts.cpp does):
//   moe_mlp:     w1 = gate_up_proj [E, 2I, H], gated activation, w2 = down_proj [E, H, I], optional biases
//   adapter_moe: w1 = down [E, r, H], plain activation, w2 = up [E, H, r], output times `scale`
// Forward, with the plan (expert_offsets, sorted_slots, slot_positions) of ids:
//   xs = gather(x)                        [N, H] staging rows in expert order   (row op)
//   h  = grouped_mm(xs, w1^T, offsets)    [N, M1]                               (at::_grouped_mm)
//   a  = act(h + b1)                      [N, M2]                               (row op)
//   y  = grouped_mm(a, w2^T, offsets)     [N, H]                                (at::_grouped_mm)
//   out[t] = sum_j w[t,j] * scale * (y[pos] + b2[e])                            (row op)
// With keep, the forward also returns xs and the biased pre-activation h for the backward (else both empty).
// Backward (gs = gather(grad_out), row weight w_p = weights[slot] * scale):
//   u  = grouped_mm(gs, w2, offsets)                   [N, M2]
//   grad_h = act'(h) * w_p u; u := w_p act(h); grad_weights = scale (<u, act(h)> + <gs, b2>)   (row op)
//   grad_w2 = grouped_mm(gs^T, u, offsets)              [E, H, M2]   k-grouped: groups along the rows
//   grad_w1 = grouped_mm(grad_h^T, xs, offsets)         [E, M1, H]   k-grouped
//   grad_x  = scatter_sum(grouped_mm(grad_h, w1, offsets))
//   grad_b2[e] = sum_p w_p gs[p], grad_b1[e] = sum_p grad_h[p] over expert e's rows       (row op)
// The group offsets are expert_offsets[1:], read on the device by the GEMM: nothing here synchronises with
// the host. On CUDA, torch runs its CUTLASS grouped GEMM for bfloat16 on sm90/sm100; elsewhere torch's
// own fallback (a GEMM per group after reading the offsets on the host) -- moe_kernels/native.py decides
// whether that fallback may run (see grouped_gemm_status there). Operands must have 16-byte aligned row
// strides: staging buffers pad their rows, and weights whose layout does not fit are copied into padded
// storage for the call; widths that are not multiples of 16 bytes run zero-padded (see Widths).
#include <algorithm>
#include <string>
#include <tuple>

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "grouped_experts.h"

namespace moe_kernels {
namespace grouped {
namespace {

using act::parse_activation;

const RowOps& row_ops(const at::Tensor& t) {
#ifdef MOE_KERNELS_WITH_CUDA
  if (t.is_cuda()) return cuda_row_ops();
#endif
  TORCH_CHECK(t.device().is_cpu(), "grouped expert ops run on CPU or CUDA tensors, got ", t.device());
  return cpu_row_ops();
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Elements per 16 bytes: the grouped GEMM's stride alignment.
int64_t align_elems(at::ScalarType dtype) { return 16 / static_cast<int64_t>(c10::elementSize(dtype)); }

// [rows, cols] rows whose starts are 16-byte aligned: a view of a [rows, cols rounded up] buffer.
at::Tensor staging(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const int64_t padded = round_up(std::max<int64_t>(cols, 1), align_elems(options.dtype().toScalarType()));
  return at::empty({rows, padded}, options).narrow(1, 0, cols);
}

// The grouped GEMM's operand check (torch's check_valid_strides_and_return_transposed) on the last two dims.
bool operand_strides_ok(const at::Tensor& m) {
  const int64_t a = align_elems(m.scalar_type());
  const int64_t d = m.dim() - 1;
  const auto st = m.strides();
  const auto sz = m.sizes();
  if (st[d - 1] == 1 && st[d] >= std::max<int64_t>(1, sz[d - 1])) return st[d] % a == 0;
  if (st[d] == 1 && st[d - 1] >= std::max<int64_t>(1, sz[d])) return st[d - 1] % a == 0;
  return false;
}

// A weight [E, R, C] the grouped GEMM takes as it is and transposed: R, C > 1 (a unit dim makes torch's
// row/column-major test ambiguous), 16-byte aligned data, batch stride and leading dimension. Otherwise
// copied into padded storage (a per-call copy of the weights: only odd widths or odd views pay it).
at::Tensor grouped_operand(const at::Tensor& w) {
  const int64_t a = align_elems(w.scalar_type());
  const bool ok = w.size(1) > 1 && w.size(2) > 1 && w.stride(0) % a == 0 &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && operand_strides_ok(w) &&
                  operand_strides_ok(w.transpose(1, 2));
  if (ok) return w;
  const int64_t padded = round_up(w.size(2), a);
  at::Tensor out = at::empty({w.size(0), w.size(1), padded}, w.options()).narrow(2, 0, w.size(2));
  out.copy_(w);
  return out;
}

// A 2-D GEMM result in the layout of `staging` (torch pads its row stride the same way on CUDA; this copies
// only when a torch version lays it out otherwise).
at::Tensor as_staging(const at::Tensor& m) {
  const int64_t padded = round_up(std::max<int64_t>(m.size(1), 1), align_elems(m.scalar_type()));
  if (m.stride(1) == 1 && m.stride(0) == padded) return m;
  at::Tensor out = staging(m.size(0), m.size(1), m.options());
  out.copy_(m);
  return out;
}

using experts::Dims;

Dims check_args(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                const std::optional<at::Tensor>& b2, const at::Tensor& weights, const at::Tensor& ids,
                const at::Tensor& expert_offsets, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                const ActSpec& spec) {
  const Dims d = experts::check_operands(x, w1, w2, b1, b2, weights, ids, spec, "the grouped expert path");
  for (const at::Tensor* t : {&expert_offsets, &sorted_slots, &slot_positions}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt, "the plan tensors must be 1-D int32");
    TORCH_CHECK(t->device() == x.device(), "every tensor must be on x's device ", x.device(), ", got ", t->device());
  }
  TORCH_CHECK(expert_offsets.numel() == d.E + 1, "expert_offsets must have E+1 = ", d.E + 1, " entries");
  TORCH_CHECK(sorted_slots.numel() == d.N && slot_positions.numel() == d.N, "the plan must hold T*k = ", d.N,
              " slots");
  return d;
}

at::Tensor float_bias(const std::optional<at::Tensor>& b) {
  return b.has_value() ? b->to(at::kFloat).contiguous() : at::Tensor();
}

// The routing tensors of a call as the row ops take them (grouped_experts.h): weights and ids flat [T*k], the
// plan contiguous (`.contiguous()` is free for what moe_kernels.ops passes; a direct caller may pass views),
// and ends = offsets[1:], the cumulative group ends the grouped GEMM takes (on the device, never read here).
struct Routing {
  at::Tensor weights, ids, sorted_slots, slot_positions, offsets, ends;
};

Routing flat_routing(const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& expert_offsets,
                     const at::Tensor& sorted_slots, const at::Tensor& slot_positions) {
  const at::Tensor offsets = expert_offsets.contiguous();
  return {weights.contiguous().view(-1), ids.contiguous().view(-1), sorted_slots.contiguous(),
          slot_positions.contiguous(), offsets, offsets.narrow(0, 1, offsets.numel() - 1)};
}

// GEMM widths of a call. Aligned (H, M1, M2 multiples of 16 bytes): the GEMMs run on the logical widths,
// the weights as they are (grouped_operand) and staging rows padded only in their stride. Otherwise every
// width is padded to 16 bytes with zeros -- zero-padded weight copies and zero-filled staging rows -- so the
// grouped GEMM never sees a width that is not a multiple of its alignment (CUTLASS's TMA kernels assume it;
// only the group sizes stay ragged).
struct Widths {
  bool padded;
  int64_t H, M1, M2;
};

Widths gemm_widths(const Dims& d, at::ScalarType dtype) {
  const int64_t a = align_elems(dtype);
  const bool padded = d.H % a != 0 || d.M1 % a != 0 || d.M2 % a != 0;
  if (!padded) return {false, d.H, d.M1, d.M2};
  return {true, round_up(d.H, a), round_up(d.M1, a), round_up(d.M2, a)};
}

// [rows, cols] GEMM operand rows: zero-filled in padded mode, else uninitialised staging.
at::Tensor operand_rows(const Widths& g, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return g.padded ? at::zeros({rows, cols}, options) : staging(rows, cols, options);
}

// The weight [E, R, C] as a grouped GEMM operand of [E, Rg, Cg]: zero-padded copy in padded mode.
at::Tensor weight_operand(const Widths& g, const at::Tensor& w, int64_t Rg, int64_t Cg) {
  if (!g.padded) return grouped_operand(w);
  at::Tensor out = at::zeros({w.size(0), Rg, Cg}, w.options());
  out.narrow(1, 0, w.size(1)).narrow(2, 0, w.size(2)).copy_(w);
  return out;
}

// The forward's saved rows [N, C] (row stride Cg) seen at their full GEMM width [N, Cg]: their own storage
// when it holds whole rows (the padding holds zeros in padded mode: the forward allocated them so), else a
// zero-padded copy.
at::Tensor full_width(const at::Tensor& m, int64_t Cg) {
  const int64_t needed = (m.storage_offset() + m.size(0) * Cg) * m.element_size();
  if (m.stride(1) == 1 && m.stride(0) == Cg && static_cast<int64_t>(m.storage().nbytes()) >= needed) {
    return m.as_strided({m.size(0), Cg}, {Cg, 1});
  }
  at::Tensor out = at::zeros({m.size(0), Cg}, m.options());
  out.narrow(1, 0, m.size(1)).copy_(m);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mlp_forward(
    const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, const at::Tensor& weights_in, const at::Tensor& ids_in,
    const at::Tensor& expert_offsets, const at::Tensor& sorted_slots_in, const at::Tensor& slot_positions_in,
    c10::string_view activation, bool gated, bool interleaved, std::optional<double> limit, double scale,
    bool keep, double gate_cap, double up_cap) {
  const ActSpec spec = parse_activation(std::string(activation), gated, interleaved, limit, gate_cap, up_cap, scale);
  const Dims d = check_args(x_in, w1, w2, b1, b2, weights_in, ids_in, expert_offsets, sorted_slots_in,
                            slot_positions_in, spec);
  const RowOps& rows = row_ops(x_in);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto [weights, ids, sorted_slots, slot_positions, offsets, ends] =
      flat_routing(weights_in, ids_in, expert_offsets, sorted_slots_in, slot_positions_in);
  const auto options = x.options();
  const Widths g = gemm_widths(d, x.scalar_type());

  at::Tensor xs = operand_rows(g, d.N, g.H, options);  // [N, Hg]
  rows.gather(x, sorted_slots, d.k, xs.narrow(1, 0, d.H));
  at::Tensor h = as_staging(at::_grouped_mm(xs, weight_operand(g, w1, g.M1, g.H).transpose(1, 2), ends));
  at::Tensor a = operand_rows(g, d.N, g.M2, options);  // [N, M2g]
  const at::Tensor b1f = float_bias(b1);
  const at::Tensor h_used = h.narrow(1, 0, d.M1);
  // With b1, the biased pre-activation is written back into h (the GEMM's own buffer) when it is kept;
  // without, h already holds it.
  rows.act_forward(h_used, b1f, ids, sorted_slots, spec, keep && b1f.defined() ? h_used : at::Tensor(),
                   a.narrow(1, 0, d.M2));
  const at::Tensor y = at::_grouped_mm(a, weight_operand(g, w2, g.H, g.M2).transpose(1, 2), ends);  // [N, Hg]
  at::Tensor out = at::empty({d.T, d.H}, options);
  rows.combine(y.narrow(1, 0, d.H), slot_positions, weights, scale, ids, float_bias(b2), d.k, out);
  if (!keep) return {out, at::empty({0, d.H}, options), at::empty({0, d.M1}, options)};
  return {out, xs.narrow(1, 0, d.H), h_used};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& xs, const at::Tensor& hidden, const at::Tensor& w1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
    const at::Tensor& weights_in, const at::Tensor& ids_in, const at::Tensor& expert_offsets,
    const at::Tensor& sorted_slots_in, const at::Tensor& slot_positions_in, c10::string_view activation, bool gated,
    bool interleaved, std::optional<double> limit, double scale, double gate_cap, double up_cap) {
  const ActSpec spec = parse_activation(std::string(activation), gated, interleaved, limit, gate_cap, up_cap, scale);
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must be [T, H], got ", grad_out.sizes());
  const Dims d = check_args(grad_out, w1, w2, b1, b2, weights_in, ids_in, expert_offsets, sorted_slots_in,
                            slot_positions_in, spec);
  TORCH_CHECK(xs.dim() == 2 && xs.size(0) == d.N && xs.size(1) == d.H && xs.stride(1) == 1,
              "xs must be the forward's [T*k, H] gathered rows, got ", xs.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == d.N && hidden.size(1) == d.M1 && hidden.stride(1) == 1,
              "hidden must be the forward's [T*k, M1] pre-activation, got ", hidden.sizes());
  TORCH_CHECK(xs.scalar_type() == grad_out.scalar_type() && hidden.scalar_type() == grad_out.scalar_type(),
              "xs, hidden and grad_out must share a dtype");
  const RowOps& rows = row_ops(grad_out);
  const c10::DeviceGuard guard(grad_out.device());
  const auto [weights, ids, sorted_slots, slot_positions, offsets, ends] =
      flat_routing(weights_in, ids_in, expert_offsets, sorted_slots_in, slot_positions_in);
  const auto options = grad_out.options();
  const Widths g = gemm_widths(d, grad_out.scalar_type());
  // xs takes part in the weight gradient of w1 only, where its padding columns meet nothing that is kept.
  const at::Tensor xs_g = g.padded ? full_width(xs, g.H) : as_staging(xs);  // [N, Hg]
  const at::Tensor w1g = weight_operand(g, w1, g.M1, g.H);                  // [E, M1g, Hg]
  const at::Tensor w2g = weight_operand(g, w2, g.H, g.M2);                  // [E, Hg, M2g]

  at::Tensor gs = operand_rows(g, d.N, g.H, options);  // [N, Hg]
  rows.gather(grad_out.contiguous(), sorted_slots, d.k, gs.narrow(1, 0, d.H));
  at::Tensor u = as_staging(at::_grouped_mm(gs, w2g, ends));  // [N, M2g]; padding columns 0 (w2g's are)
  at::Tensor grad_h = operand_rows(g, d.N, g.M1, options);    // [N, M1g]
  at::Tensor grad_weights = at::empty({d.T, d.k}, weights_in.options());
  const at::Tensor b2f = float_bias(b2);
  rows.act_backward(hidden, u.narrow(1, 0, d.M2), gs.narrow(1, 0, d.H), b2f, weights, ids, sorted_slots, scale, spec,
                    grad_h.narrow(1, 0, d.M1), grad_weights);
  // Weight gradients: k-grouped GEMMs (A column-major, B row-major: empty groups allowed), then experts
  // without rows set to zero explicitly.
  at::Tensor grad_w2 = at::_grouped_mm(gs.t(), u, ends);       // [E, Hg, M2g]
  at::Tensor grad_w1 = at::_grouped_mm(grad_h.t(), xs_g, ends);  // [E, M1g, Hg]
  rows.zero_empty_groups(grad_w2, offsets);
  rows.zero_empty_groups(grad_w1, offsets);
  const at::Tensor grad_xs = at::_grouped_mm(grad_h, w1g, ends);  // [N, Hg]
  at::Tensor grad_x = at::empty({d.T, d.H}, options);
  rows.combine(grad_xs.narrow(1, 0, d.H), slot_positions, at::Tensor(), 1.0, ids, at::Tensor(), d.k, grad_x);
  at::Tensor grad_b1 = at::empty({0}, options), grad_b2 = at::empty({0}, options);
  if (b1.has_value()) {
    at::Tensor sums = at::empty({d.E, d.M1}, options.dtype(at::kFloat));
    rows.segment_column_sum(grad_h.narrow(1, 0, d.M1), offsets, at::Tensor(), sorted_slots, 1.0, sums);
    grad_b1 = sums.to(b1->scalar_type());
  }
  if (b2.has_value()) {
    at::Tensor sums = at::empty({d.E, d.H}, options.dtype(at::kFloat));
    rows.segment_column_sum(gs.narrow(1, 0, d.H), offsets, weights, sorted_slots, scale, sums);
    grad_b2 = sums.to(b2->scalar_type());
  }
  return {grad_x, grad_w1.narrow(1, 0, d.M1).narrow(2, 0, d.H).contiguous(),
          grad_w2.narrow(1, 0, d.H).narrow(2, 0, d.M2).contiguous(), grad_b1, grad_b2, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("grouped_mlp_forward", &grouped_mlp_forward);
  m.impl("grouped_mlp_backward", &grouped_mlp_backward);
}

#ifdef MOE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("grouped_mlp_forward", &grouped_mlp_forward);
  m.impl("grouped_mlp_backward", &grouped_mlp_backward);
}
#endif

}  // namespace grouped
}  // namespace moe_kernels
