// The arithmetic of the dispatch ops (docs/semantics.md#dispatch), shared by the CPU handlers
// (dispatch_cpu.cc) and the CUDA kernels (dispatch_plan.cuh, dispatch_rows.cuh), so that both
// round exactly alike. No XLA or CUDA headers.
//
// Every float operation here is one IEEE operation (or an explicit fma); the build forbids
// implicit contraction (-ffp-contract=off, -fmad=false), so `acc + w * v` is a multiply
// rounded to float32 and then an add rounded to float32 on both platforms.
#pragma once

#include <cstdint>

#include "exact_math.h"

namespace jax_router {
namespace dispatch {

// ---- the plan --------------------------------------------------------------------------------

// The plan is computed over tiles of kPlanTile consecutive flat (token, slot) entries: a count
// per (tile, expert), then each tile ranks its own entries from the counts of the tiles before
// it. The tiles form groups of plan_group(tiles) (a power of two near sqrt(tiles)) whose counts
// are also summed per (group, expert), so that a tile finds its first rank from at most
// sqrt(tiles) group sums and sqrt(tiles) tile counts per expert instead of a scan over every
// tile before it. jax_router/dispatch.py sizes the workspace from the same formulas (a test
// compares them with the compiled modules' dispatch_plan_workspace_size).
#ifndef JR_PLAN_TILE  // a knob for benchmarks/cuda_bench_dispatch.cu only; Python assumes 2048
#define JR_PLAN_TILE 2048
#endif
constexpr int64_t kPlanTile = JR_PLAN_TILE;

// int32 elements of shared memory the CUDA rank kernel may hold (48 KiB, no opt-in): the expert
// starts, the totals, the tile's first ranks and offsets and one count table per warp, [E]
// each, 32 warp totals, and the tile's staged entries [kPlanTile]. A lane holds its entries of
// the tile in registers, at most kPlanMaxLaneEntries (more spill), so the tables need at least
// kPlanMinSharedWarps warps; past kPlanSharedMaxExperts they live in the workspace instead
// (dispatch_plan.cuh).
constexpr int64_t kPlanSmemInts = 12288;
constexpr int64_t kPlanMaxLaneEntries = 64;
constexpr int64_t kPlanMinSharedWarps =
    kPlanTile > 32 * kPlanMaxLaneEntries ? kPlanTile / (32 * kPlanMaxLaneEntries) : 1;
constexpr int64_t kPlanSharedMaxExperts =
    (kPlanSmemInts - 32 - kPlanTile) / (4 + kPlanMinSharedWarps);

// attribute value of `capacity` meaning "no capacity" (R = T * topk, experts packed)
constexpr int64_t kNoCapacity = -1;

JR_HD int64_t plan_tiles(int64_t n) { return (n + kPlanTile - 1) / kPlanTile; }

// Tiles per group: the smallest power of two whose square covers the tiles (1 for one tile),
// but at most kPlanClusterGroup while there are at most kPlanClusterMaxTiles tiles. There the
// CUDA plan counts each group in one cluster of blocks (dispatch_plan.cuh), whose portable
// size is 8; the scan block then reads at most 32 group sums per expert.
constexpr int64_t kPlanClusterGroup = 8;
constexpr int64_t kPlanClusterMaxTiles = 256;
JR_HD int64_t plan_group(int64_t tiles) {
  int64_t g = 1;
  while (g * g < tiles) g *= 2;
  return tiles <= kPlanClusterMaxTiles && g > kPlanClusterGroup ? kPlanClusterGroup : g;
}

JR_HD int64_t plan_groups(int64_t tiles) {
  const int64_t g = plan_group(tiles);
  return (tiles + g - 1) / g;
}

// The workspace's int32 elements: the counts [tiles, E], the group sums [groups, E], the expert
// starts [E], and, when E is past kPlanSharedMaxExperts, one rank table per tile [tiles, E].
// (The CPU handler uses the first tiles * E, for its counts.)
JR_HD int64_t plan_workspace_size(int64_t n, int64_t experts) {
  const int64_t tiles = plan_tiles(n);
  const int64_t global_tables = experts > kPlanSharedMaxExperts ? tiles : 0;
  return (tiles + plan_groups(tiles) + 1 + global_tables) * experts;
}

// The expert of an id, or `experts` (a sentinel sorting after every expert) when the id is
// outside [0, experts): such pairs are dropped and not counted.
JR_HD int32_t expert_or_drop(int64_t id, int64_t experts) {
  return (id >= 0 && id < experts) ? static_cast<int32_t>(id) : static_cast<int32_t>(experts);
}

// Where expert e's pairs start in the buffer: the exclusive prefix sum of tokens_per_expert
// without capacity (`packed_start`), e * C with capacity C.
JR_HD int32_t expert_start(int32_t e, int32_t packed_start, int64_t capacity) {
  return capacity < 0 ? packed_start : static_cast<int32_t>(e * capacity);
}

// The buffer row of the rank-th pair (0-based, in flat order) of an expert starting at `start`,
// or -1 when the capacity drops it.
JR_HD int32_t plan_row(int32_t start, int32_t rank, int64_t capacity) {
  return (capacity < 0 || rank < capacity) ? start + rank : -1;
}

// ---- rows ------------------------------------------------------------------------------------

// Row indices read from a plan are used only inside [0, n): anything else (a plan not made by
// dispatch_plan) counts as empty / dropped, so a kernel never reads or writes out of bounds.
JR_HD bool in_range(int64_t v, int64_t n) { return v >= 0 && v < n; }

// unpermute (and permute's backward, with w = 1, which is exact): out[t] accumulates
// w_j * rows[positions[t, j]] over the kept slots j = 0 .. topk-1 in order, from +0, in
// float32: the product rounded, then the sum rounded.
JR_HD float combine_add(float acc, float w, float v) { return acc + w * v; }

// The weighted permute (unpermute's backward for rows): d rows[r] = w[src] * dout[src / topk].
JR_HD float scale(float w, float v) { return w * v; }

// unpermute's backward for the weights: dw[t, j] = dot(dout[t], rows[positions[t, j]]) over H.
// Element h goes to partial h % 32 (exact::kSumLanes), each partial accumulates its elements
// in ascending h from +0 with one fused multiply-add a term (dot_step), then the 32 partials
// combine as exact::combine_partials (distance 16, 8, 4, 2, 1): on CUDA lane l of a warp
// accumulates h = l, l + 32, ... and the warp runs warp_sum_in_order.
JR_HD float dot_step(float part, float a, float b) { return exact::fma(a, b, part); }

}  // namespace dispatch
}  // namespace jax_router
