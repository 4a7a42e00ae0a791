// Per-row (per-token) top-k routing, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations.
//
// Every function works on one token's row over raw pointers and is MOE_HOST_DEVICE, so the CPU tests
// exercise the same code a CUDA thread runs. The math is moe_kernels/reference.py's `route`:
//   softmax_then_topk: scores = softmax(logits) or sigmoid(logits); choose on scores (+ bias);
//                      weights = the chosen (unbiased) scores.
//   topk_then_softmax: choose on logits (+ bias); weights = softmax/sigmoid of the k chosen logits.
//   Optional DeepSeek-V3 group-limited choice; renormalize (divide by sum + RENORM_EPS); times scale.
// Choices come out in descending choice score; ties go to the lower expert index.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moe_kernels {
namespace routing {

// Same constant as reference.RENORM_EPS.
constexpr float kRenormEps = 1e-20f;

// Routing options of one call (the same for every row).
struct RouteParams {
  int64_t num_experts;  // E
  int64_t k;
  bool use_sigmoid;     // scoring "sigmoid" instead of "softmax"
  bool topk_first;      // order "topk_then_softmax"
  bool renormalize;
  int64_t n_group;      // <= 1: no group-limited choice
  int64_t topk_group;
  float scale;
};

// True when (a at index ia) ranks before (b at index ib) in a stable descending sort: larger first,
// equal values by ascending index, NaN above every number (as torch.sort(descending=True) does).
MOE_HOST_DEVICE inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return (a_nan && b_nan) ? ia < ib : a_nan;
  return a > b || (a == b && ia < ib);
}

MOE_HOST_DEVICE inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Inserts (value, index) into top_values/top_ids, `count` entries sorted by ranks_before, keeping at
// most `capacity`. Returns the new count. Feeding every candidate yields the stable top-`capacity`.
MOE_HOST_DEVICE inline int64_t insert_top(float* top_values, int32_t* top_ids, int64_t count, int64_t capacity,
                                          float value, int32_t index) {
  if (count == capacity && !ranks_before(value, index, top_values[count - 1], top_ids[count - 1])) return count;
  int64_t pos = count < capacity ? count : capacity - 1;
  while (pos > 0 && ranks_before(value, index, top_values[pos - 1], top_ids[pos - 1])) {
    top_values[pos] = top_values[pos - 1];
    top_ids[pos] = top_ids[pos - 1];
    --pos;
  }
  top_values[pos] = value;
  top_ids[pos] = index;
  return count < capacity ? count + 1 : count;
}

// Max and sum(exp(x - max)) of n values (sum in index order): the softmax normaliser.
MOE_HOST_DEVICE inline void softmax_stats(const float* x, int64_t n, float* max_out, float* sum_out) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += expf(x[i] - m);
  *max_out = m;
  *sum_out = sum;
}

// Softmax of n values in place: exp(x_i - max) / sum.
MOE_HOST_DEVICE inline void softmax_inplace(float* x, int64_t n) {
  float m, sum;
  softmax_stats(x, n, &m, &sum);
  for (int64_t i = 0; i < n; ++i) x[i] = expf(x[i] - m) / sum;
}

// Scratch floats one row's forward needs: scores [E], group scores [n_group], group keep flags [n_group].
MOE_HOST_DEVICE inline int64_t forward_scratch_floats(const RouteParams& p) {
  return p.num_experts + (p.n_group > 1 ? 2 * p.n_group : 0);
}

// Scratch floats one row's backward needs: recomputed weights before renormalisation [k], their grads [k].
MOE_HOST_DEVICE inline int64_t backward_scratch_floats(const RouteParams& p) { return 2 * p.k; }

// Group-limited choice: a group scores the sum of its best two choice values (its best when a group
// has one expert); keep[g] = 1 for the topk_group best groups (stable ranking), else 0.
template <typename bias_t>
MOE_HOST_DEVICE void select_groups(const float* scores, const bias_t* bias, const RouteParams& p,
                                   float* group_scores, float* keep) {
  const int64_t per_group = p.num_experts / p.n_group;
  for (int64_t g = 0; g < p.n_group; ++g) {
    float best = -INFINITY, second = -INFINITY;
    int64_t best_i = -1, second_i = -1;
    for (int64_t i = g * per_group; i < (g + 1) * per_group; ++i) {
      const float c = bias ? scores[i] + static_cast<float>(bias[i]) : scores[i];
      if (best_i < 0 || ranks_before(c, i, best, best_i)) {
        second = best;
        second_i = best_i;
        best = c;
        best_i = i;
      } else if (second_i < 0 || ranks_before(c, i, second, second_i)) {
        second = c;
        second_i = i;
      }
    }
    group_scores[g] = per_group >= 2 ? best + second : best;
  }
  for (int64_t g = 0; g < p.n_group; ++g) {
    int64_t ahead = 0;
    for (int64_t h = 0; h < p.n_group; ++h) ahead += ranks_before(group_scores[h], h, group_scores[g], g) ? 1 : 0;
    keep[g] = ahead < p.topk_group ? 1.0f : 0.0f;
  }
}

// Final weights from the k picked values (in place): softmax/sigmoid over them when topk_first,
// then renormalisation, then scale.
MOE_HOST_DEVICE inline void finish_weights(float* picked, const RouteParams& p) {
  const int64_t k = p.k;
  if (p.topk_first) {
    if (p.use_sigmoid) {
      for (int64_t j = 0; j < k; ++j) picked[j] = sigmoid(picked[j]);
    } else {
      softmax_inplace(picked, k);
    }
  }
  if (p.renormalize) {
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += picked[j];
    const float denom = sum + kRenormEps;
    for (int64_t j = 0; j < k; ++j) picked[j] = picked[j] / denom;
  }
  for (int64_t j = 0; j < k; ++j) picked[j] = picked[j] * p.scale;
}

// Choice value of expert e: score (+ bias); -inf for experts of dropped groups, exactly as the
// reference's masked_fill does.
template <typename bias_t>
MOE_HOST_DEVICE inline float choice_value(const float* scores, const bias_t* bias, const float* keep,
                                          int64_t per_group, int64_t e) {
  const float c = bias ? scores[e] + static_cast<float>(bias[e]) : scores[e];
  return keep && keep[e / per_group] == 0.0f ? -INFINITY : c;
}

// Expert choice and final weights of one row from its scores (softmax/sigmoid already applied when
// !topk_first, the logits as float otherwise): group-limited choice, top-k, finish_weights.
//   scores [E] float (read only); bias [E] of bias_t or nullptr (choice only);
//   scratch: 2 * n_group floats when grouped (else unused); weights_out [k] float; ids_out [k] int32;
//   candidates: E int32 of scratch for the prefilter below, or nullptr (no prefilter).
// Prefilter (when candidates is given, k divides E and no choice value is NaN): split the experts into k
// equal blocks; the smallest block maximum tau is <= the k-th largest value (each block holds one value
// >= tau), so only experts with value >= tau can be chosen. They are listed branch-free, then ranked
// exactly as without the prefilter (same result, about half the time at E = 64, k = 8).
template <typename bias_t>
MOE_HOST_DEVICE void route_row_choose(const float* scores, const bias_t* bias, const RouteParams& p, float* scratch,
                                      float* weights_out, int32_t* ids_out, int32_t* candidates = nullptr) {
  const int64_t E = p.num_experts, k = p.k;
  const bool grouped = p.n_group > 1;
  float* keep = grouped ? scratch + p.n_group : nullptr;
  if (grouped) select_groups(scores, bias, p, scratch, keep);
  const int64_t per_group = grouped ? E / p.n_group : E;
  int64_t num_candidates = E;
  const int64_t block = E / k;
  if (candidates && E % k == 0 && block >= 2) {
    float tau = INFINITY;
    bool any_nan = false;
    for (int64_t b = 0; b < k; ++b) {
      float m = -INFINITY;
      for (int64_t e = b * block; e < (b + 1) * block; ++e) {
        const float c = choice_value(scores, bias, keep, per_group, e);
        m = c > m ? c : m;
        any_nan |= c != c;
      }
      tau = m < tau ? m : tau;
    }
    if (any_nan) {
      candidates = nullptr;
    } else {
      num_candidates = 0;
      for (int64_t e = 0; e < E; ++e) {
        candidates[num_candidates] = static_cast<int32_t>(e);
        num_candidates += choice_value(scores, bias, keep, per_group, e) >= tau ? 1 : 0;
      }
    }
  } else {
    candidates = nullptr;
  }
  // Top-k of the choice values, candidates in ascending expert order; weights_out holds the choice
  // values meanwhile.
  int64_t count = 0;
  for (int64_t i = 0; i < num_candidates; ++i) {
    const int64_t e = candidates ? candidates[i] : i;
    const float c = choice_value(scores, bias, keep, per_group, e);
    // Fast reject once full: not above the last kept value, a later index cannot rank before it (a NaN
    // on either side compares false and takes the exact path).
    if (count == k && c <= weights_out[k - 1]) continue;
    count = insert_top(weights_out, ids_out, count, k, c, static_cast<int32_t>(e));
  }
  for (int64_t j = 0; j < k; ++j) weights_out[j] = scores[ids_out[j]];
  finish_weights(weights_out, p);
}

// Forward of one row.
//   logits [E] of scalar_t (float, c10::Half, c10::BFloat16, ... anything convertible to float);
//   bias [E] of bias_t, or nullptr (used for the choice only);
//   scratch: forward_scratch_floats(p) floats; weights_out [k] float; ids_out [k] int32.
template <typename scalar_t, typename bias_t>
MOE_HOST_DEVICE void route_row_forward(const scalar_t* logits, const bias_t* bias, const RouteParams& p,
                                       float* scratch, float* weights_out, int32_t* ids_out) {
  const int64_t E = p.num_experts;
  float* scores = scratch;
  for (int64_t e = 0; e < E; ++e) scores[e] = static_cast<float>(logits[e]);
  if (!p.topk_first) {
    if (p.use_sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = sigmoid(scores[e]);
    } else {
      softmax_inplace(scores, E);
    }
  }
  route_row_choose(scores, bias, p, scratch + E, weights_out, ids_out);
}

// Writes one row's k finished weights and ids in route's output storage types: W float, c10::Half or
// c10::BFloat16 (one rounding of the fp32 weight, as the reference's .to(dtype)), I int32_t or int64_t.
template <typename W, typename I>
MOE_HOST_DEVICE inline void store_row(const float* weights, const int32_t* ids, int64_t k, W* weights_out,
                                      I* ids_out) {
  for (int64_t j = 0; j < k; ++j) {
    weights_out[j] = static_cast<W>(weights[j]);
    ids_out[j] = static_cast<I>(ids[j]);
  }
}

// Backward of one row: grad_weights [k] float -> grad_logits_out [E] float (every entry written).
// Recomputes the forward's intermediate values from logits and the chosen ids (index_t: int32_t or int64_t).
template <typename scalar_t, typename index_t>
MOE_HOST_DEVICE void route_row_backward(const float* grad_weights, const scalar_t* logits, const index_t* ids,
                                        const RouteParams& p, float* scratch, float* grad_logits_out) {
  const int64_t E = p.num_experts, k = p.k;
  float* picked = scratch;         // weights before renormalisation and scale
  float* grad_picked = scratch + k;
  float row_max = 0.0f, row_sum = 1.0f;
  if (!p.topk_first && !p.use_sigmoid) {
    // softmax over the whole row: max and sum, computed as in the forward.
    float m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const float x = static_cast<float>(logits[e]);
      m = x > m ? x : m;
    }
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += expf(static_cast<float>(logits[e]) - m);
    row_max = m;
    row_sum = sum;
  }
  for (int64_t j = 0; j < k; ++j) {
    const float x = static_cast<float>(logits[ids[j]]);
    if (p.topk_first) {
      picked[j] = x;
    } else {
      picked[j] = p.use_sigmoid ? sigmoid(x) : expf(x - row_max) / row_sum;
    }
  }
  if (p.topk_first) {
    if (p.use_sigmoid) {
      for (int64_t j = 0; j < k; ++j) picked[j] = sigmoid(picked[j]);
    } else {
      softmax_inplace(picked, k);
    }
  }
  // Through scale and renormalisation: q = p / D, D = sum(p) + eps  =>  dL/dp_i = (g_i - sum_j g_j q_j) / D.
  for (int64_t j = 0; j < k; ++j) grad_picked[j] = grad_weights[j] * p.scale;
  if (p.renormalize) {
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += picked[j];
    const float denom = sum + kRenormEps;
    float dot = 0.0f;
    for (int64_t j = 0; j < k; ++j) dot += grad_picked[j] * (picked[j] / denom);
    for (int64_t j = 0; j < k; ++j) grad_picked[j] = (grad_picked[j] - dot) / denom;
  }
  for (int64_t e = 0; e < E; ++e) grad_logits_out[e] = 0.0f;
  if (p.use_sigmoid) {
    // Elementwise in both orders: d sigmoid(x) = s (1 - s).
    for (int64_t j = 0; j < k; ++j) grad_logits_out[ids[j]] = grad_picked[j] * picked[j] * (1.0f - picked[j]);
    return;
  }
  // Softmax (over the k chosen logits, or over all E): dx_i = s_i (g_i - sum_j g_j s_j).
  float dot = 0.0f;
  for (int64_t j = 0; j < k; ++j) dot += grad_picked[j] * picked[j];
  if (!p.topk_first) {
    for (int64_t e = 0; e < E; ++e) {
      grad_logits_out[e] = -(expf(static_cast<float>(logits[e]) - row_max) / row_sum) * dot;
    }
  }
  for (int64_t j = 0; j < k; ++j) grad_logits_out[ids[j]] = picked[j] * (grad_picked[j] - dot);
}

}  // namespace routing
}  // namespace moe_kernels
