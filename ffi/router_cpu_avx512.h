// AVX-512 row routine for the CPU forward (router_cpu.cc), used when the CPU has AVX-512
// (F, BW, DQ, VL) and the problem fits its shapes (Supports). It computes exactly what RouteRow
// computes, bit for bit: the same score arithmetic (routing_math.h's operations, in order),
// the same order keys and the same selection; only the way the selection is found differs.
//
// Why it is faster than RouteRow on the same machine: RouteRow's selections are scalar loops
// whose branches depend on the data (~120 mispredictions a row at DeepSeek-V3's shape). Here
// every step is a fixed sequence of vector operations:
//   1. scores and order keys, 16 experts per vector, 8 vectors in lockstep;
//   2. each group's top-2 keys: a per-lane (max, second max) over the group's vectors, then
//      folds that halve the lanes per group while doubling the groups per vector;
//   3. the kept groups by counting, for every group, the groups that beat it;
//   4. a floor at least k kept keys reach (the smallest second-best key of the kept groups, or
//      the k-th largest per-lane maximum), the keys at or above it compressed into a short
//      candidate list (~11 at DeepSeek-V3's shape), and each candidate placed by counting the
//      candidates that beat it.
// Rows are pipelined: the next row's scores are computed between this row's selection steps.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "cpu_util.h"
#include "ffi_contract.h"
#include "routing_math.h"

#define JR_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,bmi,bmi2,popcnt")))

namespace jax_router {
namespace avx512 {

constexpr int64_t kMaxE = 1024;  // keys and scores live in stack arrays
constexpr int64_t kMaxK = 16;    // the per-lane floor needs k <= 16 lanes

// JAX_ROUTER_CPU_NO_AVX512 (any value) keeps a process on the scalar routine, so that a test
// can compare the two routines' outputs on one machine.
inline bool Available() {
  static const bool ok =
      std::getenv("JAX_ROUTER_CPU_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl");
  return ok;
}

// Shapes the vector routine handles; everything else takes RouteRow.
inline bool Supports(const FwdProblem& f) {
  const RouteParams& P = f.p;
  const int64_t E = f.experts, K = P.topk;
  if (E % 16 != 0 || E > kMaxE || K < 1 || K > kMaxK || is_qb(P)) return false;
  if (P.group_topk > 0) {
    const int64_t G = P.num_groups, gsize = E / G, m = K / P.group_topk;
    if (G > 16 || gsize % 16 != 0 || (m != 1 && m != 2)) return false;
  }
  return true;
}

template <typename T>
JR_AVX512 inline __m512 Load16(const T* p);
template <>
JR_AVX512 inline __m512 Load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
JR_AVX512 inline __m512 Load16<BF16>(const BF16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <>
JR_AVX512 inline __m512 Load16<F16>(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// routing_math.h's sigmoid, 1 / (1 + exact::exp_for_sigmoid(-x)), on N vectors, operation for
// operation (the same fused multiply-adds, the same roundings), so that the results are
// identical. Each vector is one long dependent chain (~16 operations); written stage by stage over N vectors,
// N independent operations are in flight at every step, where a vector at a time leaves the
// scheduler full of waiting operations (~1.5x slower at N = 8).
// The clamps put the constant first: max/min return their second operand on NaN, which keeps
// a NaN x as the scalar selects do.
template <int N>
JR_AVX512 inline void SigmoidV(__m512* x) {
#define JR_EACH for (int i = 0; i < N; ++i)
#define JR_C(v) _mm512_set1_ps(v)
  __m512 t[N], n[N], r[N], q[N];
  JR_EACH x[i] = _mm512_xor_ps(x[i], _mm512_set1_ps(-0.0f));
  JR_EACH x[i] = _mm512_max_ps(JR_C(exact::kSigmoidExpMin), x[i]);
  JR_EACH x[i] = _mm512_min_ps(JR_C(exact::kSigmoidExpMax), x[i]);
  JR_EACH t[i] = _mm512_fmadd_ps(x[i], JR_C(exact::kLog2e), JR_C(exact::kRoundMagic));
  JR_EACH n[i] = _mm512_sub_ps(t[i], JR_C(exact::kRoundMagic));
  JR_EACH r[i] = _mm512_fmadd_ps(n[i], JR_C(-exact::kLn2Hi), x[i]);
  JR_EACH r[i] = _mm512_fmadd_ps(n[i], JR_C(-exact::kLn2Lo), r[i]);
  JR_EACH q[i] = _mm512_fmadd_ps(JR_C(0.016625041142106056f), r[i], JR_C(0.08378031849861145f));
  JR_EACH q[i] = _mm512_fmadd_ps(q[i], r[i], JR_C(0.3333422839641571f));
  JR_EACH q[i] = _mm512_fmadd_ps(q[i], r[i], JR_C(0.999984622001648f));
  JR_EACH q[i] = _mm512_fmadd_ps(q[i], r[i], JR_C(2.0f));
  JR_EACH q[i] = _mm512_fmadd_ps(q[i], r[i], JR_C(2.0f));
  JR_EACH q[i] = _mm512_mul_ps(q[i], _mm512_castsi512_ps(_mm512_add_epi32(
                     _mm512_slli_epi32(_mm512_castps_si512(t[i]), 23), _mm512_set1_epi32(126 << 23))));
  JR_EACH x[i] = _mm512_div_ps(JR_C(1.0f), _mm512_add_ps(JR_C(1.0f), q[i]));
#undef JR_C
#undef JR_EACH
}

// order_key (routing_math.h) on 16 lanes.
JR_AVX512 inline __m512i OrderKeyV(__m512 z) {
  const __m512i u = _mm512_castps_si512(z);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(INT32_MIN));
  const __mmask16 nan = _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(_mm512_xor_si512(u, flip), nan, _mm512_set1_epi32(kNanKey));
}

// order_key_value (routing_math.h) on 16 lanes, for keys of real scores (never kExcludedKey).
JR_AVX512 inline __m512 KeyValueV(__m512i key) {
  const __m512i t = _mm512_srai_epi32(key, 31);
  const __m512i flip = _mm512_or_si512(_mm512_andnot_si512(t, _mm512_set1_epi32(-1)),
                                       _mm512_set1_epi32(INT32_MIN));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(key, _mm512_set1_epi32(kNanKey));
  const __m512i u = _mm512_mask_mov_epi32(_mm512_xor_si512(key, flip), nan,
                                          _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(u);
}

// (m1, m2) per lane: the largest and second largest of the keys seen in that lane (a multiset:
// equal keys count twice). Merging two disjoint sets' pairs keeps that meaning.
JR_AVX512 inline void Top2Merge(__m512i& m1, __m512i& m2, __m512i b1, __m512i b2) {
  m2 = _mm512_max_epu32(_mm512_min_epu32(m1, b1), _mm512_max_epu32(m2, b2));
  m1 = _mm512_max_epu32(m1, b1);
}

// Folds the 16 lanes' pairs into one pair, left in every lane.
JR_AVX512 inline void Top2Fold(__m512i& m1, __m512i& m2) {
  Top2Merge(m1, m2, _mm512_shuffle_i32x4(m1, m1, 0x4E), _mm512_shuffle_i32x4(m2, m2, 0x4E));
  Top2Merge(m1, m2, _mm512_shuffle_i32x4(m1, m1, 0xB1), _mm512_shuffle_i32x4(m2, m2, 0xB1));
  Top2Merge(m1, m2, _mm512_shuffle_epi32(m1, _MM_PERM_BADC), _mm512_shuffle_epi32(m2, _MM_PERM_BADC));
  Top2Merge(m1, m2, _mm512_shuffle_epi32(m1, _MM_PERM_CDAB), _mm512_shuffle_epi32(m2, _MM_PERM_CDAB));
}

// Per-lane (m1, m2) of two groups, 16 lanes each, merged into one vector: the low 8 lanes hold
// 8 partial pairs of group a, the high 8 of group b.
JR_AVX512 inline void Top2Pair(__m512i a1, __m512i a2, __m512i b1, __m512i b2, __m512i& m1,
                               __m512i& m2) {
  m1 = _mm512_shuffle_i32x4(a1, b1, 0x44);
  m2 = _mm512_shuffle_i32x4(a2, b2, 0x44);
  Top2Merge(m1, m2, _mm512_shuffle_i32x4(a1, b1, 0xEE), _mm512_shuffle_i32x4(a2, b2, 0xEE));
}

// Top two keys of each of 8 consecutive groups (gsize a multiple of 16, keys 64-byte aligned):
// lane g of m1 / m2 (g < 8) gets group g's best / second best key. The groups share the folds:
// each step halves the lanes per group and doubles the groups per vector.
// GV (vectors per group) is a template argument so that every loop here unrolls.
template <int GV>
JR_AVX512 inline void Top2Of8Groups(const uint32_t* key, __m512i& m1, __m512i& m2) {
  constexpr int gsize = 16 * GV;
  __m512i p1[4], p2[4];
  for (int i = 0; i < 4; ++i) {
    __m512i a1, a2, b1, b2;
    for (int h = 0; h < 2; ++h) {
      const uint32_t* g = key + (2 * i + h) * gsize;
      __m512i x1 = _mm512_load_si512(g), x2 = _mm512_setzero_si512();
      for (int v = 16; v < gsize; v += 16) {
        Top2Merge(x1, x2, _mm512_load_si512(g + v), _mm512_setzero_si512());
      }
      (h ? b1 : a1) = x1;
      (h ? b2 : a2) = x2;
    }
    Top2Pair(a1, a2, b1, b2, p1[i], p2[i]);
  }
  // 128-bit lane q of (p[2i], p[2i+1]) -> groups (4i, 4i+1, 4i+2, 4i+3), 4 partials each.
  __m512i q1[2], q2[2];
  for (int i = 0; i < 2; ++i) {
    q1[i] = _mm512_shuffle_i32x4(p1[2 * i], p1[2 * i + 1], 0x88);
    q2[i] = _mm512_shuffle_i32x4(p2[2 * i], p2[2 * i + 1], 0x88);
    Top2Merge(q1[i], q2[i], _mm512_shuffle_i32x4(p1[2 * i], p1[2 * i + 1], 0xDD),
              _mm512_shuffle_i32x4(p2[2 * i], p2[2 * i + 1], 0xDD));
  }
  // 128-bit lane q: group q in dwords 0-1, group 4 + q in dwords 2-3.
  m1 = _mm512_unpacklo_epi64(q1[0], q1[1]);
  m2 = _mm512_unpacklo_epi64(q2[0], q2[1]);
  Top2Merge(m1, m2, _mm512_unpackhi_epi64(q1[0], q1[1]), _mm512_unpackhi_epi64(q2[0], q2[1]));
  Top2Merge(m1, m2, _mm512_shuffle_epi32(m1, _MM_PERM_CDAB), _mm512_shuffle_epi32(m2, _MM_PERM_CDAB));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 4, 8, 12, 2, 6, 10, 14);
  m1 = _mm512_permutexvar_epi32(order, m1);
  m2 = _mm512_permutexvar_epi32(order, m2);
}

// Slot keys (routing_math.h slot_key) of 8 keys and their expert ids.
JR_AVX512 inline __m512i SlotKeys8(__m256i keys, __m256i ids) {
  const __m512i hi = _mm512_slli_epi64(_mm512_cvtepu32_epi64(keys), 32);
  const __m512i lo = _mm512_cvtepu32_epi64(_mm256_xor_si256(ids, _mm256_set1_epi32(-1)));
  return _mm512_or_si512(hi, lo);
}

// Ranks of NV * 8 distinct slot keys (descending); out[rank] = key for every rank < k. Lanes
// past the real candidates hold keys below every real one, so they never raise a real rank.
template <int NV>
JR_AVX512 inline void RankAndPlace(const uint64_t* sk, int64_t k, uint64_t* out) {
  __m512i v[NV], rank[NV];
  const __m512i one = _mm512_set1_epi64(1);
  for (int i = 0; i < NV; ++i) {
    v[i] = _mm512_loadu_si512(sk + 8 * i);
    rank[i] = _mm512_setzero_si512();
  }
  for (int j = 0; j < NV * 8; ++j) {
    const __m512i b = _mm512_set1_epi64(static_cast<long long>(sk[j]));
    for (int i = 0; i < NV; ++i) {
      rank[i] = _mm512_mask_add_epi64(rank[i], _mm512_cmpgt_epu64_mask(b, v[i]), rank[i], one);
    }
  }
  const __m512i kv = _mm512_set1_epi64(k);
  for (int i = 0; i < NV; ++i) {
    _mm512_mask_i64scatter_epi64(out, _mm512_cmplt_epu64_mask(rank[i], kv), rank[i], v[i], 8);
  }
}

// Sigmoid scores s and keys of z = s + bias for vectors [v, v + N) of a row.
template <int N, typename T>
JR_AVX512 inline void SigmoidKeys(const T* xr, const float* bias, int64_t v, float* s,
                                  uint32_t* key) {
  __m512 x[N];
  for (int i = 0; i < N; ++i) x[i] = Load16(xr + 16 * (v + i));
  SigmoidV<N>(x);
  for (int i = 0; i < N; ++i) {
    _mm512_storeu_ps(s + 16 * (v + i), x[i]);
    const __m512 z = bias ? _mm512_add_ps(x[i], _mm512_loadu_ps(bias + 16 * (v + i))) : x[i];
    _mm512_store_si512(key + 16 * (v + i), OrderKeyV(z));
  }
}

// One row's scores s and order keys (experts by id), 64-byte aligned for the vector loads.
struct RowKeys {
  alignas(64) uint32_t key[kMaxE];
  alignas(64) float s[kMaxE];
};

// Scores and keys of vectors [v0, v1) of row xr. Sigmoid and plain softmax are vectorised
// here; the other score functions take ScoreRow for the whole row, in the call whose range
// starts the row.
template <typename T, ScoreFn F>
JR_AVX512 inline void ScoreVectors(const RouteParams& P, int64_t E, const T* xr,
                                   const float* bias, int64_t v0, int64_t v1, RowKeys& w) {
  if constexpr (F == ScoreFn::kSigmoid) {
    int64_t v = v0;
    for (; v + 8 <= v1; v += 8) SigmoidKeys<8>(xr, bias, v, w.s, w.key);
    for (; v + 4 <= v1; v += 4) SigmoidKeys<4>(xr, bias, v, w.s, w.key);
    for (; v < v1; ++v) SigmoidKeys<1>(xr, bias, v, w.s, w.key);
  } else if (F == ScoreFn::kSoftmax && !P.pre_softmax) {
    for (int64_t v = v0; v < v1; ++v) {
      const __m512 x = Load16(xr + 16 * v);
      _mm512_store_ps(w.s + 16 * v, x);
      _mm512_store_si512(w.key + 16 * v, OrderKeyV(x));
    }
  } else if (v0 == 0 && v1 > 0) {
    alignas(64) float x[kMaxE], z[kMaxE];
    for (int64_t v = 0; v < E / 16; ++v) _mm512_store_ps(x + 16 * v, Load16(xr + 16 * v));
    ScoreRow<F>(P.pre_softmax, x, bias, E, w.s, z, w.key);
  }
}

// What the group stage leaves for the expert stage: the kept groups (bit g; one group spanning
// the row when there is no group routing) and a key at least k kept experts reach.
struct KeptGroups {
  uint32_t kept;
  uint32_t floor_key;
  int64_t gsize;
  int64_t nkept;
};

// Group-limited routing: each group's score from its top two keys, the kept groups, and the floor.
JR_AVX512 inline KeptGroups SelectGroups(const RouteParams& P, int64_t E, const uint32_t* key) {
  const int64_t K = P.topk;
  if (P.group_topk <= 0) {
    // k-th largest per-lane maximum: k lanes hold a key at least that large.
    __m512i mx = _mm512_setzero_si512();
    for (int64_t v = 0; v < E / 16; ++v) mx = _mm512_max_epu32(mx, _mm512_load_si512(key + 16 * v));
    alignas(64) uint32_t lm[16];
    _mm512_store_si512(lm, mx);
    __m512i above = _mm512_setzero_si512();
    const __m512i one = _mm512_set1_epi32(1);
    for (int j = 0; j < 16; ++j) {
      above = _mm512_mask_add_epi32(
          above, _mm512_cmpgt_epu32_mask(_mm512_set1_epi32(static_cast<int>(lm[j])), mx), above, one);
    }
    const uint32_t floor_key = _mm512_mask_reduce_min_epu32(
        _mm512_cmplt_epu32_mask(above, _mm512_set1_epi32(static_cast<int>(K))), mx);
    return KeptGroups{1u, floor_key, E, 1};
  }
  const int64_t G = P.num_groups, m = K / P.group_topk, gsize = E / G, gv = gsize / 16;
  __m512i k1, k2;
  if (G == 8 && gv == 2) {
    Top2Of8Groups<2>(key, k1, k2);
  } else if (G == 8 && gv == 4) {
    Top2Of8Groups<4>(key, k1, k2);
  } else if (G == 16 && gv <= 2) {
    __m512i a1, a2, b1, b2;
    if (gv == 1) {
      Top2Of8Groups<1>(key, a1, a2);
      Top2Of8Groups<1>(key + 8 * gsize, b1, b2);
    } else {
      Top2Of8Groups<2>(key, a1, a2);
      Top2Of8Groups<2>(key + 8 * gsize, b1, b2);
    }
    k1 = _mm512_inserti64x4(a1, _mm512_castsi512_si256(b1), 1);
    k2 = _mm512_inserti64x4(a2, _mm512_castsi512_si256(b2), 1);
  } else {
    alignas(64) uint32_t gm1[16] = {}, gm2[16] = {};
    for (int64_t g = 0; g < G; ++g) {
      __m512i m1 = _mm512_load_si512(key + g * gsize), m2 = _mm512_setzero_si512();
      for (int64_t v = 1; v < gv; ++v) {
        Top2Merge(m1, m2, _mm512_load_si512(key + g * gsize + 16 * v), _mm512_setzero_si512());
      }
      Top2Fold(m1, m2);
      gm1[g] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(m1)));
      gm2[g] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(m2)));
    }
    k1 = _mm512_load_si512(gm1);
    k2 = _mm512_load_si512(gm2);
  }
  const __mmask16 real = static_cast<__mmask16>((1u << G) - 1u);
  // Group score: the sum of the two best scores (their keys decode exactly), or the best.
  const __m512i gkey = _mm512_maskz_mov_epi32(
      real, m == 2 ? OrderKeyV(_mm512_add_ps(KeyValueV(k1), KeyValueV(k2))) : k1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i s0 = SlotKeys8(_mm512_castsi512_si256(gkey), _mm512_castsi512_si256(iota));
  const __m512i s1 =
      SlotKeys8(_mm512_extracti64x4_epi64(gkey, 1), _mm512_extracti64x4_epi64(iota, 1));
  // A group is kept when fewer than group_topk real groups beat it. Group j's key is broadcast
  // from the register: through memory it cost a store and G reloads a row.
  const __m512i one = _mm512_set1_epi64(1);
  __m512i r0 = _mm512_setzero_si512(), r1 = _mm512_setzero_si512();
  for (int64_t j = 0; j < G; ++j) {
    const __m512i b = _mm512_permutexvar_epi64(_mm512_set1_epi64(j & 7), j < 8 ? s0 : s1);
    r0 = _mm512_mask_add_epi64(r0, _mm512_cmpgt_epu64_mask(b, s0), r0, one);
    if (G > 8) r1 = _mm512_mask_add_epi64(r1, _mm512_cmpgt_epu64_mask(b, s1), r1, one);
  }
  const __m512i gk = _mm512_set1_epi64(P.group_topk);
  const uint32_t kept = (static_cast<uint32_t>(_mm512_cmplt_epu64_mask(r0, gk)) |
                         (static_cast<uint32_t>(_mm512_cmplt_epu64_mask(r1, gk)) << 8)) &
                        real;
  // The kept groups' top-m keys are group_topk * m = k distinct experts: a floor.
  const uint32_t floor_key =
      _mm512_mask_reduce_min_epu32(static_cast<__mmask16>(kept), m == 2 ? k2 : k1);
  return KeptGroups{kept, floor_key, gsize, P.group_topk};
}

// Selection: the k best slot keys of the kept experts, in slot order, into sel. key is
// modified only on the rare fallback.
JR_AVX512 inline void SelectExperts(const RouteParams& P, int64_t E, uint32_t* key,
                                    const KeptGroups& g, uint64_t* sel,
                                    std::vector<uint64_t>& scratch) {
  const int64_t K = P.topk;
  constexpr int64_t kCap = 32;  // candidates ranked by counting; more take SelectTopK
  // Candidates: kept keys at or above the floor, by ascending id. Past kCap only the count
  // goes on, so the buffers stay small.
  alignas(64) uint32_t ck[kCap + 16], ci[kCap + 16];
  int64_t nc = 0;
  const __m512i fv = _mm512_set1_epi32(static_cast<int>(g.floor_key));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  uint32_t left = g.kept;
  for (int64_t t = 0; t < g.nkept; ++t) {
    const int64_t grp = __builtin_ctz(left);
    left &= left - 1;
    for (int64_t e0 = grp * g.gsize; e0 < (grp + 1) * g.gsize; e0 += 16) {
      const __m512i kv = _mm512_load_si512(key + e0);
      const __mmask16 mk = _mm512_cmpge_epu32_mask(kv, fv);
      const int64_t at = nc < kCap ? nc : kCap;
      _mm512_storeu_si512(ck + at, _mm512_maskz_compress_epi32(mk, kv));
      _mm512_storeu_si512(ci + at, _mm512_maskz_compress_epi32(
                                       mk, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(e0)))));
      nc += _mm_popcnt_u32(mk);
    }
  }
  if (nc <= kCap) {
    alignas(64) uint64_t sk[kCap];
    const __mmask16 lo = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(nc)));
    const __mmask16 hi = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(nc > 16 ? nc - 16 : 0)));
    for (int half = 0; half < 2; ++half) {
      const __mmask16 mk = half ? hi : lo;
      const __m512i kv = _mm512_maskz_loadu_epi32(mk, ck + 16 * half);
      const __m512i iv = _mm512_maskz_loadu_epi32(mk, ci + 16 * half);
      _mm512_store_si512(sk + 16 * half, SlotKeys8(_mm512_castsi512_si256(kv), _mm512_castsi512_si256(iv)));
      _mm512_store_si512(sk + 16 * half + 8, SlotKeys8(_mm512_extracti64x4_epi64(kv, 1),
                                                       _mm512_extracti64x4_epi64(iv, 1)));
    }
    if (nc <= 16) {
      RankAndPlace<2>(sk, K, sel);
    } else {
      RankAndPlace<4>(sk, K, sel);
    }
    return;
  }
  // Many keys tie at the floor (constant rows, say): the general selection.
  if (P.group_topk > 0) {
    for (int64_t grp = 0; grp < P.num_groups; ++grp) {
      if (!(g.kept >> grp & 1u)) std::fill_n(key + grp * g.gsize, g.gsize, kExcludedKey);
    }
  }
  SelectTopK(key, 0, E, K, sel, scratch);
}

// RouteRow (router_cpu.cc) over rows [r0, r1): for each row, out(r, sel, p, s) receives the
// slot keys in slot order, the weights before scaling and the activations.
//
// The score stage is bound by floating-point throughput, the selection stages by the latency
// of short dependent chains; so the next row's scores are computed in between the current
// row's selection stages, which keeps both kinds of work in the out-of-order window.
template <typename T, ScoreFn F, typename Out>
JR_AVX512 void RouteRows(const FwdProblem& f, int64_t r0, int64_t r1, uint64_t* sel, float* p,
                         std::vector<uint64_t>& scratch, Out&& out) {
  const RouteParams& P = f.p;
  const int64_t E = f.experts, NV = E / 16, half = NV / 2;
  const T* logits = static_cast<const T*>(f.logits);
  auto bias_of = [&](int64_t r) { return f.bias ? f.bias + (r / f.rows_per_bias) * E : nullptr; };
  RowKeys buf[2];
  if (r0 < r1) ScoreVectors<T, F>(P, E, logits + r0 * E, bias_of(r0), 0, NV, buf[0]);
  for (int64_t r = r0; r < r1; ++r) {
    RowKeys& cur = buf[(r - r0) & 1];
    RowKeys& next = buf[(r - r0 + 1) & 1];
    const bool more = r + 1 < r1;
    const T* xn = logits + (r + 1) * E;
    const float* bn = more ? bias_of(r + 1) : nullptr;
    const KeptGroups g = SelectGroups(P, E, cur.key);
    if (more) ScoreVectors<T, F>(P, E, xn, bn, 0, half, next);
    SelectExperts(P, E, cur.key, g, sel, scratch);
    if (more) ScoreVectors<T, F>(P, E, xn, bn, half, NV, next);
    Weights<F>(P, sel, cur.s, cur.s, p);  // s holds x itself for raw softmax
    out(r, sel, p, cur.s);
  }
}

}  // namespace avx512
}  // namespace jax_router
