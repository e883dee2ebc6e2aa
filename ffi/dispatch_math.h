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

// The plan is computed over blocks of kPlanChunk consecutive flat (token, slot) entries: a count
// per (block, expert), an exclusive scan over blocks per expert, then each block ranks its own
// entries. jax_router/dispatch.py sizes the workspace from the same constant (the compiled
// modules report it as dispatch_plan_chunk, which a test compares).
constexpr int64_t kPlanChunk = 4096;

// attribute value of `capacity` meaning "no capacity" (R = T * topk, experts packed)
constexpr int64_t kNoCapacity = -1;

JR_HD int64_t plan_blocks(int64_t n) { return (n + kPlanChunk - 1) / kPlanChunk; }

// The workspace's int32 elements: the per-(block, expert) counts, then one row of expert starts.
JR_HD int64_t plan_workspace_size(int64_t n, int64_t experts) {
  return (plan_blocks(n) + 1) * experts;
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
