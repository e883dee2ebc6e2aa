// Quantile balancing's histogram on the GPU (routing_math.h qb_bin), counted after the routing
// kernel has written every row's cutoff.
//
// Why a kernel of its own: counting inside the routing kernel makes every (row, expert) pair a
// global atomic, T * E of them (59 million at 65536 x 896), which took 0.7 ms on an H200, three
// times the routing. Here a block owns a tile of `eb` experts and a chunk of rows: it counts in
// shared memory, then adds its nonzero counts to the global histogram, so the global atomics
// number at most (tiles x chunks x eb x num_bins). The activation is routing_math.h's sigmoid
// (its reciprocal through the exact fast path of cuda_common.cuh, as in the fast routing
// kernel), so the counts match the CPU kernel's exactly. Histograms too large for
// shared memory (num_bins beyond ~50000 with one expert a block) count in global memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

constexpr int kQbThreads = 256;
constexpr int kQbUnroll = 8;

struct QbHistArgs {
  int64_t rows;
  int E;
  const void* logits;
  const float* cutoff;      // [rows]
  const float* bin_bounds;  // [lower, upper]
  int64_t num_bins;
  int32_t* histogram;  // [E, num_bins], accumulated into
  int eb;              // experts per block (divides kQbThreads); 0: global counting
  int64_t rows_per_chunk;
};

template <typename D>
__global__ void __launch_bounds__(kQbThreads) qb_histogram_kernel(const QbHistArgs a) {
  extern __shared__ int32_t counts_sm[];  // [eb][num_bins] (shared mode)
  using R = typename D::raw;
  const bool shared = a.eb > 0;
  const int eb = shared ? a.eb : 1;
  const int e0 = blockIdx.x * eb;
  const int ne = min(eb, a.E - e0);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_chunk;
  const int64_t r1 = min(a.rows, r0 + a.rows_per_chunk);
  const int64_t nb = a.num_bins;
  int32_t* counts = shared ? counts_sm : a.histogram + static_cast<int64_t>(e0) * nb;
  if (shared) {
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(ne) * nb; i += kQbThreads) counts[i] = 0;
  }
  __syncthreads();  // the block's counts are zero before any thread adds to them
  const float lower = __ldg(a.bin_bounds);
  const float scale = qb_scale(nb, lower, __ldg(a.bin_bounds + 1));
  const int eo = threadIdx.x % eb;
  const R* logits = static_cast<const R*>(a.logits);
  // Each thread takes every (kQbThreads / eb)-th row of the chunk, kQbUnroll at a time: all
  // their loads are issued before the first count, so that many loads are in flight per thread
  // (one at a time left the kernel waiting on memory latency: 0.8 ms at 65536 x 896).
  const int64_t step = kQbThreads / eb;
  if (eo < ne) {
    for (int64_t rb = r0 + threadIdx.x / eb; rb < r1; rb += kQbUnroll * step) {
      float x[kQbUnroll], c[kQbUnroll];
#pragma unroll
      for (int u = 0; u < kQbUnroll; ++u) {
        const int64_t r = rb + u * step;
        x[u] = r < r1 ? D::to_f(__ldg(logits + r * a.E + e0 + eo)) : 0.0f;
        c[u] = r < r1 ? __ldg(a.cutoff + r) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kQbUnroll; ++u) {
        if (rb + u * step < r1) {
          bool odd = false;
          float s = sigmoid_rn_fast(x[u], &odd);
          if (odd) s = activation<ScoreFn::kSigmoid>(x[u]);  // rare: x below about -87, NaN
          atomicAdd(counts + eo * nb + qb_bin(c[u], s, lower, scale, nb), 1);
        }
      }
    }
  }
  if (!shared) return;
  __syncthreads();  // every row of the chunk is counted before the block publishes its counts
  int32_t* out = a.histogram + static_cast<int64_t>(e0) * nb;
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(ne) * nb; i += kQbThreads) {
    const int32_t c = counts[i];
    if (c != 0) atomicAdd(out + i, c);
  }
}

// Experts per block: the most (16 down to 1, dividing kQbThreads) whose counts fit in `smem`
// bytes; 0 when not even one expert's do.
inline int QbExpertsPerBlock(int64_t num_bins, int64_t smem) {
  for (int eb = 16; eb >= 1; eb /= 2) {
    if (static_cast<int64_t>(eb) * num_bins * 4 <= smem) return eb;
  }
  return 0;
}

}  // namespace cuda
}  // namespace jax_router
