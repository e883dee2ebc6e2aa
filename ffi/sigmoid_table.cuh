// The exact sigmoid of a bfloat16 logit as a shared-memory table lookup, for the
// one-thread-a-token sigmoid forwards (router_fwd_grouped.cuh, router_fwd_sigmoid_bf16.cuh).
// A bfloat16 logit has 65536 values and routing_math.h's sigmoid is constant outside a narrow
// band of magnitudes:
//   |x| <= bf16 0x33C0 (8.9e-8, negative side up to 0x343F): 0.5;
//   x >= 16.75: 1;  x <= -89 (and -inf): 0;
// (tests/test_grouped_forward.py checks those three facts on the CPU). So the table holds
// sigmoid(x) for magnitudes in [kSigLo, kSigHi] of each sign, computed with routing_math.h's
// own function, and a magnitude outside is clamped to the band's edge, whose entry equals every
// value beyond it: the lookup is exact by construction for every non-NaN logit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_rows.cuh"
#include "exact_math.h"
#include "routing_math.h"

namespace jax_router {
namespace cuda {

// The table's band of bfloat16 magnitudes (bits & 0x7FFF); see the header comment.
constexpr uint32_t kSigLo = 0x33C0u;
constexpr uint32_t kSigHi = 0x42B2u;
// Entries a sign: the band, rounded up to whole 16-byte copies (the last is never read).
constexpr int kSigN = (static_cast<int>(kSigHi - kSigLo) + 1 + 3) & ~3;

// The table in shared memory. A lookup's byte offset is built from the
// logit's bits with one shift and one mask, which leaves the sign bit at 1 << 17: the
// negative half of the table sits 131072 bytes above the positive half; a kernel's other shared
// memory fills the space between and after.
constexpr int kSigNegOff = 1 << 17;
constexpr int kSigTableBytes = 4 * kSigN;

// Two bfloat16 logits (one 32-bit word) -> their magnitudes clamped into the table's band with
// the signs kept. `nan` collects the raw magnitudes (a half above 0x7F80 is a NaN).
__device__ __forceinline__ uint32_t clamp_pair(uint32_t w, uint32_t* nan) {
  const uint32_t a = w & 0x7FFF7FFFu;
  if (nan) *nan = max_u16x2(*nan, a);
  const uint32_t c = min_u16x2(max_u16x2(a, kSigLo * 0x10001u), kSigHi * 0x10001u);
  return c | (w & 0x80008000u);
}

// sigmoid of the low / high logit of a clamped pair: the table entry at 4 * magnitude + the
// sign at 1 << 17, less the band's start.
__device__ __forceinline__ float sig_lo(const char* sm, uint32_t c) {
  return *reinterpret_cast<const float*>(sm + ((c << 2) & 0x3FFFCu) - 4 * kSigLo);
}
__device__ __forceinline__ float sig_hi(const char* sm, uint32_t c) {
  return *reinterpret_cast<const float*>(sm + ((c >> 14) & 0x3FFFCu) - 4 * kSigLo);
}

// The table is the same for every launch, so the first block to find none builds one into
// g_sig_table (g_sig_state 0 -> 1 -> 2, published with release / acquire); blocks that find it
// ready copy it (30 KiB from L2) instead of computing 7656 sigmoids, and blocks that start while
// it is being built compute their own. Either way a block's table holds routing_math.h's
// values. No host state: the same under CUDA graphs and on every device (each context has its
// own copy of these variables; `static`: one per translation unit that launches the kernel).
static __device__ uint4 g_sig_table[2 * kSigTableBytes / 16];
static __device__ int g_sig_state;

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// 16-byte chunk i of the table (g_sig_table's order: the positive half, then the negative).
constexpr int kSigChunksPerSign = kSigTableBytes / 16;
__device__ __forceinline__ uint4* sig_table_chunk(char* sm, int i) {
  const int neg = i >= kSigChunksPerSign ? 1 : 0;
  return reinterpret_cast<uint4*>(sm + (neg ? kSigNegOff : 0) + 16 * (i - neg * kSigChunksPerSign));
}

// The table into shared memory at sm (its negative half at sm + kSigNegOff) by the block's
// `nthreads` threads: copied from g_sig_table when it is ready, else built (and published by
// sig_table_publish when this block won the build). Starts with a block barrier; the caller's
// barrier after it orders the entries before any read. Returns the mode for sig_table_publish.
__device__ __forceinline__ int sig_table_fill(char* sm, int nthreads) {
  __shared__ int table_mode;  // 2: copy the global table; 1: build and publish it; 0: build
  if (threadIdx.x == 0) {
    int mode = load_acquire(&g_sig_state) == 2 ? 2 : 0;
    if (mode == 0 && atomicCAS(&g_sig_state, 0, 1) == 0) mode = 1;
    table_mode = mode;
  }
  __syncthreads();  // table_mode written before it is read
  const int mode = table_mode;
  if (mode == 2) {
    for (int i = threadIdx.x; i < 2 * kSigChunksPerSign; i += nthreads) {
      *sig_table_chunk(sm, i) = __ldcg(&g_sig_table[i]);
    }
  } else {
    // routing_math.h's sigmoid of every magnitude in the band, both signs (its plain IEEE form:
    // this runs in the first launch's blocks only)
    for (int i = threadIdx.x; i < 2 * kSigN; i += nthreads) {
      const uint32_t neg = i >= kSigN ? 1u : 0u;
      const uint32_t mag = kSigLo + static_cast<uint32_t>(i - (neg ? kSigN : 0));
      const float x = exact::bf16_bits_to_float(static_cast<uint16_t>((neg << 15) | mag));
      *reinterpret_cast<float*>(sm + (neg ? kSigNegOff : 0) + 4 * (mag - kSigLo)) =
          activation<ScoreFn::kSigmoid>(x);
    }
  }
  return mode;
}

// After the caller's barrier: the block that won the build publishes its table.
__device__ __forceinline__ void sig_table_publish(char* sm, int mode, int nthreads) {
  if (mode == 1) {
    for (int i = threadIdx.x; i < 2 * kSigChunksPerSign; i += nthreads) {
      g_sig_table[i] = *sig_table_chunk(sm, i);
    }
    __syncthreads();  // every thread's part of the global table written
    if (threadIdx.x == 0) {
      __threadfence();  // the table visible device-wide before the state says so
      atomicExch(&g_sig_state, 2);
    }
  }
}

}  // namespace cuda
}  // namespace jax_router
