// CPU helpers shared by the router handlers (router_cpu.cc) and the aux-score handlers
// (aux_cpu.cc): element conversion (every float written goes through FromFloat, which gives
// one NaN), dtype dispatch, the row loop over XLA's thread pool, row softmax and sums in the
// fixed order of exact_math.h, and the top-k selection on order keys (routing_math.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ffi_contract.h"
#include "routing_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_router {

namespace ffi = xla::ffi;

// ---- element conversion ------------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};
using F16 = _Float16;

inline float ToFloat(float v) { return v; }
inline float ToFloat(F16 v) { return static_cast<float>(v); }
inline float ToFloat(BF16 v) { return exact::bf16_bits_to_float(v.bits); }

template <typename T>
inline T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) {
  return exact::canonical(v);
}
template <>
inline F16 FromFloat<F16>(float v) {
  if (exact::is_nan(v)) {
    F16 h;
    std::memcpy(&h, &exact::kF16CanonicalNan, 2);
    return h;
  }
  return static_cast<F16>(v);  // IEEE round to nearest even, as the CUDA conversion
}
template <>
inline BF16 FromFloat<BF16>(float v) {
  return BF16{exact::to_bf16_bits(v)};
}

// Calls fn(T{}) with T the C++ type of a float dtype.
template <typename Fn>
ffi::Error DispatchFloat(ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::F32:
      fn(float{});
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      fn(BF16{});
      return ffi::Error::Success();
    case ffi::DataType::F16:
      fn(F16{});
      return ffi::Error::Success();
    default:
      return Invalid("unsupported float dtype");
  }
}

// Calls fn(A{}, B{}) with A and B the C++ types of two float dtypes; the first bad dtype's
// error otherwise.
template <typename Fn>
ffi::Error DispatchFloatPair(ffi::DataType a, ffi::DataType b, Fn&& fn) {
  ffi::Error inner = ffi::Error::Success();
  ffi::Error outer = DispatchFloat(a, [&](auto ta) {
    inner = DispatchFloat(b, [&](auto tb) { fn(ta, tb); });
  });
  return outer.failure() ? outer : inner;
}

// ---- floating-point environment ----------------------------------------------------------

// XLA's CPU runtime runs handlers with flush-to-zero and denormals-are-zero set (its threads
// set them for speed), which would zero every subnormal activation and make the results differ
// from the CUDA kernels'. The router keeps subnormals (docs/semantics.md#numerics), so each
// row range runs with both modes cleared, and the thread's own mode is restored after.
class KeepSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  KeepSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFtzDaz); }
  ~KeepSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtzDaz = (1u << 15) | (1u << 6);  // MXCSR FTZ, DAZ
  unsigned saved_;
#elif defined(__aarch64__)
  KeepSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t v = saved_ & ~kFz;
    asm volatile("msr fpcr, %0" : : "r"(v));
  }
  ~KeepSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  static constexpr uint64_t kFz = uint64_t{1} << 24;  // FPCR.FZ
  uint64_t saved_;
#else
#error "jax_router's CPU handlers need a way to keep subnormals on this architecture"
#endif
  KeepSubnormals(const KeepSubnormals&) = delete;
  KeepSubnormals& operator=(const KeepSubnormals&) = delete;
};

// ---- parallel rows -----------------------------------------------------------------------

// Runs fn(r0, r1) over [0, rows) in chunks on the calling thread and XLA's pool, each call
// with subnormals kept (KeepSubnormals). Chunks are claimed from a shared counter, so the
// caller never waits on a task that has not started: a pool thread that starts late finds
// nothing left and returns.
template <typename Fn>
void ParallelRows(ffi::ThreadPool* pool, int64_t rows, int64_t work_per_row, Fn&& fn_) {
  auto fn = [&fn_](int64_t r0, int64_t r1) {
    KeepSubnormals mode;
    fn_(r0, r1);
  };
  constexpr int64_t kMinWorkPerChunk = 1 << 16;
  int64_t threads = pool ? pool->num_threads() : 0;
  int64_t chunks = std::min<int64_t>(
      {rows, (threads + 1) * 4, std::max<int64_t>(1, rows * work_per_row / kMinWorkPerChunk)});
  if (threads <= 0 || chunks <= 1) {
    fn(int64_t{0}, rows);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  int64_t per_chunk = (rows + chunks - 1) / chunks;
  auto* fn_ptr = &fn;
  auto work = [state, chunks, per_chunk, rows, fn_ptr]() {
    int64_t c;
    while ((c = state->next.fetch_add(1)) < chunks) {
      (*fn_ptr)(c * per_chunk, std::min(rows, (c + 1) * per_chunk));
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == chunks) state->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < std::min(threads, chunks - 1); ++t) pool->Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

// ---- scores ------------------------------------------------------------------------------

// sum_e v[e] in the order of exact::combine_partials (32 strided partials; blocks of 32 keep
// them in vector registers).
inline float RowSum(const float* v, int64_t E) {
  float part[exact::kSumLanes] = {};
  int64_t e0 = 0;
  for (; e0 + exact::kSumLanes <= E; e0 += exact::kSumLanes) {
    for (int l = 0; l < exact::kSumLanes; ++l) part[l] = part[l] + v[e0 + l];
  }
  for (int64_t e = e0; e < E; ++e) part[e - e0] = part[e - e0] + v[e];
  return exact::combine_partials(part);
}

// Softmax over a row (routing_math.h): numerators e^{x - max}, their RowSum, then one division
// each. The forward and the pre-softmax backward both call it, so they see the same s.
inline void Softmax(const float* x, float* s, int64_t E) {
  float m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) m = row_max_step(m, x[e]);
  for (int64_t e = 0; e < E; ++e) s[e] = softmax_numerator(x[e], m);
  const float sum = RowSum(s, E);
  for (int64_t e = 0; e < E; ++e) s[e] = s[e] / sum;
}

// Selection scores of one row and their order keys: s (activation), z (s + bias) and
// key = order_key(z).
template <ScoreFn F>
__attribute__((always_inline)) inline void ScoreRow(bool pre_softmax, const float* x,
                                                    const float* bias, int64_t E, float* s,
                                                    float* z, uint32_t* key) {
  if (F == ScoreFn::kSoftmax && pre_softmax) {
    Softmax(x, s, E);
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = activation<F>(x[e]);
  }
  if (UsesBias(F) && bias) {
    for (int64_t e = 0; e < E; ++e) z[e] = selection_score(s[e], bias[e]);
  } else {
    for (int64_t e = 0; e < E; ++e) z[e] = s[e];
  }
  for (int64_t e = 0; e < E; ++e) key[e] = order_key(z[e]);
}

// Weights before scaling (routing_math.h), in slot order, from the logits x and activations s
// of the row; the scalar and AVX-512 routines both end here.
template <ScoreFn F>
inline void Weights(const RouteParams& P, const uint64_t* sel, const float* x, const float* s,
                    float* p) {
  const int64_t K = P.topk;
  const float x0 = x[slot_expert(sel[0])];
  float sum = 0.0f;
  for (int64_t j = 0; j < K; ++j) {
    const uint32_t e = slot_expert(sel[j]);
    p[j] = weight_numerator<F>(P.pre_softmax, x[e], x0, s[e]);
    sum = j == 0 ? p[j] : slot_sum_add(sum, p[j]);
  }
  const float denom = weight_denominator<F>(sum);
  for (int64_t j = 0; j < K; ++j) p[j] = weight<F>(P.pre_softmax, K, p[j], denom);
}

// ---- selection ---------------------------------------------------------------------------

constexpr int64_t kMaxBlocks = 1024;    // block maxima kept on the stack: E <= 8192 uses the floor
constexpr int64_t kMaxCandidates = 72;  // ranked by counting; more fall back to a sorted buffer

// Writes the k largest slot keys of experts [first, first + n) (keys indexed by expert id),
// in descending order, to out[0..k). k <= n.
//
// Small k: the maxima of blocks of 8 keys come first (vector max); the k-th largest block
// maximum is a floor that at least k keys reach, so only blocks whose maximum reaches it are
// scanned, and only keys at or above it enter the sorted buffer. Candidates arrive by ascending
// id, so an equal key never displaces a held one: ties go to the lower id.
__attribute__((always_inline)) inline void SelectTopK(const uint32_t* keys, int64_t first,
                                                      int64_t n, int64_t k, uint64_t* out,
                                                      std::vector<uint64_t>& scratch) {
  if (k <= 32) {
    constexpr int64_t kBlock = 8;
    const uint32_t* kv = keys + first;
    const int64_t nblocks = (n + kBlock - 1) / kBlock;
    uint32_t bmax[kMaxBlocks];
    uint32_t floor_key = 0;
    const bool use_floor = nblocks >= k && nblocks <= kMaxBlocks;
    if (use_floor) {
      const int64_t full = n / kBlock;
      for (int64_t b = 0; b < full; ++b) {
        uint32_t m = 0;
        for (int64_t i = 0; i < kBlock; ++i) m = kv[b * kBlock + i] > m ? kv[b * kBlock + i] : m;
        bmax[b] = m;
      }
      if (full < nblocks) {
        uint32_t m = 0;
        for (int64_t e = full * kBlock; e < n; ++e) m = kv[e] > m ? kv[e] : m;
        bmax[full] = m;
      }
      // k-th largest block maximum (a small insertion over nblocks values).
      uint32_t best[32];
      int64_t cnt = 0;
      for (int64_t b = 0; b < nblocks; ++b) {
        const uint32_t v = bmax[b];
        if (cnt == k && v <= best[k - 1]) continue;
        int64_t j = cnt < k ? cnt++ : k - 1;
        while (j > 0 && best[j - 1] < v) {
          best[j] = best[j - 1];
          --j;
        }
        best[j] = v;
      }
      floor_key = best[k - 1];
    }
    // Candidates (keys at or above the floor) gathered without branches, then each placed by
    // counting the candidates that beat it: slot keys are distinct, so ranks are too. Data-
    // dependent branches cost more than these few compares.
    uint64_t cand[kMaxCandidates];
    int64_t nc = 0;
    int32_t blocks[kMaxBlocks];
    int64_t nb = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
      blocks[nb] = static_cast<int32_t>(b);
      nb += !use_floor || bmax[b] >= floor_key;
    }
    for (int64_t ib = 0; ib < nb && nc <= kMaxCandidates - kBlock; ++ib) {
      const int64_t e0 = blocks[ib] * kBlock, e1 = std::min(n, e0 + kBlock);
      for (int64_t e = e0; e < e1; ++e) {
        cand[nc] = slot_key(kv[e], static_cast<uint32_t>(first + e));
        nc += kv[e] >= floor_key;
      }
    }
    if (nc <= kMaxCandidates - kBlock) {
      for (int64_t i = 0; i < nc; ++i) {
        int64_t rank = 0;
        for (int64_t j = 0; j < nc; ++j) rank += cand[j] > cand[i];
        if (rank < k) out[rank] = cand[i];
      }
      return;
    }
    // Many keys tie at the floor (constant rows, say): a sorted buffer instead.
    int64_t cnt = 0;
    for (int64_t e = 0; e < n; ++e) {
      if (kv[e] < floor_key) continue;
      const uint64_t sk = slot_key(kv[e], static_cast<uint32_t>(first + e));
      if (cnt == k && sk <= out[k - 1]) continue;
      int64_t j = cnt < k ? cnt++ : k - 1;
      while (j > 0 && out[j - 1] < sk) {
        out[j] = out[j - 1];
        --j;
      }
      out[j] = sk;
    }
    return;
  }
  scratch.resize(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = slot_key(keys[first + i], first + i);
  auto desc = [](uint64_t a, uint64_t b) { return a > b; };
  if (k < n) std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), desc);
  std::sort(scratch.begin(), scratch.begin() + k, desc);
  std::copy(scratch.begin(), scratch.begin() + k, out);
}

}  // namespace jax_router
