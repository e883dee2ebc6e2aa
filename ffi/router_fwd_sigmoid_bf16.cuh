// The sigmoid forward for bfloat16 logits, one thread a token (two from E = 256), without
// group-limited routing:
// sigmoid with or without a bias (one row), E a multiple of 64 up to kSigmoidBf16MaxE,
// topk <= 16, compact outputs (Kimi-K2: E = 384, k = 8). Same bits as the fast forward and the
// CPU (routing_math.h); the launcher takes it on devices of compute capability 9.0 or newer
// with the shared memory (router_launch.cuh).
//
// The bf16 softmax forward's screen (router_fwd_softmax_screen.cuh) on the truncated selection
// scores: pass 0 turns each logit of the tile into zt = z truncated to a bfloat16 (its upper 16
// bits, toward zero: a non-decreasing function of z), with z = s + bias and s the exact sigmoid
// from sigmoid_table.cuh, and takes the group maxima of zt as it goes. L = the k-th largest
// group maximum of zt: k experts have zt >= L, and an expert with zt < L has k experts with a
// larger zt, hence a larger z (a non-decreasing function cannot invert a strict order), so it
// is not selected. The candidates (zt >= L) get their logits copied back from global memory
// (the 16-byte chunks holding one), their exact z and 64-bit slot keys (routing_math.h's order
// key, then the lower expert), inserted into a descending list. z is a number with no -0 (s in
// [0, 1], a finite bias), so the bf16 and float orders agree with the keys'. A row with a NaN
// logit, or a launch with a non-finite bias, takes route_exact_sigmoid below.
//
// Shared memory: the table's halves at 0 and kSigNegOff, the bias after the positive half, the
// warps' tiles (32 / lanes rows and their masks, 68 E / lanes bytes) in the space between and
// after: one block an SM, as many warps as fit (tests/sigmoid_bf16_layout.cu checks it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_rows.cuh"
#include "router_fwd_fast.cuh"
#include "router_fwd_small.cuh"
#include "router_fwd_softmax_screen.cuh"
#include "routing_math.h"
#include "sigmoid_table.cuh"

namespace jax_router {
namespace cuda {

constexpr int kSigmoidBf16MaxE = 512;
// Two lanes a token from this E up (E % 128 == 0): one block an SM holds only 7 warps of
// 32-row tiles at E = 384, so a lone tile's latency is most of the time; 16-row tiles at half
// the bytes double the warps (benchmarks/NOTES.md, row 77). The knob is for the benchmarks'
// A/B runs only.
#ifndef JR_SIGMOID_BF16_PAIR_MIN_E
#define JR_SIGMOID_BF16_PAIR_MIN_E 256
#endif
inline int SigmoidBf16Lanes(int64_t E) { return E >= JR_SIGMOID_BF16_PAIR_MIN_E && E % 128 == 0 ? 2 : 1; }
// The smallest batch the launcher gives it: for one lane a token, M rows up to E = 128 and
// E / 128 times that above; for two, 2 M up to E = 256 and E / 256 times that above (Kimi-K2,
// E = 384: 32768; at 16384 the fast forward is faster). M = JR_SIGMOID_BF16_MIN_ROWS, a knob
// for the benchmarks' A/B runs only.
#ifndef JR_SIGMOID_BF16_MIN_ROWS
#define JR_SIGMOID_BF16_MIN_ROWS 16384
#endif
inline int64_t SigmoidBf16MinRows(int64_t E) {
  const int64_t m = JR_SIGMOID_BF16_MIN_ROWS;
  return SigmoidBf16Lanes(E) == 2 ? 2 * m * (E / 256) : m * (E > 128 ? E / 128 : 1);
}

// Whether the kernel can take a call (the launcher also asks for compute capability 9.0 and
// sizes the block from the shared memory).
inline bool SigmoidBf16Fits(int64_t E, const RouteParams& p, Dt dt, bool dense_outputs,
                            bool single_bias_row, bool logits_aligned) {
  return dt == Dt::kBF16 && p.score_fn == ScoreFn::kSigmoid && p.group_topk <= 0 && !is_qb(p) &&
         !dense_outputs && E % 64 == 0 && E >= 64 && E <= kSigmoidBf16MaxE && p.topk <= 16 &&
         single_bias_row && logits_aligned;
}

// The shared-memory layout for E (bytes from the dynamic base, 128-byte aligned tiles).
__host__ __device__ constexpr int RoundUp128(int v) { return (v + 127) & ~127; }
// A warp's tile: its 32 / lanes rows (2 E bytes each) and the candidate masks (E / 32 a token).
__host__ __device__ inline int SigmoidBf16WarpBytes(int E, int lanes) { return 68 * E / lanes; }
constexpr int kSigmoidBf16BiasOff = (kSigTableBytes + 15) & ~15;
__host__ __device__ inline int SigmoidBf16LowOff(int E) { return RoundUp128(kSigmoidBf16BiasOff + 4 * E); }
__host__ __device__ inline int SigmoidBf16LowWarps(int E, int lanes) {
  return (kSigNegOff - SigmoidBf16LowOff(E)) / SigmoidBf16WarpBytes(E, lanes);
}
constexpr int kSigmoidBf16HighOff = RoundUp128(kSigNegOff + kSigTableBytes);
__host__ __device__ inline int SigmoidBf16TileOff(int E, int lanes, int warp) {
  const int low = SigmoidBf16LowWarps(E, lanes), wb = SigmoidBf16WarpBytes(E, lanes);
  return warp < low ? SigmoidBf16LowOff(E) + warp * wb : kSigmoidBf16HighOff + (warp - low) * wb;
}
// Warps a block within `smem` bytes (at most `most`); 0 where the table's negative half does
// not fit (devices of compute capability 9.0 or newer with ~100 KiB a block, such as 12.0).
inline int SigmoidBf16Warps(int E, int lanes, int smem, int most) {
  if (smem < kSigmoidBf16HighOff) return 0;
  int w = SigmoidBf16LowWarps(E, lanes);
  if (smem > kSigmoidBf16HighOff) w += (smem - kSigmoidBf16HighOff) / SigmoidBf16WarpBytes(E, lanes);
  return w < most ? w : most;
}
// The bytes a block of `warps` uses: its last tile's end, and at least the table's negative half
// (E = 64 fits 16 warps below it).
inline int SigmoidBf16Smem(int E, int lanes, int warps) {
  const int tiles_end = SigmoidBf16TileOff(E, lanes, warps - 1) + SigmoidBf16WarpBytes(E, lanes);
  return tiles_end > kSigmoidBf16HighOff ? tiles_end : kSigmoidBf16HighOff;
}

// ---- the exact path (a row with a NaN logit, or a non-finite bias) ---------------------------

// routing_math.h's selection over the whole row from global memory, plainly: every expert's
// slot key (NaN scores last); the selected experts' activations in s.
template <int kK>
__device__ __noinline__ void route_exact_sigmoid(const uint16_t* row, const float* bias_sm, int E,
                                                 uint64_t (&list)[kK], float (&s)[kK]) {
  for (int p = 0; p < kK; ++p) list[p] = 0ull;
  for (int e = 0; e < E; ++e) {
    const float z = selection_score(activation<ScoreFn::kSigmoid>(exact::bf16_bits_to_float(row[e])), bias_sm[e]);
    insert_desc(slot_key(order_key(z), static_cast<uint32_t>(e)), list);
  }
  for (int p = 0; p < kK; ++p) {
    s[p] = activation<ScoreFn::kSigmoid>(exact::bf16_bits_to_float(row[slot_expert(list[p]) % E]));
  }
}

// ---- the kernel -------------------------------------------------------------------------------

constexpr int kSigmoidBf16MaxWarps = 16;  // 128 registers a thread at most

// kK: 8 (k <= 8) or 16 (k <= 16), the list, and kP = kK accumulators. kLanes: lanes a token;
// with two, lane 2 r + h takes half h of row r of its 16-row tile, as in the softmax screen:
// its own group maxima (combined with the partner's by one shuffle a word), the same L, its own
// masks, candidates and list (the lists merged), half the stores.
template <int kK, int kLanes>
__global__ void __launch_bounds__(32 * kSigmoidBf16MaxWarps, 1) fwd_sigmoid_bf16_kernel(const FastArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // sm_90 instructions (bf16x2 and u16x2); the launcher asks for 9.0
#else
  constexpr int kP = kK;
  constexpr int kRows = 32 / kLanes;          // a warp tile's rows
  constexpr uint32_t kNegInf2 = 0xFF80FF80u;  // bf16 -inf in both halves
  constexpr ScoreFn F = ScoreFn::kSigmoid;
  extern __shared__ __align__(128) char sig_rows_sm[];  // its own name: see the softmax kernel
  char* sm = sig_rows_sm;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int tr = lane / kLanes, h = lane % kLanes;  // the token's row in the tile, the lane's part
  const unsigned pair = kLanes == 2 ? 3u << (lane & ~1) : 1u << lane;  // the token's lanes
  const int E = a.E, k = a.k;
  const int row_bytes = 2 * E;
  const int part_bytes = row_bytes / kLanes, blocks = part_bytes / 128, part_e = E / kLanes;
  char* tile = sm + SigmoidBf16TileOff(E, kLanes, warp);
  const ScreenTile<kLanes> st(tile, row_bytes, tr, h);  // the softmax screen's tile and copies
  const int swz = st.swz;
  uint32_t* masks = reinterpret_cast<uint32_t*>(tile + kRows * row_bytes) + lane;
  char* part = tile + tr * row_bytes + h * part_bytes;
  const int e0 = h * part_e;  // the part's first expert
  float* bias_sm = reinterpret_cast<float*>(sm + kSigmoidBf16BiasOff);
  const int64_t ntiles = (a.rows + kRows - 1) / kRows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * nwarps;

  // Warp tiles interleaved across blocks; the first tile's copies go out before the table.
  const int64_t first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  if (first < ntiles) st.stage(a.logits, a.rows, first, lane);
  const int mode = sig_table_fill(sm, blockDim.x);
  bool bias_bad = false;  // the bias (0 without one: s + 0 = s)
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const float b = a.bias != nullptr ? __ldg(a.bias + i) : 0.0f;
    bias_bad |= !(fabsf(b) <= 3.402823466e38f);  // NaN or infinite
    bias_sm[i] = b;
  }
  // Every table and bias entry written before any thread reads one.
  bias_bad = __syncthreads_or(bias_bad);
  sig_table_publish(sm, mode, blockDim.x);

  for (int64_t wt = first; wt < ntiles; wt += stride) {
    const int64_t t0 = wt * kRows;
    const int nrows = ScreenTile<kLanes>::rows_of(a.rows, wt);
    cp_async_wait_all();
    __syncwarp();  // every lane's copies landed and are visible to the warp

    const int64_t t = t0 + tr;
    const bool live = tr < nrows;  // the same in both lanes of a token
    const char* grow = static_cast<const char*>(a.logits) + t * row_bytes;
    const char* gpart = grow + h * part_bytes;
    int sel[kK];
    float sv[kK];  // the selected experts' activations, slot order
    if (live) {
      // 0-1. z of every logit of the part, truncated, back into the tile; the group maxima of
      // the truncated scores (words w % kP of the part, low and high halves: a part starts at
      // a multiple of kP words).
      uint32_t acc[kP];
#pragma unroll
      for (int j = 0; j < kP; ++j) acc[j] = kNegInf2;
      uint32_t nan = 0;
#pragma unroll 1
      for (int b = 0; b < blocks; ++b) {
        char* blk = part + 128 * b;
        const float* bb = bias_sm + e0 + 64 * b;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint4* chunk = reinterpret_cast<uint4*>(blk + st.off[j]);
          const uint4 v = *chunk;
          const float4 b0 = *reinterpret_cast<const float4*>(bb + 8 * j);
          const float4 b1 = *reinterpret_cast<const float4*>(bb + 8 * j + 4);
          const uint32_t c0 = clamp_pair(v.x, &nan), c1 = clamp_pair(v.y, &nan);
          const uint32_t c2 = clamp_pair(v.z, &nan), c3 = clamp_pair(v.w, &nan);
          const uint32_t zt[4] = {
              upper_halves(selection_score(sig_lo(sm, c0), b0.x), selection_score(sig_hi(sm, c0), b0.y)),
              upper_halves(selection_score(sig_lo(sm, c1), b0.z), selection_score(sig_hi(sm, c1), b0.w)),
              upper_halves(selection_score(sig_lo(sm, c2), b1.x), selection_score(sig_hi(sm, c2), b1.y)),
              upper_halves(selection_score(sig_lo(sm, c3), b1.z), selection_score(sig_hi(sm, c3), b1.w))};
          *chunk = make_uint4(zt[0], zt[1], zt[2], zt[3]);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[(4 * j + i) % kP] = max_bf16x2(acc[(4 * j + i) % kP], zt[i]);
        }
      }
      if (kLanes == 2) {
#pragma unroll
        for (int j = 0; j < kP; ++j) acc[j] = max_bf16x2(acc[j], __shfl_xor_sync(pair, acc[j], 1));
        nan = max_u16x2(nan, __shfl_xor_sync(pair, nan, 1));  // both lanes take the same path
      }
      const bool exact_row = bias_bad || (nan & 0xFFFFu) > 0x7F80u || (nan >> 16) > 0x7F80u;

      if (!exact_row) {
        // 2. L, the k-th largest group maximum of zt (no NaN: z is a number).
        const uint32_t lw = screen_threshold(acc, k);

        // 3. The part's candidate masks of zt >= L (bit 8 y + j of mask q: the part's logit
        // 32 q + 4 j + y), and the logits of every 16-byte chunk holding a candidate copied back
        // into the tile (chunk c of a mask's four holds its bits 2 c, 2 c + 1 of each byte).
        uint32_t nonempty = 0;
#pragma unroll 1
        for (int b = 0; b < blocks; ++b) {
          const char* blk = part + 128 * b;
#pragma unroll
          for (int g = 0; g < 2; ++g) {
            uint32_t w[16];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint4 v = *reinterpret_cast<const uint4*>(blk + st.off[4 * g + c]);
              w[4 * c] = v.x, w[4 * c + 1] = v.y, w[4 * c + 2] = v.z, w[4 * c + 3] = v.w;
            }
            const uint32_t mask = screen_mask(w, lw);
            const int q = 2 * b + g;
            masks[32 * q] = mask;
            nonempty |= (mask != 0 ? 1u : 0u) << q;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (mask & (0x03030303u << (2 * c))) {
                cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(blk + st.off[4 * g + c])),
                           gpart + 128 * b + 16 * (4 * g + c));
              }
            }
          }
        }
        cp_async_wait_all();  // this thread's own copies: only it reads its part

        // 4. The candidates' exact z and slot keys into the list.
        uint64_t list[kK];
#pragma unroll
        for (int p = 0; p < kK; ++p) list[p] = 0ull;
        for_each_candidate(masks, nonempty, [&](int pe) {
          const uint32_t hb = *reinterpret_cast<const uint16_t*>(part + ((2 * pe) ^ swz));
          const float z = selection_score(sig_lo(sm, clamp_pair(hb, nullptr)), bias_sm[e0 + pe]);
          insert_desc(slot_key(order_key(z), static_cast<uint32_t>(e0 + pe)), list);
        });
        if (kLanes == 2) merge_pair_lists<uint64_t, kK>(list, pair, h);  // both lanes: one list
#pragma unroll
        for (int r = 0; r < kK; ++r) {
          // slots from k on may be empty (key 0): expert 0xFFFFFFFF % E, read but not stored.
          // A slot's logit is in its owner's part (restored by the owner's copies): each lane
          // reads its own slots' and takes the others' from its partner.
          sel[r] = static_cast<int>(slot_expert(list[r]) % static_cast<uint32_t>(E));
          const bool own = kLanes == 1 || (sel[r] >= e0 && sel[r] < e0 + part_e);
          const int pe = own ? sel[r] - e0 : 0;
          const uint32_t hb = *reinterpret_cast<const uint16_t*>(part + ((2 * pe) ^ swz));
          sv[r] = sig_lo(sm, clamp_pair(hb, nullptr));
          if (kLanes == 2) {
            const float other = __shfl_xor_sync(pair, sv[r], 1);
            sv[r] = own ? sv[r] : other;
          }
        }
      } else {
        uint64_t list_x[kK];
        float s_x[kK];
        route_exact_sigmoid<kK>(reinterpret_cast<const uint16_t*>(grow), bias_sm, E, list_x, s_x);
#pragma unroll
        for (int r = 0; r < kK; ++r) {
          sel[r] = static_cast<int>(slot_expert(list_x[r]) % static_cast<uint32_t>(E));
          sv[r] = s_x[r];
        }
      }
    }
    __syncwarp();  // every lane done with the tile: the next tile's copies go out under the weights
    if (wt + stride < ntiles) st.stage(a.logits, a.rows, wt + stride, lane);

    if (live) {
      // 5. Weights in slot order (routing_math.h), then the stores.
      float u[kK];
      const float denom = slot_numerators<F>(sv, k, u);
      store_compact<F, kK, kLanes>(a, t, h, k, u, sel, denom);
    }
  }
#endif
}

}  // namespace cuda
}  // namespace jax_router
