// CUDA kernels of the dispatch ops of moe_kernels: plan (stable counting sort of slots by expert),
// gather_rows, scatter_rows_sum, combine and combine_backward. Registered for the CUDA dispatch key.
//
// Conventions (see moe_kernels/reference.py): slot s = t * k + j is token t's j-th choice; ids [T,k] int32;
// routing weights [T,k] float32; a "sorted position" p indexes the rows of the expert-sorted activations.
// Every kernel runs on the current CUDA stream; no kernel needs a host synchronisation. Row offsets are
// computed in int64 (T*k*H may exceed 2^31 elements).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda_utils.cuh"

namespace moe_kernels {
namespace cuda {
namespace {

// ----------------------------------------------------------------------------------------------------
// plan
// ----------------------------------------------------------------------------------------------------
//
// The slots are cut into C chunks of `chunk_size` consecutive slots. A matrix of cells [E, C] (expert-major)
// holds, per expert and chunk, first the number of that expert's slots in the chunk, then (after one
// exclusive scan over the flattened matrix) the sorted position of the chunk's first slot of that expert.
// Because the scan runs expert-major, cell (e, 0) after the scan is expert e's offset, and the position of
// a slot = its cell's base + the number of earlier slots of the same expert within its chunk: a stable
// order, computed without atomics, so the plan is deterministic. C is chosen so the matrix stays small
// (at most kMaxPlanCells cells) whatever E is, so thousands of experts work.

constexpr int64_t kMaxPlanCells = int64_t(1) << 22;  // 16 MiB of int32 cells at most
constexpr int64_t kMinPlanChunk = 256;               // slots per chunk (a multiple of 32)
constexpr int kPlanWarpsPerBlock = 4;
constexpr int kScanThreads = 512;
constexpr int kScanItemsPerThread = 8;
constexpr int64_t kScanTile = int64_t(kScanThreads) * kScanItemsPerThread;

// Counts the slots of each expert in each chunk.
//   ids         [num_slots] int32 (flattened [T,k], contiguous), values in [0, num_experts)
//   cell_counts [num_experts, num_chunks] int32, zero on entry; cell (e, c) = slots of expert e in chunk c
// Launch: one warp per chunk, kPlanWarpsPerBlock warps per block, grid = ceil(num_chunks / warps per block).
// Each warp walks its chunk 32 slots at a time; lanes with the same expert find each other with
// __match_any_sync and the highest such lane adds the group's size. Only this warp touches column c.
__global__ void plan_count_kernel(const int* __restrict__ ids, int64_t num_slots, int num_experts,
                                  int64_t chunk_size, int64_t num_chunks, int* __restrict__ cell_counts) {
  const int64_t chunk = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (chunk >= num_chunks) return;  // uniform across the warp
  const int lane = threadIdx.x % kWarpSize;
  const int64_t begin = chunk * chunk_size;
  const int64_t end = min(begin + chunk_size, num_slots);
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t slot = base + lane;
    int expert = slot < end ? ids[slot] : -1;
    CUDA_KERNEL_ASSERT(slot >= end || (expert >= 0 && expert < num_experts));
    if (expert >= num_experts) expert = -1;  // out of range (asserts compiled out): leave the slot out
    const unsigned group = __match_any_sync(kFullMask, expert);
    const int leader = kWarpSize - 1 - __clz(group);
    if (expert >= 0 && lane == leader) cell_counts[int64_t(expert) * num_chunks + chunk] += __popc(group);
    __syncwarp();  // orders this step's cell update before the next step's
  }
}

// Sum of an int over the block (blockDim.x == kScanThreads); every thread gets the total.
__device__ __forceinline__ int block_sum_int(int value, int* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < int(blockDim.x / kWarpSize); ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Exclusive scan of one int per thread over the block; `block_total` receives the block's sum.
// `scratch` holds 32 ints of shared memory; the call ends with a barrier so it can be reused.
__device__ __forceinline__ int block_exclusive_scan_int(int value, int* scratch, int& block_total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int warp_total = lane < num_warps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int up = __shfl_up_sync(kFullMask, warp_total, offset);
      if (lane >= offset) warp_total += up;
    }
    scratch[lane] = warp_total;  // inclusive scan of the warp totals
  }
  __syncthreads();
  const int warp_prefix = warp > 0 ? scratch[warp - 1] : 0;
  block_total = scratch[num_warps - 1];
  __syncthreads();
  return warp_prefix + inclusive - value;
}

// Phase 1 of the cell scan: the sum of each tile of kScanTile cells.
//   cells [num_cells] int32; tile_sums [num_tiles] int32.
// Launch: one block of kScanThreads threads per tile; thread i reads kScanItemsPerThread consecutive cells.
__global__ void scan_tile_sums_kernel(const int* __restrict__ cells, int64_t num_cells, int* __restrict__ tile_sums) {
  __shared__ int scratch[kWarpSize];
  const int64_t first = int64_t(blockIdx.x) * kScanTile + int64_t(threadIdx.x) * kScanItemsPerThread;
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kScanItemsPerThread; ++i) sum += first + i < num_cells ? cells[first + i] : 0;
  sum = block_sum_int(sum, scratch);
  if (threadIdx.x == 0) tile_sums[blockIdx.x] = sum;
}

// Phase 2: exclusive scan of the tile sums in place. Launch: one block of kScanThreads threads, which walks
// the tiles kScanThreads at a time carrying the running total.
__global__ void scan_tile_offsets_kernel(int* __restrict__ tile_sums, int64_t num_tiles) {
  __shared__ int scratch[kWarpSize];
  int carry = 0;
  for (int64_t base = 0; base < num_tiles; base += blockDim.x) {
    const int64_t tile = base + threadIdx.x;
    const int value = tile < num_tiles ? tile_sums[tile] : 0;
    int chunk_total;
    const int exclusive = block_exclusive_scan_int(value, scratch, chunk_total);
    if (tile < num_tiles) tile_sums[tile] = carry + exclusive;
    carry += chunk_total;
  }
}

// Phase 3: exclusive scan of the cells in place, plus the expert offsets.
//   cells          [num_experts, num_chunks] int32: counts on entry, sorted base positions on exit
//   tile_offsets   [num_tiles] int32 (phase 2's output), or nullptr when there is one tile
//   expert_offsets [num_experts + 1] int32: cell (e, 0) after the scan, and num_slots at the end
// Launch: one block of kScanThreads threads per tile, kScanItemsPerThread consecutive cells per thread.
__global__ void scan_cells_kernel(int* __restrict__ cells, int64_t num_cells, const int* __restrict__ tile_offsets,
                                  int64_t num_chunks, int num_experts, int num_slots, int* __restrict__ expert_offsets) {
  __shared__ int scratch[kWarpSize];
  const int64_t first = int64_t(blockIdx.x) * kScanTile + int64_t(threadIdx.x) * kScanItemsPerThread;
  int items[kScanItemsPerThread];
  int thread_sum = 0;
#pragma unroll
  for (int i = 0; i < kScanItemsPerThread; ++i) {
    items[i] = first + i < num_cells ? cells[first + i] : 0;
    thread_sum += items[i];
  }
  int block_total;
  int running = block_exclusive_scan_int(thread_sum, scratch, block_total);
  if (tile_offsets != nullptr) running += tile_offsets[blockIdx.x];
#pragma unroll
  for (int i = 0; i < kScanItemsPerThread; ++i) {
    const int64_t cell = first + i;
    if (cell < num_cells) {
      cells[cell] = running;
      if (cell % num_chunks == 0) expert_offsets[cell / num_chunks] = running;
    }
    running += items[i];
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) expert_offsets[num_experts] = num_slots;
}

// Writes each slot's sorted position and its inverse.
//   ids            [num_slots] int32
//   cell_cursor    [num_experts, num_chunks] int32: base positions from the scan; advanced as slots are placed
//   slot_positions [num_slots] int32: sorted position of each slot
//   sorted_slots   [num_slots] int32: slot at each sorted position
// Launch: as plan_count_kernel (one warp per chunk). A slot's position = its cell's cursor + the number of
// lower lanes of this step with the same expert; the group's highest lane then advances the cursor.
__global__ void plan_scatter_kernel(const int* __restrict__ ids, int64_t num_slots, int num_experts,
                                    int64_t chunk_size, int64_t num_chunks, int* __restrict__ cell_cursor,
                                    int* __restrict__ slot_positions, int* __restrict__ sorted_slots) {
  const int64_t chunk = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (chunk >= num_chunks) return;
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = chunk * chunk_size;
  const int64_t end = min(begin + chunk_size, num_slots);
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t slot = base + lane;
    int expert = slot < end ? ids[slot] : -1;
    if (expert >= num_experts) expert = -1;
    const unsigned group = __match_any_sync(kFullMask, expert);
    const int leader = kWarpSize - 1 - __clz(group);
    int* cursor = expert >= 0 ? cell_cursor + int64_t(expert) * num_chunks + chunk : nullptr;
    const int position = expert >= 0 ? *cursor + __popc(group & lower_lanes) : 0;
    __syncwarp();  // every lane has read its cursor before the leader advances it
    if (expert >= 0) {
      if (lane == leader) *cursor += __popc(group);
      slot_positions[slot] = position;
      sorted_slots[position] = static_cast<int>(slot);
    }
    __syncwarp();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(const at::Tensor& ids, int64_t num_experts) {
  check_cuda(ids, "ids");
  check_dtype(ids, at::kInt, "ids");
  TORCH_CHECK(ids.dim() == 2, "ids must be 2-D [T, k], got shape ", ids.sizes());
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(num_experts < std::numeric_limits<int>::max(), "num_experts too large: ", num_experts);
  const int64_t num_slots = ids.numel();
  TORCH_CHECK(num_slots < std::numeric_limits<int>::max(), "ids has too many slots for int32 positions: ",
              num_slots);
  c10::cuda::CUDAGuard guard(ids.device());
  const at::Tensor flat_ids = ids.contiguous().view(-1);
  const auto int_options = ids.options().dtype(at::kInt);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, int_options);
  at::Tensor sorted_slots = at::empty({num_slots}, int_options);
  at::Tensor slot_positions = at::empty({num_slots}, int_options);
  if (num_slots == 0) {
    expert_offsets.zero_();
    return {expert_offsets, sorted_slots, slot_positions};
  }

  // Chunks: at least kMinPlanChunk slots each, and few enough that E * C <= kMaxPlanCells.
  const int64_t max_chunks = std::max<int64_t>(1, kMaxPlanCells / num_experts);
  int64_t chunk_size = std::max<int64_t>(kMinPlanChunk, ceil_div(num_slots, max_chunks));
  chunk_size = ceil_div(chunk_size, kWarpSize) * kWarpSize;
  const int64_t num_chunks = ceil_div(num_slots, chunk_size);
  const int64_t num_cells = num_experts * num_chunks;
  const int64_t num_tiles = ceil_div(num_cells, kScanTile);

  at::Tensor cells = at::zeros({num_cells}, int_options);
  at::Tensor tile_sums = num_tiles > 1 ? at::empty({num_tiles}, int_options) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int plan_threads = kPlanWarpsPerBlock * kWarpSize;
  const int64_t plan_blocks = ceil_div(num_chunks, kPlanWarpsPerBlock);
  const int* ids_ptr = flat_ids.data_ptr<int>();
  int* cells_ptr = cells.data_ptr<int>();

  plan_count_kernel<<<static_cast<unsigned>(plan_blocks), plan_threads, 0, stream>>>(ids_ptr, num_slots, int(num_experts), chunk_size,
                                                              num_chunks, cells_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_tiles > 1) {
    scan_tile_sums_kernel<<<static_cast<unsigned>(num_tiles), kScanThreads, 0, stream>>>(cells_ptr, num_cells, tile_sums.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_tile_offsets_kernel<<<1, kScanThreads, 0, stream>>>(tile_sums.data_ptr<int>(), num_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_cells_kernel<<<static_cast<unsigned>(num_tiles), kScanThreads, 0, stream>>>(
      cells_ptr, num_cells, num_tiles > 1 ? tile_sums.data_ptr<int>() : nullptr, num_chunks, int(num_experts),
      int(num_slots), expert_offsets.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_scatter_kernel<<<static_cast<unsigned>(plan_blocks), plan_threads, 0, stream>>>(ids_ptr, num_slots, int(num_experts), chunk_size,
                                                                num_chunks, cells_ptr, slot_positions.data_ptr<int>(),
                                                                sorted_slots.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {expert_offsets, sorted_slots, slot_positions};
}

// ----------------------------------------------------------------------------------------------------
// gather_rows
// ----------------------------------------------------------------------------------------------------

// out[p, :] = x[sorted_slots[p] / k, :], copied as raw units (16, 8, 4, 2 or 1 bytes) so one kernel serves
// every dtype.
//   x            [T, units_per_row] unit_t, contiguous
//   sorted_slots [num_rows] int32, values in [0, T*k)
//   out          [num_rows, units_per_row] unit_t, contiguous
// Launch: block (threads_per_row, rows_per_block); grid-stride over rows in steps of rows_per_block.
template <typename unit_t>
__global__ void gather_rows_kernel(const unit_t* __restrict__ x, const int* __restrict__ sorted_slots, int k,
                                   int64_t num_rows, int64_t units_per_row, unit_t* __restrict__ out) {
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < num_rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int slot = sorted_slots[row];
    CUDA_KERNEL_ASSERT(slot >= 0);
    const int64_t token = slot / k;
    const unit_t* src = x + token * units_per_row;
    unit_t* dst = out + row * units_per_row;
    for (int64_t unit = threadIdx.x; unit < units_per_row; unit += blockDim.x) dst[unit] = src[unit];
  }
}

// Block shape for the row kernels that give each row a group of threads: threads_per_row a power of two
// covering the row's vectors (at most 256), rows_per_block filling 256 threads.
inline dim3 row_group_block(int64_t vectors_per_row) {
  int threads_per_row = 1;
  while (threads_per_row < vectors_per_row && threads_per_row < 256) threads_per_row *= 2;
  return dim3(threads_per_row, 256 / threads_per_row);
}

template <typename unit_t>
void launch_gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k, at::Tensor& out,
                        int64_t row_bytes, cudaStream_t stream) {
  const int64_t units_per_row = row_bytes / int64_t(sizeof(unit_t));
  const int64_t num_rows = out.size(0);
  const dim3 block = row_group_block(units_per_row);
  const int64_t grid = capped_grid(ceil_div(num_rows, block.y));
  gather_rows_kernel<unit_t><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      static_cast<const unit_t*>(x.data_ptr()), sorted_slots.data_ptr<int>(), int(k), num_rows, units_per_row,
      static_cast<unit_t*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The checks gather_rows and scatter_rows_sum share: 2-D rows and a 1-D int32 index [T*k] on one CUDA device,
// k >= 1 (metadata only: the index values are trusted, see csrc/cpu/common.h's check_index_range).
void check_row_op_args(const at::Tensor& rows, const char* rows_name, const at::Tensor& index, const char* index_name,
                       int64_t k) {
  check_cuda_same_device({{rows, rows_name}, {index, index_name}});
  check_dtype(index, at::kInt, index_name);
  TORCH_CHECK(rows.dim() == 2, rows_name, " must be 2-D, got shape ", rows.sizes());
  TORCH_CHECK(index.dim() == 1, index_name, " must be 1-D [T*k], got shape ", index.sizes());
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  check_row_op_args(x, "x", sorted_slots, "sorted_slots", k);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor slots_c = sorted_slots.contiguous().view(-1);
  at::Tensor out = at::empty({slots_c.numel(), x.size(1)}, x.options());
  const int64_t row_bytes = x.size(1) * x_c.element_size();
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto address = reinterpret_cast<std::uintptr_t>(x_c.data_ptr());  // out is freshly allocated: aligned
  if (row_bytes % 16 == 0 && address % 16 == 0) {
    launch_gather_rows<uint4>(x_c, slots_c, k, out, row_bytes, stream);
  } else if (row_bytes % 8 == 0 && address % 8 == 0) {
    launch_gather_rows<uint2>(x_c, slots_c, k, out, row_bytes, stream);
  } else if (row_bytes % 4 == 0 && address % 4 == 0) {
    launch_gather_rows<uint32_t>(x_c, slots_c, k, out, row_bytes, stream);
  } else if (row_bytes % 2 == 0 && address % 2 == 0) {
    launch_gather_rows<uint16_t>(x_c, slots_c, k, out, row_bytes, stream);
  } else {
    launch_gather_rows<uint8_t>(x_c, slots_c, k, out, row_bytes, stream);
  }
  return out;
}

// ----------------------------------------------------------------------------------------------------
// combine / scatter_rows_sum
// ----------------------------------------------------------------------------------------------------

// out[t, :] = sum_j w[t, j] * rows[slot_positions[t*k + j], :], accumulated in float32 with j ascending;
// w = 1 when weights is nullptr (scatter_rows_sum). The product is rounded before the add (no FMA), the
// same arithmetic as the CPU kernels, so the result is deterministic and matches them bit for bit.
//   rows           [num_rows, vecs_per_row * VEC] scalar_t, contiguous (16-byte aligned rows when VEC > 1)
//   slot_positions [num_tokens * k] int32
//   weights        [num_tokens, k] float32 or nullptr
//   out            [num_tokens, vecs_per_row * VEC] scalar_t
// Launch: block (threads_per_row, rows_per_block); grid-stride over tokens; each thread owns VEC columns
// (one 128-bit access when VEC = 16 / sizeof(scalar_t)) per step.
template <typename scalar_t, int VEC>
__global__ void weighted_row_sum_kernel(const scalar_t* __restrict__ rows, const int* __restrict__ slot_positions,
                                        const float* __restrict__ weights, int64_t num_tokens, int k,
                                        int64_t vecs_per_row, scalar_t* __restrict__ out) {
  using pack_t = Pack<scalar_t, VEC>;
  const pack_t* row_packs = reinterpret_cast<const pack_t*>(rows);
  pack_t* out_packs = reinterpret_cast<pack_t*>(out);
  for (int64_t token = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; token < num_tokens;
       token += int64_t(gridDim.x) * blockDim.y) {
    const int64_t first_slot = token * k;
    for (int64_t vec = threadIdx.x; vec < vecs_per_row; vec += blockDim.x) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      for (int j = 0; j < k; ++j) {
        const int64_t position = slot_positions[first_slot + j];
        const pack_t pack = row_packs[position * vecs_per_row + vec];
        if (weights != nullptr) {
          const float w = weights[first_slot + j];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, static_cast<float>(pack.v[i])));
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], static_cast<float>(pack.v[i]));
        }
      }
      pack_t result;
#pragma unroll
      for (int i = 0; i < VEC; ++i) result.v[i] = static_cast<scalar_t>(acc[i]);
      out_packs[token * vecs_per_row + vec] = result;
    }
  }
}

template <typename scalar_t, int VEC>
void launch_weighted_row_sum(const at::Tensor& rows, const at::Tensor& slot_positions, const float* weights,
                             int64_t num_tokens, int64_t k, at::Tensor& out, cudaStream_t stream) {
  const int64_t vecs_per_row = rows.size(1) / VEC;
  const dim3 block = row_group_block(vecs_per_row);
  const int64_t grid = capped_grid(ceil_div(num_tokens, block.y));
  weighted_row_sum_kernel<scalar_t, VEC><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      rows.data_ptr<scalar_t>(), slot_positions.data_ptr<int>(), weights, num_tokens, int(k), vecs_per_row,
      out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared body of combine (weights given) and scatter_rows_sum (weights undefined).
at::Tensor weighted_row_sum(const at::Tensor& rows, const at::Tensor& slot_positions, const at::Tensor& weights,
                            int64_t num_tokens, int64_t k, const char* rows_name) {
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor positions_c = slot_positions.contiguous().view(-1);
  const at::Tensor weights_c = weights.defined() ? weights.contiguous() : at::Tensor();
  at::Tensor out = at::empty({num_tokens, rows.size(1)}, rows.options());
  if (out.numel() == 0) return out;
  if (k == 0) return out.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* weights_ptr = weights_c.defined() ? weights_c.data_ptr<float>() : nullptr;
  MOE_DISPATCH_FLOAT_HALF_BF16(rows.scalar_type(), rows_name, [&] {
    if (rows_16b_aligned(rows_c, rows.size(1))) {
      launch_weighted_row_sum<scalar_t, vec_elems<scalar_t>()>(rows_c, positions_c, weights_ptr, num_tokens, k, out,
                                                               stream);
    } else {
      launch_weighted_row_sum<scalar_t, 1>(rows_c, positions_c, weights_ptr, num_tokens, k, out, stream);
    }
  });
  return out;
}

at::Tensor scatter_rows_sum(const at::Tensor& grad_rows, const at::Tensor& slot_positions, int64_t k) {
  check_row_op_args(grad_rows, "grad_rows", slot_positions, "slot_positions", k);
  TORCH_CHECK(slot_positions.numel() % k == 0, "slot_positions has ", slot_positions.numel(),
              " entries, not a multiple of k = ", k);
  TORCH_CHECK(grad_rows.size(0) == slot_positions.numel(), "grad_rows must have T*k = ", slot_positions.numel(),
              " rows, got ", grad_rows.size(0));
  return weighted_row_sum(grad_rows, slot_positions, at::Tensor(), slot_positions.numel() / k, k, "grad_rows");
}

void check_combine_args(const at::Tensor& y_sorted, const at::Tensor& slot_positions, const at::Tensor& weights) {
  check_cuda_same_device({{y_sorted, "y_sorted"}, {slot_positions, "slot_positions"}, {weights, "weights"}});
  check_dtype(slot_positions, at::kInt, "slot_positions");
  check_dtype(weights, at::kFloat, "weights");
  TORCH_CHECK(y_sorted.dim() == 2, "y_sorted must be 2-D [T*k, H], got shape ", y_sorted.sizes());
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D [T, k], got shape ", weights.sizes());
  TORCH_CHECK(slot_positions.dim() == 1, "slot_positions must be 1-D [T*k], got shape ", slot_positions.sizes());
  TORCH_CHECK(slot_positions.numel() == weights.numel() && y_sorted.size(0) == weights.numel(), "weights ",
              weights.sizes(), ", slot_positions ", slot_positions.sizes(), " and y_sorted ", y_sorted.sizes(),
              " must hold T*k slots");
}

at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& slot_positions, const at::Tensor& weights) {
  check_combine_args(y_sorted, slot_positions, weights);
  return weighted_row_sum(y_sorted, slot_positions, weights, weights.size(0), weights.size(1), "y_sorted");
}

// ----------------------------------------------------------------------------------------------------
// combine_backward
// ----------------------------------------------------------------------------------------------------

// For each slot s = t*k + j with p = slot_positions[s]:
//   grad_y_sorted[p, :] = weights[t, j] * grad_out[t, :]                 (rounded to scalar_t)
//   grad_weights[t, j]  = sum_h grad_out[t, h] * y_sorted[p, h]           (float32, fixed reduction order)
//   grad_out       [num_tokens, vecs_per_row * VEC] scalar_t, contiguous
//   y_sorted       [num_rows, vecs_per_row * VEC] scalar_t, contiguous
//   slot_positions [num_tokens * k] int32; weights [num_tokens, k] float32
//   grad_y_sorted  [num_rows, vecs_per_row * VEC] scalar_t; grad_weights [num_tokens, k] float32
// Launch: one block per token (grid-stride), blockDim.x a multiple of 32 covering the row's vectors (<= 256);
// the dot products are reduced with block_sum, whose order depends only on blockDim, so the result is
// deterministic.
template <typename scalar_t, int VEC>
__global__ void combine_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y_sorted,
                                        const int* __restrict__ slot_positions, const float* __restrict__ weights,
                                        int64_t num_tokens, int k, int64_t vecs_per_row,
                                        scalar_t* __restrict__ grad_y_sorted, float* __restrict__ grad_weights) {
  using pack_t = Pack<scalar_t, VEC>;
  __shared__ float scratch[kWarpSize];
  const pack_t* grad_out_packs = reinterpret_cast<const pack_t*>(grad_out);
  const pack_t* y_packs = reinterpret_cast<const pack_t*>(y_sorted);
  pack_t* grad_y_packs = reinterpret_cast<pack_t*>(grad_y_sorted);
  for (int64_t token = blockIdx.x; token < num_tokens; token += gridDim.x) {
    for (int j = 0; j < k; ++j) {
      const int64_t slot = token * k + j;
      const int64_t position = slot_positions[slot];
      const float w = weights[slot];
      float dot = 0.f;
      for (int64_t vec = threadIdx.x; vec < vecs_per_row; vec += blockDim.x) {
        const pack_t g = grad_out_packs[token * vecs_per_row + vec];
        const pack_t y = y_packs[position * vecs_per_row + vec];
        pack_t grad_y;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g_i = static_cast<float>(g.v[i]);
          dot = __fadd_rn(dot, __fmul_rn(g_i, static_cast<float>(y.v[i])));
          grad_y.v[i] = static_cast<scalar_t>(__fmul_rn(w, g_i));
        }
        grad_y_packs[position * vecs_per_row + vec] = grad_y;
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) grad_weights[slot] = dot;
    }
  }
}

template <typename scalar_t, int VEC>
void launch_combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted, const at::Tensor& slot_positions,
                             const at::Tensor& weights, at::Tensor& grad_y_sorted, at::Tensor& grad_weights,
                             cudaStream_t stream) {
  const int64_t num_tokens = weights.size(0);
  const int64_t vecs_per_row = y_sorted.size(1) / VEC;
  const int threads = row_block_threads(vecs_per_row);
  const int64_t grid = capped_grid(num_tokens);
  combine_backward_kernel<scalar_t, VEC><<<static_cast<unsigned>(grid), threads, 0, stream>>>(
      grad_out.data_ptr<scalar_t>(), y_sorted.data_ptr<scalar_t>(), slot_positions.data_ptr<int>(),
      weights.data_ptr<float>(), num_tokens, int(weights.size(1)), vecs_per_row, grad_y_sorted.data_ptr<scalar_t>(),
      grad_weights.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                    const at::Tensor& slot_positions, const at::Tensor& weights) {
  check_combine_args(y_sorted, slot_positions, weights);
  check_cuda_same_device({{y_sorted, "y_sorted"}, {grad_out, "grad_out"}});
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == weights.size(0) && grad_out.size(1) == y_sorted.size(1),
              "grad_out must be [T, H] = [", weights.size(0), ", ", y_sorted.size(1), "], got shape ", grad_out.sizes());
  c10::cuda::CUDAGuard guard(y_sorted.device());
  const at::Tensor grad_out_c = grad_out.to(y_sorted.scalar_type()).contiguous();
  const at::Tensor y_c = y_sorted.contiguous();
  const at::Tensor positions_c = slot_positions.contiguous().view(-1);
  const at::Tensor weights_c = weights.contiguous();
  at::Tensor grad_y_sorted = at::empty_like(y_c);  // every row is some slot's (y_sorted has T*k rows)
  at::Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  if (weights.numel() == 0) return {grad_y_sorted, grad_weights};
  if (y_c.size(1) == 0) return {grad_y_sorted, grad_weights.zero_()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MOE_DISPATCH_FLOAT_HALF_BF16(y_sorted.scalar_type(), "y_sorted", [&] {
    if (rows_16b_aligned(y_c, y_c.size(1)) && rows_16b_aligned(grad_out_c, y_c.size(1))) {
      launch_combine_backward<scalar_t, vec_elems<scalar_t>()>(grad_out_c, y_c, positions_c, weights_c, grad_y_sorted,
                                                               grad_weights, stream);
    } else {
      launch_combine_backward<scalar_t, 1>(grad_out_c, y_c, positions_c, weights_c, grad_y_sorted, grad_weights,
                                           stream);
    }
  });
  return {grad_y_sorted, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("plan", &plan);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows_sum", &scatter_rows_sum);
  m.impl("combine", &combine);
  m.impl("combine_backward", &combine_backward);
}

}  // namespace cuda
}  // namespace moe_kernels
