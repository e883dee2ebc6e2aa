// CUDA kernels that move rows through a dispatch plan (docs/semantics.md#dispatch): permute
// (also unpermute's backward for the rows, weighted), unpermute (also permute's backward,
// unweighted) and unpermute's backward for the weights. The arithmetic is dispatch_math.h's,
// shared with the CPU handlers (dispatch_cpu.cc), so both give the same bits.
//
// permute and unpermute take one block per output row (grid-stride past 2^20 rows) and move
// 16-byte vectors when the row length in bytes is a multiple of 16 and the buffers are 16-byte
// aligned (element by element otherwise); loads are issued kUnroll at a time before their
// stores so that each thread keeps several in flight. Nothing is accumulated with atomics: each
// output element is written by one thread, once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_warp.cuh"
#include "dispatch_math.h"

namespace jax_router {
namespace cuda {

constexpr int kRowThreads = 128;
constexpr int kUnroll = 4;
constexpr int kDotWarps = 8;  // slots per block of the weights backward, one warp each
constexpr int64_t kMaxRowGrid = 1 << 20;

struct RowsArgs {
  int64_t tokens = 0, topk = 0, hidden = 0, rows = 0;
  const void* x = nullptr;        // permute: x [T, H]; unpermute: rows [R, H]; bwd: dout [T, H]
  const void* rows_in = nullptr;  // bwd: rows [R, H]
  const int32_t* index = nullptr;  // permute: source [R]; otherwise positions [T, k]
  const void* weights = nullptr;   // [T, k] or nullptr
  Dt w_dt = Dt::kF32;
  void* out = nullptr;
  Dt out_dt = Dt::kF32;  // bwd: of dweights
};

template <typename D>
constexpr int kPerVec = 16 / static_cast<int>(sizeof(typename D::raw));

template <typename D>
__device__ __forceinline__ uint4 pack16(const float* f) {
  uint4 w;
  auto* p = reinterpret_cast<typename D::raw*>(&w);
#pragma unroll
  for (int q = 0; q < kPerVec<D>; ++q) p[q] = D::from_f(f[q]);
  return w;
}

// permute: out[r] = x[source[r] / k] (bits copied), or w[source[r]] * x[...] in float32 cast to
// the dtype when weighted; zeros where source[r] is outside [0, T * k).
template <typename D, bool kVec, bool kWeighted>
__global__ void __launch_bounds__(kRowThreads) permute_kernel(RowsArgs a) {
  using raw = typename D::raw;
  const int64_t H = a.hidden, n = a.tokens * a.topk;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const int64_t s = a.index[r];
    const bool valid = dispatch::in_range(s, n);
    const raw* src = static_cast<const raw*>(a.x) + (valid ? s / a.topk : 0) * H;
    raw* dst = static_cast<raw*>(a.out) + r * H;
    const float w = kWeighted && valid ? load_as_float(a.weights, a.w_dt, s) : 1.0f;
    if (kVec) {
      const int64_t nv = H / kPerVec<D>;
      const uint4* sv = reinterpret_cast<const uint4*>(src);
      uint4* dv = reinterpret_cast<uint4*>(dst);
      for (int64_t v0 = threadIdx.x; v0 < nv; v0 += kUnroll * kRowThreads) {
        uint4 buf[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * kRowThreads;
          buf[u] = valid && v < nv ? __ldg(sv + v) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * kRowThreads;
          if (v >= nv) break;
          if (kWeighted && valid) {
            float f[kPerVec<D>];
            D::unpack16(buf[u], f);
#pragma unroll
            for (int q = 0; q < kPerVec<D>; ++q) f[q] = dispatch::scale(w, f[q]);
            buf[u] = pack16<D>(f);
          }
          dv[v] = buf[u];
        }
      }
    } else {
      for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
        raw v = raw{};
        if (valid) v = kWeighted ? D::from_f(dispatch::scale(w, D::to_f(src[h]))) : src[h];
        dst[h] = v;
      }
    }
  }
}

// unpermute: out[t] = sum_j w[t, j] * rows[positions[t, j]] (w = 1 unweighted) over positions
// inside [0, R), accumulated in float32 in slot order from +0, cast to the dtype. A thread
// takes kUnroll vectors of the output row and walks the slots kSlots at a time, issuing the
// kSlots x kUnroll loads before the first add (the adds then run in slot order), so that
// kSlots rows are in flight at once: one slot at a time left each thread waiting on a round
// trip per slot (benchmarks/NOTES.md). kStream loads the rows with the evict-first hint (each
// buffer row is read once).
template <typename D, bool kVec, bool kWeighted, int kUnrollV = 2, int kSlots = 4,
          bool kStream = false>
__global__ void __launch_bounds__(kRowThreads) unpermute_kernel(RowsArgs a) {
  using raw = typename D::raw;
  const int64_t H = a.hidden, K = a.topk;
  const raw* rows = static_cast<const raw*>(a.x);
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const int32_t* pos = a.index + t * K;
    raw* dst = static_cast<raw*>(a.out) + t * H;
    if (kVec) {
      constexpr int N = kPerVec<D>;
      const int64_t nv = H / N;
      for (int64_t v0 = threadIdx.x; v0 < nv; v0 += kUnrollV * kRowThreads) {
        float acc[kUnrollV][N];
#pragma unroll
        for (int u = 0; u < kUnrollV; ++u) {
#pragma unroll
          for (int q = 0; q < N; ++q) acc[u][q] = 0.0f;
        }
        for (int64_t j0 = 0; j0 < K; j0 += kSlots) {
          const uint4* sv[kSlots];
          bool kept[kSlots];
          float w[kSlots];
#pragma unroll
          for (int s = 0; s < kSlots; ++s) {
            const int64_t j = j0 + s;
            const int64_t r = j < K ? pos[j] : -1;
            kept[s] = dispatch::in_range(r, a.rows);
            w[s] = kWeighted && kept[s] ? load_as_float(a.weights, a.w_dt, t * K + j) : 1.0f;
            sv[s] = reinterpret_cast<const uint4*>(rows + (kept[s] ? r : 0) * H);
          }
          uint4 buf[kSlots][kUnrollV];
#pragma unroll
          for (int s = 0; s < kSlots; ++s) {
#pragma unroll
            for (int u = 0; u < kUnrollV; ++u) {
              const int64_t v = v0 + u * kRowThreads;
              buf[s][u] = !(kept[s] && v < nv) ? make_uint4(0, 0, 0, 0)
                         : kStream                ? __ldcs(sv[s] + v)
                                                  : __ldg(sv[s] + v);
            }
          }
#pragma unroll
          for (int s = 0; s < kSlots; ++s) {
            if (!kept[s]) continue;
#pragma unroll
            for (int u = 0; u < kUnrollV; ++u) {
              float f[N];
              D::unpack16(buf[s][u], f);
#pragma unroll
              for (int q = 0; q < N; ++q) acc[u][q] = dispatch::combine_add(acc[u][q], w[s], f[q]);
            }
          }
        }
        uint4* dv = reinterpret_cast<uint4*>(dst);
#pragma unroll
        for (int u = 0; u < kUnrollV; ++u) {
          const int64_t v = v0 + u * kRowThreads;
          if (v < nv) dv[v] = pack16<D>(acc[u]);
        }
      }
    } else {
      for (int64_t h = threadIdx.x; h < H; h += kRowThreads) {
        float acc = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t r = pos[j];
          if (!dispatch::in_range(r, a.rows)) continue;
          const float w = kWeighted ? load_as_float(a.weights, a.w_dt, t * K + j) : 1.0f;
          acc = dispatch::combine_add(acc, w, D::to_f(rows[r * H + h]));
        }
        dst[h] = D::from_f(acc);
      }
    }
  }
}

// unpermute's backward for the weights: one warp per slot s = t * k + j, dweights[s] =
// dot(dout[t], rows[positions[s]]) in dispatch_math.h's order (lane l takes h = l, l + 32, ...,
// then warp_sum_in_order), 0 where positions[s] is outside [0, R).
template <typename D>
__global__ void __launch_bounds__(kDotWarps * 32) unpermute_bwd_kernel(RowsArgs a) {
  using raw = typename D::raw;
  const int lane = threadIdx.x & 31;
  const int64_t slots = a.tokens * a.topk, H = a.hidden;
  const raw* dout = static_cast<const raw*>(a.x);
  const raw* rows = static_cast<const raw*>(a.rows_in);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kDotWarps + (threadIdx.x >> 5); s < slots;
       s += static_cast<int64_t>(gridDim.x) * kDotWarps) {  // the same s across a warp
    const int64_t r = a.index[s];
    float part = 0.0f;
    if (dispatch::in_range(r, a.rows)) {
      const raw* x = dout + (s / a.topk) * H;
      const raw* y = rows + r * H;
      for (int64_t h = lane; h < H; h += 32) part = dispatch::dot_step(part, D::to_f(x[h]), D::to_f(y[h]));
    }
    const float dot = warp_sum_in_order(part);
    if (lane == 0) store_from_float(a.out, a.out_dt, s, dot);
  }
}

inline unsigned RowGrid(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxRowGrid ? rows : kMaxRowGrid);
}

// Whether rows of `hidden` elements of D can move as 16-byte vectors between these buffers.
template <typename D>
inline bool Vectorisable(int64_t hidden, const void* a, const void* b) {
  return (hidden * static_cast<int64_t>(sizeof(typename D::raw))) % 16 == 0 &&
         (reinterpret_cast<uintptr_t>(a) & 15u) == 0 && (reinterpret_cast<uintptr_t>(b) & 15u) == 0;
}

// Launches launch(D{}, vec, weighted) for the element type of dt, with vec and weighted
// std::bool_constant tags: 16-byte vectors when the rows and buffers allow them, weights when
// a.weights is set.
template <typename Launch>
inline cudaError_t LaunchRowKernel(const RowsArgs& a, Dt dt, Launch&& launch) {
  return DispatchDt(dt, [&](auto tag) {
    using D = decltype(tag);
    auto weighted = [&](auto vec) {
      a.weights ? launch(tag, vec, std::true_type{}) : launch(tag, vec, std::false_type{});
    };
    Vectorisable<D>(a.hidden, a.x, a.out) ? weighted(std::true_type{})
                                          : weighted(std::false_type{});
    return cudaGetLastError();
  });
}

// rows [R, H] = permute(x) (weighted when a.weights is set); dt is x's (and rows') dtype.
inline cudaError_t LaunchPermute(const RowsArgs& a, Dt dt, cudaStream_t s) {
  if (a.rows == 0 || a.hidden == 0) return cudaSuccess;
  return LaunchRowKernel(a, dt, [&](auto tag, auto vec, auto weighted) {
    permute_kernel<decltype(tag), decltype(vec)::value, decltype(weighted)::value>
        <<<RowGrid(a.rows), kRowThreads, 0, s>>>(a);
  });
}

// out [T, H] = unpermute(rows) (unweighted when a.weights is null); dt is rows' dtype.
inline cudaError_t LaunchUnpermute(const RowsArgs& a, Dt dt, cudaStream_t s) {
  if (a.tokens == 0 || a.hidden == 0) return cudaSuccess;
  return LaunchRowKernel(a, dt, [&](auto tag, auto vec, auto weighted) {
    unpermute_kernel<decltype(tag), decltype(vec)::value, decltype(weighted)::value>
        <<<RowGrid(a.tokens), kRowThreads, 0, s>>>(a);
  });
}

// dweights [T, k]; dt is dout's and rows' dtype.
inline cudaError_t LaunchUnpermuteBwd(const RowsArgs& a, Dt dt, cudaStream_t s) {
  const int64_t slots = a.tokens * a.topk;
  if (slots == 0) return cudaSuccess;
  const int64_t blocks = (slots + kDotWarps - 1) / kDotWarps;
  return DispatchDt(dt, [&](auto tag) {
    using D = decltype(tag);
    unpermute_bwd_kernel<D><<<RowGrid(blocks), kDotWarps * 32, 0, s>>>(a);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace jax_router
