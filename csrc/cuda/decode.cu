// CUDA kernels of the decode expert path (csrc/decode_experts.h): two GEMV passes over the routed slots, each
// output element reduced by one warp (lanes stride over the reduced dimension, 16-byte loads where the layout
// allows, a fixed butterfly sum: deterministic), with the per-element steps of csrc/common/grouped_rows.h.
// Weight rows are read once per slot that routes to them; nothing synchronises with the host.
#include <ATen/ATen.h>

#include "cuda_utils.cuh"
#include "decode_experts.h"

namespace moe_kernels {
namespace cuda {
namespace {

using grouped::add_rn;
using grouped::combine_term;
using grouped::decode_act_column;

constexpr int kWarpsPerBlock = decode::kCudaColumnsPerBlock;  // one output element per warp

// This lane's shares of the R dot products u[r] . w[r] over n elements (u[r] unit stride, w[r] stride w_stride), in
// one loop so their loads are in flight together (rows repeated in u are read once: the same addresses). VEC
// elements per step: VEC > 1 needs w_stride == 1, n % VEC == 0 and 16-byte aligned rows (checked by the launcher).
template <typename T, int VEC, int R>
__device__ __forceinline__ void lane_dots(const T* const* u, const T* const* w, int64_t w_stride, int64_t n, int lane,
                                          float (&acc)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  if constexpr (VEC == 1) {
    for (int64_t i = lane; i < n; i += kWarpSize) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        acc[r] = fmaf(static_cast<float>(u[r][i]), static_cast<float>(w[r][i * w_stride]), acc[r]);
      }
    }
  } else {
#pragma unroll 2
    for (int64_t i = int64_t(lane) * VEC; i < n; i += int64_t(kWarpSize) * VEC) {
      Pack<T, VEC> pu[R], pw[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        pu[r] = *reinterpret_cast<const Pack<T, VEC>*>(u[r] + i);
        pw[r] = *reinterpret_cast<const Pack<T, VEC>*>(w[r] + i);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r] = fmaf(static_cast<float>(pu[r].v[v]), static_cast<float>(pw[r].v[v]), acc[r]);
      }
    }
  }
}

// a[s, i] = act(x[s / k] . w1[e][gate row], x[s / k] . w1[e][up row]) for slot s = blockIdx.x, e = ids[s], and
// activation column i = blockIdx.y * kWarpsPerBlock + warp. x [T, H] contiguous; w1 [E, M1, H] strides
// (s1e, s1r, s1c); b1 [E, M1] float or nullptr; ids [T*k] int32 or int64 (I); a [T*k, M2] contiguous. GATED: gate
// and up rows in one pass.
template <typename T, typename I, int VEC, bool GATED>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
decode_up_kernel(const T* __restrict__ x, const T* __restrict__ w1, int64_t s1e, int64_t s1r, int64_t s1c,
                 const float* __restrict__ b1, const I* __restrict__ ids, act::ActSpec spec, int64_t H, int64_t M1,
                 int64_t M2, int64_t k, T* __restrict__ a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t s = blockIdx.x;
  const int64_t i = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= M2) return;  // whole warps: no barrier below
  const int64_t e = ids[s];
  const T* x_row = x + (s / k) * H;
  const T* w_expert = w1 + e * s1e;
  float gate, up = 0.0f;
  if constexpr (GATED) {
    const T* const xs[2] = {x_row, x_row};
    const T* const rows[2] = {w_expert + act::gate_column(spec, i) * s1r, w_expert + act::up_column(spec, i, M2) * s1r};
    float acc[2];
    lane_dots<T, VEC, 2>(xs, rows, s1c, H, lane, acc);
    gate = warp_sum(acc[0]);
    up = warp_sum(acc[1]);
  } else {
    const T* const xs[1] = {x_row};
    const T* const rows[1] = {w_expert + i * s1r};
    float acc[1];
    lane_dots<T, VEC, 1>(xs, rows, s1c, H, lane, acc);
    gate = warp_sum(acc[0]);
  }
  if (lane == 0) {
    const float* bias = b1 != nullptr ? b1 + e * M1 : nullptr;
    a[s * M2 + i] = static_cast<T>(decode_act_column<T>(spec, gate, up, bias, i, M2));
  }
}

// Adds slots j0 .. j0+R-1 of token t to acc (j ascending): their rows' dot products in one pass, then each
// rounded to T as the grouped path stores its second GEMM's output, weighted and summed as its combine does.
template <typename T, typename W, typename I, int VEC, int R>
__device__ __forceinline__ float add_slots(float acc, const T* __restrict__ a, const T* __restrict__ w2, int64_t s2e,
                                           int64_t s2r, int64_t s2c, const float* __restrict__ b2,
                                           const W* __restrict__ weights, const I* __restrict__ ids, float scale,
                                           int64_t H, int64_t M2, int64_t s0, int64_t c, int lane) {
  const T* a_rows[R];
  const T* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    a_rows[r] = a + (s0 + r) * M2;
    rows[r] = w2 + static_cast<int64_t>(ids[s0 + r]) * s2e + c * s2r;
  }
  float dots[R];
  lane_dots<T, VEC, R>(a_rows, rows, s2c, M2, lane, dots);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float y = static_cast<float>(static_cast<T>(warp_sum(dots[r])));
    acc = add_rn(acc, combine_term(y, weights, s0 + r, scale, b2, H, ids, c));
  }
  return acc;
}

constexpr int kSlotsPerStep = 4;  // slots of a token whose down-projection rows are read in one pass

// out[t, c] = sum_j (w[s] * scale) * (a[s] . w2[e][c] (+ b2[e, c])), s = t*k + j, e = ids[s], for token
// t = blockIdx.x and output column c = blockIdx.y * kWarpsPerBlock + warp. a [T*k, M2] contiguous; w2 [E, H, M2]
// strides (s2e, s2r, s2c); b2 [E, H] float or nullptr; weights [T*k] float or T (W), ids [T*k] int32 or int64 (I);
// out [T, H] contiguous.
template <typename T, typename W, typename I, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
decode_down_kernel(const T* __restrict__ a, const T* __restrict__ w2, int64_t s2e, int64_t s2r, int64_t s2c,
                   const float* __restrict__ b2, const W* __restrict__ weights, const I* __restrict__ ids,
                   float scale, int64_t H, int64_t M2, int64_t k, T* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t t = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (c >= H) return;
  float acc = 0.0f;
  int64_t j = 0;
  for (; j + kSlotsPerStep <= k; j += kSlotsPerStep) {
    acc = add_slots<T, W, I, VEC, kSlotsPerStep>(acc, a, w2, s2e, s2r, s2c, b2, weights, ids, scale, H, M2,
                                                 t * k + j, c, lane);
  }
  const int64_t s0 = t * k + j;
  switch (k - j) {  // the last 1-3 slots, without reading rows for slots that do not exist
    case 3:
      acc = add_slots<T, W, I, VEC, 3>(acc, a, w2, s2e, s2r, s2c, b2, weights, ids, scale, H, M2, s0, c, lane);
      break;
    case 2:
      acc = add_slots<T, W, I, VEC, 2>(acc, a, w2, s2e, s2r, s2c, b2, weights, ids, scale, H, M2, s0, c, lane);
      break;
    case 1:
      acc = add_slots<T, W, I, VEC, 1>(acc, a, w2, s2e, s2r, s2c, b2, weights, ids, scale, H, M2, s0, c, lane);
      break;
    default: break;
  }
  if (lane == 0) out[t * H + c] = static_cast<T>(acc);
}

// 16-byte loads along the reduced dimension: unit stride, every row start and the batch stride aligned.
bool vector_rows(const at::Tensor& w, int64_t reduced, int64_t elems) {
  return w.stride(2) == 1 && reduced % elems == 0 && w.stride(1) % elems == 0 && w.stride(0) % elems == 0 &&
         reinterpret_cast<std::uintptr_t>(w.data_ptr()) % 16 == 0;
}

template <typename T, typename W, typename I>
void launch(const decode::Call& c) {
  constexpr int kVec = vec_elems<T>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kWarpsPerBlock * kWarpSize);
  const float* b1 = c.b1.defined() ? c.b1.data_ptr<float>() : nullptr;
  const float* b2 = c.b2.defined() ? c.b2.data_ptr<float>() : nullptr;
  // x and a are contiguous and fresh allocations: aligned whenever their row length is a multiple of kVec
  const dim3 up_grid(static_cast<unsigned>(c.N), static_cast<unsigned>(ceil_div(c.M2, kWarpsPerBlock)));
  const bool up_vec = vector_rows(c.w1, c.H, kVec) && c.H % kVec == 0 &&
                      reinterpret_cast<std::uintptr_t>(c.x.data_ptr()) % 16 == 0;
  auto up = c.spec.gated ? (up_vec ? decode_up_kernel<T, I, kVec, true> : decode_up_kernel<T, I, 1, true>)
                         : (up_vec ? decode_up_kernel<T, I, kVec, false> : decode_up_kernel<T, I, 1, false>);
  up<<<up_grid, block, 0, stream>>>(c.x.data_ptr<T>(), c.w1.data_ptr<T>(), c.w1.stride(0), c.w1.stride(1),
                                    c.w1.stride(2), b1, c.ids.data_ptr<I>(), c.spec, c.H, c.M1, c.M2, c.k,
                                    c.a.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 down_grid(static_cast<unsigned>(c.T), static_cast<unsigned>(ceil_div(c.H, kWarpsPerBlock)));
  const bool down_vec = vector_rows(c.w2, c.M2, kVec) && c.M2 % kVec == 0;
  auto down = down_vec ? decode_down_kernel<T, W, I, kVec> : decode_down_kernel<T, W, I, 1>;
  down<<<down_grid, block, 0, stream>>>(c.a.data_ptr<T>(), c.w2.data_ptr<T>(), c.w2.stride(0), c.w2.stride(1),
                                        c.w2.stride(2), b2, c.weights.data_ptr<W>(), c.ids.data_ptr<I>(),
                                        c.scale, c.H, c.M2, c.k, c.out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

namespace decode {

void run_cuda(const Call& call) {  // sizes checked by check_call (csrc/decode_experts.cpp)
  MOE_DISPATCH_FLOAT_HALF_BF16(call.x.scalar_type(), "x", [&] {
    dispatch_routing<scalar_t>(call, [&](auto weight_tag, auto id_tag) {
      cuda::launch<scalar_t, decltype(weight_tag), decltype(id_tag)>(call);
    });
  });
}

}  // namespace decode
}  // namespace moe_kernels
