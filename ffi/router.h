// The router's per-element math (SPEC §3-4), written once for the CPU and CUDA handlers.
//
// Everything here is plain C++ usable from host and device code: no XLA headers, no CUDA
// headers. Selection order is defined by integer keys so that the CPU loop, the CUDA warp code
// and the pure-JAX reference (jax_router/reference.py::order_key) agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JR_HD __host__ __device__ __forceinline__
#else
#define JR_HD inline
#endif

namespace jax_router {

// Mirrored by jax_router/options.py::ScoreFunction (checked by a test).
enum class ScoreFn : int64_t { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

// Static options of one routing call, decoded from the FFI attributes (ffi_common.h).
struct RouteParams {
  int64_t topk;
  ScoreFn score_fn;
  bool pre_softmax;
  int64_t num_groups;  // 0: no group-limited routing
  int64_t group_topk;  // 0: no group-limited routing
  float scaling;
};

// Added to sums of selected scores before dividing (forward normalisation and its gradient).
constexpr float kEps = 1e-20f;

// ---- activations -------------------------------------------------------------------------

// sigma(x) = 1 / (1 + e^-x)
JR_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// softplus(x) = log(1 + e^x), and x itself past 20 where the two agree in float32.
JR_HD float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Activation s(x) of the element-wise score functions; softmax is a row operation (see
// callers) and its raw-logit selection uses s = x.
JR_HD float activation(ScoreFn f, float x) {
  switch (f) {
    case ScoreFn::kSigmoid:
      return sigmoid(x);
    case ScoreFn::kSqrtSoftplus:
      return sqrtf(softplus(x));
    default:
      return x;
  }
}

// ds/dx written in terms of s alone, so the backward needs only the saved [T, k] scores:
//   sigmoid:       s (1 - s)
//   sqrtsoftplus:  sigma(x) / (2 s + eps), with sigma(x) = 1 - e^{-softplus(x)} = -expm1(-s^2)
JR_HD float activation_grad(ScoreFn f, float s) {
  if (f == ScoreFn::kSigmoid) return s * (1.0f - s);
  if (f == ScoreFn::kSqrtSoftplus) return -expm1f(-s * s) / (2.0f * s + kEps);
  return 1.0f;
}

// True when the selection score adds expert_bias (SPEC §3.2).
JR_HD bool uses_bias(ScoreFn f) { return f != ScoreFn::kSoftmax; }

// ---- ordering ----------------------------------------------------------------------------

JR_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

// Keys below every real number: an expert outside the kept groups, then a NaN score.
constexpr uint32_t kExcludedKey = 0u;
constexpr uint32_t kNanKey = 1u;

// Order-preserving map float -> uint32: a larger key is a larger score. NaN ranks below -inf;
// +0 ranks above -0, as in jax.lax.top_k.
JR_HD uint32_t order_key(float z) {
  const uint32_t u = float_bits(z);
  const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return z != z ? kNanKey : key;  // a select, not a branch: the CPU loop vectorises
}

// One 64-bit key per candidate: score key high, inverted expert id low. Keys are distinct
// within a row and a larger key is the better candidate (higher score, then lower id), so
// "the k largest keys, descending" is exactly SPEC §3's selection and slot order.
JR_HD uint64_t slot_key(uint32_t key, uint32_t expert) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - expert);
}
JR_HD uint32_t slot_expert(uint64_t k) { return 0xFFFFFFFFu - static_cast<uint32_t>(k); }

// The score a key came from (inverse of order_key on every key it returns; NaN for kNanKey).
// kExcludedKey has no score (it decodes to a NaN payload; callers never decode it).
JR_HD float order_key_value(uint32_t key) {
  if (key == kNanKey) return NAN;
  uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

// ---- sizes -------------------------------------------------------------------------------

JR_HD int64_t bitmap_bytes(int64_t num_experts) { return (num_experts + 7) / 8; }

}  // namespace jax_router
