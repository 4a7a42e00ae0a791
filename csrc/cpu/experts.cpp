// CPU expert path: routed two-layer experts on contiguous per-expert slices.
//
// One implementation serves both public expert ops of moe_kernels:
//   moe_mlp:     w1 = gate_up_proj [E, 2I, H], gated activation, w2 = down_proj [E, H, I] (+ optional biases)
//   adapter_moe: w1 = down [E, r, H], plain activation, w2 = up [E, H, r], output scaled by `scale`
// Forward: rows of x gathered into expert order (the plan), then per expert e with rows [a, b):
//   hidden = xs[a:b] @ w1[e]^T (+ b1[e])  ->  act  ->  ys[a:b] = act @ w2[e]^T (+ b2[e])
// (two ATen GEMMs on contiguous slices with the activation fused between them), then the weighted
// combine back to token order. The backward recomputes the activation from the saved pre-activation
// `hidden` (or recomputes `hidden` too when it was not kept) and never needs ys: the routing-weight
// gradient uses <grad_out, ys> = <grad_out @ w2, act> + <grad_out, b2>.
// Forward variants (same math): tiny plain adapters without grad take two dense GEMMs over all experts
// (dense_small_adapter_forward); small expert weights run in token chunks, one parallel region
// (token_chunks); otherwise expert order, each expert gathering its own rows when experts are spread
// over the threads. The backward has the token-chunk and expert-order variants.
// The saved `hidden` [T*k, M1] holds each expert's pre-activation block transposed: expert e's rows [a, b)
// are an [M1, b-a] matrix at flat offset a*M1.
// These ops are CPU-only (schemas in csrc/ops.cpp); the cuda backend runs the grouped-GEMM path instead
// (csrc/grouped_experts.cpp).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "cpu/dispatch.h"

namespace moe_kernels {
namespace cpu {
namespace {

using act::ActSpec;
using act::gate_column;
using act::parse_activation;
using act::up_column;

std::vector<int64_t> read_offsets(const at::Tensor& expert_offsets, int64_t num_experts, int64_t num_rows) {
  check_cpu(expert_offsets, "expert_offsets", 1);
  check_int32(expert_offsets, "expert_offsets");
  TORCH_CHECK(expert_offsets.numel() == num_experts + 1, "expert_offsets must have E+1 = ", num_experts + 1,
              " entries, got ", expert_offsets.numel());
  const at::Tensor off = expert_offsets.contiguous();
  std::vector<int64_t> out(num_experts + 1);
  for (int64_t e = 0; e <= num_experts; ++e) out[e] = off.data_ptr<int32_t>()[e];
  TORCH_CHECK(out[0] == 0 && out[num_experts] == num_rows, "expert_offsets must run from 0 to T*k = ", num_rows);
  for (int64_t e = 0; e < num_experts; ++e) TORCH_CHECK(out[e] <= out[e + 1], "expert_offsets must not decrease");
  return out;
}

// Element (r, c) of an expert's pre-activation block: pre[r * row_stride + c * col_stride]. The forward
// keeps it transposed ([M1, n], row_stride 1, col_stride n: the first GEMM runs as w1[e] @ xs^T, which
// MKL does faster for the few rows an expert gets); the backward's recompute keeps it as rows.
struct Block {
  int64_t row_stride, col_stride;
};

// Adds b1 to the pre-activation (stored back, so the backward recomputes from the same values) and
// writes act [n, M2] row-major. Parallel over blocks of output columns; within a block, each column
// reads its pre-activation columns contiguously along r in the transposed layout.
template <typename scalar_t>
void activation_forward(scalar_t* pre, Block layout, int64_t n, int64_t M2, const float* b1, scalar_t* out,
                        const ActSpec& spec) {
  constexpr int64_t kColumns = 16;
  const int64_t rs = layout.row_stride, cs = layout.col_stride;
  at::parallel_for(0, (M2 + kColumns - 1) / kColumns, std::max<int64_t>(1, 4096 / (n * kColumns)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * kColumns; i < std::min(M2, end * kColumns); ++i) {
      if (spec.gated) {
        const int64_t gc = gate_column(spec, i), uc = up_column(spec, i, M2);
        const float gate_bias = b1 ? b1[gc] : 0.0f, up_bias = b1 ? b1[uc] : 0.0f;
        scalar_t* gate = pre + gc * cs;
        scalar_t* up = pre + uc * cs;
        for (int64_t r = 0; r < n; ++r) {
          float g = gate[r * rs], u = up[r * rs];
          if (b1) {
            g = static_cast<float>(static_cast<scalar_t>(g + gate_bias));
            u = static_cast<float>(static_cast<scalar_t>(u + up_bias));
            gate[r * rs] = static_cast<scalar_t>(g);
            up[r * rs] = static_cast<scalar_t>(u);
          }
          out[r * M2 + i] = static_cast<scalar_t>(act::gated_forward(spec, g, u));
        }
      } else {
        const float bias = b1 ? b1[i] : 0.0f;
        scalar_t* col = pre + i * cs;
        for (int64_t r = 0; r < n; ++r) {
          float v = col[r * rs];
          if (b1) {
            v = static_cast<float>(static_cast<scalar_t>(v + bias));
            col[r * rs] = static_cast<scalar_t>(v);
          }
          out[r * M2 + i] = static_cast<scalar_t>(act::forward(spec.code, v));
        }
      }
    }
  });
}

// Rows p in [a, a+n) of one expert. In: pre (an [n, M1] block, see Block), u = grad_out_rows @ w2[e] ([n, M2], overwritten with
// row_weight * act), g = grad_out rows [n, H]. Out: grad_pre [n, M1], grad_weight_sorted[a + r].
template <typename scalar_t>
void activation_backward(const scalar_t* pre, Block layout, scalar_t* u, const scalar_t* g, const float* b2, int64_t n, int64_t M1,
                         int64_t M2, int64_t H, const float* row_weight, scalar_t* grad_pre, float* grad_weight_sorted,
                         float scale, const ActSpec& spec) {
  at::parallel_for(0, n, grain_rows(M1 * 8), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* pre_row = pre + r * layout.row_stride;
      const int64_t cs = layout.col_stride;
      scalar_t* u_row = u + r * M2;
      scalar_t* gp_row = grad_pre + r * M1;
      const float w = row_weight[r];
      float dot = 0.0f;  // <u, act>
      if (spec.gated) {
        for (int64_t i = 0; i < M2; ++i) {
          const int64_t gc = gate_column(spec, i), uc = up_column(spec, i, M2);
          const float ui = u_row[i];
          float grad_gate, grad_up;
          const float a = act::gated_backward(spec, pre_row[gc * cs], pre_row[uc * cs], w * ui, &grad_gate, &grad_up);
          gp_row[gc] = static_cast<scalar_t>(grad_gate);
          gp_row[uc] = static_cast<scalar_t>(grad_up);
          dot += ui * a;
          u_row[i] = static_cast<scalar_t>(w * a);
        }
      } else {
        for (int64_t i = 0; i < M2; ++i) {
          const float x = pre_row[i * cs], ui = u_row[i];
          const float a = act::forward(spec.code, x);
          gp_row[i] = static_cast<scalar_t>(w * ui * act::derivative(spec.code, x));
          dot += ui * a;
          u_row[i] = static_cast<scalar_t>(w * a);
        }
      }
      if (b2) {
        const scalar_t* g_row = g + r * H;
        for (int64_t h = 0; h < H; ++h) dot += static_cast<float>(g_row[h]) * b2[h];
      }
      grad_weight_sorted[r] = scale * dot;
    }
  });
}

// out[c] = sum_r coef[r] * m[r, c] (coef nullptr: 1), fp32 accumulation, for the bias gradients.
template <typename scalar_t>
void weighted_column_sum(const scalar_t* m, int64_t n, int64_t cols, const float* coef, scalar_t* out) {
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(end - begin, 0.0f);
    for (int64_t r = 0; r < n; ++r) {
      const float c = coef ? coef[r] : 1.0f;
      const scalar_t* row = m + r * cols;
      for (int64_t j = begin; j < end; ++j) acc[j - begin] += c * static_cast<float>(row[j]);
    }
    for (int64_t j = begin; j < end; ++j) out[j] = static_cast<scalar_t>(acc[j - begin]);
  });
}

// Spread experts over threads (each GEMM single-threaded) instead of threading each GEMM.
// MOE_KERNELS_CPU_EXPERT_PARALLEL=1/0 forces it; by default when there are at least 4 experts a thread.
bool experts_in_parallel(int64_t num_experts) {
  const char* flag = std::getenv("MOE_KERNELS_CPU_EXPERT_PARALLEL");
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return false;
  if (flag && flag[0]) return flag[0] == '1';
  return num_experts >= 4 * threads;
}

// Runs fn(e) for every expert: in order, or spread over the threads.
template <typename Fn>
void for_each_expert(int64_t num_experts, bool parallel, const Fn& fn) {
  if (!parallel) {
    for (int64_t e = 0; e < num_experts; ++e) fn(e);
    return;
  }
  // Worker threads start with default thread-local dispatch state: hand them the caller's (which
  // excludes autograd here; at::mm_out on weights that require grad would refuse otherwise).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t e = begin; e < end; ++e) fn(e);
  });
}

struct Shapes {
  int64_t T, H, E, M1, M2, k, N;
};

Shapes check_shapes(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& weights,
                    const at::Tensor& sorted_slots, const at::Tensor& slot_positions, const ActSpec& spec) {
  check_cpu(x, "x", 2);
  check_cpu(w1, "w1", 3);
  check_cpu(w2, "w2", 3);
  check_cpu(weights, "weights", 2);
  check_int32(sorted_slots, "sorted_slots");
  check_int32(slot_positions, "slot_positions");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32");
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(),
              "w1, w2 and x must share a dtype");
  Shapes s{x.size(0), x.size(1), w1.size(0), w1.size(1), w2.size(2), weights.size(1), weights.numel()};
  TORCH_CHECK(w1.size(2) == s.H, "w1 must be [E, M1, H] with H = ", s.H, ", got ", w1.sizes());
  TORCH_CHECK(w2.size(0) == s.E && w2.size(1) == s.H, "w2 must be [E, H, M2], got ", w2.sizes());
  TORCH_CHECK(spec.gated ? s.M1 == 2 * s.M2 : s.M1 == s.M2, "w1 ", w1.sizes(), " and w2 ", w2.sizes(),
              " disagree on the hidden width");
  TORCH_CHECK(weights.size(0) == s.T, "weights must have T = ", s.T, " rows");
  check_cpu(sorted_slots, "sorted_slots", 1);
  check_cpu(slot_positions, "slot_positions", 1);
  TORCH_CHECK(sorted_slots.numel() == s.N && slot_positions.numel() == s.N, "the plan must hold T*k = ", s.N, " slots");
  TORCH_CHECK(s.k >= 1, "weights must have at least one column (k >= 1)");
  check_index_range(sorted_slots, "sorted_slots", s.N);
  check_index_range(slot_positions, "slot_positions", s.N);
  return s;
}

// What both ops start with: the activation, the tensors they read made contiguous (free when they are),
// the checked shapes, the expert offsets read on the host and the most rows one expert has.
struct Call {
  ActSpec spec;
  at::Tensor x, weights, sorted_slots, slot_positions;
  Shapes s;
  std::vector<int64_t> off;
  int64_t max_rows;
};

Call prepare_call(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                  const std::optional<at::Tensor>& b2, const at::Tensor& weights, const at::Tensor& expert_offsets,
                  const at::Tensor& sorted_slots, const at::Tensor& slot_positions, c10::string_view activation,
                  bool gated, bool interleaved, const std::optional<double>& limit, double gate_cap, double up_cap,
                  double scale) {
  Call c;
  c.spec = parse_activation(std::string(activation), gated, interleaved, limit, gate_cap, up_cap, scale);
  c.x = x.contiguous();
  c.weights = weights.contiguous();
  c.sorted_slots = sorted_slots.contiguous();
  c.slot_positions = slot_positions.contiguous();
  c.s = check_shapes(c.x, w1, w2, c.weights, c.sorted_slots, c.slot_positions, c.spec);
  check_optional_shape(b1, "b1", c.s.E, c.s.M1);
  check_optional_shape(b2, "b2", c.s.E, c.s.H);
  c.off = read_offsets(expert_offsets, c.s.E, c.s.N);
  c.max_rows = 0;
  for (int64_t e = 0; e < c.s.E; ++e) c.max_rows = std::max(c.max_rows, c.off[e + 1] - c.off[e]);
  return c;
}

// Routing weight (times scale) of each sorted row: w[sorted_slots[p]] * scale.
std::vector<float> sorted_row_weights(const at::Tensor& weights, const at::Tensor& sorted_slots, float scale) {
  const float* w = weights.data_ptr<float>();
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  std::vector<float> out(sorted_slots.numel());
  for (int64_t p = 0; p < static_cast<int64_t>(out.size()); ++p) out[p] = w[slots[p]] * scale;
  return out;
}

// Token chunks for the small-weights forward (see expert_mlp_forward), or 0 to use the expert-order path.
// Each chunk re-reads every expert's weights, so only when all of them are small (adapters, LoRA
// experts); MOE_KERNELS_CPU_TOKEN_CHUNKS=1/0 forces it on/off (where the plan allows it).
int64_t token_chunks(const Shapes& s, int64_t element_size) {
  constexpr int64_t kMinTokensPerChunk = 16;
  constexpr int64_t kMaxWeightBytes = int64_t(16) << 20;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(threads, s.T / kMinTokensPerChunk);
  const char* flag = std::getenv("MOE_KERNELS_CPU_TOKEN_CHUNKS");
  if (flag && flag[0]) return flag[0] == '1' ? std::max<int64_t>(1, std::min<int64_t>(threads, s.T)) : 0;
  const int64_t weight_bytes = s.E * (s.M1 * s.H + s.H * s.M2) * element_size;
  return chunks >= 2 && weight_bytes <= kMaxWeightBytes ? chunks : 0;
}

// Sorted positions [lo, hi) of expert e's rows that belong to tokens [t0, t1): with a stable plan each
// expert's slots ascend, so token ranges map to contiguous row ranges found by binary search.
std::pair<int64_t, int64_t> expert_rows_of_tokens(const int32_t* slots, const std::vector<int64_t>& off, int64_t e,
                                                  int64_t t0, int64_t t1, int64_t k) {
  const int32_t* first = slots + off[e];
  const int32_t* last = slots + off[e + 1];
  return {std::lower_bound(first, last, static_cast<int32_t>(t0 * k)) - slots,
          std::lower_bound(first, last, static_cast<int32_t>(t1 * k)) - slots};
}

// out[r, :] = x[slots[r] / k, :] for r in [0, n): the token rows of n sorted slots, rows of H elements.
template <typename scalar_t>
void copy_token_rows(const scalar_t* x, const int32_t* slots, int64_t n, int64_t k, int64_t H, scalar_t* out) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(out + r * H, x + (slots[r] / k) * H, H * sizeof(scalar_t));
}

// The token-chunk variant's one parallel region (see token_chunks), with the caller's thread-local state
// (see for_each_expert). Chunk c takes tokens [t0, t1): rows(e, lo, hi) for every expert e, [lo, hi) being
// e's sorted rows of those tokens (expert_rows_of_tokens: the plan must be stable), then tokens(t0, t1, acc)
// with the thread's accumulator of H opmath values.
template <typename scalar_t, typename RowsFn, typename TokensFn>
void for_each_token_chunk(int64_t chunks, const Shapes& s, const int32_t* slots, const std::vector<int64_t>& off,
                          const RowsFn& rows, const TokensFn& tokens) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    std::vector<at::opmath_type<scalar_t>> acc(s.H);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t t0 = s.T * c / chunks, t1 = s.T * (c + 1) / chunks;
      for (int64_t e = 0; e < s.E; ++e) {
        const auto [lo, hi] = expert_rows_of_tokens(slots, off, e, t0, t1, s.k);
        rows(e, lo, hi);
      }
      tokens(t0, t1, acc.data());
    }
  });
}

// Whether every expert's slots are in ascending order in sorted_slots (a stable plan, as `plan` makes):
// then a token range maps to one contiguous row range per expert.
bool slots_ascending_per_expert(const at::Tensor& sorted_slots, const std::vector<int64_t>& off) {
  const int32_t* slots = sorted_slots.data_ptr<int32_t>();
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    for (int64_t p = off[e] + 1; p < off[e + 1]; ++p) {
      if (slots[p] <= slots[p - 1]) return false;
    }
  }
  return true;
}

// Experts x rank small enough (adapters of width 8 over a few experts) that computing every expert's
// Down on every token costs less than the per-expert GEMM calls: see dense_small_adapter_forward.
constexpr int64_t kDenseAdapterMaxColumns = 128;

// Forward of plain (non-gated, bias-free) small adapters without the plan's row movements:
//   h_all = x @ [w1[0]; ...; w1[E-1]]^T                  [T, E*r], one GEMM
//   a[t, e*r:(e+1)*r] = sum_j [e_j = e] w[t,j] * scale * act(h_all[t, e*r:(e+1)*r])   (zero elsewhere)
//   out = a @ [w2[0]^T; ...; w2[E-1]^T]                   [T, H], one GEMM (the combine is inside it)
// Two GEMM calls instead of 2 per expert (each call costs more than its FLOPs at this size).
template <typename scalar_t>
at::Tensor dense_small_adapter_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                       const at::Tensor& weights, const at::Tensor& slot_positions,
                                       const std::vector<int64_t>& off, const Shapes& s, double scale,
                                       const ActSpec& spec) {
  const int64_t columns = s.E * s.M1;
  const at::Tensor h_all = at::mm(x, w1.reshape({columns, s.H}).t());
  const at::Tensor w2_cat = w2.permute({0, 2, 1}).reshape({columns, s.H});
  at::Tensor a = at::empty({s.T, columns}, x.options());
  const scalar_t* h_ptr = h_all.data_ptr<scalar_t>();
  scalar_t* a_ptr = a.data_ptr<scalar_t>();
  const float* w = weights.data_ptr<float>();
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  at::parallel_for(0, s.T, grain_rows(columns, 65536), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(columns);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < s.k; ++j) {
        // The slot's expert: the one whose rows of the plan hold the slot's position.
        const int64_t p = pos[t * s.k + j];
        const int64_t e = std::upper_bound(off.begin(), off.end(), p) - off.begin() - 1;
        const float wj = w[t * s.k + j] * static_cast<float>(scale);
        for (int64_t c = e * s.M1; c < (e + 1) * s.M1; ++c) {
          acc[c] += wj * act::forward(spec.code, static_cast<float>(h_ptr[t * columns + c]));
        }
      }
      for (int64_t c = 0; c < columns; ++c) a_ptr[t * columns + c] = static_cast<scalar_t>(acc[c]);
    }
  });
  return at::mm(a, w2_cat);
}

std::tuple<at::Tensor, at::Tensor> expert_mlp_forward(
    const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, const at::Tensor& weights_in, const at::Tensor& expert_offsets,
    const at::Tensor& sorted_slots_in, const at::Tensor& slot_positions_in, c10::string_view activation, bool gated,
    bool interleaved, std::optional<double> limit, double scale, bool keep_hidden, double gate_cap, double up_cap) {
  const auto [spec, x, weights, sorted_slots, slot_positions, s, off, max_rows] =
      prepare_call(x_in, w1, w2, b1, b2, weights_in, expert_offsets, sorted_slots_in, slot_positions_in, activation,
                   gated, interleaved, limit, gate_cap, up_cap, scale);
  if (!keep_hidden && !spec.gated && !b1.has_value() && !b2.has_value() && s.E * s.M1 <= kDenseAdapterMaxColumns) {
    at::Tensor dense_out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_mlp_forward_cpu", [&] {
      dense_out = dense_small_adapter_forward<scalar_t>(x, w1, w2, weights, slot_positions, off, s, scale, spec);
    });
    return {dense_out, at::empty({0, s.M1}, x.options())};
  }

  const at::Tensor b1f = b1.has_value() ? b1->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b2x = b2.has_value() ? b2->to(x.scalar_type()).contiguous() : at::Tensor();
  // Two ways to spread the work over the threads:
  //  * token chunks (small expert weights): each thread takes a contiguous range of tokens and runs it
  //    end to end -- gather, per expert the two GEMMs on its rows of that range, the weighted combine of
  //    its tokens -- in ONE parallel region with no cross-thread writes. On a busy machine every
  //    parallel region can cost a scheduler time slice, which dominates these small ops.
  //  * expert order: gather, then experts one after another (each GEMM on every thread) or spread over
  //    the threads (experts_in_parallel), then the combine.
  // Either way each expert's pre-activation block is kept transposed ([M1, n] at flat offset a * M1)
  // for the backward.
  int64_t chunks = token_chunks(s, x.element_size());
  if (chunks > 0 && !slots_ascending_per_expert(sorted_slots, off)) chunks = 0;
  const bool parallel_experts = chunks == 0 && experts_in_parallel(s.E);
  const bool full_buffers = chunks > 0 || keep_hidden || parallel_experts;
  const bool full_act = chunks > 0 || parallel_experts;
  at::Tensor hidden = at::empty({full_buffers ? s.N : max_rows, s.M1}, x.options());
  at::Tensor act_buf = at::empty({full_act ? s.N : max_rows, s.M2}, x.options());
  at::Tensor ys = at::empty({s.N, s.H}, x.options());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_mlp_forward_cpu", [&] {
    // Rows [lo, hi) of expert e (within its rows [off[e], off[e+1])), xs_rows their gathered inputs.
    auto run_rows = [&](int64_t e, int64_t lo, int64_t hi, const at::Tensor& xs_rows) {
      const int64_t a = off[e], n = off[e + 1] - off[e], m = hi - lo;
      if (m == 0) return;
      at::Tensor pre_t = hidden.view(-1).narrow(0, (full_buffers ? a : 0) * s.M1, n * s.M1).view({s.M1, n})
                             .narrow(1, lo - a, m);
      at::Tensor act_rows = act_buf.narrow(0, full_act ? lo : 0, m);
      at::mm_out(pre_t, w1[e], xs_rows.t());
      activation_forward<scalar_t>(pre_t.data_ptr<scalar_t>(), Block{1, n}, m, s.M2,
                                   b1f.defined() ? b1f.data_ptr<float>() + e * s.M1 : nullptr,
                                   act_rows.data_ptr<scalar_t>(), spec);
      at::Tensor y_rows = ys.narrow(0, lo, m);
      if (b2x.defined()) {
        at::addmm_out(y_rows, b2x[e], act_rows, w2[e].t());
      } else {
        at::mm_out(y_rows, act_rows, w2[e].t());
      }
    };
    if (chunks > 0) {
      out = at::empty({s.T, s.H}, x.options());
      at::Tensor xs = at::empty({s.N, s.H}, x.options());
      const int32_t* slots = sorted_slots.data_ptr<int32_t>();
      const scalar_t* x_ptr = x.data_ptr<scalar_t>();
      scalar_t* xs_ptr = xs.data_ptr<scalar_t>();
      for_each_token_chunk<scalar_t>(
          chunks, s, slots, off,
          [&](int64_t e, int64_t lo, int64_t hi) {
            copy_token_rows(x_ptr, slots + lo, hi - lo, s.k, s.H, xs_ptr + lo * s.H);
            run_rows(e, lo, hi, xs.narrow(0, lo, hi - lo));
          },
          [&](int64_t t0, int64_t t1, at::opmath_type<scalar_t>* acc) {
            combine_token_rows<scalar_t>(ys.data_ptr<scalar_t>(), slot_positions.data_ptr<int32_t>(),
                                         weights.data_ptr<float>(), static_cast<float>(scale), s.k, s.H, t0, t1,
                                         out.data_ptr<scalar_t>(), acc);
          });
    } else {
      if (parallel_experts) {
        // Each expert gathers its rows into its thread's scratch right before its GEMMs: the rows are
        // still in cache when read, and no [T*k, H] gathered copy goes through memory.
        const int64_t threads = at::get_num_threads();
        at::Tensor xs_scratch = at::empty({threads, max_rows, s.H}, x.options());
        const int32_t* slots = sorted_slots.data_ptr<int32_t>();
        const scalar_t* x_ptr = x.data_ptr<scalar_t>();
        for_each_expert(s.E, true, [&](int64_t e) {
          const int64_t a = off[e], n = off[e + 1] - off[e];
          if (n == 0) return;
          at::Tensor xs_rows = xs_scratch[at::get_thread_num()].narrow(0, 0, n);
          copy_token_rows(x_ptr, slots + a, n, s.k, s.H, xs_rows.data_ptr<scalar_t>());
          run_rows(e, a, a + n, xs_rows);
        });
      } else {  // experts one after another, each GEMM threaded by ATen
        const at::Tensor xs = gather_rows(x, sorted_slots, s.k);
        for (int64_t e = 0; e < s.E; ++e) run_rows(e, off[e], off[e + 1], xs.narrow(0, off[e], off[e + 1] - off[e]));
      }
      const at::Tensor scaled_weights = scale == 1.0 ? weights : weights * scale;
      out = combine(ys, slot_positions, scaled_weights);
    }
  });
  if (!keep_hidden) hidden = at::empty({0, s.M1}, x.options());
  return {out, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2, const at::Tensor& weights_in,
    const at::Tensor& expert_offsets, const at::Tensor& sorted_slots_in, const at::Tensor& slot_positions_in,
    const at::Tensor& hidden, c10::string_view activation, bool gated, bool interleaved, std::optional<double> limit,
    double scale, double gate_cap, double up_cap) {
  const auto [spec, x, weights, sorted_slots, slot_positions, s, off, max_rows] =
      prepare_call(x_in, w1, w2, b1, b2, weights_in, expert_offsets, sorted_slots_in, slot_positions_in, activation,
                   gated, interleaved, limit, gate_cap, up_cap, scale);
  check_cpu(grad_out, "grad_out", 2);
  TORCH_CHECK(grad_out.size(0) == s.T && grad_out.size(1) == s.H, "grad_out must be [T, H]");
  check_cpu(hidden, "hidden", 2);
  const bool hidden_kept = hidden.numel() > 0 || s.N == 0;
  TORCH_CHECK(!hidden_kept || (hidden.size(0) == s.N && hidden.size(1) == s.M1),
              "hidden must be [T*k, M1] or empty, got ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == x.scalar_type(), "hidden must have x's dtype ", x.scalar_type());

  const at::Tensor b1f = b1.has_value() ? b1->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b2f = b2.has_value() ? b2->to(at::kFloat).contiguous() : at::Tensor();
  // As in the forward: experts one after another over shared scratch rows, or spread over the threads
  // with scratch rows of their own (buffer_row(a) says where an expert's scratch starts).
  // Token chunks as in the forward (small expert weights): one parallel region over token ranges
  // (gathers, u = g @ w2, the activation's backward, grad_x of the range's tokens), then one over the
  // experts for the weight gradients (one GEMM per expert over all its rows, as in expert order).
  int64_t chunks = token_chunks(s, x.element_size());
  if (chunks > 0 && !slots_ascending_per_expert(sorted_slots, off)) chunks = 0;
  const bool parallel_experts = chunks > 0 ? at::get_num_threads() > 1 : experts_in_parallel(s.E);
  const bool full_scratch = chunks > 0 || parallel_experts;
  const int64_t scratch_rows = full_scratch ? s.N : max_rows;
  auto buffer_row = [&](int64_t a) { return full_scratch ? a : int64_t(0); };
  const at::Tensor hidden_c = hidden_kept ? hidden.contiguous() : at::empty({scratch_rows, s.M1}, x.options());
  const at::Tensor grad_out_x = grad_out.to(x.scalar_type()).contiguous();
  // Gradient rows in expert order; in expert order each expert's slice is reused for its grad_xs once
  // consumed (token chunks keep g_rows for the weight gradients and write grad_xs to grad_xs_rows).
  // With experts spread over the threads, each expert gathers its own rows (as in the forward): its
  // grad rows into g_rows, its x rows into its thread's scratch.
  const bool gather_in_expert = chunks == 0 && parallel_experts;
  at::Tensor g_rows = chunks > 0 || gather_in_expert ? at::empty({s.N, s.H}, x.options())
                                                     : gather_rows(grad_out_x, sorted_slots, s.k);
  const at::Tensor xs = chunks > 0 ? at::empty({s.N, s.H}, x.options())
                        : gather_in_expert ? at::empty({at::get_num_threads(), max_rows, s.H}, x.options())
                                           : gather_rows(x, sorted_slots, s.k);
  const at::Tensor grad_xs_rows = chunks > 0 ? at::empty({s.N, s.H}, x.options()) : at::Tensor();
  at::Tensor grad_x = chunks > 0 ? at::empty({s.T, s.H}, x.options()) : at::Tensor();
  at::Tensor u_buf = at::empty({scratch_rows, s.M2}, x.options());
  at::Tensor grad_pre_buf = at::empty({scratch_rows, s.M1}, x.options());
  at::Tensor grad_w1 = at::empty({s.E, s.M1, s.H}, x.options());
  at::Tensor grad_w2 = at::empty({s.E, s.H, s.M2}, x.options());
  at::Tensor grad_b1 = b1.has_value() ? at::empty({s.E, s.M1}, b1->options()) : at::empty({0}, x.options());
  at::Tensor grad_b2 = b2.has_value() ? at::empty({s.E, s.H}, b2->options()) : at::empty({0}, x.options());
  const at::Tensor grad_b1_x = b1.has_value() ? at::empty({s.E, s.M1}, x.options()) : at::Tensor();
  const at::Tensor grad_b2_x = b2.has_value() ? at::empty({s.E, s.H}, x.options()) : at::Tensor();
  std::vector<float> grad_weight_sorted(s.N);
  const std::vector<float> row_weight = sorted_row_weights(weights, sorted_slots, static_cast<float>(scale));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_mlp_backward_cpu", [&] {
    auto run_expert = [&](int64_t e) {
      const int64_t a = off[e], n = off[e + 1] - off[e];
      if (n == 0) {
        grad_w1[e].zero_();
        grad_w2[e].zero_();
        if (grad_b1_x.defined()) grad_b1_x[e].zero_();
        if (grad_b2_x.defined()) grad_b2_x[e].zero_();
        return;
      }
      at::Tensor g = g_rows.narrow(0, a, n);
      at::Tensor xs_rows;
      if (gather_in_expert) {
        xs_rows = xs[at::get_thread_num()].narrow(0, 0, n);
        const int32_t* slots = sorted_slots.data_ptr<int32_t>() + a;
        copy_token_rows(x.data_ptr<scalar_t>(), slots, n, s.k, s.H, xs_rows.data_ptr<scalar_t>());
        copy_token_rows(grad_out_x.data_ptr<scalar_t>(), slots, n, s.k, s.H, g.data_ptr<scalar_t>());
      } else {
        xs_rows = xs.narrow(0, a, n);
      }
      at::Tensor pre;
      Block layout;
      if (hidden_kept) {  // the forward's transposed block [M1, n]
        pre = hidden_c.view(-1).narrow(0, a * s.M1, n * s.M1);
        layout = Block{1, n};
      } else {
        pre = hidden_c.narrow(0, buffer_row(a), n);
        at::mm_out(pre, xs_rows, w1[e].t());
        if (b1f.defined()) pre.add_(b1f[e].to(x.scalar_type()));
        layout = Block{s.M1, 1};
      }
      at::Tensor u = u_buf.narrow(0, buffer_row(a), n);
      at::Tensor grad_pre = grad_pre_buf.narrow(0, buffer_row(a), n);
      at::mm_out(u, g, w2[e]);
      activation_backward<scalar_t>(pre.data_ptr<scalar_t>(), layout, u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                    b2f.defined() ? b2f.data_ptr<float>() + e * s.H : nullptr, n, s.M1, s.M2, s.H,
                                    row_weight.data() + a, grad_pre.data_ptr<scalar_t>(), grad_weight_sorted.data() + a,
                                    static_cast<float>(scale), spec);
      // u now holds row_weight * act: grad_w2[e] = g^T @ (w * act).
      at::Tensor grad_w2_e = grad_w2[e];
      at::mm_out(grad_w2_e, g.t(), u);
      if (grad_b2_x.defined()) {
        weighted_column_sum<scalar_t>(g.data_ptr<scalar_t>(), n, s.H, row_weight.data() + a,
                                      grad_b2_x[e].data_ptr<scalar_t>());
      }
      at::Tensor grad_w1_e = grad_w1[e];
      at::mm_out(grad_w1_e, grad_pre.t(), xs_rows);
      if (grad_b1_x.defined()) {
        weighted_column_sum<scalar_t>(grad_pre.data_ptr<scalar_t>(), n, s.M1, nullptr,
                                      grad_b1_x[e].data_ptr<scalar_t>());
      }
      at::mm_out(g, grad_pre, w1[e]);  // grad of the gathered x rows, in place of the consumed grad rows
    };
    if (chunks == 0) {
      for_each_expert(s.E, parallel_experts, run_expert);
      return;
    }
    // Rows [lo, hi) of expert e: pre-activation (kept, or recomputed), u = g @ w2[e] (overwritten with
    // row_weight * act), grad_pre, the routing-weight grads, and grad_xs = grad_pre @ w1[e].
    auto run_rows = [&](int64_t e, int64_t lo, int64_t hi) {
      const int64_t a = off[e], n = off[e + 1] - off[e], m = hi - lo;
      if (m == 0) return;
      const at::Tensor xs_rows = xs.narrow(0, lo, m);
      const at::Tensor g = g_rows.narrow(0, lo, m);
      scalar_t* pre_ptr;
      Block layout;
      if (hidden_kept) {  // columns [lo - a, hi - a) of the forward's transposed block [M1, n]
        pre_ptr = hidden_c.data_ptr<scalar_t>() + a * s.M1 + (lo - a);
        layout = Block{1, n};
      } else {
        at::Tensor pre = hidden_c.narrow(0, lo, m);
        at::mm_out(pre, xs_rows, w1[e].t());
        if (b1f.defined()) pre.add_(b1f[e].to(x.scalar_type()));
        pre_ptr = pre.data_ptr<scalar_t>();
        layout = Block{s.M1, 1};
      }
      at::Tensor u = u_buf.narrow(0, lo, m);
      at::Tensor grad_pre = grad_pre_buf.narrow(0, lo, m);
      at::mm_out(u, g, w2[e]);
      activation_backward<scalar_t>(pre_ptr, layout, u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                    b2f.defined() ? b2f.data_ptr<float>() + e * s.H : nullptr, m, s.M1, s.M2, s.H,
                                    row_weight.data() + lo, grad_pre.data_ptr<scalar_t>(),
                                    grad_weight_sorted.data() + lo, static_cast<float>(scale), spec);
      at::Tensor grad_xs = grad_xs_rows.narrow(0, lo, m);
      at::mm_out(grad_xs, grad_pre, w1[e]);
    };
    const int32_t* slots = sorted_slots.data_ptr<int32_t>();
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const scalar_t* grad_out_ptr = grad_out_x.data_ptr<scalar_t>();
    scalar_t* xs_ptr = xs.data_ptr<scalar_t>();
    scalar_t* g_ptr = g_rows.data_ptr<scalar_t>();
    for_each_token_chunk<scalar_t>(
        chunks, s, slots, off,
        [&](int64_t e, int64_t lo, int64_t hi) {
          copy_token_rows(x_ptr, slots + lo, hi - lo, s.k, s.H, xs_ptr + lo * s.H);
          copy_token_rows(grad_out_ptr, slots + lo, hi - lo, s.k, s.H, g_ptr + lo * s.H);
          run_rows(e, lo, hi);
        },
        [&](int64_t t0, int64_t t1, at::opmath_type<scalar_t>* acc) {
          sum_token_rows<scalar_t>(grad_xs_rows.data_ptr<scalar_t>(), slot_positions.data_ptr<int32_t>(), s.k, s.H,
                                   t0, t1, grad_x.data_ptr<scalar_t>(), acc);
        });
    // Weight gradients, per expert over all its rows: grad_w2[e] = g^T @ (w * act), grad_w1[e] = grad_pre^T @ xs.
    for_each_expert(s.E, parallel_experts, [&](int64_t e) {
      const int64_t a = off[e], n = off[e + 1] - off[e];
      at::Tensor grad_w1_e = grad_w1[e];
      at::Tensor grad_w2_e = grad_w2[e];
      if (n == 0) {
        grad_w1_e.zero_();
        grad_w2_e.zero_();
        if (grad_b1_x.defined()) grad_b1_x[e].zero_();
        if (grad_b2_x.defined()) grad_b2_x[e].zero_();
        return;
      }
      const at::Tensor g = g_rows.narrow(0, a, n);
      const at::Tensor grad_pre = grad_pre_buf.narrow(0, a, n);
      at::mm_out(grad_w2_e, g.t(), u_buf.narrow(0, a, n));
      if (grad_b2_x.defined()) {
        weighted_column_sum<scalar_t>(g.data_ptr<scalar_t>(), n, s.H, row_weight.data() + a,
                                      grad_b2_x[e].data_ptr<scalar_t>());
      }
      at::mm_out(grad_w1_e, grad_pre.t(), xs.narrow(0, a, n));
      if (grad_b1_x.defined()) {
        weighted_column_sum<scalar_t>(grad_pre.data_ptr<scalar_t>(), n, s.M1, nullptr,
                                      grad_b1_x[e].data_ptr<scalar_t>());
      }
    });
  });
  if (grad_b1_x.defined()) grad_b1.copy_(grad_b1_x);
  if (grad_b2_x.defined()) grad_b2.copy_(grad_b2_x);
  if (chunks == 0) grad_x = scatter_rows_sum(g_rows, slot_positions, s.k);
  at::Tensor grad_weights = at::empty({s.T, s.k}, weights.options());
  const int32_t* pos = slot_positions.data_ptr<int32_t>();
  float* gw = grad_weights.data_ptr<float>();
  for (int64_t slot = 0; slot < s.N; ++slot) gw[slot] = grad_weight_sorted[pos[slot]];
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("expert_mlp_forward", &expert_mlp_forward);
  m.impl("expert_mlp_backward", &expert_mlp_backward);
}

}  // namespace cpu
}  // namespace moe_kernels
