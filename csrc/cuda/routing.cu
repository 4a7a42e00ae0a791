// CUDA kernels of route_forward / route_backward (top-k routing, every variant of moe_kernels.reference.route).
//
// The per-row math comes from csrc/common/routing_row.h, the same __host__ __device__ code the CPU kernels
// run: the ranking order (ranks_before: larger first, ties to the lower expert index, NaN first), sigmoid,
// the group score of DeepSeek-V3's group-limited choice (select_groups), the final weights (finish_weights:
// softmax/sigmoid of the picked logits, renormalisation, scale) and the whole backward (route_row_backward).
// What the GPU does in parallel is the part that is a loop over E on the CPU: the softmax max and sum and
// the top-k selection, as warp (E <= 256) or block reductions. Those sums run in a tree order, so GPU
// weights can differ from the CPU's in the last bit; the choice rule is identical.
//
// Top-k without marking: round j picks the best element among those that rank strictly after round j-1's
// winner. ranks_before is a strict total order (index breaks ties), so this yields exactly the stable top-k.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_args.h"
#include "cuda_utils.cuh"

namespace moe_kernels {
namespace cuda {
namespace {

using routing::RouteParams;
using routing::make_params;
using routing::ranks_before;

constexpr int kWarpMaxExperts = 256;  // warp kernel: up to 8 experts per lane
constexpr int kWarpMaxGroups = kWarpSize;  // warp kernel: one lane per group
constexpr int kRouteWarpsPerBlock = 4;
constexpr int kRouteBlockThreads = 256;  // block kernel

// The score of one group's experts, computed by routing_row.h's select_groups on that group alone
// (a one-group problem: the sum of its best two choice values, or its best when it has one expert).
__device__ __forceinline__ float group_score(const float* group_choice, const RouteParams& p) {
  RouteParams one_group = p;
  one_group.num_experts = p.num_experts / p.n_group;
  one_group.n_group = 1;
  one_group.topk_group = 1;
  float score, keep;
  routing::select_groups<float>(group_choice, nullptr, one_group, &score, &keep);
  return score;
}

// Keeps (value, index) of the better of two candidates by ranks_before; index < 0 means "none".
__device__ __forceinline__ void keep_better(float& value, int& index, float other_value, int other_index) {
  if (other_index >= 0 && (index < 0 || ranks_before(other_value, other_index, value, index))) {
    value = other_value;
    index = other_index;
  }
}

// The best (value, index) over the warp; every lane gets it (ranks_before is a total order, so the
// butterfly gives every lane the same winner).
__device__ __forceinline__ void warp_best(float& value, int& index) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    keep_better(value, index, other_value, other_index);
  }
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// route_forward, one warp per token, E <= 32 * ITEMS <= 256 and n_group <= 32.
//   logits  [T, E] scalar_t, contiguous; bias [E] float32 or nullptr (choice only)
//   weights [T, k] W (float, half or bfloat16); ids [T, k] I (int32 or int64)
// Launch: kRouteWarpsPerBlock warps per block, grid-stride over tokens in warps. Lane l holds experts
// l, l + 32, ... in registers (coalesced loads). Grouped choice stages the choice values in shared memory
// (kWarpMaxExperts floats per warp) so lane g can score group g; keep flags travel as a ballot mask.
// Lane 0 collects the picked scores in the same shared row (k <= E <= kWarpMaxExperts), finishes them in fp32
// with finish_weights and writes them in W.
template <typename scalar_t, typename W, typename I, int ITEMS>
__global__ void route_forward_warp_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias,
                                          RouteParams p, int64_t num_tokens, W* __restrict__ weights,
                                          I* __restrict__ ids) {
  __shared__ float staged_choice[kRouteWarpsPerBlock][kWarpMaxExperts];
  const int lane = threadIdx.x % kWarpSize;
  const int warp_in_block = threadIdx.x / kWarpSize;
  const int num_experts = static_cast<int>(p.num_experts);
  const int k = static_cast<int>(p.k);
  const bool grouped = p.n_group > 1;
  const int per_group = grouped ? num_experts / static_cast<int>(p.n_group) : num_experts;
  const int64_t warps_total = int64_t(gridDim.x) * kRouteWarpsPerBlock;

  for (int64_t token = int64_t(blockIdx.x) * kRouteWarpsPerBlock + warp_in_block; token < num_tokens;
       token += warps_total) {
    const scalar_t* row = logits + token * num_experts;
    float score[ITEMS];   // softmax/sigmoid of the logits, or the logits themselves when topk_first
    float choice[ITEMS];  // score + bias, -inf in dropped groups
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int expert = lane + i * kWarpSize;
      score[i] = expert < num_experts ? static_cast<float>(row[expert]) : 0.f;
    }
    if (!p.topk_first) {
      if (p.use_sigmoid) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) score[i] = routing::sigmoid(score[i]);
      } else {
        float row_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if (lane + i * kWarpSize < num_experts) row_max = score[i] > row_max ? score[i] : row_max;
        }
        row_max = warp_max(row_max);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if (lane + i * kWarpSize < num_experts) sum += expf(score[i] - row_max);
        }
        sum = warp_sum(sum);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) score[i] = expf(score[i] - row_max) / sum;
      }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int expert = lane + i * kWarpSize;
      choice[i] = (bias != nullptr && expert < num_experts) ? score[i] + bias[expert] : score[i];
    }
    if (grouped) {
      float* staged = staged_choice[warp_in_block];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int expert = lane + i * kWarpSize;
        if (expert < num_experts) staged[expert] = choice[i];
      }
      __syncwarp();
      const int n_group = static_cast<int>(p.n_group);
      const float my_group_score = lane < n_group ? group_score(staged + lane * per_group, p) : 0.f;
      int ahead = 0;  // groups ranking before mine
      for (int g = 0; g < n_group; ++g) {
        const float other = __shfl_sync(kFullMask, my_group_score, g);
        ahead += (lane < n_group && ranks_before(other, g, my_group_score, lane)) ? 1 : 0;
      }
      const unsigned keep_mask = __ballot_sync(kFullMask, lane < n_group && ahead < p.topk_group);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int expert = lane + i * kWarpSize;
        if (expert < num_experts && !((keep_mask >> (expert / per_group)) & 1u)) choice[i] = -INFINITY;
      }
      __syncwarp();  // staged[] is rewritten by the next token
    }

    float* picked = staged_choice[warp_in_block];  // lane 0's, after the grouped choice is done with it
    I* ids_row = ids + token * k;
    float previous_value = 0.f;
    int previous_index = -1;
    for (int j = 0; j < k; ++j) {
      float best_value = 0.f;
      int best_index = -1;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int expert = lane + i * kWarpSize;
        const bool eligible =
            expert < num_experts && (previous_index < 0 || ranks_before(previous_value, previous_index, choice[i], expert));
        if (eligible) keep_better(best_value, best_index, choice[i], expert);
      }
      warp_best(best_value, best_index);
      // The winner's score lives in lane best_index % 32, item best_index / 32.
      float owner_score = 0.f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) owner_score = (i == best_index / kWarpSize) ? score[i] : owner_score;
      const float winner_score = __shfl_sync(kFullMask, owner_score, best_index % kWarpSize);
      if (lane == 0) {
        ids_row[j] = static_cast<I>(best_index);
        picked[j] = winner_score;
      }
      previous_value = best_value;
      previous_index = best_index;
    }
    if (lane == 0) {
      routing::finish_weights(picked, p);
      W* weights_row = weights + token * k;
      for (int j = 0; j < k; ++j) weights_row[j] = static_cast<W>(picked[j]);
    }
    __syncwarp();  // picked[] (staged_choice) is rewritten by the next token
  }
}

// route_forward fallback for any E and n_group: one block per token (grid-stride), kRouteBlockThreads threads.
//   logits [T, E] scalar_t, contiguous; bias [E] float32 or nullptr
//   scratch [gridDim.x, E + 2 * n_group + k] float32: this block's choice values, group scores, keep flags and
//   picked scores (finished in fp32 by thread 0, then written in W)
//   weights [T, k] W (float, half or bfloat16); ids [T, k] I (int32 or int64)
// Scores are recomputed from the logits when needed (one expf) rather than stored.
template <typename scalar_t, typename W, typename I>
__global__ void route_forward_block_kernel(const scalar_t* __restrict__ logits, const float* __restrict__ bias,
                                           RouteParams p, int64_t num_tokens, float* __restrict__ scratch,
                                           W* __restrict__ weights, I* __restrict__ ids) {
  __shared__ float reduce_values[kWarpSize];
  __shared__ int reduce_indices[kWarpSize];
  __shared__ float winner_value;
  __shared__ int winner_index;
  const int num_experts = static_cast<int>(p.num_experts);
  const int k = static_cast<int>(p.k);
  const bool grouped = p.n_group > 1;
  const int n_group = grouped ? static_cast<int>(p.n_group) : 0;
  const int per_group = grouped ? num_experts / n_group : num_experts;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  float* choice = scratch + int64_t(blockIdx.x) * (num_experts + 2 * n_group + k);
  float* group_scores = choice + num_experts;
  float* group_keep = group_scores + n_group;
  float* picked = group_keep + n_group;
  const bool softmax_all = !p.topk_first && !p.use_sigmoid;

  for (int64_t token = blockIdx.x; token < num_tokens; token += gridDim.x) {
    const scalar_t* row = logits + token * num_experts;
    float row_max = 0.f, row_sum = 1.f;
    if (softmax_all) {
      float local_max = -INFINITY;
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        const float x = static_cast<float>(row[e]);
        local_max = x > local_max ? x : local_max;
      }
      local_max = warp_max(local_max);
      if (lane == 0) reduce_values[warp] = local_max;
      __syncthreads();
      row_max = -INFINITY;
      for (int w = 0; w < num_warps; ++w) row_max = reduce_values[w] > row_max ? reduce_values[w] : row_max;
      __syncthreads();
      float local_sum = 0.f;
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) local_sum += expf(static_cast<float>(row[e]) - row_max);
      row_sum = block_sum(local_sum, reduce_values);
    }
    auto score_of = [&](int e) {
      const float x = static_cast<float>(row[e]);
      if (p.topk_first) return x;
      return p.use_sigmoid ? routing::sigmoid(x) : expf(x - row_max) / row_sum;
    };
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      const float s = score_of(e);
      choice[e] = bias != nullptr ? s + bias[e] : s;
    }
    __syncthreads();
    if (grouped) {
      for (int g = threadIdx.x; g < n_group; g += blockDim.x) group_scores[g] = group_score(choice + g * per_group, p);
      __syncthreads();
      for (int g = threadIdx.x; g < n_group; g += blockDim.x) {
        int ahead = 0;
        for (int h = 0; h < n_group; ++h) ahead += ranks_before(group_scores[h], h, group_scores[g], g) ? 1 : 0;
        group_keep[g] = ahead < p.topk_group ? 1.f : 0.f;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        if (group_keep[e / per_group] == 0.f) choice[e] = -INFINITY;
      }
      __syncthreads();
    }

    float previous_value = 0.f;
    int previous_index = -1;
    for (int j = 0; j < k; ++j) {
      float best_value = 0.f;
      int best_index = -1;
      for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        const float c = choice[e];
        if (previous_index < 0 || ranks_before(previous_value, previous_index, c, e)) keep_better(best_value, best_index, c, e);
      }
      warp_best(best_value, best_index);
      if (lane == 0) {
        reduce_values[warp] = best_value;
        reduce_indices[warp] = best_index;
      }
      __syncthreads();
      if (warp == 0) {
        best_value = lane < num_warps ? reduce_values[lane] : 0.f;
        best_index = lane < num_warps ? reduce_indices[lane] : -1;
        warp_best(best_value, best_index);
        if (lane == 0) {
          winner_value = best_value;
          winner_index = best_index;
          ids[token * k + j] = static_cast<I>(best_index);
          picked[j] = score_of(best_index);
        }
      }
      __syncthreads();
      previous_value = winner_value;
      previous_index = winner_index;
      __syncthreads();  // winner_* is rewritten next round
    }
    if (threadIdx.x == 0) {
      routing::finish_weights(picked, p);
      for (int j = 0; j < k; ++j) weights[token * k + j] = static_cast<W>(picked[j]);
    }
    __syncthreads();  // choice[] is rewritten by the next token
  }
}

// route_backward: one thread per token running routing_row.h's route_row_backward.
//   grad_weights [T, k] float32; logits [T, E] scalar_t; ids [T, k] I, int32 or int64 (all contiguous)
//   scratch [T, 2k] float32; grad_logits [T, E] float32 (every entry written)
// Launch: 128 threads per block, grid-stride over tokens. The O(E) loops of one row run in one thread:
// backward touches each logit a few times with no selection, so this stays memory-bound.
template <typename scalar_t, typename I>
__global__ void route_backward_row_kernel(const float* __restrict__ grad_weights, const scalar_t* __restrict__ logits,
                                          const I* __restrict__ ids, RouteParams p, int64_t num_tokens,
                                          float* __restrict__ scratch, float* __restrict__ grad_logits) {
  const int64_t k = p.k, num_experts = p.num_experts;
  for (int64_t token = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; token < num_tokens;
       token += int64_t(gridDim.x) * blockDim.x) {
    routing::route_row_backward(grad_weights + token * k, logits + token * num_experts, ids + token * k, p,
                                scratch + token * routing::backward_scratch_floats(p),
                                grad_logits + token * num_experts);
  }
}

std::tuple<at::Tensor, at::Tensor> route_forward(const at::Tensor& logits, int64_t k, bool use_sigmoid,
                                                 bool topk_first, bool renormalize,
                                                 const std::optional<at::Tensor>& bias, int64_t n_group,
                                                 int64_t topk_group, double scale,
                                                 std::optional<at::ScalarType> weights_dtype_in,
                                                 std::optional<at::ScalarType> ids_dtype_in) {
  check_cuda(logits, "logits");
  const at::ScalarType weights_dtype = routing::route_weights_dtype(weights_dtype_in);
  const at::ScalarType ids_dtype = routing::route_ids_dtype(ids_dtype_in);
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E], got shape ", logits.sizes());
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  TORCH_CHECK(num_experts < (int64_t(1) << 31), "logits has too many experts: ", num_experts);
  routing::check_route_forward_args(num_experts, k, n_group, topk_group);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cuda_same_device({{logits, "logits"}, {*bias, "bias"}});
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == num_experts, "bias must be [E = ", num_experts, "], got shape ",
                bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const RouteParams p = make_params(num_experts, k, use_sigmoid, topk_first, renormalize, n_group, topk_group, scale);
  const at::Tensor logits_c = logits.contiguous();
  at::Tensor weights = at::empty({num_tokens, k}, logits.options().dtype(weights_dtype));
  at::Tensor ids = at::empty({num_tokens, k}, logits.options().dtype(ids_dtype));
  if (num_tokens == 0) return {weights, ids};
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool warp_path = num_experts <= kWarpMaxExperts && p.n_group <= kWarpMaxGroups;
  MOE_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "logits", [&] {
    routing::dispatch_route_outputs(weights_dtype, ids_dtype, [&](auto w_type, auto i_type) {
      using W = decltype(w_type);
      using I = decltype(i_type);
      const scalar_t* logits_ptr = logits_c.data_ptr<scalar_t>();
      W* weights_ptr = weights.data_ptr<W>();
      I* ids_ptr = ids.data_ptr<I>();
      if (warp_path) {
        const int64_t grid = capped_grid(ceil_div(num_tokens, kRouteWarpsPerBlock));
        const unsigned threads = kRouteWarpsPerBlock * kWarpSize;
        if (num_experts <= 2 * kWarpSize) {
          route_forward_warp_kernel<scalar_t, W, I, 2><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
              logits_ptr, bias_ptr, p, num_tokens, weights_ptr, ids_ptr);
        } else {
          route_forward_warp_kernel<scalar_t, W, I, kWarpMaxExperts / kWarpSize>
              <<<static_cast<unsigned>(grid), threads, 0, stream>>>(logits_ptr, bias_ptr, p, num_tokens, weights_ptr,
                                                                    ids_ptr);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t grid = capped_grid(num_tokens, 4);
        at::Tensor scratch = at::empty({grid, num_experts + 2 * p.n_group + k}, logits.options().dtype(at::kFloat));
        route_forward_block_kernel<scalar_t, W, I><<<static_cast<unsigned>(grid), kRouteBlockThreads, 0, stream>>>(
            logits_ptr, bias_ptr, p, num_tokens, scratch.data_ptr<float>(), weights_ptr, ids_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {weights, ids};
}

at::Tensor route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& ids,
                          bool use_sigmoid, bool topk_first, bool renormalize, double scale) {
  check_cuda_same_device({{logits, "logits"}, {ids, "ids"}, {grad_weights, "grad_weights"}});
  routing::check_route_ids(ids);
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [T, E], got shape ", logits.sizes());
  TORCH_CHECK(ids.dim() == 2 && grad_weights.dim() == 2, "grad_weights ", grad_weights.sizes(), " and ids ",
              ids.sizes(), " must both be [T, k]");
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1), k = ids.size(1);
  TORCH_CHECK(ids.size(0) == num_tokens && grad_weights.size(0) == num_tokens && grad_weights.size(1) == k,
              "route_backward: grad_weights ", grad_weights.sizes(), " and ids ", ids.sizes(),
              " must both be [T, k] with T = ", num_tokens);
  c10::cuda::CUDAGuard guard(logits.device());
  const RouteParams p = make_params(num_experts, k, use_sigmoid, topk_first, renormalize, 0, 0, scale);
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor grad_weights_c = grad_weights.to(at::kFloat).contiguous();
  at::Tensor grad_logits = at::empty({num_tokens, num_experts}, logits.options().dtype(at::kFloat));
  if (grad_logits.numel() == 0) return grad_logits;
  at::Tensor scratch = at::empty({num_tokens, routing::backward_scratch_floats(p)}, logits.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 128;
  const int64_t grid = capped_grid(ceil_div(num_tokens, threads));
  MOE_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "logits", [&] {
    auto launch = [&](const auto* ids_ptr) {
      route_backward_row_kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(
          grad_weights_c.data_ptr<float>(), logits_c.data_ptr<scalar_t>(), ids_ptr, p, num_tokens,
          scratch.data_ptr<float>(), grad_logits.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    ids_c.scalar_type() == at::kInt ? launch(ids_c.data_ptr<int32_t>()) : launch(ids_c.data_ptr<int64_t>());
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("route_forward", &route_forward);
  m.impl("route_backward", &route_backward);
}

}  // namespace cuda
}  // namespace moe_kernels
