// The softmax forward for bfloat16 logits, one thread a token: softmax without pre-softmax (the
// selection is on the raw logits), no group-limited routing, E a multiple of 64 up to
// kSoftmaxBf16MaxE, topk <= 16, compact outputs only (Qwen3: E = 128, k = 8; Qwen3-Next:
// E = 512, k = 10). Same bits as the fast forward and the CPU (routing_math.h); the launcher
// takes it on devices of compute capability 9.0 or newer (router_launch.cuh).
//
// The selection score of an expert is its logit itself, so the screen needs no arithmetic at
// all, only bf16x2 maxima and compares, two logits an instruction:
//   1. pass 1: word w of the row (logits 2w, 2w + 1) goes into accumulator w % kP by a bf16x2
//      maximum (from -inf), which gives the maxima of 2 kP disjoint groups (low halves, high
//      halves). A maximum skips NaNs: a group of NaNs only keeps -inf.
//   2. L = the k-th largest of the 2 kP group maxima: a bitonic sort of the kP words (both
//      halves at once), the top kP of the two sorted halves by one bf16x2 maximum a pair, and
//      where k < kP a bitonic merge of those. If L > -inf, k group maxima are experts with
//      logit >= L, so every expert of the selection has logit >= L (any expert below L has k
//      experts above it, in float order and so in key order). If L = -inf every number is a
//      candidate.
//   3. pass 2: a candidate mask of the logits >= L, two a bf16x2 compare (IEEE: NaN never,
//      -0 == +0, so the mask is a superset of the experts whose order key is >= L's; about 10
//      a token of 128 on N(0, 1) logits, 12 of 512 for k = 10).
//   4. each candidate's 32-bit slot key (the 16-bit order key of its bf16 logit, then the
//      expert id inverted: routing_math.h's order with ties to the lower id) into a descending
//      list of kK: the top k of a superset of the selection, in order. Fewer than k candidates
//      means fewer than k numbers in the row (NaNs are selected): route_exact below.
//   5. weights by routing_math.h's formulas in slot order, the fast forward's stores.
// Rows are staged in shared memory a warp tile of 32 at a time with coalesced cp.async copies
// (cuda_rows.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_rows.cuh"
#include "router_fwd_fast.cuh"
#include "router_fwd_small.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

constexpr int kSoftmaxBf16MaxE = 512;
constexpr int kSoftmaxBf16Warps = 2;  // a block; the occupancy calculator sets blocks an SM
// The smallest batch the launcher gives it, for E <= 128 (E / 128 times that above): a token is
// one thread's work, so a small batch is one round of warps, each as slow as its slowest row;
// below this the fast forward finishes sooner (benchmarks/NOTES.md, row 73).
#ifndef JR_SOFTMAX_BF16_MIN_ROWS  // a knob for the benchmarks' A/B runs only
#define JR_SOFTMAX_BF16_MIN_ROWS 16384
#endif
inline int64_t SoftmaxBf16MinRows(int64_t E) {
  return static_cast<int64_t>(JR_SOFTMAX_BF16_MIN_ROWS) * (E > 128 ? E / 128 : 1);
}

// Whether the kernel can take a call (the launcher also asks for compute capability 9.0).
inline bool SoftmaxBf16Fits(int64_t E, const RouteParams& p, Dt dt, bool dense_outputs,
                            bool logits_aligned) {
  return dt == Dt::kBF16 && p.score_fn == ScoreFn::kSoftmax && !p.pre_softmax &&
         p.group_topk <= 0 && !is_qb(p) && !dense_outputs && E % 64 == 0 && E >= 64 &&
         E <= kSoftmaxBf16MaxE && p.topk <= 16 && logits_aligned;
}

// Shared memory of one warp: its 32 rows, then the candidate masks (mask j of lane l at word
// 32 j + l: a lane's masks in its own bank). 68 E bytes: a multiple of 128, as the staging
// and the reads' swizzle need.
__host__ __device__ inline size_t SoftmaxBf16WarpSmem(int E) { return static_cast<size_t>(32) * 2 * E + 4 * E; }

// ---- packed bfloat16 helpers -----------------------------------------------------------------

// 0xFFFFFFFF where bit 15 of a is set, else 0 (prmt's sign-replicating selector).
__device__ __forceinline__ uint32_t sign_mask16(uint32_t a) {
  uint32_t d;
  asm("prmt.b32 %0, %1, 0, 0x9999;" : "=r"(d) : "r"(a));
  return d;
}
__device__ __forceinline__ uint32_t swap_halves(uint32_t a) { return __byte_perm(a, 0, 0x1032); }
__device__ __forceinline__ float bf16_lo(uint32_t a) { return __uint_as_float(a << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t a) { return __uint_as_float(a & 0xFFFF0000u); }

// Bitonic sort of n packed words, descending, both halves as independent sequences
// (max / min of bfloat16 numbers; the callers pass no NaN).
template <int N>
__device__ __forceinline__ void sort_desc_bf16x2(uint32_t (&v)[N]) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          const uint32_t hi = max_bf16x2(v[i], v[j]), lo = min_bf16x2(v[i], v[j]);
          const bool desc = (i & size) == 0;
          v[i] = desc ? hi : lo;
          v[j] = desc ? lo : hi;
        }
      }
    }
  }
}

// The 16-bit order key of a bfloat16 number h (routing_math.h's order_key on its float: larger
// is better, +0 above -0): its bits with the sign bit set, or all bits flipped for a negative
// one. In the low 16 bits (the high ones are garbage: slot_key16 shifts them out).
__device__ __forceinline__ uint32_t bf16_number_key(uint32_t h) {
  return h ^ (sign_mask16(h) | 0x8000u);
}
// The same for any bfloat16: NaN at 0, below -inf's 0x007F.
__device__ __forceinline__ uint32_t bf16_order_key(uint32_t h) {
  return (h & 0x7FFFu) > 0x7F80u ? 0u : bf16_number_key(h);
}
// The bfloat16 a non-NaN key came from.
__device__ __forceinline__ uint32_t bf16_from_order_key(uint32_t key) {
  return (key & 0x8000u) ? (key & 0x7FFFu) : (~key & 0xFFFFu);
}
// One slot key: order key high, expert id inverted low (distinct in a row; larger is better).
__device__ __forceinline__ uint32_t slot_key16(uint32_t key, int e) {
  return (key << 16) | (0xFFFFu - static_cast<uint32_t>(e));
}

// Inserts c into the descending list (c = 0: no change). Every comparison is made against the
// old list at once, so the chain is three instructions deep, not two a place.
template <int kK>
__device__ __forceinline__ void insert_desc(uint32_t c, uint32_t (&list)[kK]) {
  bool above[kK];
#pragma unroll
  for (int p = 0; p < kK; ++p) above[p] = c > list[p];
#pragma unroll
  for (int p = kK - 1; p > 0; --p) list[p] = above[p] ? (above[p - 1] ? list[p - 1] : c) : list[p];
  list[0] = above[0] ? c : list[0];
}

// ---- the exact path (a row with fewer than topk numbers) --------------------------------------

// Every expert's slot key (NaN logits last, in id order) into the list, from global memory.
template <int kK>
__device__ __noinline__ void route_exact_softmax_bf16(const uint16_t* row, int E, uint32_t (&list)[kK]) {
  for (int p = 0; p < kK; ++p) list[p] = 0u;
  for (int e = 0; e < E; ++e) insert_desc(slot_key16(bf16_order_key(row[e]), e), list);
}

// ---- the kernel -------------------------------------------------------------------------------

template <int kK>  // 8 (k <= 8) or 16 (k <= 16): the list, and kP = kK accumulators
__global__ void __launch_bounds__(32 * kSoftmaxBf16Warps) fwd_softmax_bf16_kernel(const FastArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // sm_90 instructions (bf16x2 compares); the launcher asks for 9.0
#else
  constexpr int kP = kK;
  constexpr uint32_t kNegInf2 = 0xFF80FF80u;  // bf16 -inf in both halves
  // its own name: an extern array declared again with another alignment keeps the first one
  extern __shared__ __align__(128) char rows_sm[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int E = a.E, k = a.k;
  const int row_bytes = 2 * E, chunks = E / 8, blocks64 = E / 64, nmask = E / 32;
  char* tile = rows_sm + static_cast<size_t>(warp) * SoftmaxBf16WarpSmem(E);
  const uint32_t tile_s = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  uint32_t* masks = reinterpret_cast<uint32_t*>(tile + 32 * row_bytes) + lane;
  const char* row = tile + lane * row_bytes;
  // A row's byte b sits at b ^ swz (cuda_rows.cuh's chunk swizzle: bits 4-6 XOR the row's low
  // three bits). off[j]: chunk j of each 128-byte block of the row.
  const int swz = (lane & 7) << 4;
  int off[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) off[j] = (16 * j) ^ swz;
  const int64_t ntiles = (a.rows + 31) / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSoftmaxBf16Warps;

  // The tile's copies: copy j of this lane is the tile's 16-byte chunk i = lane + 32 j, i.e.
  // source byte 16 i and row r = i / chunks (stepped by dr, dc without a division).
  const int dr = 32 / chunks, dc = 32 % chunks;
  auto stage = [&](int64_t wt) {
    const int64_t t0 = wt * 32;
    const int nrows = static_cast<int>(a.rows - t0 < 32 ? a.rows - t0 : 32);
    const char* src = static_cast<const char*>(a.logits) + t0 * row_bytes + 16 * lane;
    uint32_t dst = tile_s + 16 * lane;
    for (int r = lane / chunks, c = lane % chunks; r < nrows;) {
      cp_async16(dst ^ ((r & 7) << 4), src);  // tile_s is 128-byte aligned (SoftmaxBf16WarpSmem)
      src += 512;
      dst += 512;
      r += dr;
      c += dc;
      if (c >= chunks) c -= chunks, ++r;
    }
  };

  // Warp tiles interleaved across blocks, so that a partial last round spreads over every SM.
  const int64_t first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  if (first < ntiles) stage(first);
  for (int64_t wt = first; wt < ntiles; wt += stride) {
    const int64_t t0 = wt * 32;
    const int nrows = static_cast<int>(a.rows - t0 < 32 ? a.rows - t0 : 32);
    cp_async_wait_all();
    __syncwarp();  // every lane's copies landed and are visible to the warp

    const int64_t t = t0 + lane;
    const bool live = lane < nrows;
    uint32_t list[kK];
    if (live) {
      // 1. Group maxima, 64 logits (8 chunks) an iteration. NaNs are skipped (a group of NaNs
      // only keeps -inf, which is no expert's logit unless one is -inf).
      uint32_t acc[kP];
#pragma unroll
      for (int j = 0; j < kP; ++j) acc[j] = kNegInf2;
#pragma unroll 1
      for (int b = 0; b < blocks64; ++b) {
        const char* blk = row + 128 * b;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint4 v = *reinterpret_cast<const uint4*>(blk + off[j]);
          acc[(4 * j) % kP] = max_bf16x2(acc[(4 * j) % kP], v.x);
          acc[(4 * j + 1) % kP] = max_bf16x2(acc[(4 * j + 1) % kP], v.y);
          acc[(4 * j + 2) % kP] = max_bf16x2(acc[(4 * j + 2) % kP], v.z);
          acc[(4 * j + 3) % kP] = max_bf16x2(acc[(4 * j + 3) % kP], v.w);
        }
      }

      // 2. L, the k-th largest group maximum.
      sort_desc_bf16x2(acc);
      uint32_t top[kP / 2];  // low half: the i-th of the top kP (bitonic), high: the (kP-1-i)-th
#pragma unroll
      for (int i = 0; i < kP / 2; ++i) top[i] = max_bf16x2(acc[i], swap_halves(acc[kP - 1 - i]));
      uint32_t lw;  // L in both halves
      if (k == kP) {
        uint32_t m = top[0];
#pragma unroll
        for (int i = 1; i < kP / 2; ++i) m = min_bf16x2(m, top[i]);
        lw = min_bf16x2(m, swap_halves(m));
      } else {
        float f[kP];
#pragma unroll
        for (int i = 0; i < kP / 2; ++i) {
          f[i] = bf16_lo(top[i]);
          f[kP - 1 - i] = bf16_hi(top[i]);
        }
#pragma unroll
        for (int d = kP / 2; d > 0; d >>= 1) {
#pragma unroll
          for (int i = 0; i < kP; ++i) {
            if ((i & d) == 0) {
              const float hi = fmaxf(f[i], f[i + d]), lo = fminf(f[i], f[i + d]);
              f[i] = hi;
              f[i + d] = lo;
            }
          }
        }
        // f is descending: f[k - 1] is the smallest of its first k (a min chain: a select
        // chain on i == k - 1 compiled to a run-time-indexed local-memory load)
        float l = f[0];
#pragma unroll
        for (int i = 1; i < kP; ++i) l = i < k ? fminf(l, f[i]) : l;
        lw = (__float_as_uint(l) >> 16) * 0x10001u;
      }

      // 3. The candidate masks, 32 logits (4 chunks) a mask: bit 8 y + j of mask q is logit
      // 32 q + 4 j + y.
#pragma unroll 1
      for (int b = 0; b < blocks64; ++b) {
        const char* blk = row + 128 * b;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t mask = 0;
#pragma unroll
          for (int j = 0; j < 4; j += 2) {
            const uint4 v0 = *reinterpret_cast<const uint4*>(blk + off[4 * h + j]);
            const uint4 v1 = *reinterpret_cast<const uint4*>(blk + off[4 * h + j + 1]);
            const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              // logits 4 (2 j + u) .. +3 of the mask's 32: bytes 0, 2 of each compare word
              const uint32_t fl = __byte_perm(ge_bf16x2(w[2 * u], lw), ge_bf16x2(w[2 * u + 1], lw), 0x6420);
              mask |= fl & (0x01010101u << (2 * j + u));
            }
          }
          masks[32 * (2 * b + h)] = mask;
        }
      }

      // 4. The candidates' slot keys into the list, one an iteration across all masks (a warp
      // runs as many iterations as its lane with the most candidates). Logit 32 q + 4 j + y
      // is at row byte (64 q + 8 j + 2 y) ^ swz; a candidate is a number (bf16_number_key).
#pragma unroll
      for (int p = 0; p < kK; ++p) list[p] = 0u;
      int q = 0;
      uint32_t mask = masks[0];
      while (true) {
        while (mask == 0 && q + 1 < nmask) mask = masks[32 * ++q];
        if (mask == 0) break;
        const int bit = 31 - __clz(mask);
        mask ^= 1u << bit;
        const int e = 32 * q + 4 * (bit & 7) + (bit >> 3);
        const uint32_t h = *reinterpret_cast<const uint16_t*>(row + ((2 * e) ^ swz));
        insert_desc(slot_key16(bf16_number_key(h), e), list);
      }
      uint32_t kth = list[0];  // list[k - 1], the smallest of the first k (as L above)
#pragma unroll
      for (int p = 1; p < kK; ++p) kth = p < k ? min(kth, list[p]) : kth;
      if (kth == 0u) {
        // fewer than k numbers were candidates: L was -inf from a group of NaNs only, and the
        // selection takes NaNs
        uint32_t list_x[kK];  // its own array: `list` stays in registers on the screened path
        route_exact_softmax_bf16<kK>(
            reinterpret_cast<const uint16_t*>(static_cast<const char*>(a.logits) + t * row_bytes), E, list_x);
#pragma unroll
        for (int p = 0; p < kK; ++p) list[p] = list_x[p];
      }
    }
    __syncwarp();  // every lane done with the tile: the next tile's copies go out under the weights
    if (wt + stride < ntiles) stage(wt + stride);

    if (live) {
      // 5. Weights in slot order (routing_math.h), then the stores.
      constexpr ScoreFn F = ScoreFn::kSoftmax;
      float x[kK];
      int sel[kK];
#pragma unroll
      for (int r = 0; r < kK; ++r) {
        x[r] = exact::bf16_bits_to_float(static_cast<uint16_t>(bf16_from_order_key(list[r] >> 16)));
        sel[r] = static_cast<int>(0xFFFFu - (list[r] & 0xFFFFu));
      }
      float u[kK];
      const float denom = slot_numerators<F>(x, k, u);
      const int64_t ko = t * k;
      if (kK == 8 && a.slots_vec && k == 8) {  // slots_vec: 16-byte aligned int32 outputs
        uint32_t wv[8], iv[8], rv[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const float p = weight<F>(false, k, u[r], denom);
          wv[r] = __float_as_uint(compact_weight(a.scaling * p));
          iv[r] = static_cast<uint32_t>(sel[r]);
          rv[r] = __float_as_uint(compact_residual<F>(p, u[r]));
        }
        if (a.weights) store_words<8>(a.weights + ko, wv);
        if (a.indices) store_words<8>(static_cast<int32_t*>(a.indices) + ko, iv);
        if (a.act) store_words<8>(a.act + ko, rv);
      } else {
#pragma unroll
        for (int r = 0; r < kK; ++r) {
          if (r < k) {
            const float p = weight<F>(false, k, u[r], denom);
            store_slot<F>(a, ko, r, sel[r], a.scaling * p, p, u[r]);
          }
        }
      }
    }
  }
#endif
}

}  // namespace cuda
}  // namespace jax_router
