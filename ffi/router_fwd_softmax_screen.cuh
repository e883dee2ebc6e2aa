// The softmax screen forward, for bfloat16 logits (and float32 ones up to E = kSoftmaxF32MaxE),
// one thread a token (or two, from E = 256): softmax without pre-softmax (the selection is on the raw logits), no
// group-limited routing, E a multiple of 64 up to kSoftmaxScreenMaxE, topk <= 16, compact
// outputs (Qwen3: E = 128, k = 8; Qwen3-Next: E = 512, k = 10). Same bits as the fast forward
// and the CPU (routing_math.h); the launcher takes it on devices of compute capability 9.0 or
// newer (router_launch.cuh). float32 logits are screened on their values rounded toward zero to
// bfloat16 (a non-decreasing function, so the screen still keeps a superset of the selection)
// and ranked by their own 64-bit slot keys.
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

constexpr int kSoftmaxScreenMaxE = 512;
constexpr int kSoftmaxScreenWarps = 2;  // a block; the occupancy calculator sets blocks an SM
// The smallest batch the launcher gives it, for E <= 128 (E / 128 times that above): a token is
// one thread's work, so a small batch is one round of warps, each as slow as its slowest row;
// below this the fast forward finishes sooner (benchmarks/NOTES.md, row 73).
#ifndef JR_SOFTMAX_SCREEN_MIN_ROWS  // a knob for the benchmarks' A/B runs only
#define JR_SOFTMAX_SCREEN_MIN_ROWS 16384
#endif
inline int64_t SoftmaxScreenMinRows(int64_t E) {
  return static_cast<int64_t>(JR_SOFTMAX_SCREEN_MIN_ROWS) * (E > 128 ? E / 128 : 1);
}

// Whether the kernel can take a call (the launcher also asks for compute capability 9.0).
// Compact outputs only: written one row a thread, dense rows took longer than the fast
// forward's (benchmarks/NOTES.md, row 76).
// float32 logits up to E = kSoftmaxF32MaxE (a row is twice the bytes: 512 would leave 2 warps
// an SM).
constexpr int kSoftmaxF32MaxE = 256;
inline bool SoftmaxScreenFits(int64_t E, const RouteParams& p, Dt dt, bool dense_outputs,
                            bool logits_aligned) {
  return (dt == Dt::kBF16 || (dt == Dt::kF32 && E <= kSoftmaxF32MaxE)) &&
         p.score_fn == ScoreFn::kSoftmax && !p.pre_softmax &&
         p.group_topk <= 0 && !is_qb(p) && E % 64 == 0 && E >= 64 && E <= kSoftmaxScreenMaxE &&
         p.topk <= 16 && !dense_outputs && logits_aligned;
}

// Shared memory of one warp with `lanes` lanes a token (1 or 2) for logits of `bytes` bytes:
// its 32 / lanes rows, then the candidate masks (a lane's E / 32 / lanes masks, mask j of lane l
// at word 32 j + l: in the lane's own bank). A multiple of 128 bytes, as the staging and the
// reads' swizzle need (E % 64 == 0, and E % 128 == 0 for two lanes).
__host__ __device__ inline size_t SoftmaxWarpSmem(int E, int lanes, int bytes) {
  return (static_cast<size_t>(32) * bytes * E + 4 * E) / lanes;
}
// Two lanes a token from this E up (the knob for the benchmarks' A/B runs only): a token's
// chain is halved, and where shared memory bounds the tokens in flight (E = 512: 6 warps an
// SM) that doubles the throughput.
#ifndef JR_SOFTMAX_SCREEN_PAIR_MIN_E
#define JR_SOFTMAX_SCREEN_PAIR_MIN_E 256
#endif
inline int SoftmaxScreenLanes(int64_t E) {
  return E >= JR_SOFTMAX_SCREEN_PAIR_MIN_E && E % 128 == 0 ? 2 : 1;
}

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

// A bitonic sequence of n values sorted descending (no NaN among floats).
template <typename V, int N>
__device__ __forceinline__ void bitonic_merge_desc(V (&v)[N]) {
#pragma unroll
  for (int d = N / 2; d > 0; d >>= 1) {
#pragma unroll
    for (int p = 0; p < N; ++p) {
      if ((p & d) == 0) {
        const V hi = max(v[p], v[p + d]), lo = min(v[p], v[p + d]);
        v[p] = hi;
        v[p + d] = lo;
      }
    }
  }
}

// The 16-bit order key of a bfloat16 (routing_math.h's order_key on its float: larger is
// better, +0 above -0), NaN at 0, below -inf's 0x007F. In the low 16 bits.
__device__ __forceinline__ uint32_t bf16_order_key(uint32_t h) {
  const uint32_t key = (h & 0x8000u) ? (~h & 0xFFFFu) : (h | 0x8000u);
  return (h & 0x7FFFu) > 0x7F80u ? 0u : key;
}
// The bfloat16 a non-NaN key came from.
__device__ __forceinline__ uint32_t bf16_from_order_key(uint32_t key) {
  return (key & 0x8000u) ? (key & 0x7FFFu) : (~key & 0xFFFFu);
}
// One slot key: order key high, expert id inverted low (distinct in a row; larger is better).
__device__ __forceinline__ uint32_t slot_key16(uint32_t key, int e) {
  return (key << 16) | (0xFFFFu - static_cast<uint32_t>(e));
}

// Inserts c into the descending list of keys (32 or 64 bits; c = 0: no change). Every
// comparison is made against the old list at once, so the chain is three instructions deep,
// not two a place.
template <typename K, int kK>
__device__ __forceinline__ void insert_desc(K c, K (&list)[kK]) {
  bool above[kK];
#pragma unroll
  for (int p = 0; p < kK; ++p) above[p] = c > list[p];
#pragma unroll
  for (int p = kK - 1; p > 0; --p) list[p] = above[p] ? (above[p - 1] ? list[p - 1] : c) : list[p];
  list[0] = above[0] ? c : list[0];
}

// L in both halves of a word: the k-th largest of the 2 kP group maxima in acc (packed
// bfloat16 pairs, no NaN; acc is sorted on the way). A bitonic sort of the kP words (both
// halves at once), the top kP of the two sorted halves by one maximum a pair, and where k < kP
// a bitonic merge of those.
template <int kP>
__device__ __forceinline__ uint32_t screen_threshold(uint32_t (&acc)[kP], int k) {
  sort_desc_bf16x2(acc);
  uint32_t top[kP / 2];  // low half: the i-th of the top kP (bitonic), high: the (kP-1-i)-th
#pragma unroll
  for (int i = 0; i < kP / 2; ++i) top[i] = max_bf16x2(acc[i], swap_halves(acc[kP - 1 - i]));
  if (k == kP) {
    uint32_t m = top[0];
#pragma unroll
    for (int i = 1; i < kP / 2; ++i) m = min_bf16x2(m, top[i]);
    return min_bf16x2(m, swap_halves(m));
  }
  float f[kP];
#pragma unroll
  for (int i = 0; i < kP / 2; ++i) {
    f[i] = bf16_lo(top[i]);
    f[kP - 1 - i] = bf16_hi(top[i]);
  }
  bitonic_merge_desc(f);
  // f is descending: f[k - 1] is the smallest of its first k (a min chain, where a select
  // chain on i == k - 1 became a local-memory load)
  float l = f[0];
#pragma unroll
  for (int i = 1; i < kP; ++i) l = i < k ? fminf(l, f[i]) : l;
  return (__float_as_uint(l) >> 16) * 0x10001u;
}

// The candidate mask of 32 logits from their 16 screen words w (word m: logits 2 m, 2 m + 1):
// bit 8 y + J is logit 4 J + y, set where it is >= L (bytes 0 and 2 of the compares of w[2 J]
// and w[2 J + 1]). NaN never, -0 == +0: a superset of the keys >= L's.
__device__ __forceinline__ uint32_t screen_mask(const uint32_t (&w)[16], uint32_t lw) {
  uint32_t mask = 0;
#pragma unroll
  for (int J = 0; J < 8; ++J) {
    const uint32_t fl = __byte_perm(ge_bf16x2(w[2 * J], lw), ge_bf16x2(w[2 * J + 1], lw), 0x6420);
    mask |= fl & (0x01010101u << J);
  }
  return mask;
}

// Calls fn(i) for each candidate i (a logit's index in the masked part) of the lane's masks
// (mask q at masks[32 q]; bit q of nonempty: mask q has a candidate), one an iteration across
// all masks: a warp runs as many iterations as its lane with the most candidates.
template <typename Fn>
__device__ __forceinline__ void for_each_candidate(const uint32_t* masks, uint32_t nonempty, Fn&& fn) {
  int q = 0;
  uint32_t mask = 0;
  while (true) {  // the masks with a candidate, lowest first
    if (mask == 0) {
      if (nonempty == 0) break;
      q = __ffs(nonempty) - 1;
      nonempty &= nonempty - 1;
      mask = masks[32 * q];
    }
    const int bit = 31 - __clz(mask);
    mask ^= 1u << bit;
    fn(32 * q + 4 * (bit & 7) + (bit >> 3));  // screen_mask's bit layout
  }
}

// ---- the logits' type ---------------------------------------------------------------------------

// Two floats -> one bfloat16x2 word, each rounded toward zero (a non-decreasing function: the
// screen on the words stays a superset; NaN stays NaN).
__device__ __forceinline__ uint32_t pack_rz_bf16x2(float lo, float hi) {
  uint32_t d;
  asm("cvt.rz.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// What the kernel needs of the logits' type: bytes an element, a 16-byte chunk's screen words
// (bfloat16x2, two logits each), a candidate's slot key (its order key, then the expert id
// inverted: distinct in a row, larger is better; 0 never) and the logit and expert of a key.
struct Bf16Logits {
  using Key = uint32_t;
  static constexpr int kBytes = 2, kWords = 4;  // screen words a chunk
  static __device__ __forceinline__ void words(const uint4& v, uint32_t* w) {
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  }
  // a candidate (a number): its bits with the sign bit set, or all bits flipped if negative
  static __device__ __forceinline__ Key slot(const char* at, int e) {
    const uint32_t h = *reinterpret_cast<const uint16_t*>(at);
    return slot_key16(h ^ (sign_mask16(h) | 0x8000u), e);  // the key's low 16 bits
  }
  static __device__ __forceinline__ Key exact_slot(const void* row, int e) {
    return slot_key16(bf16_order_key(static_cast<const uint16_t*>(row)[e]), e);
  }
  static __device__ __forceinline__ float value(Key k) {
    return exact::bf16_bits_to_float(static_cast<uint16_t>(bf16_from_order_key(k >> 16)));
  }
  static __device__ __forceinline__ int expert(Key k) { return static_cast<int>(0xFFFFu - (k & 0xFFFFu)); }
  static constexpr Dt kDt = Dt::kBF16;
};
struct F32Logits {
  using Key = uint64_t;
  static constexpr int kBytes = 4, kWords = 2;
  static __device__ __forceinline__ void words(const uint4& v, uint32_t* w) {
    w[0] = pack_rz_bf16x2(__uint_as_float(v.x), __uint_as_float(v.y));
    w[1] = pack_rz_bf16x2(__uint_as_float(v.z), __uint_as_float(v.w));
  }
  static __device__ __forceinline__ Key slot(const char* at, int e) {
    return slot_key(order_key(*reinterpret_cast<const float*>(at)), static_cast<uint32_t>(e));
  }
  static __device__ __forceinline__ Key exact_slot(const void* row, int e) {
    return slot_key(order_key(static_cast<const float*>(row)[e]), static_cast<uint32_t>(e));
  }
  static __device__ __forceinline__ float value(Key k) {
    return order_key_value(static_cast<uint32_t>(k >> 32));
  }
  static __device__ __forceinline__ int expert(Key k) { return static_cast<int>(slot_expert(k)); }
  static constexpr Dt kDt = Dt::kF32;
};

// Every expert's slot key (NaN logits last, in id order) into the list, from global memory.
template <typename T, int kK>
__device__ __noinline__ void route_exact_softmax(const void* row, int E, typename T::Key (&list)[kK]) {
  for (int p = 0; p < kK; ++p) list[p] = 0;
  for (int e = 0; e < E; ++e) insert_desc(T::exact_slot(row, e), list);
}

// ---- the pieces both screen kernels (softmax, sigmoid) share -----------------------------------

// The swizzle key of a 16-byte tile chunk i (row r = i / chunks, part by i's chunk in the row):
// (r & 7) for one lane a token, (r & 3) | (part << 2) for two (the 8 lanes of a quarter-warp
// read 8 distinct bank groups either way).
template <int kLanes>
__device__ __forceinline__ uint32_t tile_key(uint32_t i, uint32_t r, uint32_t chunks) {
  if (kLanes == 1) return r & 7;
  return (r & 3) | ((i - r * chunks) >= chunks / 2 ? 4u : 0u);
}

// A warp's tile in the screen kernels: its kRows = 32 / kLanes rows (row_bytes each, a
// multiple of 128) at shared address tile_s, 16-byte chunks swizzled by tile_key. Lane (tr, h)
// holds part h of row tr; the part's byte b sits at b ^ swz, and off[j] is chunk j of each of
// its 128-byte units.
template <int kLanes>
struct ScreenTile {
  static constexpr int kRows = 32 / kLanes;
  uint32_t tile_s, chunks, magic;
  int row_bytes, swz;
  int off[8];
  __device__ __forceinline__ ScreenTile(const char* tile, int row_bytes_, int tr, int h)
      : tile_s(static_cast<uint32_t>(__cvta_generic_to_shared(tile))),
        chunks(static_cast<uint32_t>(row_bytes_ / 16)),
        // r = i / chunks by a multiply-high: exact for i < 2^16 (the magic's excess over
        // 2^32 / chunks is below 1 / chunks)
        magic(0xFFFFFFFFu / chunks + 1u),
        row_bytes(row_bytes_),
        swz((kLanes == 1 ? (tr & 7) : ((tr & 3) | (h << 2))) << 4) {
#pragma unroll
    for (int j = 0; j < 8; ++j) off[j] = (16 * j) ^ swz;
  }
  // The rows of warp tile wt, of `rows` in all.
  static __device__ __forceinline__ int rows_of(int64_t rows, int64_t wt) {
    const int64_t t0 = wt * kRows;
    return static_cast<int>(rows - t0 < kRows ? rows - t0 : kRows);
  }
  // Warp tile wt's copies from `logits` (tile_s 128-byte aligned): copy j of this lane is the
  // tile's 16-byte chunk i = lane + 32 j, source byte 16 i, row r = i / chunks.
  __device__ __forceinline__ void stage(const void* logits, int64_t rows, int64_t wt, int lane) const {
    const char* src = static_cast<const char*>(logits) + wt * kRows * row_bytes;
    const uint32_t n = static_cast<uint32_t>(rows_of(rows, wt)) * chunks;
    for (uint32_t i = lane; i < n; i += 32) {
      const uint32_t r = __umulhi(i, magic);
      cp_async16((tile_s + 16 * i) ^ (tile_key<kLanes>(i, r, chunks) << 4), src + 16 * i);
    }
  }
};

// Two lanes' descending lists of a token (this lane's, half h) merged into the top kK of both,
// the same in both lanes: with A the first part's and B the second's, max(A[i], B[kK - 1 - i])
// holds the top kK of both and is bitonic; a bitonic merge sorts it.
template <typename Key, int kK>
__device__ __forceinline__ void merge_pair_lists(Key (&list)[kK], unsigned pair, int h) {
  Key other[kK];
#pragma unroll
  for (int p = 0; p < kK; ++p) other[p] = __shfl_xor_sync(pair, list[p], 1);
  Key c[kK];  // not in place: slot p reads slot kK - 1 - p
#pragma unroll
  for (int p = 0; p < kK; ++p) c[p] = h == 0 ? max(list[p], other[kK - 1 - p]) : max(other[p], list[kK - 1 - p]);
  bitonic_merge_desc(c);
#pragma unroll
  for (int p = 0; p < kK; ++p) list[p] = c[p];
}

// A token's compact outputs from its slot numerators u and experts sel (slot order): all k
// slots, or half each for two lanes (lane half h). Vector stores when k == 8 and the outputs
// allow (slots_vec: 16-byte aligned int32 outputs), else routing_math.h's store_slot a slot.
template <ScoreFn F, int kK, int kLanes>
__device__ __forceinline__ void store_compact(const FastArgs& a, int64_t t, int h, int k,
                                              const float (&u)[kK], const int (&sel)[kK], float denom) {
  const int64_t ko = t * k;
  constexpr int kV = 8 / kLanes;  // the vector path's slots a lane
  if (kK == 8 && a.slots_vec && k == 8) {
    uint32_t wv[kV], iv[kV], rv[kV];
#pragma unroll
    for (int r = 0; r < kV; ++r) {
      float us = u[r];  // slot r, or r + kV in the second lane (selects: static indices)
      int es = sel[r];
      if constexpr (kLanes == 2) {
        us = h == 0 ? u[r] : u[r + kV];
        es = h == 0 ? sel[r] : sel[r + kV];
      }
      const float p = weight<F>(false, k, us, denom);
      wv[r] = __float_as_uint(compact_weight(a.scaling * p));
      iv[r] = static_cast<uint32_t>(es);
      rv[r] = __float_as_uint(compact_residual<F>(p, us));
    }
    const int64_t ks = ko + h * kV;
    if (a.weights) store_words<kV>(a.weights + ks, wv);
    if (a.indices) store_words<kV>(static_cast<int32_t*>(a.indices) + ks, iv);
    if (a.act) store_words<kV>(a.act + ks, rv);
  } else {
    const int half = (k + 1) / 2;
    const int lo = kLanes == 1 ? 0 : h * half, hi = kLanes == 1 ? k : (h == 0 ? half : k);
#pragma unroll
    for (int r = 0; r < kK; ++r) {
      if (r >= lo && r < hi) {
        const float p = weight<F>(false, k, u[r], denom);
        store_slot<F>(a, ko, r, sel[r], a.scaling * p, p, u[r]);
      }
    }
  }
}

// ---- the kernel -------------------------------------------------------------------------------

// T: the logits' type (Bf16Logits, F32Logits). kK: 8 (k <= 8) or 16 (k <= 16), the list, and
// kP = kK accumulators. kLanes: lanes a token. With two, lane 2 r + h of a warp takes half h of
// row r of its 16-row tile: its own group maxima (combined with the partner's by one shuffle a
// word), the same L in both lanes, its own masks and list (the two lists merged by a bitonic
// merge), half the stores.
template <typename T, int kK, int kLanes>
__global__ void __launch_bounds__(32 * kSoftmaxScreenWarps) fwd_softmax_screen_kernel(const FastArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // sm_90 instructions (bf16x2 compares); the launcher asks for 9.0
#else
  using Key = typename T::Key;
  constexpr int kP = kK;
  constexpr int kRows = 32 / kLanes;          // a warp tile's rows
  constexpr uint32_t kNegInf2 = 0xFF80FF80u;  // bf16 -inf in both halves
  constexpr int kW = T::kWords;               // screen words a 16-byte chunk
  // its own name: an extern array declared again with another alignment keeps the first one
  extern __shared__ __align__(128) char rows_sm[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tr = lane / kLanes, h = lane % kLanes;  // the token's row in the tile, the lane's part
  const unsigned pair = kLanes == 2 ? 3u << (lane & ~1) : 1u << lane;  // the token's lanes
  const int E = a.E, k = a.k;
  const int row_bytes = T::kBytes * E;
  const int part_bytes = row_bytes / kLanes, units = part_bytes / 128, nmask = E / 32 / kLanes;
  char* tile = rows_sm + static_cast<size_t>(warp) * SoftmaxWarpSmem(E, kLanes, T::kBytes);
  const ScreenTile<kLanes> st(tile, row_bytes, tr, h);
  const int swz = st.swz;
  uint32_t* masks = reinterpret_cast<uint32_t*>(tile + kRows * row_bytes) + lane;
  const char* part = tile + tr * row_bytes + h * part_bytes;
  const int64_t ntiles = (a.rows + kRows - 1) / kRows;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSoftmaxScreenWarps;

  // Warp tiles interleaved across blocks, so that a partial last round spreads over every SM.
  const int64_t first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  if (first < ntiles) st.stage(a.logits, a.rows, first, lane);
  for (int64_t wt = first; wt < ntiles; wt += stride) {
    const int64_t t0 = wt * kRows;
    const int nrows = ScreenTile<kLanes>::rows_of(a.rows, wt);
    cp_async_wait_all();
    __syncwarp();  // every lane's copies landed and are visible to the warp

    const int64_t t = t0 + tr;
    const bool live = tr < nrows;  // the same in both lanes of a token
    Key list[kK];
    if (live) {
      // 1. Group maxima over the screen words, a 128-byte unit (8 chunks) an iteration: word w
      // of the row (logits 2 w, 2 w + 1) into accumulator w % kP. NaNs are skipped (a group of
      // NaNs only keeps -inf, which is no expert's logit unless one is -inf). A unit and a
      // part start at a multiple of kP words.
      uint32_t acc[kP];
#pragma unroll
      for (int j = 0; j < kP; ++j) acc[j] = kNegInf2;
#pragma unroll 1
      for (int u = 0; u < units; ++u) {
        const char* unit = part + 128 * u;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint32_t w[kW];
          T::words(*reinterpret_cast<const uint4*>(unit + st.off[j]), w);
#pragma unroll
          for (int i = 0; i < kW; ++i) acc[(kW * j + i) % kP] = max_bf16x2(acc[(kW * j + i) % kP], w[i]);
        }
      }
      if (kLanes == 2) {
#pragma unroll
        for (int j = 0; j < kP; ++j) acc[j] = max_bf16x2(acc[j], __shfl_xor_sync(pair, acc[j], 1));
      }

      // 2. L, the k-th largest group maximum (both lanes of a token alike).
      const uint32_t lw = screen_threshold(acc, k);

      // 3. The part's candidate masks, one for each 32 logits (16 screen words W): bit 8 y + J
      // of mask q is the part's logit 32 q + 4 J + y (bytes 0 and 2 of the compares of W[2 J]
      // and W[2 J + 1]). Bit q of `nonempty`: mask q has a candidate.
      uint32_t nonempty = 0;
      constexpr int kChunksAMask = 16 / kW;  // 4 (bf16) or 8 (f32)
#pragma unroll 1
      for (int q = 0; q < nmask; ++q) {
        const int byte0 = q * 32 * T::kBytes;  // the mask's first byte in the part
        const char* unit = part + (byte0 & ~127);
        const int c0 = (byte0 & 127) >> 4;     // its first chunk in the unit
        uint32_t w[16];
#pragma unroll
        for (int c = 0; c < kChunksAMask; ++c) {  // (not off[c0 + c]: a run-time index)
          uint32_t wc[kW];
          T::words(*reinterpret_cast<const uint4*>(unit + ((16 * (c0 + c)) ^ swz)), wc);
#pragma unroll
          for (int i = 0; i < kW; ++i) w[kW * c + i] = wc[i];
        }
        const uint32_t mask = screen_mask(w, lw);
        masks[32 * q] = mask;
        nonempty |= (mask != 0 ? 1u : 0u) << q;
      }

      // 4. The candidates' slot keys into the list. The part's logit pe is at part byte
      // (kBytes pe) ^ swz, expert h E / 2 + pe.
#pragma unroll
      for (int p = 0; p < kK; ++p) list[p] = 0;
      const int e0 = h * (E / kLanes);
      for_each_candidate(masks, nonempty, [&](int pe) {
        insert_desc(T::slot(part + ((T::kBytes * pe) ^ swz), e0 + pe), list);
      });
      if (kLanes == 2) merge_pair_lists<Key, kK>(list, pair, h);  // both lanes: one list
      Key kth = list[0];  // list[k - 1], the smallest of the first k (see L above)
#pragma unroll
      for (int p = 1; p < kK; ++p) kth = p < k ? min(kth, list[p]) : kth;
      if (kth == 0) {
        // fewer than k numbers were candidates: L was -inf from a group of NaNs only, and the
        // selection takes NaNs (both lanes of a token alike)
        Key list_x[kK];  // its own array: `list` stays in registers on the screened path
        route_exact_softmax<T, kK>(static_cast<const char*>(a.logits) + t * row_bytes, E, list_x);
#pragma unroll
        for (int p = 0; p < kK; ++p) list[p] = list_x[p];
      }
    }
    __syncwarp();  // every lane done with the tile: the next tile's copies go out under the weights
    if (wt + stride < ntiles) st.stage(a.logits, a.rows, wt + stride, lane);

    if (live) {
      // 5. Weights in slot order (routing_math.h), then the stores.
      constexpr ScoreFn F = ScoreFn::kSoftmax;
      float x[kK];
      int sel[kK];
#pragma unroll
      for (int r = 0; r < kK; ++r) {
        x[r] = T::value(list[r]);
        sel[r] = T::expert(list[r]) % E;  // slots from k on may be empty (key 0): never stored
      }
      float u[kK];
      const float denom = slot_numerators<F>(x, k, u);
      store_compact<F, kK, kLanes>(a, t, h, k, u, sel, denom);
    }
  }
#endif
}

}  // namespace cuda
}  // namespace jax_router
