// The backward one thread a row, for large batches: no pre-softmax, topk <= 16, rows of
// grad_logits of whole 16-byte vectors up to kBwdRowsMaxBytes (Qwen3 and Mixtral in bf16).
// routing_math.h's formulas in the same order as bwd_kernel (router_bwd.cuh), so the same
// bits. A thread reads its row's k slots with no shuffles (A and B summed in slot order in
// registers), zeroes its row in shared memory and writes its k entries there; the warp then
// copies its 32 rows out as one contiguous run of 16-byte stores. bwd_kernel spreads a row over
// 8 lanes: its shuffled slot sums are a serial chain of 2 k shuffles a row, and its stores go
// out row by row (benchmarks/NOTES.md: the backward sits at 1.5-2x its floor).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "router_bwd.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

constexpr int kBwdRowsWarps = 4;
// 512-byte rows (DeepSeek-V3 in bf16, Qwen3 in float32) leave 12 warps an SM and took as long
// as bwd_kernel or longer (benchmarks/NOTES.md, row 76)
constexpr int kBwdRowsMaxBytes = 256;
constexpr int kBwdRowsMaxK = 16;
#ifndef JR_BWD_ROWS_MIN_ROWS  // a knob for the benchmarks' A/B runs only
#define JR_BWD_ROWS_MIN_ROWS 16384
#endif
constexpr int64_t kBwdRowsMinRows = JR_BWD_ROWS_MIN_ROWS;

inline bool BwdRowsFits(bool pre_softmax, int64_t E, int64_t elem_bytes, int64_t k, const void* out) {
  const int64_t rb = E * elem_bytes;
  return !pre_softmax && k <= kBwdRowsMaxK && rb % 16 == 0 && rb <= kBwdRowsMaxBytes &&
         (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
}

template <typename D, ScoreFn F>
__global__ void __launch_bounds__(32 * kBwdRowsWarps) bwd_rows_kernel(const BwdKArgs a) {
  using R = typename D::raw;
  extern __shared__ __align__(128) unsigned char bwd_rows_sm[];  // [warps][32 rows][E]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int E = a.E, k = a.k;
  const int rb = E * static_cast<int>(sizeof(R)), cpr = rb / 16;
  unsigned char* tile = bwd_rows_sm + static_cast<size_t>(warp) * 32 * rb;
  // Chunk c of row r sits at chunk c ^ (r & 7) where rows hold whole 8-chunk blocks (a
  // quarter-warp's 16-byte stores to 8 rows then hit 8 distinct bank groups), else at c.
  const bool swizzled = cpr % 8 == 0;
  // r = i / cpr by a multiply-high (ceil(2^32 / cpr): exact for i < 2^16), or i itself for
  // one chunk a row (the magic would be 2^32)
  const uint32_t magic = cpr > 1 ? 0xFFFFFFFFu / static_cast<uint32_t>(cpr) + 1u : 0u;
  const int64_t ntiles = (a.rows + 31) / 32;
  for (int64_t wt = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; wt < ntiles;
       wt += static_cast<int64_t>(gridDim.x) * kBwdRowsWarps) {
    const int64_t t0 = wt * 32;
    const int nrows = static_cast<int>(a.rows - t0 < 32 ? a.rows - t0 : 32);
    const int64_t t = t0 + lane;
    const int key = swizzled ? ((lane & 7) << 4) : 0;
    unsigned char* row = tile + lane * rb;
    if (lane < nrows) {
      for (int c = 0; c < cpr; ++c) *reinterpret_cast<uint4*>(row + ((16 * c) ^ key)) = make_uint4(0, 0, 0, 0);
      // A = sum r_j from the first term, B = sum g_j r_j (dot_add), in slot order, as
      // bwd_kernel; an index outside [0, E) contributes g = 0 and no entry.
      const int64_t ko = t * static_cast<int64_t>(k), ro = t * static_cast<int64_t>(E);
      float g[kBwdRowsMaxK], s[kBwdRowsMaxK];
      int e[kBwdRowsMaxK];
      float A = 0.0f, B = 0.0f;
#pragma unroll
      for (int r = 0; r < kBwdRowsMaxK; ++r) {
        if (r < k) {
          const int64_t ei = load_index(a.indices, a.index_dt, ko + r);
          const bool ok = ei >= 0 && ei < E;
          float gr = a.dense_grad ? (ok ? load_as_float(a.grad, a.grad_dt, ro + ei) : 0.0f)
                                  : load_as_float(a.grad, a.grad_dt, ko + r);
          gr = ok ? a.scaling * gr : 0.0f;
          const float sr = a.act[ko + r];
          A = r == 0 ? sr : slot_sum_add(A, sr);
          B = dot_add(B, gr, sr);
          g[r] = gr;
          s[r] = sr;
          e[r] = ok ? static_cast<int>(ei) : -1;
        }
      }
#pragma unroll
      for (int r = 0; r < kBwdRowsMaxK; ++r) {
        if (r < k && e[r] >= 0) {
          const float dx = grad_logit<F>(k, g[r], s[r], A, B);
          *reinterpret_cast<R*>(row + ((static_cast<int>(sizeof(R)) * e[r]) ^ key)) = D::from_f(dx);
        }
      }
    }
    __syncwarp();  // every lane's row assembled before the warp copies the rows out
    unsigned char* dst = static_cast<unsigned char*>(a.out) + t0 * rb;
    const uint32_t n = static_cast<uint32_t>(nrows * cpr);
    for (uint32_t i = lane; i < n; i += 32) {
      const uint32_t r = cpr > 1 ? __umulhi(i, magic) : i;
      const uint32_t c = i - r * static_cast<uint32_t>(cpr);
      const uint32_t rk = swizzled ? ((r & 7) << 4) : 0u;
      *reinterpret_cast<uint4*>(dst + 16 * static_cast<int64_t>(i)) =
          *reinterpret_cast<const uint4*>(tile + r * rb + ((16 * c) ^ rk));
    }
    __syncwarp();  // the copies read before the next tile's rows are zeroed
  }
}

}  // namespace cuda
}  // namespace jax_router
