// Rows of bfloat16 logits staged in shared memory for one-thread-a-token kernels
// (router_fwd_grouped.cuh, router_fwd_softmax_screen.cuh): the cp.async copies, the XOR swizzle
// of 16-byte chunks that keeps a quarter-warp's reads of 8 rows in 8 distinct bank groups, and
// the packed 16-bit operations the kernels screen rows with (sm_90 for most of them).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_router {
namespace cuda {

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// Waits for this thread's copies only: a warp that reads other lanes' copies needs __syncwarp
// after it.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}

// Byte offset of 16-byte chunk c of a row whose length is a multiple of 128 bytes: chunk c of
// row r sits at chunk c ^ (r & 7) (sw = r & 7), so the 8 rows a quarter-warp reads (every row
// starts in bank 0) hit 8 distinct bank groups.
__device__ __forceinline__ int chunk_off(int c, int sw) { return (c ^ sw) << 4; }

// Packed 16-bit operations, one PTX instruction each: two lanes of u16 or bf16 a word.
//   max_u16x2 / min_u16x2    unsigned maximum / minimum per half
//   max_bf16x2 / min_bf16x2  IEEE maximum / minimum per half (a NaN operand gives the other)
//   ge_bf16x2                0xFFFF where a's half is >= b's, else 0 (a NaN compares false,
//                            -0 equals +0)
#define JR_PACKED_OP(name, instr)                                          \
  __device__ __forceinline__ uint32_t name(uint32_t a, uint32_t b) {       \
    uint32_t d;                                                            \
    asm(instr " %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));                  \
    return d;                                                              \
  }
JR_PACKED_OP(max_u16x2, "max.u16x2")
JR_PACKED_OP(min_u16x2, "min.u16x2")
JR_PACKED_OP(max_bf16x2, "max.bf16x2")
JR_PACKED_OP(min_bf16x2, "min.bf16x2")
JR_PACKED_OP(ge_bf16x2, "set.ge.u32.bf16x2")
#undef JR_PACKED_OP

// The upper 16 bits of two floats, packed: bfloat16s rounded toward zero.
__device__ __forceinline__ uint32_t upper_halves(float lo, float hi) {
  return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
}

}  // namespace cuda
}  // namespace jax_router
