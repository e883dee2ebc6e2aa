// CUDA kernels of the router forward and backward (SPEC §3-4), free of XLA headers so that a
// standalone driver (benchmarks/cuda_selftest.cu) can include them.
//
// Forward, two paths chosen per call from (E, topk, options) only, never from the token count,
// so a row's result does not depend on the batch it came in:
//
// * fwd_fast_kernel<D, FN, L, V, P>: E <= 1024, topk <= 32, no pre-softmax. L lanes (a power of
//   two dividing 32) work on one token, lane j holding experts [jV, jV+V) in registers as
//   32-bit order keys (router.h::order_key). For DeepSeek-V3 (E=256, 8 groups of 32) a lane is
//   exactly one group. Selection never runs k rounds of argmax:
//     1. each lane keeps its top-P keys while it computes them (P <= 2, IMNMX only);
//     2. group-limited routing: group score = sequential sum of the lane's top-m values, group
//        ranks by comparing the L group keys (ties to the lower group id);
//     3. a threshold tau below which no top-k expert can lie: the minimum over the (kept) lanes
//        of their m-th / P-th key, or the k-th largest lane maximum (wide layouts);
//     4. the few candidates >= tau are compacted into shared memory as 64-bit slot keys
//        (router.h::slot_key: score key high, inverted expert id low, all distinct);
//     5. each candidate's slot = the number of candidates with a larger slot key. Slots < k
//        are the selection, already in SPEC order (score descending, ties to the lower id).
//   If a token has more than CMAX candidates (many exact ties), the ranks are counted against
//   every expert of the token instead: slower, same result.
// * fwd_general_kernel<D, FN>: any E up to the shared-memory limit (16384 on sm_80/90/100),
//   any topk, pre-softmax. One block per row sorts the row's 64-bit slot keys in shared memory
//   (bitonic); group-limited routing sorts (group, key) composites first, then group keys.
//
// Weights: p from the unbiased activation recomputed from the logit of each selected expert
// (the same router.h code that produced the selection score), normalisation sums taken
// sequentially in slot order. Dense outputs (probs, bytemap) are zero-filled with vector stores
// by the lane that owns the chunk, then, after a __syncwarp/__syncthreads, the k selected
// entries are stored; bitmap bytes are assembled by the owning lane.
//
// Backward: one warp per row; sums over the k slots in slot order, zero-fill + scatter.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "router.h"

namespace jax_router {
namespace cuda {

enum class Dt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum class It : int { kS16 = 0, kS32 = 1, kS64 = 2 };

struct FwdArgs {
  int64_t rows = 0;
  int64_t experts = 0;
  RouteParams p{};
  const void* logits = nullptr;
  Dt logits_dt = Dt::kF32;
  const float* bias = nullptr;
  int64_t rows_per_bias = 1;
  void* probs = nullptr;
  void* map = nullptr;
  bool bitmap = false;
  float* weights = nullptr;
  void* indices = nullptr;
  It index_dt = It::kS32;
  float* act = nullptr;
};

struct BwdArgs {
  int64_t rows = 0;
  int64_t experts = 0;
  RouteParams p{};
  bool dense_grad = false;
  const void* grad = nullptr;
  Dt grad_dt = Dt::kF32;
  const void* indices = nullptr;
  It index_dt = It::kS32;
  const float* act = nullptr;
  const void* logits = nullptr;  // pre-softmax only
  Dt logits_dt = Dt::kF32;
  void* grad_logits = nullptr;
  Dt out_dt = Dt::kF32;
};

// Which forward kernel a call takes (for tests and benchmarks).
enum class FwdPath : int { kNone = 0, kFast = 1, kGeneral = 2 };

// ---- element types ------------------------------------------------------------------------

struct DF32 {
  using raw = float;
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static __device__ __forceinline__ void unpack16(const uint4& w, float* o) {
    o[0] = __uint_as_float(w.x);
    o[1] = __uint_as_float(w.y);
    o[2] = __uint_as_float(w.z);
    o[3] = __uint_as_float(w.w);
  }
};
struct DBF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  static __device__ __forceinline__ uint16_t from_f(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  static __device__ __forceinline__ void unpack16(const uint4& w, float* o) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      o[2 * q] = __uint_as_float(u[q] << 16);
      o[2 * q + 1] = __uint_as_float(u[q] & 0xFFFF0000u);
    }
  }
};
struct DF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) {
    return __half2float(__ushort_as_half(v));
  }
  static __device__ __forceinline__ uint16_t from_f(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
  static __device__ __forceinline__ void unpack16(const uint4& w, float* o) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      __half2 h = *reinterpret_cast<const __half2*>(&u[q]);
      float2 f = __half22float2(h);
      o[2 * q] = f.x;
      o[2 * q + 1] = f.y;
    }
  }
};

__device__ __forceinline__ float load_as_float(const void* p, Dt dt, int64_t i) {
  switch (dt) {
    case Dt::kF32:
      return static_cast<const float*>(p)[i];
    case Dt::kBF16:
      return DBF16::to_f(static_cast<const uint16_t*>(p)[i]);
    default:
      return DF16::to_f(static_cast<const uint16_t*>(p)[i]);
  }
}

__device__ __forceinline__ void store_from_float(void* p, Dt dt, int64_t i, float v) {
  switch (dt) {
    case Dt::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case Dt::kBF16:
      static_cast<uint16_t*>(p)[i] = DBF16::from_f(v);
      break;
    default:
      static_cast<uint16_t*>(p)[i] = DF16::from_f(v);
      break;
  }
}

__device__ __forceinline__ void store_index(void* p, It dt, int64_t i, int e) {
  switch (dt) {
    case It::kS16:
      static_cast<int16_t*>(p)[i] = static_cast<int16_t>(e);
      break;
    case It::kS32:
      static_cast<int32_t*>(p)[i] = e;
      break;
    default:
      static_cast<int64_t*>(p)[i] = e;
      break;
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, It dt, int64_t i) {
  switch (dt) {
    case It::kS16:
      return static_cast<const int16_t*>(p)[i];
    case It::kS32:
      return static_cast<const int32_t*>(p)[i];
    default:
      return static_cast<const int64_t*>(p)[i];
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// router.h's activation with subnormal values flushed to zero where they arise (e^x inside
// softplus below x ~ -87.3, a sigmoid below x ~ -87.3), as XLA computes the pure-JAX reference
// on the GPU (flush-to-zero) and as the SPEC §4 rule "s underflows to 0" reads. Equal to
// activation() everywhere else.
__device__ __forceinline__ float act_dev(ScoreFn f, float x) {
  if (f == ScoreFn::kSigmoid) {
    const float s = sigmoid(x);
    return s < FLT_MIN ? 0.0f : s;  // s >= 0; NaN passes through
  }
  if (f == ScoreFn::kSqrtSoftplus) {
    if (x > 20.0f) return sqrtf(x);
    float e = expf(x);
    e = e < FLT_MIN ? 0.0f : e;
    return sqrtf(log1pf(e));
  }
  return x;
}

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

// ---- warp-group helpers (groups of L lanes, L a power of two) -------------------------------

template <int L>
__device__ __forceinline__ uint32_t group_min(uint32_t v) {
#pragma unroll
  for (int o = 1; o < L; o <<= 1) v = min(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
template <int L>
__device__ __forceinline__ uint32_t group_max(uint32_t v) {
#pragma unroll
  for (int o = 1; o < L; o <<= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
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
};

// 1/y rounded to nearest, through the same fast path as the CUDA library's reciprocal; *odd is
// set when y is outside the range where that path is exact (the caller then redoes the chunk
// with router.h's plain code, which takes the library's slow path).
__device__ __forceinline__ float rcp_rn_fast(float y, bool* odd) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  const float e = fmaf(-y, r, 1.0f);
  r = fmaf(r, e, r);
  const uint32_t ex = (__float_as_uint(y) + 0x1800000u) & 0x7F800000u;
  *odd |= ex <= 0x1FFFFFFu;
  return r;
}

// router.h's activation of 4 values, out of line: the rare path (a reciprocal outside the fast
// path's exact range: x below about -87, or NaN) stays out of the hot loop's instruction stream.
template <ScoreFn F>
__device__ __noinline__ float4 activation4_slow(float4 x) {
  return make_float4(act_dev(F, x.x), act_dev(F, x.y), act_dev(F, x.z), act_dev(F, x.w));
}

// Keys of one lane's chunk, streamed 4 at a time into keys_sm[.][tid], and its top-P keys
// (descending). Keys past nvalid are 0 (the caller passes x = 0 there). The sigmoid is
// router.h's (expf, then 1/(1+e) rounded to nearest), with the reciprocal's range check done
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
      for (int u = 0; u < 4; ++u) s[u] = rcp_rn_fast(1.0f + expf(-x[4 * q + u]), &odd);
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
      for (int u = 0; u < 4; ++u) s[u] = act_dev(F, x[4 * q + u]);
    }
    uint32_t kk[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      kk[u] = F == ScoreFn::kSoftmax ? order_key(x[4 * q + u]) : order_key(s[u] + b[u]);
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

template <int FN, int L, int V, int P>
__global__ void __launch_bounds__(kFastThreads, 6) fwd_fast_kernel(const FastArgs a) {
  constexpr int TPB = kFastThreads / L;
  constexpr int CMAX = fast_cmax(L, V);
  constexpr int KMAX = fast_kmax(L, V);
  constexpr int LS = CMAX + 2;
  constexpr int SS = KMAX + 1;
  constexpr ScoreFn F = static_cast<ScoreFn>(FN);
  constexpr bool kRaw = F == ScoreFn::kSoftmax;
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
        if (q < m) gs += order_key_value(top[q]);
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
        if (gt[q] < k && ge[q] >= k) mine = top[q];
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
      const int e = static_cast<int>(slot_expert(sk));
      const float xe = load_as_float(a.logits, dt, roff + e);
      sel_e[tb][rank] = e;
      sel_v[tb][rank] = kRaw ? xe : act_dev(F, xe);
    };
    if (ctot <= CMAX) {
      for (int idx = j; idx < ctot; idx += L) {
        const unsigned long long my = lst[idx];
        int rank = 0;
        for (int q = 0; q < ctot; q += 2) {
          const ulonglong2 pr = *reinterpret_cast<const ulonglong2*>(&lst[q]);
          rank += (pr.x > my ? 1 : 0) + (pr.y > my ? 1 : 0);
        }
        if (rank < k) record(rank, my);
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
        if (rank < k) record(rank, my);
      }
    }
    __syncwarp();

    // Weights, in slot order.
    constexpr int NQ = (KMAX + L - 1) / L;
    float u[NQ];
    if (kRaw) {
      const float mx = sel_v[tb][0];
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int r = j + q * L;
        u[q] = 0.0f;
        if (tok && r < k) {
          u[q] = expf(sel_v[tb][r] - mx);
          sel_u[tb][r] = u[q];
        }
      }
      __syncwarp();
    } else {
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int r = j + q * L;
        u[q] = (tok && r < k) ? sel_v[tb][r] : 0.0f;
      }
    }
    if (tok) {
      const float* us = kRaw ? sel_u[tb] : sel_v[tb];
      float sum = 0.0f;
      for (int r = 0; r < k; ++r) sum += us[r];
      const float denom = kRaw ? sum : sum + kEps;
      const int64_t ko = t * static_cast<int64_t>(k);
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const int r = j + q * L;
        if (r < k) {
          const int e = sel_e[tb][r];
          const float p = (kRaw || k > 1) ? u[q] / denom : u[q];
          const float w = a.scaling * p;
          if (a.weights) a.weights[ko + r] = w;
          if (a.indices) store_index(a.indices, a.index_dt, ko + r, e);
          if (a.act) a.act[ko + r] = kRaw ? p : u[q];
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

// ---- general forward (one block per row) ----------------------------------------------------

struct GenArgs {
  int64_t rows;
  int E;
  int k;
  int n2;   // power of two >= E
  int n2g;  // power of two >= num_groups (grouped), else 0
  int id_bits;
  const void* logits;
  const float* bias;
  int64_t rows_per_bias;
  void* probs;
  uint8_t* map;
  bool bitmap;
  float* weights;
  void* indices;
  It index_dt;
  float* act;
  float scaling;
  bool pre_softmax;
  int num_groups;
  int group_topk;
  int m;
};

// Descending bitonic sort of n (a power of two) keys in shared memory, all threads of the block.
__device__ __forceinline__ void bitonic_desc(unsigned long long* s, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int p = threadIdx.x; p < (n >> 1); p += blockDim.x) {
        const int i = 2 * p - (p & (stride - 1));
        const int jx = i + stride;
        const unsigned long long x = s[i], y = s[jx];
        const bool desc = (i & size) == 0;
        if ((x < y) == desc) {
          s[i] = y;
          s[jx] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Deterministic block reductions (fixed order: per-thread strides, xor butterfly, then warp 0
// combines the warp results in order).
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = red[0];
    for (int w = 1; w < nw; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    red[32] = r;
  }
  __syncthreads();
  return red[32];
}

template <typename D, int FN>
__global__ void fwd_general_kernel(const GenArgs a) {
  using R = typename D::raw;
  constexpr ScoreFn F = static_cast<ScoreFn>(FN);
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* sk = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* gk = sk + a.n2;
  uint8_t* flags = reinterpret_cast<uint8_t*>(gk + a.n2g);
  __shared__ float red[33];
  __shared__ float bc[2];

  const int E = a.E, k = a.k, n2 = a.n2, nt = blockDim.x, tid = threadIdx.x;
  const R* logits = static_cast<const R*>(a.logits);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const R* xr = logits + row * E;
    const float* br =
        (F != ScoreFn::kSoftmax && a.bias) ? a.bias + (row / a.rows_per_bias) * E : nullptr;
    float mx = 0.0f, inv_sum = 0.0f, sum = 1.0f;
    if (a.pre_softmax) {
      float v = -INFINITY;
      for (int i = tid; i < E; i += nt) v = fmaxf(v, D::to_f(xr[i]));
      mx = block_reduce(v, true, red);
      float s = 0.0f;
      for (int i = tid; i < E; i += nt) s += expf(D::to_f(xr[i]) - mx);
      sum = block_reduce(s, false, red);
      (void)inv_sum;
    }
    // Unbiased activation s and selection score z of expert i.
    auto act_of = [&](float x) -> float {
      if (F == ScoreFn::kSoftmax) return a.pre_softmax ? expf(x - mx) / sum : x;
      return act_dev(F, x);
    };
    auto key_of = [&](int i) -> uint32_t {
      const float s = act_of(D::to_f(xr[i]));
      return order_key(br ? s + br[i] : s);
    };

    if (a.num_groups > 0) {
      const int G = a.num_groups, gsize = E / G, ib = a.id_bits;
      const unsigned long long idmask = (1ull << ib) - 1ull;
      for (int i = tid; i < n2; i += nt) {
        unsigned long long c = 0;
        if (i < E) {
          const unsigned long long g = static_cast<unsigned long long>(G - 1 - i / gsize);
          c = (g << (32 + ib)) | (static_cast<unsigned long long>(key_of(i)) << ib) |
              (idmask - static_cast<unsigned long long>(i));
        }
        sk[i] = c;
      }
      __syncthreads();
      bitonic_desc(sk, n2);
      for (int g = tid; g < a.n2g; g += nt) {
        unsigned long long c = 0;
        if (g < G) {
          float gs = 0.0f;
          for (int q = 0; q < a.m; ++q) {
            const float z =
                order_key_value(static_cast<uint32_t>((sk[g * gsize + q] >> ib) & 0xFFFFFFFFull));
            gs = q == 0 ? z : gs + z;
          }
          c = slot_key(order_key(gs), static_cast<uint32_t>(g));
        }
        gk[g] = c;
      }
      __syncthreads();
      bitonic_desc(gk, a.n2g);
      for (int g = tid; g < G; g += nt) flags[g] = 0;
      __syncthreads();
      for (int q = tid; q < a.group_topk; q += nt) flags[slot_expert(gk[q])] = 1;
      __syncthreads();
      for (int i = tid; i < n2; i += nt) {
        sk[i] = i < E ? slot_key(flags[i / gsize] ? key_of(i) : kExcludedKey,
                                 static_cast<uint32_t>(i))
                      : 0ull;
      }
    } else {
      for (int i = tid; i < n2; i += nt) {
        sk[i] = i < E ? slot_key(key_of(i), static_cast<uint32_t>(i)) : 0ull;
      }
    }
    __syncthreads();
    bitonic_desc(sk, n2);

    // Slots 0..k-1: pack (value bits, expert) in place.
    for (int r = tid; r < k; r += nt) {
      const uint32_t e = slot_expert(sk[r]);
      const float v = act_of(D::to_f(xr[e]));
      sk[r] = (static_cast<unsigned long long>(__float_as_uint(v)) << 32) | e;
    }
    __syncthreads();
    const bool raw = F == ScoreFn::kSoftmax && !a.pre_softmax;
    if (raw) {
      const float m0 = __uint_as_float(static_cast<uint32_t>(sk[0] >> 32));
      __syncthreads();
      for (int r = tid; r < k; r += nt) {
        const float u = expf(__uint_as_float(static_cast<uint32_t>(sk[r] >> 32)) - m0);
        sk[r] = (static_cast<unsigned long long>(__float_as_uint(u)) << 32) | (sk[r] & 0xFFFFFFFFull);
      }
      __syncthreads();
    }
    if (tid == 0) {
      float s = 0.0f;
      for (int r = 0; r < k; ++r) s += __uint_as_float(static_cast<uint32_t>(sk[r] >> 32));
      bc[0] = s;
    }
    // Dense outputs: zero the row (probs) / the flags (maps).
    if (a.probs) {
      R* pr = static_cast<R*>(a.probs) + row * E;
      for (int i = tid; i < E; i += nt) pr[i] = R(0);
    }
    if (a.map) {
      for (int i = tid; i < E; i += nt) flags[i] = 0;
    }
    __syncthreads();
    const float tot = bc[0];
    const bool normalise = F == ScoreFn::kSoftmax ? raw : k > 1;
    const float denom = raw ? tot : tot + kEps;
    const int64_t ko = row * static_cast<int64_t>(k);
    for (int r = tid; r < k; r += nt) {
      const int e = static_cast<int>(sk[r] & 0xFFFFFFFFull);
      const float u = __uint_as_float(static_cast<uint32_t>(sk[r] >> 32));
      const float p = normalise ? u / denom : u;
      const float w = a.scaling * p;
      if (a.weights) a.weights[ko + r] = w;
      if (a.indices) store_index(a.indices, a.index_dt, ko + r, e);
      if (a.act) a.act[ko + r] = raw ? p : u;
      if (a.probs) static_cast<R*>(a.probs)[row * E + e] = D::from_f(w);
      if (a.map) flags[e] = 1;
    }
    __syncthreads();
    if (a.map) {
      if (a.bitmap) {
        const int nb = (E + 7) / 8;
        for (int q = tid; q < nb; q += nt) {
          uint32_t byte = 0;
          for (int bit = 0; bit < 8; ++bit) {
            const int e = q * 8 + bit;
            if (e < E && flags[e]) byte |= 1u << bit;
          }
          a.map[row * nb + q] = static_cast<uint8_t>(byte);
        }
      } else {
        for (int i = tid; i < E; i += nt) a.map[row * E + i] = flags[i];
      }
    }
    __syncthreads();  // smem reused by the next row
  }
}

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

// One group of L lanes per row (L = 32 for pre-softmax, whose whole row is computed).
template <typename D, int L>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(const BwdKArgs a) {
  using R = typename D::raw;
  const int j = threadIdx.x % L;
  const int64_t grp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / L;
  const int64_t ngrp = (static_cast<int64_t>(gridDim.x) * blockDim.x) / L;
  const int E = a.E, k = a.k;
  R* out = static_cast<R*>(a.out);
  const bool raw = a.fn == ScoreFn::kSoftmax && !a.pre_softmax;
  const bool pre = a.fn == ScoreFn::kSoftmax && a.pre_softmax;
  // Every group runs the same number of iterations so that the shuffles see whole warps.
  const int64_t iters = (a.rows + ngrp - 1) / ngrp;

  for (int64_t it = 0; it < iters; ++it) {
    const int64_t row = grp + it * ngrp;
    const bool ok_row = row < a.rows;
    const int64_t ko = row * static_cast<int64_t>(k);
    const int64_t ro = row * static_cast<int64_t>(E);
    float mx = 0.0f, sum = 1.0f;
    if (pre) {
      float v = -INFINITY;
      if (ok_row)
        for (int i = j; i < E; i += L) v = fmaxf(v, load_as_float(a.logits, a.logits_dt, ro + i));
#pragma unroll
      for (int o = 1; o < L; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
      mx = v;
      float s = 0.0f;
      if (ok_row)
        for (int i = j; i < E; i += L) s += expf(load_as_float(a.logits, a.logits_dt, ro + i) - mx);
#pragma unroll
      for (int o = 1; o < L; o <<= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
      sum = s;
    }
    // Sums over the slots in slot order: A = sum act, B = sum g*act (sigmoid family) or
    // D = sum g*p (softmax).
    float A = 0.0f, B = 0.0f;
    for (int r0 = 0; r0 < k; r0 += L) {
      const int r = r0 + j;
      float g = 0.0f, s = 0.0f;
      if (ok_row && r < k) {
        const int64_t e = load_index(a.indices, a.index_dt, ko + r);
        const bool ok = e >= 0 && e < E;
        g = a.dense_grad ? (ok ? load_as_float(a.grad, a.grad_dt, ro + e) : 0.0f)
                         : load_as_float(a.grad, a.grad_dt, ko + r);
        g *= a.scaling;
        s = pre ? (ok ? expf(load_as_float(a.logits, a.logits_dt, ro + e) - mx) / sum : 0.0f)
                : a.act[ko + r];
      }
      const int n = min(L, k - r0);
      for (int q = 0; q < n; ++q) {
        const float sq = __shfl_sync(0xFFFFFFFFu, s, q, L);
        const float gq = __shfl_sync(0xFFFFFFFFu, g, q, L);
        A += sq;
        B += gq * sq;
      }
    }
    if (ok_row) {
      if (pre) {
        for (int i = j; i < E; i += L) {
          const float s = expf(load_as_float(a.logits, a.logits_dt, ro + i) - mx) / sum;
          out[ro + i] = D::from_f(-s * B);
        }
      } else {
        group_zero<R, L>(out + ro, E, j);
      }
    }
    __syncwarp();
    if (ok_row) {
      for (int r = j; r < k; r += L) {
        const int64_t e = load_index(a.indices, a.index_dt, ko + r);
        if (e < 0 || e >= E) continue;
        float g = a.dense_grad ? load_as_float(a.grad, a.grad_dt, ro + e)
                               : load_as_float(a.grad, a.grad_dt, ko + r);
        g *= a.scaling;
        float dx;
        if (pre) {
          const float s = expf(load_as_float(a.logits, a.logits_dt, ro + e) - mx) / sum;
          dx = s * (g - B);
        } else if (raw) {
          const float p = a.act[ko + r];
          dx = p * (g - B);
        } else {
          const float s = a.act[ko + r];
          float ds;
          if (k > 1) {
            const float d = A + kEps;
            ds = g / d - B / (d * d);
          } else {
            ds = g;
          }
          dx = ds * activation_grad(a.fn, s);
        }
        out[ro + e] = D::from_f(dx);
      }
    }
    __syncwarp();
  }
}

}  // namespace cuda
}  // namespace jax_router
