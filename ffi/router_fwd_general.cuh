// The general CUDA forward: any E up to the shared-memory limit (16384 on sm_80/90/100), any
// topk, pre-softmax. One block per row sorts the row's 64-bit slot keys (routing_math.h) in
// shared memory (bitonic); group-limited routing sorts (group, key) composites first, then
// group keys. Weights: routing_math.h's formulas, numerator sums in slot order by one thread.
// Quantile balancing writes the score of sorted slot k as the row's cutoff.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_warp.cuh"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

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
  float* cutoff;  // quantile balancing: [rows]; nullptr when off
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

// Row statistics of pre-softmax (max and the sum of e^{x - max}) in exact_math.h's order:
// warp 0 computes them (lane l takes experts l, l + 32, ...) and leaves them in bc for every
// thread. The barriers order the write after the previous row's last read of bc, and every
// thread's read after the write.
template <typename D>
__device__ __forceinline__ void softmax_row_stats(const typename D::raw* xr, int E, float* bc) {
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m, sum;
    warp_softmax_stats([&](int64_t i) { return D::to_f(xr[i]); }, E, lane, &m, &sum);
    if (lane == 0) {
      bc[0] = m;
      bc[1] = sum;
    }
  }
  __syncthreads();
}

template <typename D, ScoreFn F>
__global__ void fwd_general_kernel(const GenArgs a) {
  using R = typename D::raw;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* sk = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* gk = sk + a.n2;
  uint8_t* flags = reinterpret_cast<uint8_t*>(gk + a.n2g);
  __shared__ float bc[2];   // pre-softmax row max and sum
  __shared__ float tot_sm;  // slot sum of the weight numerators

  const int E = a.E, k = a.k, n2 = a.n2, nt = blockDim.x, tid = threadIdx.x;
  const R* logits = static_cast<const R*>(a.logits);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const R* xr = logits + row * E;
    const float* br =
        (F != ScoreFn::kSoftmax && a.bias) ? a.bias + (row / a.rows_per_bias) * E : nullptr;
    float mx = 0.0f, sum = 1.0f;
    if (a.pre_softmax) {
      softmax_row_stats<D>(xr, E, bc);
      mx = bc[0];
      sum = bc[1];
    }
    // Unbiased activation s of an expert's logit x.
    auto act_of = [&](float x) -> float {
      if (F == ScoreFn::kSoftmax && a.pre_softmax) return softmax_numerator(x, mx) / sum;
      return activation<F>(x);
    };
    auto key_of = [&](int i) -> uint32_t {
      const float s = act_of(D::to_f(xr[i]));
      return order_key(br ? selection_score(s, br[i]) : s);
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
            gs = q == 0 ? z : group_score_add(gs, z);
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
    bitonic_desc(sk, n2);  // ends with a barrier: the sorted keys are visible to every thread

    if (a.cutoff && tid == 0) {  // sk[k] exists (E >= k + 1); the packing below rewrites slots < k
      a.cutoff[row] = exact::canonical(order_key_value(static_cast<uint32_t>(sk[k] >> 32)));
    }

    // Slots 0..k-1: pack (value bits, expert) in place.
    for (int r = tid; r < k; r += nt) {
      const uint32_t e = slot_expert(sk[r]);
      const float v = act_of(D::to_f(xr[e]));
      sk[r] = (static_cast<unsigned long long>(__float_as_uint(v)) << 32) | e;
    }
    __syncthreads();
    const bool raw = F == ScoreFn::kSoftmax && !a.pre_softmax;
    if (raw) {
      // Numerators e^{x_j - x_0}, in place (x_0: slot 0's logit).
      const float x0 = __uint_as_float(static_cast<uint32_t>(sk[0] >> 32));
      __syncthreads();  // every thread has read slot 0 before it is overwritten
      for (int r = tid; r < k; r += nt) {
        const float xv = __uint_as_float(static_cast<uint32_t>(sk[r] >> 32));
        const float u = weight_numerator<F>(false, xv, x0, xv);
        sk[r] = (static_cast<unsigned long long>(__float_as_uint(u)) << 32) | (sk[r] & 0xFFFFFFFFull);
      }
      __syncthreads();  // numerators written before thread 0 sums them
    }
    if (tid == 0) {
      float s = __uint_as_float(static_cast<uint32_t>(sk[0] >> 32));
      for (int r = 1; r < k; ++r) s = slot_sum_add(s, __uint_as_float(static_cast<uint32_t>(sk[r] >> 32)));
      tot_sm = s;
    }
    // Dense outputs: zero the row (probs) / the flags (maps).
    if (a.probs) {
      R* pr = static_cast<R*>(a.probs) + row * E;
      for (int i = tid; i < E; i += nt) pr[i] = R(0);
    }
    if (a.map) {
      for (int i = tid; i < E; i += nt) flags[i] = 0;
    }
    __syncthreads();  // tot_sm written and the dense zeros stored before the k entries below
    const float denom = weight_denominator<F>(tot_sm);
    const int64_t ko = row * static_cast<int64_t>(k);
    for (int r = tid; r < k; r += nt) {
      const int e = static_cast<int>(sk[r] & 0xFFFFFFFFull);
      const float u = __uint_as_float(static_cast<uint32_t>(sk[r] >> 32));
      const float p = weight<F>(a.pre_softmax, k, u, denom);
      const float w = a.scaling * p;
      if (a.weights) a.weights[ko + r] = exact::canonical(w);
      if (a.indices) store_index(a.indices, a.index_dt, ko + r, e);
      if (a.act) a.act[ko + r] = exact::canonical(residual<F>(a.pre_softmax, p, u));
      if (a.probs) static_cast<R*>(a.probs)[row * E + e] = D::from_f(w);
      if (a.map) flags[e] = 1;
    }
    __syncthreads();  // flags complete before the map is written from them
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

}  // namespace cuda
}  // namespace jax_router
