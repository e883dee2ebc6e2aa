// The CUDA backward (routing_math.h's formulas): one group of L lanes per row (a whole warp
// for pre-softmax, which recomputes its row's softmax), sums over the k slots in slot order,
// then zero-fill + scatter of the k entries (every entry of the row for pre-softmax), staged in
// shared memory and written with 16-byte stores where the row allows (BwdStaged).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_warp.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

// ---- backward (one warp per row) -------------------------------------------------------------

struct BwdKArgs {
  int64_t rows;
  int E;
  int k;
  ScoreFn fn;
  bool pre_softmax;
  float scaling;
  bool dense_grad;
  const void* grad;
  Dt grad_dt;
  const void* indices;
  It index_dt;
  const float* act;
  const void* logits;
  Dt logits_dt;
  void* out;
  Dt out_dt;
};

constexpr int kBwdThreads = 256;

// Zero `n` elements at p with the L lanes of a group (16-byte stores for the aligned middle).
template <typename R, int L>
__device__ __forceinline__ void group_zero(R* p, int n, int j) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t end = start + static_cast<uintptr_t>(n) * sizeof(R);
  uintptr_t a0 = (start + 15) & ~uintptr_t(15);
  uintptr_t a1 = end & ~uintptr_t(15);
  if (a0 > a1) a0 = a1 = end;
  const int head = static_cast<int>((a0 - start) / sizeof(R));
  const int tail0 = static_cast<int>((a1 - start) / sizeof(R));
  for (int i = j; i < head; i += L) p[i] = R(0);
  for (int i = tail0 + j; i < n; i += L) p[i] = R(0);
  uint4* body = reinterpret_cast<uint4*>(a0);
  const int nbody = static_cast<int>((a1 - a0) / 16);
  for (int q = j; q < nbody; q += L) body[q] = make_uint4(0, 0, 0, 0);
}

// Whether bwd_kernel<D, L, true> can stage the rows of out: element-wise or raw softmax with
// 8 lanes a row (E > 16: rows of 16 or 32 bytes gain nothing and measured 2-8% slower), rows of
// whole 16-byte vectors at a 16-byte aligned base, kBwdThreads / L rows in kBwdStageBytes.
// Past 48 KiB staging costs occupancy: at 64 KiB (three blocks an SM) the 896-expert bf16 rows
// gained 18% but Qwen3-Next f32 at 16384 rows lost 18% to a second wave (benchmarks/NOTES.md),
// so the default stays at 48 KiB until the choice accounts for waves.
#ifndef JR_BWD_STAGE_KIB  // a knob for benchmarks/cuda_bench.cu's A/B runs only
#define JR_BWD_STAGE_KIB 48
#endif
constexpr int64_t kBwdStageBytes = JR_BWD_STAGE_KIB * 1024;
inline bool BwdStaged(bool pre_softmax, int L, int64_t E, int64_t elem_bytes, const void* out) {
  const int64_t row_bytes = E * elem_bytes;
  return !pre_softmax && L == 8 && row_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
         (kBwdThreads / L) * row_bytes <= kBwdStageBytes;
}

// One group of L lanes per row (L = 32 for pre-softmax, whose whole row is computed).
// kStaged: each row is assembled in shared memory (zeros, then the k entries) and written once
// with 16-byte stores; the scattered 2- or 4-byte stores of the k entries went to L2 as one
// write request each, and cost the backward 15-25% (benchmarks/NOTES.md).
template <typename D, int L, bool kStaged>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(const BwdKArgs a) {
  using R = typename D::raw;
  extern __shared__ __align__(16) unsigned char bwd_stage[];  // kStaged: [rows of the block, E]
  const int j = threadIdx.x % L;
  const int64_t grp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / L;
  const int64_t ngrp = (static_cast<int64_t>(gridDim.x) * blockDim.x) / L;
  const int E = a.E, k = a.k;
  R* out = static_cast<R*>(a.out);
  const bool pre = a.fn == ScoreFn::kSoftmax && a.pre_softmax;
  // Every group runs the same number of iterations so that the shuffles see whole warps.
  const int64_t iters = (a.rows + ngrp - 1) / ngrp;

  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = grp + it * ngrp;
    const bool ok_row = row < a.rows;
    const int64_t ko = row * static_cast<int64_t>(k);
    const int64_t ro = row * static_cast<int64_t>(E);
    // Pre-softmax: the row's softmax statistics in exact_math.h's order (L == 32 here: lane j
    // takes experts j, j + 32, ...), exactly as the forward computed them.
    float mx = 0.0f, sum = 1.0f;
    if (pre) {
      warp_softmax_stats([&](int64_t i) { return load_as_float(a.logits, a.logits_dt, ro + i); },
                         ok_row ? E : 0, j, &mx, &sum);
    }
    auto softmax_at = [&](int64_t e) {
      return softmax_numerator(load_as_float(a.logits, a.logits_dt, ro + e), mx) / sum;
    };
    // Sums over the slots in slot order (routing_math.h): A = sum r_j from the first term,
    // B = sum g_j r_j (dot_add), with r the residual (pre-softmax: s recomputed).
    float A = 0.0f, B = 0.0f;
    for (int r0 = 0; r0 < k; r0 += L) {
      const int r = r0 + j;
      float g = 0.0f, s = 0.0f;
      if (ok_row && r < k) {
        const int64_t e = load_index(a.indices, a.index_dt, ko + r);
        const bool ok = e >= 0 && e < E;
        g = a.dense_grad ? (ok ? load_as_float(a.grad, a.grad_dt, ro + e) : 0.0f)
                         : load_as_float(a.grad, a.grad_dt, ko + r);
        g = ok ? a.scaling * g : 0.0f;
        s = pre ? (ok ? softmax_at(e) : 0.0f) : a.act[ko + r];
      }
      const int n = min(L, k - r0);
      for (int q = 0; q < n; ++q) {
        const float sq = __shfl_sync(0xFFFFFFFFu, s, q, L);
        const float gq = __shfl_sync(0xFFFFFFFFu, g, q, L);
        A = r0 + q == 0 ? sq : slot_sum_add(A, sq);
        B = dot_add(B, gq, sq);
      }
    }
    R* dst = out + ro;  // where the row is assembled
    if (kStaged) {
      dst = reinterpret_cast<R*>(bwd_stage) + (threadIdx.x / L) * static_cast<int64_t>(E);
      const int nvec = E * static_cast<int>(sizeof(R)) / 16;
      for (int q = j; q < nvec; q += L) reinterpret_cast<uint4*>(dst)[q] = make_uint4(0, 0, 0, 0);
    } else if (ok_row) {
      if (pre) {
        for (int i = j; i < E; i += L) dst[i] = D::from_f(softmax_grad(softmax_at(i), 0.0f, B));
      } else {
        group_zero<R, L>(dst, E, j);
      }
    }
    __syncwarp();  // the row's zeros are stored before the k entries overwrite theirs
    if (ok_row) {
      for (int r = j; r < k; r += L) {
        const int64_t e = load_index(a.indices, a.index_dt, ko + r);
        if (e < 0 || e >= E) continue;
        float g = a.dense_grad ? load_as_float(a.grad, a.grad_dt, ro + e)
                               : load_as_float(a.grad, a.grad_dt, ko + r);
        g = a.scaling * g;
        float dx;
        if (pre) {
          dx = softmax_grad(softmax_at(e), g, B);
        } else {
          const float res = a.act[ko + r];
          dx = DispatchScoreFn(a.fn, [&](auto fn) {
            return grad_logit<decltype(fn)::value>(k, g, res, A, B);
          });
        }
        dst[e] = D::from_f(dx);
      }
    }
    if (kStaged) {
      __syncwarp();  // the staged row is complete before it is copied out
      if (ok_row) {
        const int nvec = E * static_cast<int>(sizeof(R)) / 16;
        for (int q = j; q < nvec; q += L) {
          reinterpret_cast<uint4*>(out + ro)[q] = reinterpret_cast<const uint4*>(dst)[q];
        }
      }
    }
    __syncwarp();  // this row's stores (and staged reads) are done before the next row's zeros
  }
}

}  // namespace cuda
}  // namespace jax_router
