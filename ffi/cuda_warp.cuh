// Warp primitives shared by the CUDA router, aux-score and dispatch kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "exact_math.h"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Minimum / maximum over aligned groups of L lanes (L a power of two <= 32), in every lane.
template <int L>
__device__ __forceinline__ uint32_t group_min(uint32_t v) {
#pragma unroll
  for (int o = 1; o < L; o <<= 1) v = min(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
template <int L>
__device__ __forceinline__ uint32_t group_max(uint32_t v) {
#pragma unroll
  for (int o = 1; o < L; o <<= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The sum of the warp's 32 partials in exact::combine_partials' order (pairs at distance 16,
// 8, 4, 2, 1), so that a row sum taken as "lane l adds elements l, l + 32, ..." has the CPU's
// bits. Every lane gets the result: the xor partners add the same two values.
__device__ __forceinline__ float warp_sum_in_order(float v) {
  static_assert(exact::kSumLanes == 32, "one partial per lane");
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = v + __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Row maximum for softmax: NaN ignored, as routing_math.h row_max_step (the order of a max
// does not change its value; only the sign of a zero maximum may differ, which no result
// depends on: e^{x - (+-0)} is the same for every x).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Softmax statistics of a row spread over one warp, lane l taking elements l, l + 32, ... of
// x(0), ..., x(n - 1): the maximum (NaN ignored) and the sum of the numerators e^{x - max} in
// exact_math.h's order, i.e. the bits of the CPU handlers' Softmax. Every lane gets both.
template <typename X>
__device__ __forceinline__ void warp_softmax_stats(X x, int64_t n, int lane, float* max,
                                                   float* sum) {
  float m = -INFINITY;
  for (int64_t i = lane; i < n; i += 32) m = row_max_step(m, x(i));
  m = warp_max(m);
  float part = 0.0f;
  for (int64_t i = lane; i < n; i += 32) part = part + softmax_numerator(x(i), m);
  *max = m;
  *sum = warp_sum_in_order(part);
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Inclusive prefix sum over the warp's lanes (lane order).
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t t = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// The lanes of the warp holding the same value as this lane, for each of N values v[s] in
// [0, 2^bits): one ballot per bit and value, each lane keeping the lanes that agree with it on
// that bit. This is what __match_any_sync computes; on the H200 it was faster while the plan
// walked its tiles twice, level later and slower since (NOTES rows 18, 20 and 45). The loop
// runs bit by bit across all N values: their N chains of ballots are independent, so they
// overlap.
template <int N>
__device__ __forceinline__ void warp_peers_steps(const int32_t* v, int bits,
                                                 unsigned (&peers)[N]) {
#pragma unroll
  for (int s = 0; s < N; ++s) peers[s] = kFullMask;
  for (int bit = 0; bit < bits; ++bit) {
#pragma unroll
    for (int s = 0; s < N; ++s) {
      const bool set = (v[s] >> bit) & 1;
      const unsigned m = __ballot_sync(kFullMask, set);
      peers[s] &= set ? m : ~m;
    }
  }
}

// The lowest lane of a group of peers: the one that speaks for it.
__device__ __forceinline__ int group_leader(unsigned peers) { return __ffs(peers) - 1; }

}  // namespace cuda
}  // namespace jax_router
