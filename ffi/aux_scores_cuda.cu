// CUDA handlers for the aux-score targets (contract: ffi_contract.h; math: routing_math.h, as
// documented in aux_scores_cpu.cc, whose bits these kernels reproduce).
//
// One warp per row (grid-stride over rows), no shared memory. Lane l owns experts l, l + 32,
// ... of its row. For E <= 1024 the row lives in registers (the *Reg kernels); larger rows use
// the general kernels, where a lane only ever reads back scores it wrote itself.
// Forward: reductions for the normalisation, then the scores; the map is the top-k of the
// scores' order keys (routing_math.h), found by a radix search for the k-th largest key (32 passes
// of warp counts) and one ordered pass that takes the ties at that key by ascending id.
// Handlers run on XLA's stream, allocate nothing and never synchronise (command-buffer safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "cuda_handlers.h"
#include "cuda_warp.cuh"
#include "ffi_contract.h"
#include "routing_math.h"

namespace ffi = xla::ffi;

namespace jax_router {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxBlocks = 8192;

template <typename T>
__device__ __forceinline__ float LoadF(const T* p, int64_t i) {
  return cuda::to_float(p[i]);
}
using cuda::from_float;
using cuda::kFullMask;

// Row statistics for the activation: softmax -> (max, sum e^{x - max}); element-wise functions
// -> (0, sum s). A NaN in the row makes the sum NaN, hence every score of the row.
template <typename T>
__device__ __forceinline__ void RowStats(ScoreFn fn, const T* x, int64_t E, int lane, float* m,
                                         float* sum) {
  if (fn == ScoreFn::kSoftmax) {
    cuda::warp_softmax_stats([&](int64_t e) { return LoadF(x, e); }, E, lane, m, sum);
    return;
  }
  float acc = 0.0f;
  *m = 0.0f;
  for (int64_t e = lane; e < E; e += 32) acc = acc + activation(fn, LoadF(x, e));
  *sum = cuda::warp_sum_in_order(acc);
}

// s_e of one element, given the row statistics.
__device__ __forceinline__ float Act(ScoreFn fn, float x, float m, float sum) {
  return fn == ScoreFn::kSoftmax ? softmax_numerator(x, m) / sum : activation(fn, x);
}

// The aux score of one element: softmax as is, the element-wise functions normalised by the row
// sum.
__device__ __forceinline__ float Score(ScoreFn fn, float x, float m, float sum) {
  const float a = Act(fn, x, m, sum);
  return fn == ScoreFn::kSoftmax ? a : a / (sum + kEps);
}

// One 32-expert chunk [base, base + 32) of a row's routing map, lane l holding expert base + l's
// selection bit (false past the row's end).
__device__ __forceinline__ void StoreMapChunk(uint8_t* mr, int64_t base, int64_t E,
                                              int64_t mbytes, bool bitmap, bool sel, int lane) {
  if (bitmap) {
    const unsigned sel_mask = __ballot_sync(kFullMask, sel);
    const int64_t byte = base / 8 + lane;
    if (lane < 4 && byte < mbytes) mr[byte] = static_cast<uint8_t>(sel_mask >> (8 * lane));
  } else if (base + lane < E) {
    mr[base + lane] = sel ? 1 : 0;
  }
}

template <typename T>
__global__ void AuxScoresFwdKernel(AuxFwd f) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t E = f.experts;
  const int K = static_cast<int>(f.topk);
  const int64_t mbytes = map_bytes_per_row(f.map_format, E);
  for (int64_t r = warp; r < f.rows; r += nwarps) {
    const T* x = static_cast<const T*>(f.logits) + r * E;
    float* out = f.scores + r * E;
    float m, sum;
    RowStats(f.fn, x, E, lane, &m, &sum);
    for (int64_t e = lane; e < E; e += 32) out[e] = exact::canonical(Score(f.fn, LoadF(x, e), m, sum));
    // The k-th largest order key T: the largest t with #{key >= t} >= k.
    uint32_t thr = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = thr | (1u << bit);
      int cnt = 0;
      for (int64_t e = lane; e < E; e += 32) cnt += order_key(out[e]) >= cand;
      if (cuda::warp_sum_int(cnt) >= K) thr = cand;
    }
    int above = 0;
    for (int64_t e = lane; e < E; e += 32) above += order_key(out[e]) > thr;
    // Experts at the threshold key are taken by ascending id until k are marked.
    int ties_left = K - cuda::warp_sum_int(above);
    uint8_t* mr = f.map + r * mbytes;
    for (int64_t base = 0; base < E; base += 32) {
      const int64_t e = base + lane;
      const uint32_t key = e < E ? order_key(out[e]) : 0u;
      const bool tie = e < E && key == thr;
      const unsigned tie_mask = __ballot_sync(kFullMask, tie);
      const int rank = __popc(tie_mask & ((1u << lane) - 1u));
      const bool sel = e < E && (key > thr || (tie && rank < ties_left));
      ties_left -= __popc(tie_mask);
      StoreMapChunk(mr, base, E, mbytes, f.map_format == MapFormat::kBitmapU8, sel, lane);
    }
  }
}

template <typename T>
__global__ void AuxScoresBwdKernel(AuxBwd b) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t E = b.experts;
  for (int64_t r = warp; r < b.rows; r += nwarps) {
    const T* x = static_cast<const T*>(b.logits) + r * E;
    const float* g = b.grad + r * E;
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    float m, sum;
    RowStats(b.fn, x, E, lane, &m, &sum);
    float acc = 0.0f;
    if (b.fn == ScoreFn::kSoftmax) {
      for (int64_t e = lane; e < E; e += 32) acc = acc + g[e] * Act(b.fn, LoadF(x, e), m, sum);
      const float D = cuda::warp_sum_in_order(acc);
      for (int64_t e = lane; e < E; e += 32) {
        const float s = Act(b.fn, LoadF(x, e), m, sum);
        out[e] = from_float<T>(softmax_grad(s, g[e], D));
      }
    } else {
      for (int64_t e = lane; e < E; e += 32) acc = acc + g[e] * Act(b.fn, LoadF(x, e), m, sum);
      const float B = cuda::warp_sum_in_order(acc);  // sum_e g_e s_e
      for (int64_t e = lane; e < E; e += 32) {
        const float s = Act(b.fn, LoadF(x, e), m, sum);
        out[e] = from_float<T>(normalised_grad(g[e], sum, B) * activation_grad(b.fn, s));
      }
    }
  }
}

// Register-resident variants for E <= 32 * VPL (VPL <= 32): each lane keeps its VPL logits and
// order keys in registers, so the row is read from global memory once, and the selection runs
// on registers with single-instruction warp reductions (redux.sync, sm_80+). Same arithmetic in
// the same order as the kernels above (lane l sums experts l, l + 32, ... in increasing order,
// then the same shuffle tree), so the scores are bitwise the same.
template <typename T, int VPL>
__device__ __forceinline__ void LoadRow(const T* x, int64_t E, int lane, float (&v)[VPL]) {
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int64_t e = lane + 32 * j;
    v[j] = e < E ? LoadF(x, e) : 0.0f;
  }
}

template <int VPL>
__device__ __forceinline__ void RowStatsReg(ScoreFn fn, const float (&v)[VPL], int64_t E,
                                            int lane, float* m, float* sum) {
  float acc = 0.0f;
  if (fn == ScoreFn::kSoftmax) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      if (lane + 32 * j < E) mx = fmaxf(mx, v[j]);
    }
    *m = cuda::warp_max(mx);
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      if (lane + 32 * j < E) acc = acc + softmax_numerator(v[j], *m);
    }
  } else {
    *m = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      if (lane + 32 * j < E) acc = acc + activation(fn, v[j]);
    }
  }
  *sum = cuda::warp_sum_in_order(acc);
}

template <typename T, int VPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) AuxScoresFwdRegKernel(AuxFwd f) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t E = f.experts;
  const int K = static_cast<int>(f.topk);
  const int64_t mbytes = map_bytes_per_row(f.map_format, E);
  for (int64_t r = warp; r < f.rows; r += nwarps) {
    float v[VPL];
    LoadRow(static_cast<const T*>(f.logits) + r * E, E, lane, v);
    float m, sum;
    RowStatsReg(f.fn, v, E, lane, &m, &sum);
    float* out = f.scores + r * E;
    uint32_t key[VPL];  // order keys; 0 (below every real key, NaN's is 1) past the row's end
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int64_t e = lane + 32 * j;
      key[j] = 0u;
      if (e < E) {
        const float sc = Score(f.fn, v[j], m, sum);
        out[e] = exact::canonical(sc);
        key[j] = order_key(sc);
      }
    }
    // taken: bit j set when expert lane + 32 j is among the top k (largest key, ties to the
    // lower id).
    uint32_t taken = 0u;
    if (K <= 16) {
      // k rounds of a warp argmax: each lane offers its best untaken key (the first of equal
      // keys, i.e. its lowest id); the warp takes the largest key, ties to the lowest id.
      for (int t = 0; t < K; ++t) {
        uint32_t best = 0u;
        int bj = -1;
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
          const bool better = !((taken >> j) & 1u) && key[j] > best;
          best = better ? key[j] : best;
          bj = better ? j : bj;
        }
        const uint32_t wbest = __reduce_max_sync(kFullMask, best);
        const uint32_t mine =
            (bj >= 0 && best == wbest) ? static_cast<uint32_t>(lane + 32 * bj) : 0xFFFFFFFFu;
        const uint32_t win = __reduce_min_sync(kFullMask, mine);
        if (bj >= 0 && mine == win) taken |= 1u << bj;
      }
    } else {
      // The k-th largest key thr (the largest t with #{key >= t} >= k), then the keys above it
      // and the ties at it by ascending id.
      uint32_t thr = 0u;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = thr | (1u << bit);
        uint32_t cnt = 0u;
#pragma unroll
        for (int j = 0; j < VPL; ++j) cnt += key[j] >= cand;
        if (__reduce_add_sync(kFullMask, cnt) >= static_cast<uint32_t>(K)) thr = cand;
      }
      uint32_t above = 0u;
#pragma unroll
      for (int j = 0; j < VPL; ++j) above += key[j] > thr;
      int ties_left = K - static_cast<int>(__reduce_add_sync(kFullMask, above));
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const bool tie = key[j] == thr;  // thr >= 1, so never a padding slot
        const unsigned tie_mask = __ballot_sync(kFullMask, tie);
        const int rank = __popc(tie_mask & ((1u << lane) - 1u));
        if (key[j] > thr || (tie && rank < ties_left)) taken |= 1u << j;
        ties_left -= __popc(tie_mask);
      }
    }
    uint8_t* mr = f.map + r * mbytes;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int64_t base = 32 * j;
      if (base >= E) break;
      StoreMapChunk(mr, base, E, mbytes, f.map_format == MapFormat::kBitmapU8, (taken >> j) & 1u, lane);
    }
  }
}

template <typename T, int VPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) AuxScoresBwdRegKernel(AuxBwd b) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t E = b.experts;
  for (int64_t r = warp; r < b.rows; r += nwarps) {
    float v[VPL], g[VPL];
    LoadRow(static_cast<const T*>(b.logits) + r * E, E, lane, v);
    LoadRow(b.grad + r * E, E, lane, g);
    float m, sum;
    RowStatsReg(b.fn, v, E, lane, &m, &sum);
    T* out = static_cast<T*>(b.grad_logits) + r * E;
    float acc = 0.0f;
    if (b.fn == ScoreFn::kSoftmax) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        if (lane + 32 * j < E) {
          v[j] = Act(b.fn, v[j], m, sum);  // v now holds s
          acc = acc + g[j] * v[j];
        }
      }
      const float D = cuda::warp_sum_in_order(acc);
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int64_t e = lane + 32 * j;
        if (e < E) out[e] = from_float<T>(softmax_grad(v[j], g[j], D));
      }
    } else {
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        if (lane + 32 * j < E) {
          v[j] = Act(b.fn, v[j], m, sum);
          acc = acc + g[j] * v[j];
        }
      }
      const float B = cuda::warp_sum_in_order(acc);  // sum_e g_e s_e
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int64_t e = lane + 32 * j;
        if (e < E) out[e] = from_float<T>(normalised_grad(g[j], sum, B) * activation_grad(b.fn, v[j]));
      }
    }
  }
}

int Blocks(int64_t rows) {
  const int64_t need = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(need < kMaxBlocks ? need : kMaxBlocks);
}

template <template <typename> class Launch>
cudaError_t DispatchCuda(ffi::DataType t, cudaStream_t stream, int blocks, const void* args) {
  switch (ToDt(t)) {
    case cuda::Dt::kBF16:
      return Launch<__nv_bfloat16>::Run(stream, blocks, args);
    case cuda::Dt::kF16:
      return Launch<__half>::Run(stream, blocks, args);
    case cuda::Dt::kF32:
      return Launch<float>::Run(stream, blocks, args);
  }
  return cudaErrorInvalidValue;
}

// Experts per lane of the register kernels: the smallest of 2, 4, ..., 32 with 32 * VPL >= E;
// 0 (the kernels above) for E > 1024.
inline int LanesVpl(int64_t E) {
  for (int vpl = 2; vpl <= 32; vpl *= 2) {
    if (E <= 32 * vpl) return vpl;
  }
  return 0;
}

template <template <typename, int> class Kernel, typename T, typename Args>
cudaError_t LaunchReg(int vpl, cudaStream_t stream, int blocks, const Args& a) {
  const dim3 block(kWarpsPerBlock * 32);
  switch (vpl) {
    case 2: Kernel<T, 2>::Launch(blocks, block, stream, a); break;
    case 4: Kernel<T, 4>::Launch(blocks, block, stream, a); break;
    case 8: Kernel<T, 8>::Launch(blocks, block, stream, a); break;
    case 16: Kernel<T, 16>::Launch(blocks, block, stream, a); break;
    case 32: Kernel<T, 32>::Launch(blocks, block, stream, a); break;
    default: return cudaErrorInvalidValue;  // LanesVpl returns only the sizes above
  }
  return cudaGetLastError();
}

template <typename T, int VPL>
struct FwdReg {
  static void Launch(int blocks, dim3 block, cudaStream_t stream, const AuxFwd& f) {
    AuxScoresFwdRegKernel<T, VPL><<<blocks, block, 0, stream>>>(f);
  }
};

template <typename T, int VPL>
struct BwdReg {
  static void Launch(int blocks, dim3 block, cudaStream_t stream, const AuxBwd& b) {
    AuxScoresBwdRegKernel<T, VPL><<<blocks, block, 0, stream>>>(b);
  }
};

template <typename T>
struct LaunchFwd {
  static cudaError_t Run(cudaStream_t stream, int blocks, const void* args) {
    const AuxFwd& f = *static_cast<const AuxFwd*>(args);
    if (const int vpl = LanesVpl(f.experts)) return LaunchReg<FwdReg, T>(vpl, stream, blocks, f);
    AuxScoresFwdKernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(f);
    return cudaGetLastError();
  }
};

template <typename T>
struct LaunchBwd {
  static cudaError_t Run(cudaStream_t stream, int blocks, const void* args) {
    const AuxBwd& b = *static_cast<const AuxBwd*>(args);
    if (const int vpl = LanesVpl(b.experts)) return LaunchReg<BwdReg, T>(vpl, stream, blocks, b);
    AuxScoresBwdKernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(b);
    return cudaGetLastError();
  }
};

ffi::Error AuxScoresFwdCuda(cudaStream_t stream, AuxAttrs attrs, ffi::AnyBuffer logits,
                            ffi::Result<ffi::AnyBuffer> scores, ffi::Result<ffi::AnyBuffer> map) {
  AuxFwd f;
  JR_RETURN_IF_ERROR(MakeAuxFwd(f, attrs, logits, *scores, *map));
  if (f.rows == 0) return ffi::Error::Success();
  cudaError_t e = DispatchCuda<LaunchFwd>(f.logits_dtype, stream, Blocks(f.rows), &f);
  if (e != cudaSuccess) return CudaError("aux scores forward launch failed", e);
  return ffi::Error::Success();
}

ffi::Error AuxScoresBwdCuda(cudaStream_t stream, ScoreFn score_function, ffi::AnyBuffer grad,
                            ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> grad_logits) {
  AuxBwd b;
  JR_RETURN_IF_ERROR(MakeAuxBwd(b, score_function, grad, logits, *grad_logits));
  if (b.rows == 0) return ffi::Error::Success();
  cudaError_t e = DispatchCuda<LaunchBwd>(b.logits_dtype, stream, Blocks(b.rows), &b);
  if (e != cudaSuccess) return CudaError("aux scores backward launch failed", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_router

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresFwdCuda, jax_router::AuxScoresFwdCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Attrs<AuxAttrs>()
                                  .Arg<xla::ffi::AnyBuffer>()   // logits
                                  .Ret<xla::ffi::AnyBuffer>()   // scores
                                  .Ret<xla::ffi::AnyBuffer>(),  // routing map
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRouterAuxScoresBwdCuda, jax_router::AuxScoresBwdCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<jax_router::ScoreFn>("score_function")
                                  .Arg<xla::ffi::AnyBuffer>()   // grad_scores (f32)
                                  .Arg<xla::ffi::AnyBuffer>()   // logits
                                  .Ret<xla::ffi::AnyBuffer>(),  // grad_logits
                              {xla::ffi::Traits::kCmdBufferCompatible});
