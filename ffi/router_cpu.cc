// CPU handlers for jax_router_fwd / jax_router_bwd (contract: ffi_common.h).
//
// One routine per row, called for row ranges split across XLA's intra-op thread pool. The
// math comes from router.h, so the CPU and CUDA paths share every formula and the ordering.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "ffi_common.h"
#include "router.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

// ---- element conversion ------------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};
using F16 = _Float16;

inline float ToFloat(float v) { return v; }
inline float ToFloat(F16 v) { return static_cast<float>(v); }
inline float ToFloat(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) {
  return v;
}
template <>
inline F16 FromFloat<F16>(float v) {
  return static_cast<F16>(v);  // round to nearest even
}
template <>
inline BF16 FromFloat<BF16>(float v) {
  uint32_t u = float_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return BF16{static_cast<uint16_t>(u >> 16)};
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

inline int64_t LoadIndex(const void* p, ffi::DataType t, int64_t i) {
  switch (t) {
    case ffi::DataType::S16:
      return static_cast<const int16_t*>(p)[i];
    case ffi::DataType::S32:
      return static_cast<const int32_t*>(p)[i];
    default:
      return static_cast<const int64_t*>(p)[i];
  }
}

inline void StoreIndex(void* p, ffi::DataType t, int64_t i, int64_t v) {
  switch (t) {
    case ffi::DataType::S16:
      static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v);
      break;
    case ffi::DataType::S32:
      static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
      break;
    default:
      static_cast<int64_t*>(p)[i] = v;
  }
}

// ---- parallel rows -----------------------------------------------------------------------

// Runs fn(r0, r1) over [0, rows) in chunks on the calling thread and XLA's pool. Chunks are
// claimed from a shared counter, so the caller never waits on a task that has not started:
// a pool thread that starts late finds nothing left and returns.
template <typename Fn>
void ParallelRows(ffi::ThreadPool* pool, int64_t rows, int64_t work_per_row, Fn&& fn) {
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

// e^x for the CPU's score loops: Cody-Waite range reduction and a degree-6 polynomial, within
// 2 ulp of expf, written branch-free so that the loops below vectorise (libm's expf does not).
// Underflow to subnormals and zero, overflow to inf, NaN in -> NaN out.
inline float VecExp(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two normal factors, so that results down to the smallest subnormal are exact.
  const int32_t ni = static_cast<int32_t>(n == n ? n : 0.0f);
  const int32_t n1 = ni / 2, n2 = ni - n1;
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float f1, f2;
  std::memcpy(&f1, &b1, 4);
  std::memcpy(&f2, &b2, 4);
  return p * f1 * f2;
}

// Softmax over a row: s = e^{x - max} / sum. A NaN anywhere makes the sum, hence the row, NaN.
// The forward and the pre-softmax backward both call it, so they see the same s.
inline void Softmax(const float* x, float* s, int64_t E) {
  float m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) m = x[e] > m ? x[e] : m;
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = VecExp(x[e] - m);
    sum += s[e];
  }
  for (int64_t e = 0; e < E; ++e) s[e] /= sum;
}

// Selection scores of one row (SPEC §3 steps 1-2) and their order keys: s (activation), z
// (s + bias) and key = order_key(z).
__attribute__((always_inline)) inline void ScoreRow(
    ScoreFn fn, bool pre_softmax, const float* x, const float* bias, int64_t E, float* s,
    float* z, uint32_t* key) {
  if (fn == ScoreFn::kSoftmax) {
    if (pre_softmax) {
      Softmax(x, s, E);
    } else {
      for (int64_t e = 0; e < E; ++e) s[e] = x[e];
    }
  } else if (fn == ScoreFn::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + VecExp(-x[e]));
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = activation(fn, x[e]);
  }
  if (bias && uses_bias(fn)) {
    for (int64_t e = 0; e < E; ++e) z[e] = s[e] + bias[e];
  } else {
    for (int64_t e = 0; e < E; ++e) z[e] = s[e];
  }
  for (int64_t e = 0; e < E; ++e) key[e] = order_key(z[e]);
}

// ---- selection ---------------------------------------------------------------------------

constexpr int64_t kMaxBlocks = 1024;  // block maxima kept on the stack: E <= 8192 uses the floor

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
    int64_t cnt = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
      if (use_floor && bmax[b] < floor_key) continue;
      const int64_t e0 = b * kBlock, e1 = std::min(n, e0 + kBlock);
      for (int64_t e = e0; e < e1; ++e) {
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

struct RowScratch {
  std::vector<float> x, s, z;
  std::vector<uint32_t> key, group_key;
  std::vector<uint64_t> sel, group_sel, tmp;
  std::vector<char> keep;
  RowScratch(int64_t E, int64_t k, int64_t groups)
      : x(E), s(E), z(E), key(E), group_key(std::max<int64_t>(groups, 1)), sel(k),
        group_sel(std::max<int64_t>({groups, k, int64_t{1}})), keep(groups) {}
};

// Routes one row (SPEC §3) whose float32 logits are in w.x; sel receives the selected slot keys
// in slot order and p the weights before scaling. Two builds, dispatched at load time by the
// CPU's features, so that the score and selection loops use 8-wide vectors where they exist.
__attribute__((target_clones("avx2", "default"))) void RouteRow(const FwdProblem& f,
                                                                  const float* bias,
                                                                  RowScratch& w, float* p) {
  const RouteParams& P = f.p;
  const int64_t E = f.experts, K = P.topk;
  ScoreRow(P.score_fn, P.pre_softmax, w.x.data(), bias, E, w.s.data(), w.z.data(), w.key.data());

  if (P.group_topk > 0) {
    const int64_t G = P.num_groups, gsize = E / G, m = K / P.group_topk;
    for (int64_t g = 0; g < G; ++g) {
      SelectTopK(w.key.data(), g * gsize, gsize, m, w.group_sel.data(), w.tmp);
      float score = w.z[slot_expert(w.group_sel[0])];
      for (int64_t j = 1; j < m; ++j) score += w.z[slot_expert(w.group_sel[j])];
      w.group_key[g] = order_key(score);
    }
    SelectTopK(w.group_key.data(), 0, G, P.group_topk, w.group_sel.data(), w.tmp);
    std::fill(w.keep.begin(), w.keep.end(), 0);
    for (int64_t j = 0; j < P.group_topk; ++j) w.keep[slot_expert(w.group_sel[j])] = 1;
    for (int64_t g = 0; g < G; ++g) {
      if (!w.keep[g]) std::fill_n(w.key.begin() + g * gsize, gsize, kExcludedKey);
    }
  }
  SelectTopK(w.key.data(), 0, E, K, w.sel.data(), w.tmp);

  if (P.score_fn == ScoreFn::kSoftmax && !P.pre_softmax) {
    float mx = w.x[slot_expert(w.sel[0])], sum = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      p[j] = expf(w.x[slot_expert(w.sel[j])] - mx);
      sum += p[j];
    }
    for (int64_t j = 0; j < K; ++j) p[j] /= sum;
  } else {
    float sum = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      p[j] = w.s[slot_expert(w.sel[j])];
      sum += p[j];
    }
    if (P.score_fn != ScoreFn::kSoftmax && K > 1) {
      for (int64_t j = 0; j < K; ++j) p[j] /= sum + kEps;
    }
  }
}

template <typename T>
void ForwardRows(const FwdProblem& f, int64_t r0, int64_t r1) {
  const int64_t E = f.experts, K = f.p.topk;
  RowScratch w(E, K, f.p.num_groups);
  std::vector<float> p(K);
  const int64_t mbytes = f.bitmap ? bitmap_bytes(E) : E;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = static_cast<const T*>(f.logits) + r * E;
    for (int64_t e = 0; e < E; ++e) w.x[e] = ToFloat(xr[e]);
    RouteRow(f, f.bias ? f.bias + (r / f.rows_per_bias) * E : nullptr, w, p.data());
    const bool act_is_p = f.p.score_fn == ScoreFn::kSoftmax && !f.p.pre_softmax;
    if (f.probs) {
      T* pr = static_cast<T*>(f.probs) + r * E;
      const T zero = FromFloat<T>(0.0f);
      std::fill(pr, pr + E, zero);
      for (int64_t j = 0; j < K; ++j) pr[slot_expert(w.sel[j])] = FromFloat<T>(f.p.scaling * p[j]);
    }
    if (f.map) {
      uint8_t* mr = static_cast<uint8_t*>(f.map) + r * mbytes;
      std::memset(mr, 0, mbytes);
      for (int64_t j = 0; j < K; ++j) {
        uint32_t e = slot_expert(w.sel[j]);
        if (f.bitmap) {
          mr[e >> 3] |= static_cast<uint8_t>(1u << (e & 7u));
        } else {
          mr[e] = 1;
        }
      }
    }
    for (int64_t j = 0; j < K; ++j) {
      uint32_t e = slot_expert(w.sel[j]);
      if (f.weights) f.weights[r * K + j] = f.p.scaling * p[j];
      if (f.indices) StoreIndex(f.indices, f.index_dtype, r * K + j, e);
      if (f.act) f.act[r * K + j] = act_is_p ? p[j] : w.s[e];
    }
  }
}

template <typename T, typename G>
void BackwardRows(const BwdProblem& b, int64_t r0, int64_t r1) {
  const RouteParams& P = b.p;
  const int64_t E = b.experts, K = P.topk;
  std::vector<float> dx(E), x, s;
  std::vector<float> gh(K), a(K);
  std::vector<int64_t> idx(K);
  const bool pre = P.score_fn == ScoreFn::kSoftmax && P.pre_softmax;
  if (pre) {
    x.resize(E);
    s.resize(E);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const G* g = static_cast<const G*>(b.grad) + r * (b.dense_grad ? E : K);
    for (int64_t j = 0; j < K; ++j) {
      int64_t e = LoadIndex(b.indices, b.index_dtype, r * K + j);
      // Indices come from the forward; anything else is skipped rather than written out of
      // bounds.
      idx[j] = (e >= 0 && e < E) ? e : -1;
      gh[j] = idx[j] < 0 ? 0.0f : P.scaling * ToFloat(g[b.dense_grad ? idx[j] : j]);
      a[j] = b.act[r * K + j];
    }
    std::fill(dx.begin(), dx.end(), 0.0f);
    if (pre) {
      DispatchFloat(b.logits_dtype, [&](auto tag) {
        using L = decltype(tag);
        const L* xr = static_cast<const L*>(b.logits) + r * E;
        for (int64_t e = 0; e < E; ++e) x[e] = ToFloat(xr[e]);
      });
      Softmax(x.data(), s.data(), E);
      float D = 0.0f;
      for (int64_t j = 0; j < K; ++j) D += idx[j] < 0 ? 0.0f : gh[j] * s[idx[j]];
      for (int64_t e = 0; e < E; ++e) dx[e] = s[e] * (0.0f - D);
      for (int64_t j = 0; j < K; ++j) {
        if (idx[j] >= 0) dx[idx[j]] = s[idx[j]] * (gh[j] - D);
      }
    } else if (P.score_fn == ScoreFn::kSoftmax) {
      float D = 0.0f;
      for (int64_t j = 0; j < K; ++j) D += gh[j] * a[j];
      for (int64_t j = 0; j < K; ++j) {
        if (idx[j] >= 0) dx[idx[j]] = a[j] * (gh[j] - D);
      }
    } else {
      float A = 0.0f, B = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        A += a[j];
        B += gh[j] * a[j];
      }
      const float inv = 1.0f / (A + kEps);
      for (int64_t j = 0; j < K; ++j) {
        if (idx[j] < 0) continue;
        float ds = K > 1 ? gh[j] * inv - B * inv * inv : gh[j];
        dx[idx[j]] = ds * activation_grad(P.score_fn, a[j]);
      }
    }
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    for (int64_t e = 0; e < E; ++e) out[e] = FromFloat<T>(dx[e]);
  }
}

ffi::Error FwdCpu(ffi::ThreadPool pool, RouteAttrs attrs, ffi::AnyBuffer logits,
                  ffi::AnyBuffer bias, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> probs,
                  ffi::Result<ffi::AnyBuffer> map, ffi::Result<ffi::AnyBuffer> weights,
                  ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> act) {
  FwdProblem f;
  JR_RETURN_IF_ERROR(MakeFwdProblem(f, attrs, logits, bias, *probs, *map, *weights, *indices, *act));
  if (f.rows == 0) return ffi::Error::Success();
  return DispatchFloat(f.logits_dtype, [&](auto tag) {
    using T = decltype(tag);
    ParallelRows(&pool, f.rows, 8 * f.experts,
                 [&](int64_t r0, int64_t r1) { ForwardRows<T>(f, r0, r1); });
  });
}

ffi::Error BwdCpu(ffi::ThreadPool pool, RouteAttrs attrs, ffi::AnyBuffer grad,
                  ffi::AnyBuffer indices, ffi::AnyBuffer act, ffi::AnyBuffer logits,
                  ffi::Result<ffi::AnyBuffer> grad_logits) {
  BwdProblem b;
  JR_RETURN_IF_ERROR(MakeBwdProblem(b, attrs, grad, indices, act, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
  ffi::Error err = ffi::Error::Success();
  ffi::Error outer = DispatchFloat(b.out_dtype, [&](auto out_tag) {
    using T = decltype(out_tag);
    err = DispatchFloat(b.grad_dtype, [&](auto grad_tag) {
      using G = decltype(grad_tag);
      ParallelRows(&pool, b.rows, 2 * b.experts,
                   [&](int64_t r0, int64_t r1) { BackwardRows<T, G>(b, r0, r1); });
    });
  });
  return outer.failure() ? outer : err;
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterFwdCpu, jax_router::FwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // logits
                                  .Arg<xla::ffi::AnyBuffer>()  // expert_bias
                                  .RemainingArgs()             // caller's indices buffer (aliased)
                                  .Ret<xla::ffi::AnyBuffer>()  // probs
                                  .Ret<xla::ffi::AnyBuffer>()  // routing map
                                  .Ret<xla::ffi::AnyBuffer>()  // weights
                                  .Ret<xla::ffi::AnyBuffer>()  // indices
                                  .Ret<xla::ffi::AnyBuffer>()  // act (residual)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterBwdCpu, jax_router::BwdCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Attrs<RouteAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()  // grad (probs or weights cotangent)
                                  .Arg<xla::ffi::AnyBuffer>()  // indices
                                  .Arg<xla::ffi::AnyBuffer>()  // act
                                  .Arg<xla::ffi::AnyBuffer>()  // logits (pre-softmax) or empty
                                  .Ret<xla::ffi::AnyBuffer>()  // grad_logits
);
