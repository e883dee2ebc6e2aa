// Host-side planning and launching of the router kernels (router_fwd_fast.cuh,
// router_fwd_small.cuh, router_fwd_grouped.cuh, router_fwd_general.cuh, router_bwd.cuh). No
// XLA headers: the FFI handlers (router_cuda.cu) and the standalone benchmarks share this code.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_device.cuh"
#include "qb_histogram.cuh"
#include "router_bwd.cuh"
#include "router_bwd_rows.cuh"
#include "router_fwd_fast.cuh"
#include "router_fwd_general.cuh"
#include "router_fwd_grouped.cuh"
#include "router_fwd_sigmoid_bf16.cuh"
#include "router_fwd_small.cuh"
#include "router_fwd_softmax_screen.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

// ---- what a launch takes -------------------------------------------------------------------

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
  // quantile balancing (p.num_bins > 0)
  const float* bin_bounds = nullptr;
  float* cutoff = nullptr;
  int32_t* histogram = nullptr;
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


// ---- plan ------------------------------------------------------------------------------------

struct FastLayout {
  int L, V;
};
constexpr FastLayout kFastLayouts[] = {{1, 8},   {4, 16},  {8, 16}, {8, 32},
                                        {16, 24}, {16, 32}, {32, 32}};
constexpr int kNumFastLayouts = sizeof(kFastLayouts) / sizeof(kFastLayouts[0]);

struct FwdPlan {
  FwdPath path = FwdPath::kNone;
  int layout = -1;  // index into kFastLayouts
  int P = 0;
};

inline int LanesWithAtLeast(int E, int L, int V, int n) {
  int c = 0;
  for (int j = 0; j < L; ++j) {
    int nv = E - j * V;
    nv = nv < 0 ? 0 : (nv > V ? V : nv);
    if (nv >= n) ++c;
  }
  return c;
}

// Chooses the kernel family from (E, topk, options) alone, never from the number of rows
// (within the fast family LaunchRouting may take the small or the grouped forward, which give
// the same bits).
inline FwdPlan PlanForward(int64_t E64, const RouteParams& p) {
  FwdPlan plan;
  plan.path = FwdPath::kGeneral;
  if (E64 > 1024) return plan;
  const int E = static_cast<int>(E64), k = static_cast<int>(ranked_count(p));
  if (p.score_fn == ScoreFn::kSoftmax && p.pre_softmax) return plan;
  const bool grouped = p.group_topk > 0;
  for (int li = 0; li < kNumFastLayouts; ++li) {
    const int L = kFastLayouts[li].L, V = kFastLayouts[li].V;
    if (L * V < E) continue;
    if (k > fast_kmax(L, V)) continue;
    if (grouped) {
      const int G = static_cast<int>(p.num_groups);
      const int m = static_cast<int>(p.topk / p.group_topk);
      if (E / G != V || G > L || m > 2) continue;
      plan.path = FwdPath::kFast;
      plan.layout = li;
      plan.P = m < 1 ? 1 : m;
      return plan;
    }
    // Threshold = k-th largest of the lanes' top-P keys: P = 1 when there are enough lanes,
    // else P = 2 (a tighter threshold, fewer candidates).
    const int P = (L >= 16 && LanesWithAtLeast(E, L, V, 1) >= k) ? 1 : 2;
    int slots = 0;
    for (int jl = 0; jl < L; ++jl) {
      int nv = E - jl * V;
      nv = nv < 0 ? 0 : (nv > V ? V : nv);
      slots += nv < P ? nv : P;
    }
    if (slots >= k) {
      plan.path = FwdPath::kFast;
      plan.layout = li;
      plan.P = P;
      return plan;
    }
    return plan;  // the smallest layout that fits E cannot take this topk: general path
  }
  return plan;
}

inline int NextPow2(int v) {
  int n = 1;
  while (n < v) n <<= 1;
  return n;
}

inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- launches ------------------------------------------------------------------------------

template <typename Kern>
inline int CachedBlocksPerSm(Kern kernel, int threads, size_t smem, std::atomic<int>& cache) {
  int v = cache.load(std::memory_order_relaxed);
  if (v > 0) return v;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem) != cudaSuccess ||
      v <= 0) {
    cudaGetLastError();
    v = 1;
  }
  cache.store(v, std::memory_order_relaxed);
  return v;
}

// Grid and blocks-per-SM of the last fast-forward launch (for benchmarks' diagnostics).
inline std::atomic<long long>& LastFastLaunch() {
  static std::atomic<long long> v{0};
  return v;
}

template <ScoreFn F, int L, int V, int P, bool QB>
inline cudaError_t LaunchFastT(const FastArgs& fa, cudaStream_t stream, int dev) {
  auto kernel = fwd_fast_kernel<F, L, V, P, QB>;
  static std::atomic<int> occ{0};
  const int per_sm = CachedBlocksPerSm(kernel, kFastThreads, 0, occ);
  constexpr int TPB = kFastThreads / L;
  const int64_t tiles = (fa.rows + TPB - 1) / TPB;
  int64_t grid = static_cast<int64_t>(SmCount(dev)) * per_sm;
  if (grid > tiles) grid = tiles;
  LastFastLaunch().store(grid * 1000 + per_sm, std::memory_order_relaxed);
  kernel<<<static_cast<unsigned>(grid), kFastThreads, 0, stream>>>(fa);
  return cudaGetLastError();
}

template <ScoreFn F, int P, bool QB>
inline cudaError_t LaunchFastLayout(int li, const FastArgs& fa, cudaStream_t s, int dev) {
  switch (li) {
    case 0:
      return LaunchFastT<F, 1, 8, P, QB>(fa, s, dev);
    case 1:
      return LaunchFastT<F, 4, 16, P, QB>(fa, s, dev);
    case 2:
      return LaunchFastT<F, 8, 16, P, QB>(fa, s, dev);
    case 3:
      return LaunchFastT<F, 8, 32, P, QB>(fa, s, dev);
    case 4:
      return LaunchFastT<F, 16, 24, P, QB>(fa, s, dev);
    case 5:
      return LaunchFastT<F, 16, 32, P, QB>(fa, s, dev);
    case 6:
      return LaunchFastT<F, 32, 32, P, QB>(fa, s, dev);
  }
  return cudaErrorInvalidValue;  // not a row of kFastLayouts
}

// The grouped forward (router_fwd_grouped.cuh): one block of 12 warps an SM (its table and
// tiles fill the shared memory), warp tiles of 32 tokens spread over every SM first.
inline cudaError_t LaunchGrouped(const FastArgs& fa, cudaStream_t s, int dev) {
  static std::atomic<int> raised[kMaxDevices];
  const cudaError_t e = AllowDynamicSmem(fwd_grouped_kernel, kGroupedSmem, dev, raised);
  if (e != cudaSuccess) return e;
  const int64_t warp_tiles = (fa.rows + 31) / 32;
  const int64_t grid = warp_tiles < SmCount(dev) ? warp_tiles : SmCount(dev);
  fwd_grouped_kernel<<<static_cast<unsigned>(grid), kGroupedThreads, kGroupedSmem, s>>>(fa);
  return cudaGetLastError();
}

// The softmax screen forward (router_fwd_softmax_screen.cuh): blocks of 2 warps, as many an SM as
// their tiles' shared memory allows, warp tiles spread over every SM first.
template <typename T, int kK, int kLanes>
inline cudaError_t LaunchSoftmaxScreenT(const FastArgs& fa, cudaStream_t s, int dev) {
  auto kernel = fwd_softmax_screen_kernel<T, kK, kLanes>;
  const size_t smem = kSoftmaxScreenWarps * SoftmaxWarpSmem(fa.E, kLanes, T::kBytes);
  static std::atomic<int> raised[kMaxDevices];
  const cudaError_t e = AllowDynamicSmem(kernel, smem, dev, raised);
  if (e != cudaSuccess) return e;
  // blocks an SM for each E (a multiple of 64 up to kSoftmaxScreenMaxE)
  static std::atomic<int> occ[kSoftmaxScreenMaxE / 64 + 1];
  const int per_sm = CachedBlocksPerSm(kernel, 32 * kSoftmaxScreenWarps, smem, occ[fa.E / 64]);
  constexpr int kRows = 32 / kLanes;
  const int64_t blocks = ((fa.rows + kRows - 1) / kRows + kSoftmaxScreenWarps - 1) / kSoftmaxScreenWarps;
  const int64_t most = static_cast<int64_t>(SmCount(dev)) * per_sm;
  const unsigned grid = static_cast<unsigned>(blocks < most ? blocks : most);
  kernel<<<grid, 32 * kSoftmaxScreenWarps, smem, s>>>(fa);
  return cudaGetLastError();
}
template <typename T>
inline cudaError_t LaunchSoftmaxScreen(const FastArgs& fa, cudaStream_t s, int dev) {
  if (SoftmaxScreenLanes(fa.E) == 2) {
    return fa.k <= 8 ? LaunchSoftmaxScreenT<T, 8, 2>(fa, s, dev) : LaunchSoftmaxScreenT<T, 16, 2>(fa, s, dev);
  }
  return fa.k <= 8 ? LaunchSoftmaxScreenT<T, 8, 1>(fa, s, dev) : LaunchSoftmaxScreenT<T, 16, 1>(fa, s, dev);
}
inline cudaError_t LaunchSoftmaxScreen(const FastArgs& fa, cudaStream_t s, int dev) {
  return fa.logits_dt == Dt::kF32 ? LaunchSoftmaxScreen<F32Logits>(fa, s, dev)
                                  : LaunchSoftmaxScreen<Bf16Logits>(fa, s, dev);
}

// The bf16 sigmoid forward (router_fwd_sigmoid_bf16.cuh): one block an SM, as many warps as
// the shared memory beside the table holds (at most kSigmoidBf16MaxWarps).
template <int kK, int kLanes>
inline cudaError_t LaunchSigmoidBf16T(const FastArgs& fa, cudaStream_t s, int dev) {
  auto kernel = fwd_sigmoid_bf16_kernel<kK, kLanes>;
  // 1 KiB kept for the kernel's static shared memory and the dynamic base's alignment
  const int warps = SigmoidBf16Warps(fa.E, kLanes, SmemOptin(dev) - 1024, kSigmoidBf16MaxWarps);
  const size_t smem = SigmoidBf16Smem(fa.E, kLanes, warps);
  static std::atomic<int> raised[kMaxDevices];
  const cudaError_t e = AllowDynamicSmem(kernel, smem, dev, raised);
  if (e != cudaSuccess) return e;
  const int64_t tiles = (fa.rows + 32 / kLanes - 1) / (32 / kLanes);
  const int64_t blocks = (tiles + warps - 1) / warps;
  const int64_t grid = blocks < SmCount(dev) ? blocks : SmCount(dev);
  kernel<<<static_cast<unsigned>(grid), 32 * warps, smem, s>>>(fa);
  return cudaGetLastError();
}
inline cudaError_t LaunchSigmoidBf16(const FastArgs& fa, cudaStream_t s, int dev) {
  if (SigmoidBf16Lanes(fa.E) == 2) {
    return fa.k <= 8 ? LaunchSigmoidBf16T<8, 2>(fa, s, dev) : LaunchSigmoidBf16T<16, 2>(fa, s, dev);
  }
  return fa.k <= 8 ? LaunchSigmoidBf16T<8, 1>(fa, s, dev) : LaunchSigmoidBf16T<16, 1>(fa, s, dev);
}

inline cudaError_t LaunchFastAny(const FwdPlan& plan, ScoreFn fn, bool qb, const FastArgs& fa,
                                 cudaStream_t s, int dev) {
  if (qb) {  // sigmoid only (checked when the attributes were decoded)
    return plan.P == 1 ? LaunchFastLayout<ScoreFn::kSigmoid, 1, true>(plan.layout, fa, s, dev)
                       : LaunchFastLayout<ScoreFn::kSigmoid, 2, true>(plan.layout, fa, s, dev);
  }
  return DispatchScoreFn(fn, [&](auto tag) {
    constexpr ScoreFn F = decltype(tag)::value;
    return plan.P == 1 ? LaunchFastLayout<F, 1, false>(plan.layout, fa, s, dev)
                       : LaunchFastLayout<F, 2, false>(plan.layout, fa, s, dev);
  });
}

template <typename D, ScoreFn F>
inline cudaError_t LaunchGeneralT(const GenArgs& ga, int threads, size_t smem, cudaStream_t s,
                                  int dev) {
  auto kernel = fwd_general_kernel<D, F>;
  static std::atomic<int> raised[kMaxDevices];
  const cudaError_t e = AllowDynamicSmem(kernel, smem, dev, raised);
  if (e != cudaSuccess) return e;
  int64_t grid = ga.rows < (1 << 20) ? ga.rows : (1 << 20);
  kernel<<<static_cast<unsigned>(grid), threads, smem, s>>>(ga);
  return cudaGetLastError();
}

inline size_t DtSize(Dt d) { return d == Dt::kF32 ? 4 : 2; }

// The largest E the general path takes on the current device.
inline int64_t MaxGeneralExperts(int dev) {
  const int64_t optin = SmemOptin(dev);
  int64_t e = 1;
  while (e * 2 * 8 + e * 2 + 1024 <= optin) e *= 2;  // n2 keys + flags (no groups)
  return e;
}

// Quantile balancing's histogram from the cutoffs the routing kernel wrote (qb_histogram.cuh).
inline cudaError_t LaunchQbHistogram(const FwdArgs& f, cudaStream_t stream, int dev) {
  QbHistArgs h{};
  h.rows = f.rows;
  h.E = static_cast<int>(f.experts);
  h.logits = f.logits;
  h.cutoff = f.cutoff;
  h.bin_bounds = f.bin_bounds;
  h.num_bins = f.p.num_bins;
  h.histogram = f.histogram;
  // Up to 32 KiB of counts a block (seven blocks an SM on sm_90), more only when one expert's
  // counts need it.
  int64_t smem_cap = SmemOptin(dev) - 1024;
  h.eb = QbExpertsPerBlock(h.num_bins, 32 * 1024);
  if (h.eb == 0) h.eb = QbExpertsPerBlock(h.num_bins, smem_cap);
  const int eb = h.eb > 0 ? h.eb : 1;
  const int64_t tiles = (f.experts + eb - 1) / eb;
  // About four blocks an SM in all; chunks of at least 1024 rows.
  const int64_t want = 4 * static_cast<int64_t>(SmCount(dev));
  int64_t chunks = (want + tiles - 1) / tiles;
  const int64_t max_chunks = (f.rows + 1023) / 1024;
  chunks = chunks < 1 ? 1 : (chunks > max_chunks ? max_chunks : chunks);
  if (chunks > 65535) chunks = 65535;
  h.rows_per_chunk = (f.rows + chunks - 1) / chunks;
  const size_t smem = h.eb > 0 ? static_cast<size_t>(h.eb) * h.num_bins * 4 : 0;
  return DispatchDt(f.logits_dt, [&](auto d) {
    auto kernel = qb_histogram_kernel<decltype(d)>;
    static std::atomic<int> raised[kMaxDevices];
    const cudaError_t e = AllowDynamicSmem(kernel, smem, dev, raised);
    if (e != cudaSuccess) return e;
    kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)), kQbThreads, smem,
             stream>>>(h);
    return cudaGetLastError();
  });
}

// The routing kernel of a forward call (fast or general path, PlanForward).
inline cudaError_t LaunchRouting(const FwdArgs& f, cudaStream_t stream, FwdPath* taken) {
  if (taken) *taken = FwdPath::kNone;
  if (f.rows <= 0) return cudaSuccess;
  if (!f.probs && !f.map && !f.weights && !f.indices && !f.act) return cudaSuccess;
  const int dev = CurrentDevice();
  const FwdPlan plan = PlanForward(f.experts, f.p);
  const bool bias_used = f.bias != nullptr && UsesBias(f.p.score_fn);
  if (plan.path == FwdPath::kFast) {
    const FastLayout lay = kFastLayouts[plan.layout];
    const size_t es = DtSize(f.logits_dt);
    FastArgs fa{};
    fa.rows = f.rows;
    fa.E = static_cast<int>(f.experts);
    fa.k = static_cast<int>(f.p.topk);
    fa.logits = f.logits;
    fa.logits_dt = f.logits_dt;
    fa.bias = bias_used ? f.bias : nullptr;
    fa.rows_per_bias = f.rows_per_bias > 0 ? f.rows_per_bias : f.rows;
    fa.single_bias_row = fa.rows_per_bias >= f.rows;
    fa.probs = f.probs;
    fa.map = static_cast<uint8_t*>(f.map);
    fa.bitmap = f.bitmap;
    fa.weights = f.weights;
    fa.indices = f.indices;
    fa.index_dt = f.index_dt;
    fa.act = f.act;
    fa.scaling = f.p.scaling;
    fa.num_groups = f.p.group_topk > 0 ? static_cast<int>(f.p.num_groups) : 0;
    fa.group_topk = static_cast<int>(f.p.group_topk);
    fa.m = f.p.group_topk > 0 ? static_cast<int>(f.p.topk / f.p.group_topk) : 0;
    fa.x_vec = Aligned16(f.logits) && (f.experts * es) % 16 == 0;
    fa.bias_vec = bias_used && Aligned16(f.bias) && f.experts % 4 == 0;
    fa.probs_vec = f.probs && Aligned16(f.probs) && (f.experts * es) % 16 == 0;
    const int mv = lay.V < 16 ? lay.V : 16;
    fa.map_vec = f.map && !f.bitmap && Aligned16(f.map) && f.experts % mv == 0;
    fa.slots_vec = (fa.k == 2 || fa.k == 4 || fa.k == 8) &&
                   (!f.indices || f.index_dt == It::kS32) && Aligned16(f.weights) &&
                   Aligned16(f.indices) && Aligned16(f.act);
    fa.cutoff = f.cutoff;
    if (taken) *taken = FwdPath::kFast;
    const bool dense = f.probs != nullptr || f.map != nullptr;
    if (SmallForward(f.experts, f.p, dense)) return LaunchSmall(f.p.score_fn, fa, stream, dev);
    // The one-thread-a-token forwards give the fast forward's bits (tests check each against
    // the CPU), so choosing one by batch size cannot change a row's result. Below their
    // thresholds the fast forward's lanes, several a token, finish sooner.
    if (f.rows >= SoftmaxScreenMinRows(f.experts) &&
        SoftmaxScreenFits(f.experts, f.p, f.logits_dt, dense, fa.x_vec) &&
        CcMajor(dev) >= 9) {
      return LaunchSoftmaxScreen(fa, stream, dev);
    }
    if (f.rows >= SigmoidBf16MinRows(f.experts) &&
        SigmoidBf16Fits(f.experts, f.p, f.logits_dt, dense, fa.single_bias_row || !bias_used,
                        fa.x_vec) &&
        CcMajor(dev) >= 9 &&
        SigmoidBf16Warps(fa.E, SigmoidBf16Lanes(fa.E), SmemOptin(dev) - 1024, kSigmoidBf16MaxWarps) >= 2) {
      return LaunchSigmoidBf16(fa, stream, dev);
    }
    if (f.rows >= kGroupedMinRows &&
        GroupedForwardFits(f.experts, f.p, f.logits_dt, dense, fa.single_bias_row || !bias_used,
                           fa.x_vec) &&
        CcMajor(dev) >= 9 && SmemOptin(dev) >= kGroupedSmem) {
      return LaunchGrouped(fa, stream, dev);
    }
    return LaunchFastAny(plan, f.p.score_fn, is_qb(f.p), fa, stream, dev);
  }
  // General path.
  GenArgs ga{};
  ga.rows = f.rows;
  ga.E = static_cast<int>(f.experts);
  ga.k = static_cast<int>(f.p.topk);
  ga.n2 = NextPow2(ga.E);
  const bool grouped = f.p.group_topk > 0;
  ga.num_groups = grouped ? static_cast<int>(f.p.num_groups) : 0;
  ga.n2g = grouped ? NextPow2(ga.num_groups) : 0;
  ga.group_topk = static_cast<int>(f.p.group_topk);
  ga.m = grouped ? static_cast<int>(f.p.topk / f.p.group_topk) : 0;
  int ib = 1;
  while ((1ll << ib) < f.experts) ++ib;
  ga.id_bits = ib;
  if (f.experts > 65536) return cudaErrorInvalidValue;
  ga.logits = f.logits;
  ga.bias = bias_used ? f.bias : nullptr;
  ga.rows_per_bias = f.rows_per_bias > 0 ? f.rows_per_bias : f.rows;
  ga.probs = f.probs;
  ga.map = static_cast<uint8_t*>(f.map);
  ga.bitmap = f.bitmap;
  ga.weights = f.weights;
  ga.indices = f.indices;
  ga.index_dt = f.index_dt;
  ga.act = f.act;
  ga.scaling = f.p.scaling;
  ga.pre_softmax = f.p.score_fn == ScoreFn::kSoftmax && f.p.pre_softmax;
  ga.cutoff = is_qb(f.p) ? f.cutoff : nullptr;
  int threads = ga.n2 / 2;
  threads = threads < 32 ? 32 : (threads > 512 ? 512 : threads);
  size_t smem = static_cast<size_t>(ga.n2) * 8 + static_cast<size_t>(ga.n2g) * 8 +
                ((static_cast<size_t>(ga.E) + 15) & ~size_t(15));
  if (taken) *taken = FwdPath::kGeneral;
  return DispatchDt(f.logits_dt, [&](auto d) {
    return DispatchScoreFn(f.p.score_fn, [&](auto fn) {
      return LaunchGeneralT<decltype(d), decltype(fn)::value>(ga, threads, smem, stream, dev);
    });
  });
}

// A forward call: the routing kernel, then quantile balancing's histogram where asked for.
inline cudaError_t LaunchForward(const FwdArgs& f, cudaStream_t stream, FwdPath* taken = nullptr) {
  cudaError_t e = LaunchRouting(f, stream, taken);
  if (e != cudaSuccess || !is_qb(f.p) || f.rows <= 0) return e;
  return LaunchQbHistogram(f, stream, CurrentDevice());
}

inline cudaError_t LaunchBackward(const BwdArgs& b, cudaStream_t stream) {
  if (b.rows <= 0) return cudaSuccess;
  const int dev = CurrentDevice();
  BwdKArgs ka{};
  ka.rows = b.rows;
  ka.E = static_cast<int>(b.experts);
  ka.k = static_cast<int>(b.p.topk);
  ka.fn = b.p.score_fn;
  ka.pre_softmax = b.p.pre_softmax;
  ka.scaling = b.p.scaling;
  ka.dense_grad = b.dense_grad;
  ka.grad = b.grad;
  ka.grad_dt = b.grad_dt;
  ka.indices = b.indices;
  ka.index_dt = b.index_dt;
  ka.act = b.act;
  ka.logits = b.logits;
  ka.logits_dt = b.logits_dt;
  ka.out = b.grad_logits;
  ka.out_dt = b.out_dt;
  const bool pre = b.p.score_fn == ScoreFn::kSoftmax && b.p.pre_softmax;
  // Large batches of short rows: one thread a row (router_bwd_rows.cuh; the same bits).
  if (b.rows >= kBwdRowsMinRows &&
      BwdRowsFits(pre, b.experts, DtSize(b.out_dt), b.p.topk, b.grad_logits)) {
    return DispatchDt(b.out_dt, [&](auto d) {
      using DT = decltype(d);
      return DispatchScoreFn(b.p.score_fn, [&](auto fn) {
        auto kernel = bwd_rows_kernel<DT, decltype(fn)::value>;
        const size_t row_bytes = b.experts * sizeof(typename DT::raw);  // a multiple of 16
        const size_t smem = static_cast<size_t>(kBwdRowsWarps) * 32 * row_bytes;
        static std::atomic<int> raised[kMaxDevices];
        const cudaError_t e = AllowDynamicSmem(kernel, smem, dev, raised);
        if (e != cudaSuccess) return e;
        // blocks an SM for each row size (16-byte vectors up to kBwdRowsMaxBytes)
        static std::atomic<int> occ[kBwdRowsMaxBytes / 16 + 1];
        const int per_sm = CachedBlocksPerSm(kernel, 32 * kBwdRowsWarps, smem, occ[row_bytes / 16]);
        const int64_t blocks = ((b.rows + 31) / 32 + kBwdRowsWarps - 1) / kBwdRowsWarps;
        const int64_t most = static_cast<int64_t>(SmCount(dev)) * per_sm;
        kernel<<<static_cast<unsigned>(blocks < most ? blocks : most), 32 * kBwdRowsWarps, smem, stream>>>(ka);
        return cudaGetLastError();
      });
    });
  }
  // Lanes per row: a whole warp for pre-softmax (it computes the full row), 2 for rows of at
  // most 16 experts (Mixtral: 16 rows per warp instead of 4), 8 otherwise.
  const int L = pre ? 32 : (b.experts <= 16 ? 2 : 8);
  const int per_block = kBwdThreads / L;
  int64_t grid = (b.rows + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(SmCount(dev)) * (2048 / kBwdThreads);
  if (grid > cap) grid = cap;
  const unsigned g = static_cast<unsigned>(grid);
  return DispatchDt(b.out_dt, [&](auto d) {
    using DT = decltype(d);
    const int64_t elem = sizeof(typename DT::raw);
    const size_t smem = static_cast<size_t>((kBwdThreads / L) * b.experts * elem);
    auto staged = bwd_kernel<DT, 8, true>;  // BwdStaged: L == 8
    bool stage = BwdStaged(pre, L, b.experts, elem, b.grad_logits);
    if constexpr (kBwdStageBytes > 48 * 1024) {  // benchmarks' JR_BWD_STAGE_KIB > 48 only
      if (stage && smem > 48 * 1024) {
        static std::atomic<int> raised[kMaxDevices];
        const cudaError_t e = AllowDynamicSmem(staged, smem, dev, raised);
        if (e != cudaSuccess) return e;
        // Past 48 KiB staging costs occupancy (three blocks an SM at 64 KiB). Where the rows
        // fit one wave of the unstaged kernel but not one of the staged, the second wave costs
        // more than staging saves (NOTES row 33), so the rows are written in place; the bits
        // are the same either way.
        int blocks = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, staged, kBwdThreads, smem) !=
            cudaSuccess) {
          return cudaGetLastError();
        }
        const int64_t staged_wave = static_cast<int64_t>(SmCount(dev)) * blocks * per_block;
        stage = !(b.rows <= cap * per_block && b.rows > staged_wave);
      }
    }
    if (stage) {
      staged<<<g, kBwdThreads, smem, stream>>>(ka);
    } else if (L == 32) {
      bwd_kernel<DT, 32, false><<<g, kBwdThreads, 0, stream>>>(ka);
    } else if (L == 2) {
      bwd_kernel<DT, 2, false><<<g, kBwdThreads, 0, stream>>>(ka);
    } else {
      bwd_kernel<DT, 8, false><<<g, kBwdThreads, 0, stream>>>(ka);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace jax_router
