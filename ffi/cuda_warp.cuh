// Warp primitives shared by the CUDA router and aux-score kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "exact_math.h"

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

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

}  // namespace cuda
}  // namespace jax_router
