// The fast CUDA forward (routing_math.h's selection and weights): E <= 1024, topk <= 32, no
// pre-softmax. Chosen per call from (E, topk, options); large DeepSeek-V3-shaped bf16 batches
// take the grouped forward instead (router_fwd_grouped.cuh), which gives the same bits, so a
// row's result does not depend on the batch it came in.
//
// fwd_fast_kernel<F, L, V, P>: L lanes (a power of two dividing 32) work on one token, lane j
// holding experts [jV, jV+V) in registers as 32-bit order keys (routing_math.h order_key). For
// DeepSeek-V3 (E=256, 8 groups of 32) a lane is exactly one group. Selection never runs k
// rounds of argmax:
//   1. each lane keeps its top-P keys while it computes them (P <= 2, IMNMX only);
//   2. group-limited routing: group score = sequential sum of the lane's top-m values, group
//      ranks by comparing the L group keys (ties to the lower group id);
//   3. a threshold tau below which no top-k expert can lie: the minimum over the (kept) lanes
//      of their m-th / P-th key, or the k-th largest lane maximum (wide layouts);
//   4. the few candidates >= tau are compacted into shared memory as 64-bit slot keys
//      (routing_math.h slot_key: score key high, inverted expert id low, all distinct);
//   5. each candidate's slot = the number of candidates with a larger slot key. Slots < k
//      are the selection, already in order (score descending, ties to the lower id).
// Quantile balancing (QB, sigmoid only) ranks k + 1 slots: slot k's score is the row's cutoff,
// written to a.cutoff (qb_histogram.cuh then counts the histogram from it).
// If a token has more than CMAX candidates (many exact ties), the ranks are counted against
// every expert of the token instead: slower, same result.
//
// Weights: p from the unbiased activation recomputed from the logit of each selected expert
// (the same routing_math.h code that produced the selection score), sums in slot order. Dense
// outputs (probs, bytemap) are zero-filled with vector stores by the lane that owns the chunk,
// then, after a __syncwarp, the k selected entries are stored; bitmap bytes are assembled by
// the owning lane.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_warp.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

// ---- chunk helpers (V elements of one lane) -------------------------------------------------

// x[i] = logits chunk, 0 past nvalid; 16-byte loads when the chunk is whole and aligned.
template <typename D, int V>
__device__ __forceinline__ void load_chunk(const typename D::raw* p, int nvalid, bool vec,
                                           float (&x)[V]) {
  using R = typename D::raw;
  constexpr int PER = 16 / sizeof(R);
  static_assert(V % PER == 0, "chunk must be a whole number of 16-byte vectors");
  if (vec && nvalid == V) {
    uint4 w[V / PER];
#pragma unroll
    for (int q = 0; q < V / PER; ++q) w[q] = __ldg(reinterpret_cast<const uint4*>(p) + q);
#pragma unroll
    for (int q = 0; q < V / PER; ++q) D::unpack16(w[q], &x[q * PER]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = i < nvalid ? D::to_f(__ldg(p + i)) : 0.0f;
  }
}

// load_chunk with the element type chosen at run time (uniform branch).
template <int V>
__device__ __forceinline__ void load_chunk_dt(const void* base, int64_t off, Dt dt, int nvalid,
                                              bool vec, float (&x)[V]) {
  switch (dt) {
    case Dt::kF32:
      load_chunk<DF32, V>(static_cast<const float*>(base) + off, nvalid, vec, x);
      break;
    case Dt::kBF16:
      load_chunk<DBF16, V>(static_cast<const uint16_t*>(base) + off, nvalid, vec, x);
      break;
    default:
      load_chunk<DF16, V>(static_cast<const uint16_t*>(base) + off, nvalid, vec, x);
      break;
  }
}

template <int V>
__device__ __forceinline__ void load_bias(const float* p, int nvalid, bool vec, float (&b)[V]) {
  if (vec && nvalid == V) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float4 w = __ldg(reinterpret_cast<const float4*>(p) + q);
      b[4 * q] = w.x;
      b[4 * q + 1] = w.y;
      b[4 * q + 2] = w.z;
      b[4 * q + 3] = w.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) b[i] = i < nvalid ? __ldg(p + i) : 0.0f;
  }
}

// Zero `nvalid` elements of type R at p (16-byte stores when whole and aligned).
template <typename R, int V>
__device__ __forceinline__ void zero_chunk(R* p, int nvalid, bool vec) {
  constexpr int BYTES = V * static_cast<int>(sizeof(R));
  if (vec && nvalid == V && BYTES % 16 == 0) {
#pragma unroll
    for (int q = 0; q < BYTES / 16; ++q) reinterpret_cast<uint4*>(p)[q] = make_uint4(0, 0, 0, 0);
  } else if (vec && nvalid == V && BYTES == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(0, 0);
  } else {
    for (int i = 0; i < nvalid; ++i) p[i] = R(0);
  }
}

// ---- fast forward ---------------------------------------------------------------------------

constexpr int kFastThreads = 128;

__host__ __device__ constexpr int fast_cmax(int L, int V) { return L * V < 64 ? L * V : 64; }
__host__ __device__ constexpr int fast_kmax(int L, int V) { return L * V < 32 ? L * V : 32; }

struct FastArgs {
  int64_t rows;
  int E;
  int k;
  const void* logits;
  Dt logits_dt;
  const float* bias;  // nullptr: none
  int64_t rows_per_bias;
  bool single_bias_row;
  void* probs;
  uint8_t* map;
  bool bitmap;
  float* weights;
  void* indices;
  It index_dt;
  float* act;
  float scaling;
  int num_groups;  // 0: no group-limited routing
  int group_topk;
  int m;           // topk / group_topk (grouped)
  bool x_vec, bias_vec, probs_vec, map_vec;
  // the small forward (router_fwd_small.cuh): a token's k compact slots as one 8- or 16-byte
  // store per output. Set where k is 2, 4 or 8 (the kernel's kK is then k), the indices int32
  // and every compact output 16-byte aligned.
  bool slots_vec;
  float* cutoff;  // quantile balancing (the QB kernels only): [rows]
};

// A slot's compact floats as stored: the weight w = scaling * p, and the residual the backward
// reads. store_slot and the small forward's vector stores both take them from here.
__device__ __forceinline__ float compact_weight(float w) { return exact::canonical(w); }
template <ScoreFn F>
__device__ __forceinline__ float compact_residual(float p, float u) {
  return exact::canonical(residual<F>(false, p, u));
}

// The numerators u of a token's k slots (routing_math.h's weight_numerator, from the selected
// experts' activations v in slot order: for raw softmax their logits, x0 = v[0]) and the
// denominator of their weights, the numerators summed in slot order. Slots from k on are not
// set. The one-thread-a-token forwards share it.
template <ScoreFn F, int kK>
__device__ __forceinline__ float slot_numerators(const float (&v)[kK], int k, float (&u)[kK]) {
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < kK; ++r) {
    if (r < k) {
      u[r] = weight_numerator<F>(false, v[r], v[0], v[r]);
      sum = r == 0 ? u[r] : slot_sum_add(sum, u[r]);
    }
  }
  return weight_denominator<F>(sum);
}

// Slot r's compact outputs for the token whose [T, k] rows start at ko: the weight, the expert
// e and the residual. Both CUDA forwards (this one and router_fwd_small.cuh) write them here,
// except the small forward's vector path.
template <ScoreFn F>
__device__ __forceinline__ void store_slot(const FastArgs& a, int64_t ko, int r, int e, float w,
                                           float p, float u) {
  if (a.weights) a.weights[ko + r] = compact_weight(w);
  if (a.indices) store_index(a.indices, a.index_dt, ko + r, e);
  if (a.act) a.act[ko + r] = compact_residual<F>(p, u);
}

// routing_math.h's activation of 4 values, out of line: the rare path (a reciprocal outside the
// fast path's exact range: x below about -87, or NaN) stays out of the hot loop's instruction
// stream.
template <ScoreFn F>
__device__ __noinline__ float4 activation4_slow(float4 x) {
  return make_float4(activation<F>(x.x), activation<F>(x.y), activation<F>(x.z),
                     activation<F>(x.w));
}

// Keys of one lane's chunk, streamed 4 at a time into keys_sm[.][tid], and its top-P keys
// (descending). Keys past nvalid are 0 (the caller passes x = 0 there). The sigmoid is
// routing_math.h's (exact::exp_for_sigmoid, then 1/(1+e) rounded to nearest), with the reciprocal's range
// check done
// once per 4 elements instead of once per element. Bias (nullptr: none) is read 4 floats at a
// time (16-byte loads when `bias_vec` and the chunk is whole).
template <ScoreFn F, int V, int P>
__device__ __forceinline__ void chunk_keys(const float (&x)[V], const float* bias, bool bias_vec,
                                           int nvalid, uint4 (*keys_sm)[kFastThreads], int tid,
                                           uint32_t (&top)[P]) {
#pragma unroll
  for (int p = 0; p < P; ++p) top[p] = 0;
  const bool whole = nvalid == V;
#pragma unroll
  for (int q = 0; q < V / 4; ++q) {
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (F != ScoreFn::kSoftmax && bias != nullptr) {
      if (bias_vec && whole) {
        const float4 w = __ldg(reinterpret_cast<const float4*>(bias) + q);
        b[0] = w.x;
        b[1] = w.y;
        b[2] = w.z;
        b[3] = w.w;
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (4 * q + u < nvalid) b[u] = __ldg(bias + 4 * q + u);
        }
      }
    }
    float s[4];
    if (F == ScoreFn::kSigmoid) {
      bool odd = false;
#pragma unroll
      for (int u = 0; u < 4; ++u) s[u] = rcp_rn_fast(1.0f + exact::exp_for_sigmoid(-x[4 * q + u]), &odd);
      if (odd) {
        const float4 r = activation4_slow<F>(
            make_float4(x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]));
        s[0] = r.x;
        s[1] = r.y;
        s[2] = r.z;
        s[3] = r.w;
      }
    } else if (F != ScoreFn::kSoftmax) {
#pragma unroll
      for (int u = 0; u < 4; ++u) s[u] = activation<F>(x[4 * q + u]);
    }
    uint32_t kk[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      kk[u] = F == ScoreFn::kSoftmax ? order_key(x[4 * q + u])
                                     : order_key(selection_score(s[u], b[u]));
    }
    if (!whole) {
#pragma unroll
      for (int u = 0; u < 4; ++u) kk[u] = 4 * q + u < nvalid ? kk[u] : 0u;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t v = kk[u];
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const uint32_t hi = max(top[p], v);
        v = min(top[p], v);
        top[p] = hi;
      }
    }
    keys_sm[q][tid] = make_uint4(kk[0], kk[1], kk[2], kk[3]);
  }
}

__device__ __forceinline__ uint32_t sm_key(const uint4 (*keys_sm)[kFastThreads], int thread,
                                           int i) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&keys_sm[i >> 2][thread]);
  return w[i & 3];
}

template <ScoreFn F, int L, int V, int P, bool QB>
__global__ void __launch_bounds__(kFastThreads, 6) fwd_fast_kernel(const FastArgs a) {
  constexpr int TPB = kFastThreads / L;
  constexpr int CMAX = fast_cmax(L, V);
  constexpr int KMAX = fast_kmax(L, V);
  constexpr int LS = CMAX + 2;
  constexpr int SS = KMAX + 1;
  constexpr bool kRaw = F == ScoreFn::kSoftmax;
  static_assert(!QB || F == ScoreFn::kSigmoid, "quantile balancing is sigmoid only");
  static_assert(L >= 1 && L <= 32 && (L & (L - 1)) == 0, "L must be a power of two <= 32");
  static_assert(V % 8 == 0 && V <= 32, "V must be 8, 16, 24 or 32");
  static_assert(V % 4 == 0, "keys are streamed 4 at a time");

  __shared__ uint4 keys_sm[V / 4][kFastThreads];
  __shared__ __align__(16) unsigned long long list_sm[TPB][LS];
  __shared__ int sel_e[TPB][SS];
  __shared__ float sel_v[TPB][SS];
  __shared__ float sel_u[kRaw ? TPB : 1][SS];

  const int tid = threadIdx.x;
  const int j = tid % L;
  const int tb = tid / L;
  const int E = a.E;
  const int k = a.k;
  const int ranked = QB ? k + 1 : k;  // slots ranked: QB's slot k is the cutoff
  const int base_e = j * V;
  const int nvalid = max(0, min(V, E - base_e));
  const int gthread0 = tid - j;  // first thread of my group
  const Dt dt = a.logits_dt;
  const int64_t ntiles = (a.rows + TPB - 1) / TPB;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t t = tile * TPB + tb;
    const bool tok = t < a.rows;
    const int64_t roff = t * static_cast<int64_t>(E);
    const int nv = tok ? nvalid : 0;

    float x[V];
    load_chunk_dt<V>(a.logits, roff + base_e, dt, nv, a.x_vec, x);
    const float* brow = nullptr;
    if (!kRaw && a.bias != nullptr) {
      brow = a.bias + (a.single_bias_row ? 0 : (tok ? t / a.rows_per_bias : 0)) * E + base_e;
    }
    if (nv > 0) {
      if (a.probs) {
        if (dt == Dt::kF32) {
          zero_chunk<float, V>(static_cast<float*>(a.probs) + roff + base_e, nv, a.probs_vec);
        } else {
          zero_chunk<uint16_t, V>(static_cast<uint16_t*>(a.probs) + roff + base_e, nv,
                                  a.probs_vec);
        }
      }
      if (a.map && !a.bitmap) zero_chunk<uint8_t, V>(a.map + roff + base_e, nv, a.map_vec);
    }

    uint32_t top[P];
    chunk_keys<F, V, P>(x, brow, a.bias_vec, nv, keys_sm, tid, top);

    // Group-limited routing and the candidate threshold.
    bool keep = tok;
    uint32_t tau;
    if (a.num_groups > 0) {
      const int m = a.m;
      float gs = order_key_value(top[0]);
#pragma unroll
      for (int q = 1; q < P; ++q) {
        if (q < m) gs = group_score_add(gs, order_key_value(top[q]));
      }
      const bool real = j < a.num_groups;
      const uint32_t gk = (real && tok) ? order_key(gs) : 0u;
      int rank = 0;
#pragma unroll
      for (int l = 0; l < L; ++l) {
        const uint32_t o = __shfl_sync(0xFFFFFFFFu, gk, l, L);
        rank += (o > gk || (o == gk && l < j)) ? 1 : 0;
      }
      keep = tok && real && rank < a.group_topk;
      uint32_t mine = top[0];
#pragma unroll
      for (int q = 1; q < P; ++q) {
        if (q == m - 1) mine = top[q];
      }
      tau = group_min<L>(keep ? mine : 0xFFFFFFFFu);
    } else {
      // tau = the k-th largest of the multiset of every lane's top-P keys (0 past E).
      int gt[P], ge[P];
#pragma unroll
      for (int q = 0; q < P; ++q) gt[q] = ge[q] = 0;
#pragma unroll
      for (int l = 0; l < L; ++l) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const uint32_t o = __shfl_sync(0xFFFFFFFFu, top[p], l, L);
#pragma unroll
          for (int q = 0; q < P; ++q) {
            gt[q] += o > top[q] ? 1 : 0;
            ge[q] += o >= top[q] ? 1 : 0;
          }
        }
      }
      uint32_t mine = 0;
#pragma unroll
      for (int q = 0; q < P; ++q) {
        if (gt[q] < ranked && ge[q] >= ranked) mine = top[q];
      }
      tau = group_max<L>(mine);
    }

    uint32_t cm = 0;
    if (keep) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        const uint4 w = keys_sm[q][tid];
        cm |= (w.x >= tau ? 1u : 0u) << (4 * q);
        cm |= (w.y >= tau ? 1u : 0u) << (4 * q + 1);
        cm |= (w.z >= tau ? 1u : 0u) << (4 * q + 2);
        cm |= (w.w >= tau ? 1u : 0u) << (4 * q + 3);
      }
    }
    const uint32_t keptmask = __ballot_sync(0xFFFFFFFFu, keep);
    const int c = __popc(cm);
    int incl = c;
#pragma unroll
    for (int d = 1; d < L; d <<= 1) {
      const int o = __shfl_up_sync(0xFFFFFFFFu, incl, d, L);
      if (j >= d) incl += o;
    }
    const int ctot = __shfl_sync(0xFFFFFFFFu, incl, L - 1, L);
    unsigned long long* lst = list_sm[tb];
    if (ctot <= CMAX) {
      int pos = incl - c;
      uint32_t mm = cm;
      while (mm) {
        const int i = __ffs(mm) - 1;
        mm &= mm - 1;
        lst[pos++] = slot_key(sm_key(keys_sm, tid, i), static_cast<uint32_t>(base_e + i));
      }
      if (j == 0 && (ctot & 1)) lst[ctot] = 0ull;
    }
    __syncwarp();

    // Ranks: slot of a candidate = number of candidates with a larger slot key.
    auto record = [&](int rank, unsigned long long sk) {
      if (QB && rank == k) {
        a.cutoff[t] = exact::canonical(order_key_value(static_cast<uint32_t>(sk >> 32)));
        return;
      }
      const int e = static_cast<int>(slot_expert(sk));
      const float xe = load_as_float(a.logits, dt, roff + e);
      sel_e[tb][rank] = e;
      sel_v[tb][rank] = activation<F>(xe);  // softmax: the logit itself
    };
    if (ctot <= CMAX) {
      for (int idx = j; idx < ctot; idx += L) {
        const unsigned long long my = lst[idx];
        int rank = 0;
        for (int q = 0; q < ctot; q += 2) {
          const ulonglong2 pr = *reinterpret_cast<const ulonglong2*>(&lst[q]);
          rank += (pr.x > my ? 1 : 0) + (pr.y > my ? 1 : 0);
        }
        if (rank < ranked) record(rank, my);
      }
    } else {
      // Many candidates (exact ties): count against every kept expert of the token.
      uint32_t mm = cm;
      while (mm) {
        const int i = __ffs(mm) - 1;
        mm &= mm - 1;
        const unsigned long long my =
            slot_key(sm_key(keys_sm, tid, i), static_cast<uint32_t>(base_e + i));
        int rank = 0;
        for (int l = 0; l < L; ++l) {
          if (!((keptmask >> ((gthread0 + l) & 31)) & 1u)) continue;
#pragma unroll
          for (int i2 = 0; i2 < V; ++i2) {
            const unsigned long long o =
                slot_key(sm_key(keys_sm, gthread0 + l, i2), static_cast<uint32_t>(l * V + i2));
            rank += o > my ? 1 : 0;
          }
        }
        if (rank < ranked) record(rank, my);
      }
    }
    __syncwarp();

    // Weights, in slot order (routing_math.h weight_numerator / weight_denominator / weight).
    constexpr int NQ = (KMAX + L - 1) / L;
    float u[NQ];
    const float x0 = sel_v[tb][0];
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const int r = j + q * L;
      u[q] = 0.0f;
      if (tok && r < k) {
        u[q] = weight_numerator<F>(false, sel_v[tb][r], x0, sel_v[tb][r]);
        if (kRaw) sel_u[tb][r] = u[q];
      }
    }
    if (kRaw) __syncwarp();  // sel_u complete before every lane sums it
    if (tok) {
      const float* us = kRaw ? sel_u[tb] : sel_v[tb];
      float sum = us[0];
      for (int r = 1; r < k; ++r) sum = slot_sum_add(sum, us[r]);
      const float denom = weight_denominator<F>(sum);
      const int64_t ko = t * static_cast<int64_t>(k);
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int r = j + q * L;
        if (r < k) {
          const int e = sel_e[tb][r];
          const float p = weight<F>(false, k, u[q], denom);
          const float w = a.scaling * p;
          store_slot<F>(a, ko, r, e, w, p, u[q]);
          if (a.probs) store_from_float(a.probs, dt, roff + e, w);
          if (a.map && !a.bitmap) a.map[roff + e] = 1;
        }
      }
      if (a.map && a.bitmap) {
        uint32_t mask = 0;
        for (int r = 0; r < k; ++r) {
          const int d = sel_e[tb][r] - base_e;
          if (d >= 0 && d < V) mask |= 1u << d;
        }
        const int64_t nbytes = (E + 7) / 8;
        const int b0 = base_e / 8;
#pragma unroll
        for (int q = 0; q < V / 8; ++q) {
          if (b0 + q < nbytes) a.map[t * nbytes + b0 + q] = static_cast<uint8_t>(mask >> (8 * q));
        }
      }
    }
    __syncwarp();  // shared arrays are reused by the next tile
  }
}

}  // namespace cuda
}  // namespace jax_router
