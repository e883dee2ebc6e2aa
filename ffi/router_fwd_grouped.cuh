// The grouped sigmoid forward for bfloat16 logits: DeepSeek-V3's shape (E = 256 in 8 groups of
// 32, sigmoid + bias, group-limited routing with topk / group_topk <= 2, topk <= 8), compact
// outputs only. Same bits as the fast forward and the CPU (routing_math.h); the launcher takes
// it for batches of at least kGroupedMinRows on devices with the shared memory
// (router_launch.cuh). On the H200 it takes DeepSeek-V3 bf16 compact at 65536 tokens from 59.0
// to 38.9 us and at 262144 from 224 to 110 (benchmarks/NOTES.md, rows 65-71).
//
// One thread per token, the warp's 32 rows staged in shared memory with coalesced cp.async
// copies. The fast forward spends most of its instructions on the exact sigmoid (~13 an
// element); here it is a lookup in sigmoid_table.cuh's exact table. A row with a NaN logit (or
// a launch with a non-finite bias) takes route_exact below.
//
// Per token, on selection scores z = s + bias (floats: no NaN, never -0, so float order is
// routing_math.h's key order):
//   1. pass 1 over the 8 groups: each group's top two z (its score z0 + z1, or z0 when m = 1);
//      each z, truncated to a bfloat16 (toward zero: a non-decreasing function of z),
//      overwrites its logit in the tile;
//   2. group ranks (ties to the lower group), the kept groups, and tau = the smallest m-th value
//      of a kept group: the k = m * group_topk values that define tau are all >= tau, so every
//      expert of the selection has z >= tau;
//   3. pass 2 over the kept groups' truncated scores, two a bf16x2 compare: a mask of every
//      element whose truncated z is >= tau's, a superset of z >= tau (~10.7 a token on N(0, 1)
//      logits); the logits of the 16-byte chunks holding one are copied back into the tile;
//   4. the candidates, recomputed exactly in ascending expert order, inserted into a sorted list
//      of 8 (strictly greater goes first, so equal scores keep the lower expert first): the
//      top k of a superset of the candidates, i.e. the selection in slot order;
//   5. weights by routing_math.h's formulas in slot order, the same stores as the fast forward.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_rows.cuh"
#include "router_fwd_fast.cuh"
#include "router_fwd_small.cuh"
#include "routing_math.h"
#include "sigmoid_table.cuh"

namespace jax_router {
namespace cuda {

#ifndef JR_GROUPED_MIN_ROWS  // a knob for the benchmarks' A/B runs only
#define JR_GROUPED_MIN_ROWS 16384
#endif
constexpr int64_t kGroupedMinRows = JR_GROUPED_MIN_ROWS;

constexpr int kGroupedE = 256;
constexpr int kGroupedGroups = 8;
#ifndef JR_GROUPED_WARPS  // a knob for the benchmarks' A/B runs only (8 to 12)
#define JR_GROUPED_WARPS 12
#endif
constexpr int kGroupedWarps = JR_GROUPED_WARPS;
constexpr int kGroupedThreads = 32 * kGroupedWarps;
constexpr int kGroupedRowBytes = 2 * kGroupedE;            // bfloat16 logits
constexpr int kGroupedTileBytes = 32 * kGroupedRowBytes;   // one warp's 32 rows

// Shared memory, in bytes from the dynamic base: the table (sigmoid_table.cuh) with its
// negative half at kSigNegOff; the warps' tiles and the bias fill the space between and after.
constexpr int RoundUp16(int v) { return (v + 15) & ~15; }
constexpr int kTilesLow = (kSigNegOff - RoundUp16(kSigTableBytes)) / kGroupedTileBytes;  // 7
constexpr int kTilesHigh = kGroupedWarps - kTilesLow;
constexpr int kTileLowOff = RoundUp16(kSigTableBytes);
constexpr int kTileHighOff = RoundUp16(kSigNegOff + kSigTableBytes);
// Bias row g at g * kBiasRowBytes: 16 bytes of padding a group, so that the 16-byte loads of
// threads on different groups fall in different banks.
constexpr int kBiasRowBytes = 4 * 32 + 16;
constexpr int kBiasOff = kTileHighOff + kTilesHigh * kGroupedTileBytes;
constexpr int kGroupedSmem = kBiasOff + kGroupedGroups * kBiasRowBytes;
static_assert(kTileLowOff + kTilesLow * kGroupedTileBytes <= kSigNegOff, "low tiles overlap");
static_assert(kTilesHigh > 0, "tiles");

// Whether the grouped kernel can take a call (the launcher also asks for the shared memory
// and a batch large enough to fill the device).
inline bool GroupedForwardFits(int64_t E, const RouteParams& p, Dt dt, bool dense_outputs,
                               bool single_bias_row, bool logits_aligned) {
  return E == kGroupedE && dt == Dt::kBF16 && p.score_fn == ScoreFn::kSigmoid && !is_qb(p) &&
         !dense_outputs && p.group_topk > 0 && p.num_groups == kGroupedGroups && p.topk <= 8 &&
         p.topk / p.group_topk <= 2 && single_bias_row && logits_aligned;
}

// ---- small device helpers -----------------------------------------------------------------

// Expert e's bfloat16 logit in its row of the tile (zero-extended: the low half of a pair).
__device__ __forceinline__ uint32_t tile_logit(const char* row, int sw, int e) {
  return *reinterpret_cast<const uint16_t*>(row + chunk_off(e >> 3, sw) + 2 * (e & 7));
}

// Group g's 32 biases in shared memory (rows of kBiasRowBytes).
__device__ __forceinline__ const float* bias_row(const float* bias_sm, int g) {
  return bias_sm + g * (kBiasRowBytes / 4);
}

// Top two of a stream of floats (m1 >= m2); FMNMX only.
__device__ __forceinline__ void top2_push(float z, float& m1, float& m2) {
  m2 = fmaxf(m2, fminf(m1, z));
  m1 = fmaxf(m1, z);
}

// (a1, a2) <- the top two of (a1, a2) and (b1, b2), each a descending pair.
__device__ __forceinline__ void top2_merge(float& a1, float& a2, float b1, float b2) {
  a2 = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
  a1 = fmaxf(a1, b1);
}

// Bit j of even -> bit 2j, bit j of odd -> bit 2j + 1 (j < 16).
__device__ __forceinline__ uint32_t interleave16(uint32_t even, uint32_t odd) {
  auto spread = [](uint32_t x) {
    x = (x | (x << 8)) & 0x00FF00FFu;
    x = (x | (x << 4)) & 0x0F0F0F0Fu;
    x = (x | (x << 2)) & 0x33333333u;
    return (x | (x << 1)) & 0x55555555u;
  };
  return spread(even) | (spread(odd) << 1);
}

// Inserts (z, e) into the descending list (zl, el): strictly greater goes first, so among equal
// scores the expert inserted earlier (the lower id) stays ahead.
__device__ __forceinline__ void insert8(float z, int e, float (&zl)[8], int (&el)[8]) {
  bool above[8];
#pragma unroll
  for (int p = 0; p < 8; ++p) above[p] = z > zl[p];
#pragma unroll
  for (int p = 7; p > 0; --p) {
    zl[p] = above[p] ? (above[p - 1] ? zl[p - 1] : z) : zl[p];
    el[p] = above[p] ? (above[p - 1] ? el[p - 1] : e) : el[p];
  }
  zl[0] = above[0] ? z : zl[0];
  el[0] = above[0] ? e : el[0];
}

// ---- the exact path (a row with a NaN logit, or a non-finite bias) --------------------------

// routing_math.h's selection with 32-bit order keys and 64-bit slot keys, the fast forward's
// steps written plainly: NaN scores rank below every number and a NaN group score below every
// group. Reads the token's row from global memory (the tile holds truncated scores by then);
// writes the selected experts (slot order) and their activations.
__device__ __noinline__ void route_exact(const uint16_t* row, const float* bias_sm, int gk, int m,
                                         int k, int (&sel)[8], float (&u)[8]) {
  auto score = [&](int e) {
    const float s = activation<ScoreFn::kSigmoid>(exact::bf16_bits_to_float(row[e]));
    return order_key(selection_score(s, bias_row(bias_sm, e >> 5)[e & 31]));
  };
  uint32_t gkey[kGroupedGroups], gmth[kGroupedGroups];
  for (int g = 0; g < kGroupedGroups; ++g) {
    uint32_t t1 = 0, t2 = 0;
    for (int i = 0; i < 32; ++i) {
      const uint32_t key = score(32 * g + i);
      t2 = max(t2, min(t1, key));
      t1 = max(t1, key);
    }
    float gs = order_key_value(t1);
    if (m == 2) gs = group_score_add(gs, order_key_value(t2));
    gkey[g] = order_key(gs);
    gmth[g] = m == 2 ? t2 : t1;
  }
  uint32_t tau = 0xFFFFFFFFu;
  unsigned kept = 0;
  for (int g = 0; g < kGroupedGroups; ++g) {
    int rank = 0;
    for (int h = 0; h < kGroupedGroups; ++h) {
      rank += (gkey[h] > gkey[g] || (gkey[h] == gkey[g] && h < g)) ? 1 : 0;
    }
    if (rank < gk) {
      kept |= 1u << g;
      tau = min(tau, gmth[g]);
    }
  }
  unsigned long long list[8];
  for (int r = 0; r < 8; ++r) list[r] = 0ull;
  for (int e = 0; e < kGroupedE; ++e) {
    if (!((kept >> (e >> 5)) & 1u)) continue;
    const uint32_t key = score(e);
    if (key < tau) continue;
    unsigned long long sk = slot_key(key, static_cast<uint32_t>(e));
    for (int r = 0; r < 8; ++r) {  // insertion into the descending list
      const unsigned long long hi = sk > list[r] ? sk : list[r];
      sk = sk > list[r] ? list[r] : sk;
      list[r] = hi;
    }
  }
  for (int r = 0; r < 8; ++r) {
    sel[r] = r < k ? static_cast<int>(slot_expert(list[r])) : 0;
    u[r] = activation<ScoreFn::kSigmoid>(exact::bf16_bits_to_float(row[sel[r]]));
  }
}

// ---- the kernel -----------------------------------------------------------------------------

// Issues the copies of warp tile wt's rows (row r, chunk `lane`: one coalesced 512-byte row a
// copy instruction), swizzled as chunk_off reads them.
__device__ __forceinline__ void stage_tile(const FastArgs& a, int64_t wt, uint32_t tile_s, int lane) {
  const int64_t t0 = wt * 32;
  const int nrows = static_cast<int>(a.rows - t0 < 32 ? a.rows - t0 : 32);
  const char* src = static_cast<const char*>(a.logits) + t0 * kGroupedRowBytes + 16 * lane;
#pragma unroll 8
  for (int r = 0; r < 32; ++r) {
    if (r < nrows) {
      cp_async16(tile_s + r * kGroupedRowBytes + chunk_off(lane, r & 7),
                 src + static_cast<int64_t>(r) * kGroupedRowBytes);
    }
  }
}

__global__ void __launch_bounds__(kGroupedThreads, 1) fwd_grouped_kernel(const FastArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // sm_90 instructions (u16x2 and bf16x2 compares); LaunchRouting asks for 9.0
#else
  extern __shared__ __align__(16) char sm[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k = a.k, gk = a.group_topk, m = a.m;

  char* tile = sm + (warp < kTilesLow ? kTileLowOff + warp * kGroupedTileBytes
                                      : kTileHighOff + (warp - kTilesLow) * kGroupedTileBytes);
  const uint32_t tile_s = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  const int64_t ntiles = (a.rows + 31) / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroupedWarps;
  // Warp tiles interleaved across blocks, so that a partial last round spreads over every SM.
  // The first tile's copies go out before the table is made, to overlap their latency.
  const int64_t first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  if (first < ntiles) stage_tile(a, first, tile_s, lane);

  const int mode = sig_table_fill(sm, kGroupedThreads);
  // The bias (0 without one: s + 0 = s).
  bool bias_bad = false;
  for (int i = threadIdx.x; i < kGroupedE; i += kGroupedThreads) {
    const float b = a.bias != nullptr ? __ldg(a.bias + i) : 0.0f;
    bias_bad |= !(fabsf(b) <= 3.402823466e38f);  // NaN or infinite
    *reinterpret_cast<float*>(sm + kBiasOff + (i >> 5) * kBiasRowBytes + 4 * (i & 31)) = b;
  }
  // Every table and bias entry written before any thread reads one.
  bias_bad = __syncthreads_or(bias_bad);
  sig_table_publish(sm, mode, kGroupedThreads);

  const float* bias_sm = reinterpret_cast<const float*>(sm + kBiasOff);
  char* row = tile + lane * kGroupedRowBytes;
  const int sw = lane & 7;

  for (int64_t wt = first; wt < ntiles; wt += stride) {
    const int64_t t0 = wt * 32;
    const int nrows = static_cast<int>(a.rows - t0 < 32 ? a.rows - t0 : 32);
    if (wt != first) stage_tile(a, wt, tile_s, lane);
    cp_async_wait_all();
    __syncwarp();  // every lane's copies landed and are visible to the warp

    const int64_t t = t0 + lane;
    if (lane < nrows) {
      // 1. Each group's score and m-th value, two groups an iteration, each group's top two
      // tracked per 8-element chunk and merged (four short chains instead of one of 32). The
      // loop stays rolled (unrolled, the compiler runs every group's loads together and
      // spills); results shift in, so that group g ends in slot 7 - g. Each score, truncated
      // to its upper 16 bits (a bfloat16 rounded toward zero: a non-decreasing function of
      // z), overwrites its logit in the tile for pass 2.
      float gsc[kGroupedGroups], gmth[kGroupedGroups];
      uint32_t nan = 0;
#pragma unroll 1
      for (int g2 = 0; g2 < kGroupedGroups; g2 += 2) {
        float m1[2][4], m2[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int g = g2 + h;
          const float* bg = bias_row(bias_sm, g);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            uint4* chunk = reinterpret_cast<uint4*>(row + chunk_off(4 * g + q, sw));
            const uint4 v = *chunk;
            const float4 b0 = *reinterpret_cast<const float4*>(bg + 8 * q);
            const float4 b1 = *reinterpret_cast<const float4*>(bg + 8 * q + 4);
            const uint32_t c0 = clamp_pair(v.x, &nan), c1 = clamp_pair(v.y, &nan);
            const uint32_t c2 = clamp_pair(v.z, &nan), c3 = clamp_pair(v.w, &nan);
            const float z[8] = {selection_score(sig_lo(sm, c0), b0.x), selection_score(sig_hi(sm, c0), b0.y),
                                selection_score(sig_lo(sm, c1), b0.z), selection_score(sig_hi(sm, c1), b0.w),
                                selection_score(sig_lo(sm, c2), b1.x), selection_score(sig_hi(sm, c2), b1.y),
                                selection_score(sig_lo(sm, c3), b1.z), selection_score(sig_hi(sm, c3), b1.w)};
            float& t1 = m1[h][q];
            float& t2 = m2[h][q];
            t1 = fmaxf(z[0], z[1]);
            t2 = fminf(z[0], z[1]);
#pragma unroll
            for (int i = 2; i < 8; ++i) top2_push(z[i], t1, t2);
            *chunk = make_uint4(upper_halves(z[0], z[1]), upper_halves(z[2], z[3]),
                                upper_halves(z[4], z[5]), upper_halves(z[6], z[7]));
          }
          top2_merge(m1[h][0], m2[h][0], m1[h][1], m2[h][1]);
          top2_merge(m1[h][2], m2[h][2], m1[h][3], m2[h][3]);
          top2_merge(m1[h][0], m2[h][0], m1[h][2], m2[h][2]);
        }
#pragma unroll
        for (int j = kGroupedGroups - 1; j > 1; --j) {
          gsc[j] = gsc[j - 2];
          gmth[j] = gmth[j - 2];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          gsc[1 - h] = m == 2 ? group_score_add(m1[h][0], m2[h][0]) : m1[h][0];
          gmth[1 - h] = m == 2 ? m2[h][0] : m1[h][0];
        }
      }
      const bool exact_row = bias_bad || (nan & 0xFFFFu) > 0x7F80u || (nan >> 16) > 0x7F80u;

      int sel[8];
      float u[8];
      if (!exact_row) {
        // 2. Group ranks: one comparison a pair (g < h: g is ahead iff its score is >= h's).
        int rank[kGroupedGroups];
#pragma unroll
        for (int g = 0; g < kGroupedGroups; ++g) rank[g] = 0;
#pragma unroll
        for (int g = 0; g < kGroupedGroups; ++g) {
#pragma unroll
          for (int h = g + 1; h < kGroupedGroups; ++h) {
            const bool g_ahead = gsc[7 - g] >= gsc[7 - h];
            rank[h] += g_ahead ? 1 : 0;
            rank[g] += g_ahead ? 0 : 1;
          }
        }
        unsigned kept = 0;
        float tau = INFINITY;
#pragma unroll
        for (int g = 0; g < kGroupedGroups; ++g) {
          if (rank[g] < gk) {
            kept |= 1u << g;
            tau = fminf(tau, gmth[7 - g]);
          }
        }
        // 3. Pass 2, on the truncated scores: a mask of every element of a kept group whose
        // truncated score is >= tau's (a superset of z >= tau, as truncation never decreases
        // an order). Then the logits of the chunks holding one are copied back into the tile.
        const uint32_t tau2 = (__float_as_uint(tau) >> 16) * 0x10001u;
        uint32_t cm[kGroupedGroups];
        int kg[kGroupedGroups];
        unsigned left = kept;
        const char* grow = static_cast<const char*>(a.logits) + t * kGroupedRowBytes;
#pragma unroll
        for (int q = 0; q < kGroupedGroups; ++q) {
          const int g = left ? __ffs(left) - 1 : 0;
          left &= left - 1;
          uint32_t even = 0, odd = 0;  // bit j: element 2j / 2j + 1 of the group
          if (q < gk) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint4 v = *reinterpret_cast<const uint4*>(row + chunk_off(4 * g + c, sw));
              const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const uint32_t ge = ge_bf16x2(w[j], tau2);
                even |= (ge & 1u) << (4 * c + j);
                odd |= ((ge >> 16) & 1u) << (4 * c + j);
              }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if ((even | odd) & (0xFu << (4 * c))) {
                cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(row + chunk_off(4 * g + c, sw))),
                           grow + 16 * (4 * g + c));
              }
            }
          }
          cm[q] = interleave16(even, odd);
          kg[q] = g;
        }
        cp_async_wait_all();  // this thread's own copies: only it reads its row

        // 4. The candidates in ascending expert order into the sorted list, one candidate an
        // iteration across all kept groups (the next group's mask shifts in when one runs
        // out), so that a warp runs as many iterations as its lane with the most candidates.
        float zl[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          zl[r] = -INFINITY;
          sel[r] = 0;
        }
        uint32_t mask = cm[0];
        int g = kg[0];
        int rest = gk - 1;  // kept groups after the current one
        while (true) {
          while (mask == 0 && rest > 0) {
#pragma unroll
            for (int q = 0; q < kGroupedGroups - 1; ++q) {
              cm[q] = cm[q + 1];
              kg[q] = kg[q + 1];
            }
            mask = cm[0];
            g = kg[0];
            --rest;
          }
          if (mask == 0) break;
          const int i = __ffs(mask) - 1;
          mask &= mask - 1;
          const int e = 32 * g + i;
          const float z = selection_score(sig_lo(sm, clamp_pair(tile_logit(row, sw, e), nullptr)),
                                          bias_row(bias_sm, g)[i]);
          insert8(z, e, zl, sel);
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          const int e = sel[r];
          u[r] = sig_lo(sm, clamp_pair(tile_logit(row, sw, e), nullptr));
        }
      } else {
        int sel_x[8];
        float u_x[8];
        route_exact(reinterpret_cast<const uint16_t*>(static_cast<const char*>(a.logits) +
                                                      t * kGroupedRowBytes),
                    bias_sm, gk, m, k, sel_x, u_x);
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          sel[r] = sel_x[r];
          u[r] = u_x[r];
        }
      }

      // 5. Weights in slot order (routing_math.h), then the stores.
      float sum = u[0];
#pragma unroll
      for (int r = 1; r < 8; ++r) {
        if (r < k) sum = slot_sum_add(sum, u[r]);
      }
      const float denom = weight_denominator<ScoreFn::kSigmoid>(sum);
      const int64_t ko = t * k;
      uint32_t wv[8], iv[8], rv[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const float p = weight<ScoreFn::kSigmoid>(false, k, u[r], denom);
        wv[r] = __float_as_uint(compact_weight(a.scaling * p));
        iv[r] = static_cast<uint32_t>(sel[r]);
        rv[r] = __float_as_uint(compact_residual<ScoreFn::kSigmoid>(p, u[r]));
      }
      if (a.slots_vec && k == 8) {
        if (a.weights) store_words<8>(a.weights + ko, wv);
        if (a.indices) store_words<8>(static_cast<int32_t*>(a.indices) + ko, iv);
        if (a.act) store_words<8>(a.act + ko, rv);
      } else {
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          if (r < k) {
            if (a.weights) a.weights[ko + r] = __uint_as_float(wv[r]);
            if (a.indices) store_index(a.indices, a.index_dt, ko + r, sel[r]);
            if (a.act) a.act[ko + r] = __uint_as_float(rv[r]);
          }
        }
      }
    }
    __syncwarp();  // every lane done with the tile before the next copies overwrite it
  }
#endif
}

}  // namespace cuda
}  // namespace jax_router
