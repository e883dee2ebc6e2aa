// CUDA kernels of jax_router_dispatch_plan: the plan by counting, without a sort
// (docs/semantics.md#dispatch; the CPU handler in dispatch_cpu.cc computes the same integers).
//
// The flat (token, slot) entries form tiles of kPlanTile; CUDA block b takes tile b. The tiles
// form groups of plan_group(tiles) (dispatch_math.h). Three kernels on sm_90 while the groups
// have at most 8 tiles (up to 256 tiles: 65536 tokens of top-8), four otherwise:
//   1. the counts and group sums, either
//      - plan_cluster_count_kernel (the cluster path): one thread block cluster a group; each
//        block counts its tile in shared memory, then reads the counts of the tiles before it
//        in the group from their blocks' shared memory: counts[b, e] = the tile's first rank
//        within its group, sums[g, e] = the group's count, plain stores (no zeroing, no global
//        atomics); or
//      - plan_zero_kernel (zeroes the group sums, and past kPlanCountSmemExperts the counts),
//        then plan_count_kernel: counts[b, e] = the tile's count, added to sums[g, e].
//   2. plan_scan_kernel, one block: sums[g, e] becomes the sum of the groups before g, the
//      totals are written to tokens_per_expert and scanned into the expert starts (or e * C).
//   3. plan_rank_kernel: each block
//      - before it waits for steps 1 and 2 (everything its tile knows alone): loads its ids
//        (kept in registers), counts them per warp and expert, scans those counts across its
//        warps and the tile's counts into its offsets in buffer order, and ranks its entries
//        within the tile in flat order: each warp walks its sub-tile, lanes holding the same
//        expert ranked by lane order; the kept entries are staged in shared memory in buffer
//        order;
//      - finds its tile's first rank in each expert: the scanned sum of the groups before its
//        own plus its first rank in its group (or the counts of the tiles before it there);
//      - writes positions[i] from the ranks each lane holds, and source[row] from the staged
//        entries in buffer order (coalesced), every kept row exactly once;
//      - writes -1 to its share of the empty rows (rows no entry fills, known from the totals),
//        so no row is written twice.
// Each kernel after the first is launched to overlap the one before it (cuda_launch.cuh); each
// waits only where it needs the previous one's results.
// Every count is an integer, so the result does not depend on the order of the adds (shared-
// memory and global atomics included): the plan is exact and repeatable.
//
// Layouts: counts [tiles, E] and sums [groups, E] are expert-minor, so the threads of a block
// (one expert each) read and write them coalesced. The rank kernel keeps its tables in 48 KiB
// of shared memory (no opt-in) with 16, 8, 4, 2 or 1 warps as E and the grid allow; past
// kPlanSharedMaxExperts it runs one warp per block, which ranks after the wait, with its table
// in the workspace. The count kernel likewise falls back to global atomics past
// kPlanCountSmemExperts.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_cluster.cuh"
#include "cuda_common.cuh"
#include "cuda_device.cuh"
#include "cuda_launch.cuh"
#include "cuda_warp.cuh"
#include "dispatch_math.h"

#ifndef JR_PLAN_TRACE
#define JR_PLAN_TRACE 0
#endif

namespace jax_router {
namespace cuda {

constexpr int kPlanTile = static_cast<int>(dispatch::kPlanTile);
#ifndef JR_PLAN_COUNT_THREADS  // a knob for benchmarks/cuda_bench_dispatch.cu only
#define JR_PLAN_COUNT_THREADS 256
#endif
// Threads of a count block: 256, so that on an SM two count blocks (at most 32 registers) and
// two 16-warp rank blocks (48) fit the 64K registers together, and every rank block of a wave
// starts its prologue while the counts run (benchmarks/NOTES.md).
constexpr int kPlanCountThreads = JR_PLAN_COUNT_THREADS;
constexpr int kPlanCountSteps = kPlanTile / kPlanCountThreads;  // entries a thread counts
#ifndef JR_PLAN_MAX_WARPS  // a knob for benchmarks/cuda_bench_dispatch.cu only
#define JR_PLAN_MAX_WARPS 16
#endif
constexpr int kPlanMaxWarps = JR_PLAN_MAX_WARPS;
constexpr int64_t kPlanCountSmemExperts = dispatch::kPlanSmemInts;
constexpr int kPlanMinSharedWarps = static_cast<int>(dispatch::kPlanMinSharedWarps);
// bits of an entry's index within its tile (the staged entries pack it beside the expert)
constexpr int kPlanTileBits = __builtin_ctz(static_cast<unsigned>(kPlanTile));
static_assert(kPlanTile == 1 << kPlanTileBits, "the tile is a power of two");

// Tiles a group may have on the cluster path (dispatch_math.h): one cluster a group, at most the
// portable cluster size.
constexpr unsigned kPlanMaxCluster = static_cast<unsigned>(dispatch::kPlanClusterGroup);
static_assert(kPlanTile % (32 * kPlanMaxWarps) == 0, "a tile splits into whole warp steps");

struct PlanArgs {
  const void* ids = nullptr;
  int64_t n = 0;  // flat entries
  int32_t experts = 0;
  int64_t capacity = dispatch::kNoCapacity;
  int64_t rows = 0;  // R
  int64_t tiles = 0, group = 1, groups = 0;
  bool prefixed = false;  // counts[b, e] holds the counts of the tiles before b in its group
  int32_t* tokens_per_expert = nullptr;
  int32_t* positions = nullptr;
  int32_t* source = nullptr;
  int32_t* counts = nullptr;  // workspace [tiles, E]
  int32_t* sums = nullptr;    // workspace [groups, E]
  int32_t* starts = nullptr;  // workspace [E]: the expert starts
  int32_t* tables = nullptr;  // workspace [tiles, E], global tables only
#if JR_PLAN_TRACE
  unsigned long long* trace = nullptr;  // [kPlanTraceSlots, 1024] %globaltimer stamps
#endif
};

// A timeline for benchmarks/cuda_bench_dispatch.cu only (-DJR_PLAN_TRACE=1): thread 0 of each
// block stamps %globaltimer into trace[slot, block] at the points marked PLAN_TRACE.
#if JR_PLAN_TRACE
constexpr int kPlanTraceSlots = 12;
#define PLAN_TRACE(a, slot)                                                     \
  do {                                                                          \
    if (threadIdx.x == 0) {                                                     \
      unsigned long long t_;                                                    \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                    \
      (a).trace[(slot) * 1024 + blockIdx.x] = t_;                               \
    }                                                                           \
  } while (0)
#else
#define PLAN_TRACE(a, slot) \
  do {                      \
  } while (0)
#endif

// The expert of flat entry i, or E (dropped) for an id outside [0, E) or i past the end.
template <typename I>
__device__ __forceinline__ int32_t plan_expert(const PlanArgs& a, int64_t i) {
  return i < a.n ? dispatch::expert_or_drop(static_cast<int64_t>(static_cast<const I*>(a.ids)[i]),
                                            a.experts)
                 : a.experts;
}

// Bits that hold every value of plan_expert (0 .. E, E being the dropped sentinel).
__device__ __forceinline__ int plan_bits(int32_t experts) { return 32 - __clz(experts); }

// The plan's first kernel (the zero kernel, or the cluster count kernel) is launched to overlap
// whatever kernel came before it on the stream and starts with overlapped_start: it waits for
// that kernel (which may write the ids) before anything else, and only then lets the plan's
// next kernel be scheduled, because that one loads the ids before its own wait. So every
// kernel of the plan reads the ids after the kernel before the plan has finished, and the first
// one's launch is hidden behind that kernel's tail.

// 0. Zeroes n ints at p: the group sums, and past kPlanCountSmemExperts the counts before them.
__global__ void __launch_bounds__(1024) plan_zero_kernel(int32_t* p, int64_t n) {
  overlapped_start();  // the plan's first kernel
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    p[i] = 0;
  }
}

// The count kernels' share of tile b: kPlanCountSteps entries a thread, all loaded before the
// first count.
template <typename I>
__device__ __forceinline__ void load_count_tile(const PlanArgs& a, int64_t b,
                                                int32_t (&ex)[kPlanCountSteps]) {
#pragma unroll
  for (int s = 0; s < kPlanCountSteps; ++s) {
    ex[s] = plan_expert<I>(a, b * kPlanTile + s * kPlanCountThreads + threadIdx.x);
  }
}

// table[e] += 1 for each loaded entry of expert e; the order of the adds does not matter.
__device__ __forceinline__ void add_counts(const int32_t (&ex)[kPlanCountSteps], int32_t* table,
                                           int32_t E) {
#pragma unroll
  for (int s = 0; s < kPlanCountSteps; ++s) {
    if (ex[s] < E) atomicAdd(&table[ex[s]], 1);
  }
}

// 1. counts[b, e] and sums[b / group, e] += counts[b, e]. The thread's entries are loaded
// before the first count. The adds go into a shared table, or straight into the tile's global
// row (zeroed by plan_zero_kernel) when E does not fit; their order does not matter (integers).
template <typename I, bool kShared>
__global__ void __launch_bounds__(kPlanCountThreads) plan_count_kernel(PlanArgs a) {
  extern __shared__ int32_t plan_smem[];
  allow_next_grid();  // the rank kernel's blocks may load their ids while this grid counts
  const int32_t E = a.experts;
  const int64_t b = blockIdx.x;
  int32_t ex[kPlanCountSteps];
  load_count_tile<I>(a, b, ex);
  int32_t* row = a.counts + b * E;
  int32_t* table = kShared ? plan_smem : row;
  if (kShared) {
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x) table[e] = 0;
    __syncthreads();  // orders the zeroing before any thread's adds
  } else {
    wait_for_previous_grid();  // the global rows are zeroed past this point
  }
  add_counts(ex, table, E);
  __syncthreads();  // orders every thread's adds before the counts are read back
  if (kShared) wait_for_previous_grid();  // the group sums are zeroed past this point
  int32_t* sums = a.sums + (b / a.group) * E;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    const int32_t c = kShared ? table[e] : __ldcg(row + e);
    if (kShared) row[e] = c;
    if (c != 0) atomicAdd(sums + e, c);
  }
}

// 1'. One cluster a group (the cluster path, groups of at most kPlanMaxCluster tiles): each
// block counts its tile in shared memory; after the cluster barrier it reads the counts of the
// tiles before its own in the group from their blocks' shared memory and writes their sum,
// the tile's first rank within the group, as counts[b, e] (a.prefixed); the group's last block
// also writes the group's sums. Plain stores, each element once: no zeroing and no global
// atomics, so no kernel runs before this one. Blocks past the last tile (the grid is whole
// clusters) count nothing and write only the sums, if last.
template <typename I>
__global__ void __launch_bounds__(kPlanCountThreads) plan_cluster_count_kernel(PlanArgs a) {
  extern __shared__ int32_t plan_smem[];
  const int32_t E = a.experts;
  const int64_t b = blockIdx.x;
  int32_t* table = plan_smem;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) table[e] = 0;  // while it waits
  overlapped_start();  // the plan's first kernel
  PLAN_TRACE(a, 0);
  int32_t ex[kPlanCountSteps];
  load_count_tile<I>(a, b, ex);
  __syncthreads();  // orders the zeroing before any thread's adds
  add_counts(ex, table, E);
  PLAN_TRACE(a, 1);
  cluster_sync();  // orders every block's counts before any block of the cluster reads them
  const unsigned r = cluster_block_rank();
  const bool last = static_cast<int64_t>(r) == a.group - 1;
  int32_t* sums = a.sums + (b / a.group) * E;
  int32_t used = 0;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t before = 0;
#pragma unroll
    for (unsigned q = 0; q < kPlanMaxCluster; ++q) {  // independent loads, all unrolled
      if (q < r) before += load_cluster_shared(table + e, q);
    }
    if (b < a.tiles) a.counts[b * E + e] = before;
    if (last) sums[e] = before + table[e];
    used ^= before;
  }
  // Keeps every block's shared memory until the other blocks have read it. Nothing is ordered
  // here, so the arrive is relaxed: a release arrive is a GPU-scope fence (MEMBAR.ALL.GPU),
  // which waited for the stores above to reach L2 before the block could end, ~0.3 us of the
  // plan at 65536 tokens (benchmarks/NOTES.md). Their visibility to the next kernel comes from
  // this grid's completion instead.
  cluster_arrive_relaxed(used);
  cluster_wait();
  PLAN_TRACE(a, 2);
}

// Tile b's first rank in expert e: the sum of the groups before its own (sums[g, e] once
// plan_scan_kernel has run) plus the counts of the tiles before b in its group, or, a.prefixed,
// their sum.
__device__ __forceinline__ int32_t tile_first(const PlanArgs& a, int64_t b, int32_t e) {
  const int64_t E = a.experts, g = b / a.group;
  int32_t before = a.sums[g * E + e];
  if (a.prefixed) return before + a.counts[b * E + e];
#pragma unroll 8
  for (int64_t t = g * a.group; t < b; ++t) before += a.counts[t * E + e];
  return before;
}

// out[x] = in[0] + ... + in[x - 1] for x < n, by a whole block; returns the sum of all n (to
// every thread). Thread t handles x = t, t + blockDim.x, ... (in place is fine: each thread
// reads its own elements before writing them). warp_totals is 32 ints of shared memory. The
// caller orders `in` before the call; the call ends with a barrier, so `out` is ordered after
// it for every thread.
__device__ __forceinline__ int32_t block_exclusive_scan(const int32_t* in, int32_t* out,
                                                        int32_t n, int32_t* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int32_t carry = 0;
  for (int32_t x0 = 0; x0 < n; x0 += blockDim.x) {  // the same trip count for the whole block
    const int32_t x = x0 + threadIdx.x;
    const int32_t v = x < n ? in[x] : 0;
    const int32_t incl = warp_inclusive_scan(v, lane);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();  // orders the warp totals before every thread reads them
    // every warp scans the warp totals itself (lane w holds warp w's), no loop over them
    const int32_t wt = lane < warps ? warp_totals[lane] : 0;
    const int32_t wincl = warp_inclusive_scan(wt, lane);
    const int32_t before = carry + __shfl_sync(kFullMask, wincl - wt, warp);
    const int32_t round = __shfl_sync(kFullMask, wincl, 31);
    if (x < n) out[x] = before + incl - v;
    carry += round;
    __syncthreads();  // orders this round's reads of warp_totals before the next round's writes
  }
  return carry;
}

// The expert starts from the totals: their exclusive prefix sum without capacity, e * C with
// it (dispatch::expert_start). A whole block calls it, as block_exclusive_scan.
__device__ __forceinline__ void block_starts(const PlanArgs& a, const int32_t* totals,
                                             int32_t* starts, int32_t* warp_totals) {
  block_exclusive_scan(totals, starts, a.experts, warp_totals);
  for (int32_t e = threadIdx.x; e < a.experts; e += blockDim.x) {  // the writer's own elements
    starts[e] = dispatch::expert_start(e, starts[e], a.capacity);
  }
  __syncthreads();  // orders the starts before every thread reads them
}

#ifndef JR_PLAN_SCAN_PARTS  // a knob for benchmarks/cuda_bench_dispatch.cu only
#define JR_PLAN_SCAN_PARTS 2
#endif
// The scan block: kPlanScanParts threads an expert, 256 experts a round, each thread holding
// up to kPlanScanChunk of its expert's group sums in registers (all the cluster path has: 32
// groups). Two threads an expert measured best, by a hair, against one and four
// (benchmarks/NOTES.md).
constexpr int kPlanScanParts = JR_PLAN_SCAN_PARTS;
constexpr int kPlanScanExperts = 256;
constexpr int kPlanScanThreads = kPlanScanParts * kPlanScanExperts;
constexpr int kPlanScanChunk = 32 / kPlanScanParts;

// 2. The scan, by one block: for each expert e, sums[g, e] := the sum of the groups before g, in
// place; tokens_per_expert[e] := the total; starts[e] := the buffer row of e's rank 0. Part p of
// an expert's threads takes the groups [p * per, (p + 1) * per): it sums them, learns the parts
// before its own from shared memory, then writes its groups' prefixes. Done once here, so that
// a rank block reads a few ints an expert instead of every group's sum (256 rank blocks reading
// 32 group sums an expert took 1.4 us, and their scans of the starts ~1 us: NOTES.md).
__global__ void __launch_bounds__(kPlanScanThreads) plan_scan_kernel(PlanArgs a) {
  __shared__ int32_t warp_totals[32];
  __shared__ int32_t part_sums[kPlanScanParts][kPlanScanExperts];
  allow_next_grid();  // the rank kernel's blocks may load and rank their tiles meanwhile
  wait_for_previous_grid();  // the group sums are complete past this point
  PLAN_TRACE(a, 3);
  const int64_t E = a.experts;
  const int part = threadIdx.x / kPlanScanExperts, x = threadIdx.x % kPlanScanExperts;
  const int64_t per = (a.groups + kPlanScanParts - 1) / kPlanScanParts;
  const int64_t h0 = part * per, h1 = std::min<int64_t>(a.groups, h0 + per);
  for (int64_t e0 = 0; e0 < E; e0 += kPlanScanExperts) {  // the same trip count in every thread
    const int64_t e = e0 + x;
    const bool live = e < E;
    int32_t* col = a.sums + h0 * E + e;  // the part's first group sum of expert e
    int32_t v[kPlanScanChunk];  // the first groups of the part, kept for the second pass
    int32_t mine = 0;
#pragma unroll
    for (int j = 0; j < kPlanScanChunk; ++j) {
      v[j] = live && h0 + j < h1 ? col[j * E] : 0;
      mine += v[j];
    }
    for (int64_t h = h0 + kPlanScanChunk; live && h < h1; ++h) mine += a.sums[h * E + e];
    part_sums[part][x] = mine;
    __syncthreads();  // orders every part's sum before the other parts read it
    int32_t run = 0, total = 0;
#pragma unroll
    for (int q = 0; q < kPlanScanParts; ++q) {
      run += q < part ? part_sums[q][x] : 0;
      total += part_sums[q][x];
    }
    if (live) {
#pragma unroll
      for (int j = 0; j < kPlanScanChunk; ++j) {
        if (h0 + j < h1) col[j * E] = run;
        run += v[j];
      }
      for (int64_t h = h0 + kPlanScanChunk; h < h1; ++h) {  // not yet overwritten: its own
        const int32_t c = a.sums[h * E + e];
        a.sums[h * E + e] = run;
        run += c;
      }
      if (part == 0) a.tokens_per_expert[e] = total;
    }
    __syncthreads();  // orders this round's reads of part_sums before the next round's writes
  }
  PLAN_TRACE(a, 4);
  // ordered by the barrier above
  block_starts(a, a.tokens_per_expert, a.starts, warp_totals);
  PLAN_TRACE(a, 5);
}

// The empty rows, -1, split across the grid: without capacity the last R - sum(totals) rows
// (past the last kept one), with capacity the rows of expert e past its first min(tpe[e], C).
__device__ __forceinline__ void fill_empty_rows(const PlanArgs& a, const int32_t* totals,
                                                const int32_t* starts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a.capacity < 0) {
    const int32_t last = a.experts - 1;
    const int64_t kept = static_cast<int64_t>(starts[last]) + totals[last];
    for (int64_t r = kept + first; r < a.rows; r += stride) a.source[r] = -1;
  } else if (a.capacity > 0) {
    const int32_t C = static_cast<int32_t>(a.capacity);  // R = E * C < 2^31
    for (int64_t r = first; r < a.rows; r += stride) {
      const int32_t e = static_cast<int32_t>(r) / C;
      if (static_cast<int32_t>(r) - e * C >= totals[e]) a.source[r] = -1;
    }
  }
}

// ---- ranking a tile with shared tables ------------------------------------------------------

// The rank kernel's shared memory, carved from its dynamic shared memory in this order ([E]
// each unless noted): PlanRankSmemInts counts it.
struct TileSmem {
  int32_t* starts;       // the expert starts (buffer row of each expert's rank 0)
  int32_t* totals;       // tokens per expert
  int32_t* first;        // the tile's first rank in each expert
  int32_t* tile_off;     // the tile's count of each expert, then its offset in buffer order
  int32_t* warp_totals;  // [32]: block_exclusive_scan's scratch
  int32_t* table;        // [warps, E]: each warp's running rank per expert, within the tile
  int32_t* stage;        // [kPlanTile]: the tile's kept entries in buffer order, staged_entry
};

__device__ __forceinline__ TileSmem carve_tile_smem(int32_t* p, int32_t E, int warps) {
  TileSmem t;
  t.starts = p;
  t.totals = t.starts + E;
  t.first = t.totals + E;
  t.tile_off = t.first + E;
  t.warp_totals = t.tile_off + E;
  t.table = t.warp_totals + 32;
  t.stage = t.table + static_cast<int64_t>(warps) * E;
  return t;
}

// The rank kernel's shared memory with shared tables, in int32 elements (TileSmem's layout).
inline int64_t PlanRankSmemInts(int64_t E, int warps) {
  return (4 + warps) * E + 32 + kPlanTile;
}

// A staged entry: its expert (< 2^(31 - kPlanTileBits) on the shared path) and its index within
// the tile, in one int.
__device__ __forceinline__ int32_t staged_entry(int32_t e, int32_t index_in_tile) {
  return (e << kPlanTileBits) | index_in_tile;
}

// Everything a tile can know of its ranks without the other tiles: table[w, e] = the entries
// of expert e in the tile's warps before w (where warp w's walk starts), tile_off[e] = the
// tile's count of e. The order of the shared-memory adds does not matter (integers). Ends after
// the scans across warps, without a barrier: the caller orders them before other threads read
// table or tile_off.
template <int kWarps, int kSteps>
__device__ __forceinline__ void tile_counts(const int32_t (&ex)[kSteps], const TileSmem& t,
                                            int32_t E) {
  const int warp = threadIdx.x >> 5;
  for (int64_t x = threadIdx.x; x < static_cast<int64_t>(kWarps) * E; x += blockDim.x) {
    t.table[x] = 0;
  }
  __syncthreads();  // orders the zeroed tables before the counts
  int32_t* mine = t.table + static_cast<int64_t>(warp) * E;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    if (ex[s] < E) atomicAdd(mine + ex[s], 1);
  }
  __syncthreads();  // orders every warp's counts before the scans across warps read them
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t run = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int32_t c = t.table[static_cast<int64_t>(w) * E + e];
      t.table[static_cast<int64_t>(w) * E + e] = run;
      run += c;
    }
    t.tile_off[e] = run;
  }
}

// The walk over kN consecutive steps of a warp (lane l of step s holds the expert ex[s] of
// one entry, the entries in flat order step by step, lane by lane): each entry's rank among the
// entries of its expert, counted from the running ranks mine[e], which it advances. Lanes
// holding the same expert (warp_peers_steps; __match_any_sync was slower, benchmarks/NOTES.md)
// are ranked in lane order; every step's peers are found first, so that the steps' ballot
// chains overlap. visit(s, e, rank) sees each step in every lane (rank is meaningless where
// e >= E).
template <int kN, typename Visit>
__device__ __forceinline__ void walk_steps(const int32_t* ex, int32_t E, int32_t* mine,
                                           Visit&& visit) {
  const int lane = threadIdx.x & 31;
  const unsigned lanes_before = (1u << lane) - 1u;
  unsigned peers[kN];
  warp_peers_steps<kN>(ex, plan_bits(E), peers);
#pragma unroll
  for (int s = 0; s < kN; ++s) {
    const int32_t e = ex[s];
    const int leader = group_leader(peers[s]);
    int32_t rank0 = 0;
    if (e < E && lane == leader) {  // the leader alone reads and advances the group's count
      rank0 = mine[e];
      mine[e] = rank0 + __popc(peers[s]);
    }
    const int32_t rank = __shfl_sync(kFullMask, rank0, leader) + __popc(peers[s] & lanes_before);
    __syncwarp();  // orders this step's count updates before the next step's leaders read them
    visit(s, e, rank);
  }
}

// Steps a walk_steps call takes at most: more peers in flight cost registers for nothing.
constexpr int kPlanWalkChunk = 8;

// walk_steps over all kSteps steps of a warp's sub-tile, kPlanWalkChunk at a time.
template <int kSteps, typename Visit>
__device__ __forceinline__ void walk_sub_tile(const int32_t (&ex)[kSteps], int32_t E,
                                              int32_t* mine, Visit&& visit) {
  constexpr int kN = kSteps < kPlanWalkChunk ? kSteps : kPlanWalkChunk;
  static_assert(kSteps % kN == 0, "whole chunks");
#pragma unroll
  for (int c = 0; c < kSteps; c += kN) {
    walk_steps<kN>(ex + c, E, mine, [&](int s, int32_t e, int32_t r) { visit(c + s, e, r); });
  }
}

// Registers a rank kernel thread may use: 48 with 16 warps, so that two rank blocks and two
// count blocks fit one SM's 64K registers and every rank block of a wave starts while the
// counts run (left to itself ptxas took 62); 64 with 8 warps (four blocks an SM; 48 spills);
// 255, the most, with fewer warps.
__host__ __device__ constexpr int plan_rank_max_registers(int warps) {
  return warps >= 16 ? 48 : warps >= 8 ? 64 : 255;
}

// 3. positions and source. Shared tables: kWarps warps, TileSmem in dynamic shared memory.
// Global tables (kWarps == 1): the block's table is its workspace row.
//
// With shared tables everything the tile knows alone is done before the wait for the count and
// scan kernels: its ids, its counts per warp, the scans across its warps, its offsets in buffer
// order, and the walk, which ranks each entry within the tile and stages the kept entries in
// shared memory in buffer order (expert by expert, then rank). After the wait only the tile's
// first ranks, the starts and the totals (a few loads an expert) and the writes remain:
// positions from each lane's (expert, rank) held in registers, and source[row] = i with
// consecutive threads on consecutive rows. (Written straight from the walk, every source entry
// was a 4-byte store to its own 32-byte sector, scattered across the buffer; that cost a third
// of the plan: benchmarks/NOTES.md.)
template <typename I, int kWarps, bool kShared>
__global__ void __launch_bounds__(kWarps * 32) __maxnreg__(plan_rank_max_registers(kWarps))
    plan_rank_kernel(PlanArgs a) {
  static_assert(kShared || kWarps == 1, "global tables hold one running count per expert");
  constexpr int kSteps = kPlanTile / (32 * kWarps);  // entries a lane ranks
  extern __shared__ int32_t plan_smem[];
  const int32_t E = a.experts;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t w0 = warp * kSteps * 32;  // the warp's first entry within the tile
  const int64_t i0 = b * kPlanTile + w0;
  allow_next_grid();  // the next kernel (the next plan's first) waits for this one's end itself
  PLAN_TRACE(a, 6);
  if constexpr (kShared) {
    static_assert(kSteps <= dispatch::kPlanMaxLaneEntries, "entries a lane holds");
    int32_t ex[kSteps];  // this warp's sub-tile, loaded once for the counts and the walk
#pragma unroll
    for (int s = 0; s < kSteps; ++s) ex[s] = plan_expert<I>(a, i0 + s * 32 + lane);
    const TileSmem t = carve_tile_smem(plan_smem, E, kWarps);
    tile_counts<kWarps>(ex, t, E);
    // its barriers order the scanned tables before the walk below
    const int32_t kept = block_exclusive_scan(t.tile_off, t.tile_off, E, t.warp_totals);
    // entry[s] = the step's expert and, in the high 16 bits, its rank within the tile
    static_assert(dispatch::kPlanSharedMaxExperts < (1 << 16) && kPlanTile <= (1 << 16),
                  "an expert and a rank within the tile fit 16 bits each");
    uint32_t entry[kSteps];
    walk_sub_tile(ex, E, t.table + static_cast<int64_t>(warp) * E,
                  [&](int s, int32_t e, int32_t rank) {
                    entry[s] = static_cast<uint32_t>(e) |  // e <= E (plan_expert)
                               (static_cast<uint32_t>(e < E ? rank : 0) << 16);
                    // every kept entry has its own place: the tile's offset + its rank
                    if (e < E) t.stage[t.tile_off[e] + rank] = staged_entry(e, w0 + s * 32 + lane);
                  });
    PLAN_TRACE(a, 7);
    wait_for_previous_grid();  // the counts and the scanned sums are complete past this point
    PLAN_TRACE(a, 8);
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
      t.first[e] = tile_first(a, b, e);
      t.starts[e] = a.starts[e];
      t.totals[e] = a.tokens_per_expert[e];
    }
    __syncthreads();  // orders the first ranks, starts, totals and staged entries before reads
    PLAN_TRACE(a, 9);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t i = i0 + s * 32 + lane;
      const int32_t e = static_cast<int32_t>(entry[s] & 0xFFFFu);
      const int32_t rank = static_cast<int32_t>(entry[s] >> 16);
      if (i < a.n) {
        a.positions[i] = e < E ? dispatch::plan_row(t.starts[e], t.first[e] + rank, a.capacity)
                               : -1;
      }
    }
    PLAN_TRACE(a, 10);
    for (int32_t x = threadIdx.x; x < kept; x += blockDim.x) {
      const int32_t v = t.stage[x];
      const int32_t e = v >> kPlanTileBits;
      const int32_t rank = t.first[e] + (x - t.tile_off[e]);
      const int32_t row = dispatch::plan_row(t.starts[e], rank, a.capacity);
      if (row >= 0) a.source[row] = static_cast<int32_t>(b * kPlanTile + (v & (kPlanTile - 1)));
    }
    fill_empty_rows(a, t.totals, t.starts);
    PLAN_TRACE(a, 11);
  } else {
    wait_for_previous_grid();  // a no-op: this path is launched without overlap
    int32_t* mine = a.tables + b * E;  // the running ranks per expert, global
    for (int32_t e = lane; e < E; e += 32) mine[e] = tile_first(a, b, e);
    __syncwarp();  // orders the initialised table before the walk (one warp)
#pragma unroll 1
    for (int c = 0; c < kSteps; c += kPlanWalkChunk) {  // a chunk's ids at a time
      int32_t ex[kPlanWalkChunk];
#pragma unroll
      for (int s = 0; s < kPlanWalkChunk; ++s) {
        ex[s] = plan_expert<I>(a, i0 + (c + s) * 32 + lane);
      }
      walk_steps<kPlanWalkChunk>(ex, E, mine, [&](int s, int32_t e, int32_t rank) {
        const int64_t i = i0 + (c + s) * 32 + lane;
        if (i >= a.n) return;
        const int32_t row = e < E ? dispatch::plan_row(a.starts[e], rank, a.capacity) : -1;
        a.positions[i] = row;
        if (row >= 0) a.source[row] = static_cast<int32_t>(i);
      });
    }
    fill_empty_rows(a, a.tokens_per_expert, a.starts);
  }
}

// Warps per block of the rank kernel with shared tables (16, 8, 4, 2 or 1, at least
// kPlanMinSharedWarps), or 0 when the fewest warps' tables do not fit: the global path. 16 warps
// while the tiles fit in one wave of 512-thread blocks (4 a SM), 8 past that: measured on the
// H200 at 65536 and 262144 tokens (benchmarks/NOTES.md), where the longer walks of 8 warps cost
// less than a second wave.
inline int PlanRankWarps(int64_t E, int64_t tiles, int sms) {
  const bool one_wave = tiles <= 4 * static_cast<int64_t>(sms);
  const int most = one_wave || kPlanMaxWarps == 1 ? kPlanMaxWarps : kPlanMaxWarps / 2;
  for (int w = most; w >= kPlanMinSharedWarps; w >>= 1) {
    if (PlanRankSmemInts(E, w) <= dispatch::kPlanSmemInts) return w;
  }
  return 0;
}

// The rank kernel with shared tables and `warps` warps (a power of two <= kWarps).
template <typename I, int kWarps>
cudaError_t LaunchRankShared(const PlanArgs& a, int warps, cudaStream_t s) {
  if constexpr (kWarps > kPlanMinSharedWarps) {
    if (warps < kWarps) return LaunchRankShared<I, kWarps / 2>(a, warps, s);
  }
  const size_t smem = static_cast<size_t>(PlanRankSmemInts(a.experts, kWarps)) * sizeof(int32_t);
  return LaunchAfter(plan_rank_kernel<I, kWarps, true>, dim3(static_cast<unsigned>(a.tiles)),
                     dim3(kWarps * 32), smem, s, a);
}

#ifndef JR_PLAN_CLUSTER  // a knob for benchmarks/cuda_bench_dispatch.cu's A/B runs only
#define JR_PLAN_CLUSTER 1
#endif

// The count kernel of the cluster path, one cluster of a.group blocks a group, if the device
// can place such a cluster (a cached answer per device and cluster size); *launched says
// whether it ran.
template <typename I>
cudaError_t LaunchClusterCount(const PlanArgs& a, int dev, bool* launched, cudaStream_t s) {
  *launched = false;
  const int C = static_cast<int>(a.group);
  if (!JR_PLAN_CLUSTER || C > static_cast<int>(kPlanMaxCluster) ||
      a.experts > kPlanCountSmemExperts || !ClusterCapable(dev)) {
    return cudaSuccess;
  }
  auto kernel = plan_cluster_count_kernel<I>;
  const size_t smem = static_cast<size_t>(a.experts) * sizeof(int32_t);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.groups * C));
  cfg.blockDim = dim3(kPlanCountThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;  // overlapped_start
  attr[1].val.programmaticStreamSerializationAllowed = JR_PDL;
  cfg.attrs = attr;
  cfg.numAttrs = 2;
  // fits[dev][log2 C]: 0 unknown, 1 yes, 2 no. The query is host-side, safe under capture.
  static std::atomic<int> fits[kMaxDevices][4];
  int log2c = 0;
  while ((1 << log2c) < C) ++log2c;
  int f = fits[dev][log2c].load(std::memory_order_relaxed);
  if (f == 0) {
    int clusters = 0;
    const cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (e != cudaSuccess) cudaGetLastError();  // not fatal: the other path runs instead
    f = e == cudaSuccess && clusters > 0 ? 1 : 2;
    fits[dev][log2c].store(f, std::memory_order_relaxed);
  }
  if (f != 1) return cudaSuccess;
  *launched = true;
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

template <typename I>
cudaError_t LaunchPlanT(PlanArgs a, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(a.tiles);
  const int64_t E = a.experts;
  const int dev = CurrentDevice();
  const int sms = SmCount(dev);
  const int warps = PlanRankWarps(a.experts, a.tiles, sms);
  bool counted = false;
  if (warps > 0) {  // the counts and group sums by one kernel of clusters, if it can run
    const cudaError_t err = LaunchClusterCount<I>(a, dev, &counted, s);
    if (err != cudaSuccess) return err;
    a.prefixed = counted;  // what the rank kernel reads in counts
  }
  if (!counted) {
    const bool shared_counts = E <= kPlanCountSmemExperts;
    // the sums follow the counts in the workspace (OnWorkspace)
    int32_t* zero_from = shared_counts ? a.sums : a.counts;
    const int64_t zeros = (shared_counts ? 0 : a.tiles * E) + a.groups * E;
    const int64_t most = 4 * static_cast<int64_t>(sms);
    const unsigned zgrid = static_cast<unsigned>(std::min<int64_t>((zeros + 4095) / 4096, most));
    cudaError_t err =
        LaunchAfter(plan_zero_kernel, dim3(zgrid), dim3(1024), 0, s, zero_from, zeros);
    if (err != cudaSuccess) return err;
    err =
        shared_counts
            ? LaunchAfter(plan_count_kernel<I, true>, dim3(grid), dim3(kPlanCountThreads),
                          static_cast<size_t>(E) * sizeof(int32_t), s, a)
            : LaunchAfter(plan_count_kernel<I, false>, dim3(grid), dim3(kPlanCountThreads), 0, s,
                          a);
    if (err != cudaSuccess) return err;
  }
  cudaError_t err = LaunchAfter(plan_scan_kernel, dim3(1), dim3(kPlanScanThreads), 0, s, a);
  if (err != cudaSuccess) return err;
  if (warps > 0) {
    err = LaunchRankShared<I, kPlanMaxWarps>(a, warps, s);
    if (err != cudaSuccess) return err;
  } else {
    plan_rank_kernel<I, 1, false><<<grid, 32, 0, s>>>(a);
  }
  return cudaGetLastError();
}

// a with its tiling and its scratch in `workspace`, laid out as dispatch_math.h's
// plan_workspace_size counts it: counts [tiles, E], sums [groups, E], starts [E], then (global
// tables only) tables [tiles, E].
inline PlanArgs OnWorkspace(PlanArgs a, int32_t* workspace) {
  const int64_t E = a.experts;
  a.tiles = dispatch::plan_tiles(a.n);
  a.group = dispatch::plan_group(a.tiles);
  a.groups = dispatch::plan_groups(a.tiles);
  a.counts = workspace;
  a.sums = a.counts + a.tiles * E;
  a.starts = a.sums + a.groups * E;
  a.tables = a.starts + E;
  return a;
}

// The whole plan on stream s, or, when there are no entries, two memsets (tokens_per_expert :=
// 0, every row empty: source := -1, all bytes 0xFF).
inline cudaError_t LaunchPlan(PlanArgs a, It id_dt, int32_t* workspace, cudaStream_t s) {
  if (a.n == 0) {
    cudaError_t e = cudaMemsetAsync(a.tokens_per_expert, 0, a.experts * sizeof(int32_t), s);
    if (e == cudaSuccess && a.rows > 0) {
      e = cudaMemsetAsync(a.source, 0xFF, a.rows * sizeof(int32_t), s);
    }
    return e;
  }
  a = OnWorkspace(a, workspace);
  switch (id_dt) {
    case It::kS16:
      return LaunchPlanT<int16_t>(a, s);
    case It::kS64:
      return LaunchPlanT<int64_t>(a, s);
    default:
      return LaunchPlanT<int32_t>(a, s);
  }
}

}  // namespace cuda
}  // namespace jax_router
