// Per-row logic of the grouped-GEMM expert path (csrc/grouped_experts.cpp), shared by its CPU loops
// (csrc/cpu/grouped_rows.cpp) and its CUDA kernels (csrc/cuda/grouped_rows.cu).
//
// The path runs, for routed slots sorted by expert (the plan: sorted position p holds slot
// s = sorted_slots[p] = t*k + j of token t, expert e = ids[s]):
//   gather      xs[p, :] = x[t, :]                                     (staging rows, expert order)
//   GEMM 1      h = xs @ w1[e]^T                                       (grouped GEMM)
//   activation  h += b1[e]; a = act(h) (gated: act(gate) * up)         (act_forward_column)
//   GEMM 2      y = a @ w2[e]^T                                        (grouped GEMM)
//   combine     out[t, :] = sum_j w[t,j] * scale * (y[pos, :] + b2[e]) (combine_column)
// and the backward's activation step (act_backward_column). Every function handles one element (a column
// of one row) and is MOE_HOST_DEVICE: a CPU loop and a CUDA thread run the same code, so the CPU tests of
// the grouped ops exercise what the GPU runs. Math in fp32; values are rounded to the storage type only
// where they are stored.
#pragma once

#include <stdint.h>

#include "common/activations.h"  // MOE_HOST_DEVICE, act::*

namespace moe_kernels {
namespace grouped {

// Products and sums rounded one at a time (no FMA contraction), so CPU and GPU round alike.
#if defined(__CUDA_ARCH__)
MOE_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
MOE_HOST_DEVICE inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
#else  // host: baseline x86-64 flags have no FMA to contract into (elsewhere the two may differ by a rounding)
MOE_HOST_DEVICE inline float mul_rn(float a, float b) { return a * b; }
MOE_HOST_DEVICE inline float add_rn(float a, float b) { return a + b; }
#endif

using act::ActSpec;  // the activation of a call and its gate/up columns: common/activations.h
using act::gate_column;
using act::up_column;

// Source row of sorted position p in the gather: the token of its slot.
MOE_HOST_DEVICE inline int64_t gather_source_row(const int32_t* sorted_slots, int64_t p, int64_t k) {
  return static_cast<int64_t>(sorted_slots[p]) / k;
}

// A stored pre-activation value plus its bias column (fp32), rounded to T as the kept pre-activation is.
template <typename T>
MOE_HOST_DEVICE inline float biased(float value, const float* bias, int64_t c) {
  return bias != nullptr ? static_cast<float>(static_cast<T>(value + bias[c])) : value;
}

// Forward activation, output column i of one sorted row.
//   pre   the row's pre-activation (GEMM 1 output), M1 = 2*half (gated) or half columns
//   bias  the row's expert's b1 row (float, M1 columns) or nullptr
//   keep  the row of the saved pre-activation, or nullptr: receives the biased values rounded to T
//         (the backward recomputes the activation from exactly those)
// Returns act value (fp32); the caller rounds it into the activation row.
template <typename T>
MOE_HOST_DEVICE inline float act_forward_column(const ActSpec& s, const T* pre, const float* bias, T* keep, int64_t i,
                                                int64_t half) {
  if (s.gated) {
    const int64_t gc = gate_column(s, i), uc = up_column(s, i, half);
    const float g = biased<T>(static_cast<float>(pre[gc]), bias, gc);
    const float u = biased<T>(static_cast<float>(pre[uc]), bias, uc);
    if (keep != nullptr) {
      keep[gc] = static_cast<T>(g);
      keep[uc] = static_cast<T>(u);
    }
    return act::gated_forward(s, g, u);
  }
  const float v = biased<T>(static_cast<float>(pre[i]), bias, i);
  if (keep != nullptr) keep[i] = static_cast<T>(v);
  return act::forward(s.code, v);
}

// The decode path's activation (csrc/decode_experts.cpp: no plan, no stored pre-activation), output column i of
// one slot from its first GEMM's fp32 dot products: rounded to T as the grouped path stores its GEMM output, then
// biased and activated as act_forward_column does. up_dot is unused when not gated.
template <typename T>
MOE_HOST_DEVICE inline float decode_act_column(const ActSpec& s, float gate_dot, float up_dot, const float* bias,
                                               int64_t i, int64_t half) {
  const float g = static_cast<float>(static_cast<T>(gate_dot));
  if (!s.gated) return act::forward(s.code, biased<T>(g, bias, i));
  const float u = static_cast<float>(static_cast<T>(up_dot));
  return act::gated_forward(s, biased<T>(g, bias, gate_column(s, i)), biased<T>(u, bias, up_column(s, i, half)));
}

// Backward activation, output column i of one sorted row.
//   pre        the saved (biased) pre-activation row
//   u          (grad_out row of the token) @ w2[e] at column i: the gradient of act before the routing weight
//   row_weight the slot's routing weight times scale
//   grad_pre   receives d loss / d pre at the gate and up columns (or column i), rounded to T
// Returns act value (fp32): the caller adds u * act to the routing-weight gradient's dot product and
// stores row_weight * act for the second GEMM's weight gradient.
template <typename T>
MOE_HOST_DEVICE inline float act_backward_column(const ActSpec& s, const T* pre, float u, float row_weight,
                                                 T* grad_pre, int64_t i, int64_t half) {
  const float upstream = mul_rn(row_weight, u);
  if (s.gated) {
    const int64_t gc = gate_column(s, i), uc = up_column(s, i, half);
    float grad_gate, grad_up;
    const float a = act::gated_backward(s, static_cast<float>(pre[gc]), static_cast<float>(pre[uc]), upstream,
                                        &grad_gate, &grad_up);
    grad_pre[gc] = static_cast<T>(grad_gate);
    grad_pre[uc] = static_cast<T>(grad_up);
    return a;
  }
  const float x = static_cast<float>(pre[i]);
  grad_pre[i] = static_cast<T>(upstream * act::derivative(s.code, x));
  return act::forward(s.code, x);
}

// One slot's addend of the combine at column c: (w[slot] * scale) * (y + b2[e, c]), y the slot's stored output
// (weights nullptr: w = 1; b2 nullptr: no bias). combine_column and the decode path sum these, j ascending.
// W, I: how the routing is stored: float32 weights and int32 ids, or (the decode path, reading a Hugging Face
// router's routing as it comes) weights in the data dtype and int64 ids; a weight is widened to float exactly.
template <typename W = float, typename I = int32_t>
MOE_HOST_DEVICE inline float combine_term(float y, const W* weights, int64_t slot, float scale, const float* b2,
                                          int64_t b2_stride, const I* ids, int64_t c) {
  if (b2 != nullptr) y = add_rn(y, b2[static_cast<int64_t>(ids[slot]) * b2_stride + c]);
  return weights != nullptr ? mul_rn(mul_rn(static_cast<float>(weights[slot]), scale), y) : y;
}

// Combine, column c of token t: sum_j (w[t,j] * scale) * (y[pos_j, c] + b2[e_j, c]), fp32, j ascending.
//   y          expert-ordered rows, row stride y_stride
//   positions  slot_positions [T*k]; weights [T*k] float or nullptr (then every weight is 1: a plain sum,
//              the gather's backward); ids [T*k] and b2 [E, b2_stride] float, or b2 nullptr
template <typename T>
MOE_HOST_DEVICE inline float combine_column(const T* y, int64_t y_stride, const int32_t* positions,
                                            const float* weights, float scale, const int32_t* ids, const float* b2,
                                            int64_t b2_stride, int64_t t, int64_t k, int64_t c) {
  float acc = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t slot = t * k + j;
    const float v = static_cast<float>(y[static_cast<int64_t>(positions[slot]) * y_stride + c]);
    acc = add_rn(acc, combine_term(v, weights, slot, scale, b2, b2_stride, ids, c));
  }
  return acc;
}

// Routing weight times scale of sorted position p (the backward's row weight).
MOE_HOST_DEVICE inline float row_weight(const float* weights, const int32_t* sorted_slots, int64_t p, float scale) {
  return mul_rn(weights[sorted_slots[p]], scale);
}

}  // namespace grouped
}  // namespace moe_kernels
