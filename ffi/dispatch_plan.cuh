// CUDA kernels of jax_router_dispatch_plan: the plan by counting, without a sort
// (docs/semantics.md#dispatch; the CPU handler in dispatch_cpu.cc runs the same steps).
//
// The flat (token, slot) entries form blocks of kPlanChunk; CUDA block b takes block b.
//   1. plan_count_kernel: each block counts its entries per expert -> counts[b, e]; the grid
//      also fills source with -1 (empty rows), which step 3 then overwrites where kept.
//   2. plan_scan_kernel: one warp per expert scans counts[:, e] over blocks (exclusive, in
//      place: counts[b, e] becomes block b's first rank in expert e) and writes
//      tokens_per_expert[e], the total.
//   3. plan_rank_kernel: each block computes the expert starts (an exclusive scan of
//      tokens_per_expert, or e * C), then ranks its entries in flat order: its warps own
//      consecutive sub-chunks, count them per expert, scan those counts across warps from the
//      block's first ranks, and walk their sub-chunks again, lanes holding the same expert
//      (__match_any_sync) ranked by lane. positions[i] and source[row] follow; every kept row
//      is written exactly once.
// Every count is an integer, so the result does not depend on the order of the adds (shared-
// memory atomics included): the plan is exact and repeatable.
//
// Shared memory: the rank kernel holds the expert starts and one [E] count table per warp in
// 48 KiB (no opt-in), taking fewer warps for larger E; past about 6000 experts it runs one warp
// per block with its tables in the global workspace (plan_starts_kernel writes the starts
// there). The count kernel likewise falls back to global atomics past 12288 experts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_warp.cuh"
#include "dispatch_math.h"

namespace jax_router {
namespace cuda {

constexpr int kPlanChunk = static_cast<int>(dispatch::kPlanChunk);
constexpr int kPlanCountThreads = 1024;
constexpr int kPlanScanThreads = 256;
constexpr size_t kPlanSmemBudget = 48 * 1024;
static_assert(kPlanChunk % kPlanCountThreads == 0, "every lane runs the same steps");

struct PlanArgs {
  const void* ids = nullptr;
  int64_t n = 0;  // flat entries
  int32_t experts = 0;
  int64_t capacity = dispatch::kNoCapacity;
  int64_t blocks = 0;
  int32_t* tokens_per_expert = nullptr;
  int32_t* positions = nullptr;
  int32_t* source = nullptr;
  int32_t* counts = nullptr;  // workspace [blocks, E]
  int32_t* starts = nullptr;  // workspace [E], after the counts
};

// The expert of flat entry i, or E (dropped) for an id outside [0, E) or i past the end.
template <typename I>
__device__ __forceinline__ int32_t plan_expert(const PlanArgs& a, int64_t i) {
  return i < a.n ? dispatch::expert_or_drop(static_cast<int64_t>(static_cast<const I*>(a.ids)[i]),
                                            a.experts)
                 : a.experts;
}

__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t t = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// The lowest lane of a __match_any_sync group: the one that speaks for it.
__device__ __forceinline__ int group_leader(unsigned peers) { return __ffs(peers) - 1; }

// 1. counts[b, e]: warp-aggregated adds (one per group of lanes holding the same expert) into
// a shared table, or straight into the block's global row when E does not fit. Also
// source := -1 over the whole grid (rows is R, which capacity makes independent of n).
template <typename I, bool kShared>
__global__ void __launch_bounds__(kPlanCountThreads) plan_count_kernel(PlanArgs a, int64_t rows) {
  extern __shared__ int32_t plan_smem[];
  const int32_t E = a.experts;
  const int64_t b = blockIdx.x;
  for (int64_t r = b * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    a.source[r] = -1;
  }
  int32_t* table = kShared ? plan_smem : a.counts + b * E;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) table[e] = 0;
  __syncthreads();  // orders the zeroing before any warp's adds
  const int lane = threadIdx.x & 31;
  for (int64_t i = b * kPlanChunk + threadIdx.x; i < (b + 1) * kPlanChunk; i += blockDim.x) {
    const int32_t e = plan_expert<I>(a, i);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e < E && lane == group_leader(peers)) atomicAdd(&table[e], __popc(peers));
  }
  if (kShared) {
    __syncthreads();  // orders every warp's adds before the table is copied out
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x) a.counts[b * E + e] = table[e];
  }
}

// 2. One warp per expert: exclusive scan of counts[:, e] over the blocks, 32 blocks a step.
__global__ void __launch_bounds__(kPlanScanThreads) plan_scan_kernel(PlanArgs a) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (e >= a.experts) return;  // whole warps: e is the same across a warp
  int32_t carry = 0;
  for (int64_t b0 = 0; b0 < a.blocks; b0 += 32) {
    const int64_t b = b0 + lane;
    int32_t* at = a.counts + b * a.experts + e;
    const int32_t v = b < a.blocks ? *at : 0;
    const int32_t incl = warp_inclusive_scan(v, lane);
    if (b < a.blocks) *at = carry + incl - v;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0) a.tokens_per_expert[e] = carry;
}

// starts[e] = the exclusive prefix sum of tokens_per_expert (no capacity) or e * C, by a whole
// block (every thread must call it); warp_totals is 32 ints of shared memory. The caller
// orders the writes before any other thread reads starts.
__device__ __forceinline__ void block_expert_starts(const PlanArgs& a, int32_t* starts,
                                                    int32_t* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (a.capacity >= 0) {  // the same branch for the whole block
    for (int32_t e = threadIdx.x; e < a.experts; e += blockDim.x) {
      starts[e] = dispatch::expert_start(e, 0, a.capacity);
    }
    return;
  }
  int32_t carry = 0;
  for (int32_t e0 = 0; e0 < a.experts; e0 += blockDim.x) {
    const int32_t e = e0 + threadIdx.x;
    const int32_t v = e < a.experts ? a.tokens_per_expert[e] : 0;
    const int32_t incl = warp_inclusive_scan(v, lane);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();  // orders the warp totals before every thread reads them
    int32_t before = carry, tile = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      tile += warp_totals[w];
    }
    if (e < a.experts) starts[e] = dispatch::expert_start(e, before + incl - v, a.capacity);
    carry += tile;
    __syncthreads();  // orders this tile's reads of warp_totals before the next tile's writes
  }
}

// Global-table path only: the starts into the workspace, by one block.
__global__ void __launch_bounds__(1024) plan_starts_kernel(PlanArgs a) {
  __shared__ int32_t warp_totals[32];
  block_expert_starts(a, a.starts, warp_totals);
}

// 3. positions and source. Shared path: blockDim.x / 32 warps, dynamic shared memory
// [E starts | 32 warp totals | warps x E counts]. Global path: one warp, its table the
// block's row of counts (block b's first ranks, from step 2) and the starts from
// plan_starts_kernel.
template <typename I, bool kShared>
__global__ void __launch_bounds__(1024) plan_rank_kernel(PlanArgs a) {
  extern __shared__ int32_t plan_smem[];
  const int32_t E = a.experts;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int32_t* starts = a.starts;
  int32_t* table = a.counts + b * E;
  if (kShared) {
    int32_t* s_starts = plan_smem;
    table = plan_smem + E + 32;
    block_expert_starts(a, s_starts, plan_smem + E);
    for (int64_t x = threadIdx.x; x < static_cast<int64_t>(warps) * E; x += blockDim.x) {
      table[x] = 0;
    }
    starts = s_starts;
  }
  __syncthreads();  // orders the starts and the zeroed tables before the warps use them
  const int sub = kPlanChunk / warps;  // a multiple of 32: warps is a power of two <= 32
  const int64_t i0 = b * kPlanChunk + static_cast<int64_t>(warp) * sub;
  int32_t* mine = kShared ? table + static_cast<int64_t>(warp) * E : table;
  if (kShared) {
    // this warp's counts per expert
    for (int s = 0; s < sub; s += 32) {
      const int32_t e = plan_expert<I>(a, i0 + s + lane);
      const unsigned peers = __match_any_sync(kFullMask, e);
      if (e < E && lane == group_leader(peers)) mine[e] += __popc(peers);
      __syncwarp();  // orders this step's adds before the next step's (same table)
    }
    __syncthreads();  // orders every warp's counts before the scan across warps
    // exclusive scan across warps, per expert, from the block's first ranks
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
      int32_t run = a.counts[b * E + e];
      for (int w = 0; w < warps; ++w) {
        const int32_t t = table[static_cast<int64_t>(w) * E + e];
        table[static_cast<int64_t>(w) * E + e] = run;
        run += t;
      }
    }
    __syncthreads();  // orders the scanned tables before the warps rank from them
  }
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int s = 0; s < sub; s += 32) {
    const int64_t i = i0 + s + lane;
    const int32_t e = plan_expert<I>(a, i);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = group_leader(peers);
    int32_t first = 0;
    if (e < E && lane == leader) {  // the leader alone reads and advances the group's count
      first = mine[e];
      mine[e] = first + __popc(peers);
    }
    const int32_t rank = __shfl_sync(kFullMask, first, leader) + __popc(peers & lanes_before);
    __syncwarp();  // orders this step's count updates before the next step's leaders read them
    if (i < a.n) {
      const int32_t row = e < E ? dispatch::plan_row(starts[e], rank, a.capacity) : -1;
      a.positions[i] = row;
      if (row >= 0) a.source[row] = static_cast<int32_t>(i);
    }
  }
}

// Warps per block of the rank kernel with shared tables (a power of two), or 0 when even one
// warp's tables do not fit: the global path.
inline int PlanRankWarps(int64_t E) {
  for (int w = 32; w >= 1; w >>= 1) {
    if (static_cast<size_t>(E + 32 + w * E) * sizeof(int32_t) <= kPlanSmemBudget) return w;
  }
  return 0;
}

template <typename I>
cudaError_t LaunchPlanT(const PlanArgs& a, int64_t rows, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(a.blocks);
  const size_t count_smem = static_cast<size_t>(a.experts) * sizeof(int32_t);
  if (count_smem <= kPlanSmemBudget) {
    plan_count_kernel<I, true><<<grid, kPlanCountThreads, count_smem, s>>>(a, rows);
  } else {
    plan_count_kernel<I, false><<<grid, kPlanCountThreads, 0, s>>>(a, rows);
  }
  const int64_t scan_blocks = (static_cast<int64_t>(a.experts) * 32 + kPlanScanThreads - 1) /
                              kPlanScanThreads;
  plan_scan_kernel<<<static_cast<unsigned>(scan_blocks), kPlanScanThreads, 0, s>>>(a);
  const int warps = PlanRankWarps(a.experts);
  if (warps > 0) {
    const size_t smem = static_cast<size_t>(a.experts + 32 + warps * a.experts) * sizeof(int32_t);
    plan_rank_kernel<I, true><<<grid, warps * 32, smem, s>>>(a);
  } else {
    plan_starts_kernel<<<1, 1024, 0, s>>>(a);
    plan_rank_kernel<I, false><<<grid, 32, 0, s>>>(a);
  }
  return cudaGetLastError();
}

// The whole plan on stream s: the three kernels, or, when there are no entries, two memsets
// (tokens_per_expert := 0, every row empty: source := -1, all bytes 0xFF).
inline cudaError_t LaunchPlan(const PlanArgs& a, It id_dt, int64_t rows, cudaStream_t s) {
  if (a.n == 0) {
    cudaError_t e = cudaMemsetAsync(a.tokens_per_expert, 0, a.experts * sizeof(int32_t), s);
    if (e == cudaSuccess && rows > 0) e = cudaMemsetAsync(a.source, 0xFF, rows * sizeof(int32_t), s);
    return e;
  }
  switch (id_dt) {
    case It::kS16:
      return LaunchPlanT<int16_t>(a, rows, s);
    case It::kS64:
      return LaunchPlanT<int64_t>(a, rows, s);
    default:
      return LaunchPlanT<int32_t>(a, rows, s);
  }
}

}  // namespace cuda
}  // namespace jax_router
