// Element types, loads and stores shared by the CUDA router kernels and the CUDA aux-score
// kernels. Every float the kernels write goes through from_float, which gives one NaN and the
// same half-precision rounding as the CPU handlers (exact_math.h). No XLA headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "exact_math.h"

namespace jax_router {
namespace cuda {

enum class Dt : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum class It : int { kS16 = 0, kS32 = 1, kS64 = 2 };

// ---- scalar conversions ----------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ uint16_t f16_bits(float v) {
  return exact::is_nan(v) ? exact::kF16CanonicalNan : __half_as_ushort(__float2half_rn(v));
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return exact::canonical(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __ushort_as_bfloat16(exact::to_bf16_bits(v));
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __ushort_as_half(f16_bits(v));
}

// ---- element types of the router kernels (raw storage + vector unpacking) --------------------

struct DF32 {
  using raw = float;
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return exact::canonical(v); }
  static __device__ __forceinline__ void unpack16(const uint4& w, float* o) {
    o[0] = __uint_as_float(w.x);
    o[1] = __uint_as_float(w.y);
    o[2] = __uint_as_float(w.z);
    o[3] = __uint_as_float(w.w);
  }
};
struct DBF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to_f(uint16_t v) { return exact::bf16_bits_to_float(v); }
  static __device__ __forceinline__ uint16_t from_f(float v) { return exact::to_bf16_bits(v); }
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
  static __device__ __forceinline__ uint16_t from_f(float v) { return f16_bits(v); }
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

// Calls fn(D{}) for the element type of dt.
template <typename Fn>
__host__ __forceinline__ auto DispatchDt(Dt dt, Fn&& fn) -> decltype(fn(DF32{})) {
  switch (dt) {
    case Dt::kF32:
      return fn(DF32{});
    case Dt::kBF16:
      return fn(DBF16{});
    case Dt::kF16:
      return fn(DF16{});
  }
  return cudaErrorInvalidValue;  // Dt has three values, all handled above
}

__device__ __forceinline__ float load_as_float(const void* p, Dt dt, int64_t i) {
  switch (dt) {
    case Dt::kF32:
      return static_cast<const float*>(p)[i];
    case Dt::kBF16:
      return DBF16::to_f(static_cast<const uint16_t*>(p)[i]);
    case Dt::kF16:
      return DF16::to_f(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

__device__ __forceinline__ void store_from_float(void* p, Dt dt, int64_t i, float v) {
  switch (dt) {
    case Dt::kF32:
      static_cast<float*>(p)[i] = DF32::from_f(v);
      break;
    case Dt::kBF16:
      static_cast<uint16_t*>(p)[i] = DBF16::from_f(v);
      break;
    case Dt::kF16:
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
    case It::kS64:
      static_cast<int64_t*>(p)[i] = e;
      break;
  }
}

// -1 (skipped by every reader) for an index type outside It.
__device__ __forceinline__ int64_t load_index(const void* p, It dt, int64_t i) {
  switch (dt) {
    case It::kS16:
      return static_cast<const int16_t*>(p)[i];
    case It::kS32:
      return static_cast<const int32_t*>(p)[i];
    case It::kS64:
      return static_cast<const int64_t*>(p)[i];
  }
  return -1;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// 1/y rounded to nearest, through the same fast path as the CUDA library's reciprocal; *odd is
// set when y is outside the range where that path is exact (the caller then redoes the chunk
// with routing_math.h's plain division, which takes the library's slow path).
__device__ __forceinline__ float rcp_rn_fast(float y, bool* odd) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  const float e = fmaf(-y, r, 1.0f);
  r = fmaf(r, e, r);
  const uint32_t ex = (__float_as_uint(y) + 0x1800000u) & 0x7F800000u;
  *odd |= ex <= 0x1FFFFFFu;
  return r;
}

// routing_math.h's sigmoid, 1 / (1 + exact::exp_for_sigmoid(-x)), with the reciprocal through
// rcp_rn_fast; *odd is set where that path is not exact (the caller then uses
// activation<kSigmoid>, whose IEEE division gives the same bits everywhere).
__device__ __forceinline__ float sigmoid_rn_fast(float x, bool* odd) {
  return rcp_rn_fast(1.0f + exact::exp_for_sigmoid(-x), odd);
}

}  // namespace cuda
}  // namespace jax_router
