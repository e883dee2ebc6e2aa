// The small-E CUDA forward: E <= 8 experts, compact outputs only (weights, indices, residuals),
// no group-limited routing, no pre-softmax, no quantile balancing. One thread per token, the
// row in registers: k rounds of a 64-bit slot-key maximum (routing_math.h's slot_key: score,
// then the lower expert id), weights by routing_math.h's formulas in slot order, so the bits
// are those of the fast forward and the CPU. Against the fast forward's one-lane layout it
// drops the candidate list and its shared memory: Mixtral (E = 8, k = 2) at 65536 tokens went
// from 4.9 to 3.2 us (benchmarks/NOTES.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_launch.cuh"
#include "router_fwd_fast.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

constexpr int kSmallExperts = 8;
constexpr int kSmallThreads = 256;

// Whether the small kernel takes a call.
inline bool SmallForward(int64_t E, const RouteParams& p, bool dense_outputs) {
  return E <= kSmallExperts && !dense_outputs && p.group_topk <= 0 && !is_qb(p) &&
         !(p.score_fn == ScoreFn::kSoftmax && p.pre_softmax);
}

// v[0 .. kN) to p[0 .. kN) (p aligned to 4 * kN bytes, kN 2, 4 or 8) in as few stores as can be:
// one store instruction writes a warp's 32 tokens' slots as one coalesced run, where kN scalar
// stores would each write every kN-th word of it. Mixtral (k = 2) measured 0.08-0.23 us faster
// at every T from 1024 to 262144 tokens, 3.02 -> 2.85 us at 65536 bf16 (benchmarks/NOTES.md).
template <int kN>
__device__ __forceinline__ void store_words(void* p, const uint32_t (&v)[kN]) {
  static_assert(kN == 2 || kN % 4 == 0, "whole vectors");
  if constexpr (kN == 2) {
    *static_cast<uint2*>(p) = make_uint2(v[0], v[1]);
  } else {
#pragma unroll
    for (int q = 0; q < kN / 4; ++q) {
      static_cast<uint4*>(p)[q] = make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
  }
}

// kK: a power of two >= k (the selection rounds are unrolled; rounds past k do nothing).
template <ScoreFn F, int kK>
__global__ void __launch_bounds__(kSmallThreads) fwd_small_kernel(const FastArgs a) {
  constexpr int kE = kSmallExperts;
  const int E = a.E, k = a.k;
  // Launched with LaunchAfter: the next kernel's launch hides behind this one's run, 0.2-0.3 us
  // of a 2-3 us call (benchmarks/NOTES.md; the larger kernels measured slower with it).
  overlapped_start();
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < a.rows;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t roff = t * E;
    float x[kE];
    load_chunk_dt<kE>(a.logits, roff, a.logits_dt, E, a.x_vec, x);
    const float* bias =
        a.bias != nullptr ? a.bias + (a.single_bias_row ? 0 : t / a.rows_per_bias) * E : nullptr;
    unsigned long long key[kE];
#pragma unroll
    for (int i = 0; i < kE; ++i) {
      const float s = activation<F>(x[i]);
      const float z = bias != nullptr && i < E ? selection_score(s, __ldg(bias + i)) : s;
      key[i] = i < E ? slot_key(order_key(z), static_cast<uint32_t>(i)) : 0ull;
    }
    int sel[kK];
    float v[kK];  // the selected experts' activations (softmax: their logits)
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      unsigned long long best = 0ull;
      int bi = 0;
      float bx = 0.0f;
#pragma unroll
      for (int i = 0; i < kE; ++i) {
        if (key[i] > best) {
          best = key[i];
          bi = i;
          bx = x[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kE; ++i) key[i] = i == bi ? 0ull : key[i];
      sel[r] = bi;
      v[r] = activation<F>(bx);
    }
    float u[kK];
    const float denom = slot_numerators<F>(v, k, u);
    const int64_t ko = t * k;
    if constexpr (kK >= 2) {
      if (a.slots_vec) {  // k == kK (FastArgs::slots_vec): store_slot's values, kK at a time
        uint32_t w[kK], ix[kK], res[kK];
#pragma unroll
        for (int r = 0; r < kK; ++r) {
          const float p = weight<F>(false, k, u[r], denom);
          w[r] = __float_as_uint(compact_weight(a.scaling * p));
          ix[r] = static_cast<uint32_t>(sel[r]);
          res[r] = __float_as_uint(compact_residual<F>(p, u[r]));
        }
        if (a.weights) store_words<kK>(a.weights + ko, w);
        if (a.indices) store_words<kK>(static_cast<int32_t*>(a.indices) + ko, ix);
        if (a.act) store_words<kK>(a.act + ko, res);
        continue;
      }
    }
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      if (r < k) {
        const float p = weight<F>(false, k, u[r], denom);
        store_slot<F>(a, ko, r, sel[r], a.scaling * p, p, u[r]);
      }
    }
  }
}

template <ScoreFn F>
inline cudaError_t LaunchSmallT(const FastArgs& fa, cudaStream_t s, int dev) {
  const int64_t blocks = (fa.rows + kSmallThreads - 1) / kSmallThreads;
  const int64_t most = static_cast<int64_t>(SmCount(dev)) * (2048 / kSmallThreads);
  const unsigned grid = static_cast<unsigned>(blocks < most ? blocks : most);
  auto kernel = fa.k <= 1   ? fwd_small_kernel<F, 1>
                : fa.k <= 2 ? fwd_small_kernel<F, 2>
                : fa.k <= 4 ? fwd_small_kernel<F, 4>
                            : fwd_small_kernel<F, 8>;
  return LaunchAfter(kernel, dim3(grid), dim3(kSmallThreads), 0, s, fa);
}

inline cudaError_t LaunchSmall(ScoreFn fn, const FastArgs& fa, cudaStream_t s, int dev) {
  return DispatchScoreFn(fn, [&](auto tag) { return LaunchSmallT<decltype(tag)::value>(fa, s, dev); });
}

}  // namespace cuda
}  // namespace jax_router
