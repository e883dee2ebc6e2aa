// Float32 functions whose bits are the same on the host and on a CUDA device.
//
// The router promises bit-identical outputs from its CPU and CUDA kernels (docs/semantics.md,
// "Numerics"). Platform libms disagree in the last bit (expf, log1pf, expm1f), CUDA flushes
// nothing by default but its fast intrinsics do, and compilers fuse a*b+c into one rounding
// when they may. So every transcendental the router uses is written here from IEEE operations
// alone (+, -, *, /, sqrt and explicit fmaf, each correctly rounded on both platforms), and the
// build forbids implicit contraction (-ffp-contract=off for C++, -fmad=false for CUDA; see
// CMakeLists.txt). Subnormal inputs and results are kept everywhere.
//
// No XLA or CUDA headers: usable from the CPU handlers, the CUDA kernels and standalone tools.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JR_HD __host__ __device__ __forceinline__
#else
#define JR_HD inline __attribute__((always_inline))
#endif

namespace jax_router {
namespace exact {

// ---- bit views -----------------------------------------------------------------------------

JR_HD uint32_t bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

JR_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

JR_HD bool is_nan(float v) { return v != v; }

JR_HD float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

// ---- NaN and half-precision outputs ---------------------------------------------------------

// Arithmetic on NaN keeps an input's payload on x86 and gives 0x7FFFFFFF on CUDA, so every
// float the kernels write passes through here: one NaN, whatever produced it.
constexpr uint32_t kCanonicalNanBits = 0x7FC00000u;
JR_HD float canonical(float v) { return is_nan(v) ? from_bits(kCanonicalNanBits) : v; }

// float -> bfloat16 bits, round to nearest even (subnormals kept; NaN -> 0x7FC0).
JR_HD uint16_t to_bf16_bits(float v) {
  uint32_t u = bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
JR_HD float bf16_bits_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }

// float -> float16 bits for a non-NaN value is the platform's IEEE round-to-nearest-even
// conversion (the same on both); NaN -> 0x7E00 (the conversions differ there).
constexpr uint16_t kF16CanonicalNan = 0x7E00u;

// ---- exp -----------------------------------------------------------------------------------

// round(y * 2^n), one rounding, for y in [0.7, 1.5) and n in [-150, 128]: an exponent add
// where the result is normal, else two factors whose first product is exact.
JR_HD float scale_pow2(float y, int32_t n) {
  if (n >= -125 && n <= 127) return from_bits(bits(y) + (static_cast<uint32_t>(n) << 23));
  const int32_t n1 = n / 2, n2 = n - n1;
  return (y * from_bits(static_cast<uint32_t>(n1 + 127) << 23)) *
         from_bits(static_cast<uint32_t>(n2 + 127) << 23);
}

// e^r - 1 - r = r^2 * P(r) on |r| <= ln2 / 2, P a degree-5 polynomial fitted to that
// interval (about 1 ulp with the reduction below).
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2Hi = 6.93145752e-1f;  // ln 2 = kLn2Hi + kLn2Lo; n * kLn2Hi is exact
constexpr float kLn2Lo = 1.42860677e-6f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kExpMin = -104.0f;          // e^-104 rounds to 0 in float32
constexpr float kExpMax = 89.0f;            // e^89 overflows

// e^x: n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r by the polynomial, times 2^n.
// Within 2 ulp of the true value; subnormal results kept; e^-inf = 0, e^inf = inf, NaN -> NaN.
JR_HD float exp(float x) {
  float xc = x < kExpMin ? kExpMin : x;  // NaN fails both tests and stays NaN
  xc = xc > kExpMax ? kExpMax : xc;
  const float t = fma(xc, kLog2e, kRoundMagic);
  const float n = t - kRoundMagic;
  float r = fma(n, -kLn2Hi, xc);
  r = fma(n, -kLn2Lo, r);
  float p = kExpP0;
  p = fma(p, r, kExpP1);
  p = fma(p, r, kExpP2);
  p = fma(p, r, kExpP3);
  p = fma(p, r, kExpP4);
  p = fma(p, r, kExpP5);
  const float y = fma(p, r * r, r) + 1.0f;
  // n as an integer from t's low mantissa bits (defined for every t, NaN included).
  const int32_t ni = static_cast<int32_t>(bits(t) - bits(kRoundMagic));
  const float v = scale_pow2(y, ni);
  return is_nan(x) ? x : v;
}

// v clamped to [lo, hi]; NaN stays NaN (its payload may change).
JR_HD float clamp_keep_nan(float v, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("max.NaN.f32 %0, %0, %1;" : "+f"(v) : "f"(lo));  // one instruction each; plain
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(v) : "f"(hi));  // fmaxf / fminf would drop the NaN
  return v;
#else
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
#endif
}

// e^y as the sigmoid needs it: 1 / (1 + e^y) is the same for every e^y below 2^-24 (1 + e^y
// rounds to 1 for y < -17) and is 0 once e^y overflows, so y is clamped to [-18, 89] and the
// function drops exp's special cases: no branch, about 12 operations, within 3 ulp of e^y.
// n = round(y / ln 2); r = y - n ln 2 (two-part ln 2); 2 e^r by a degree-5 polynomial (every
// coefficient doubled, an exact scaling); times 2^(n - 1), whose bits are t's low bits shifted
// into the exponent (t = 1.5 * 2^23 + n). A NaN y gives NaN.
constexpr float kSigmoidExpMin = -18.0f;
constexpr float kSigmoidExpMax = 89.0f;
JR_HD float exp_for_sigmoid(float y) {
  y = clamp_keep_nan(y, kSigmoidExpMin, kSigmoidExpMax);
  const float t = fma(y, kLog2e, kRoundMagic);
  const float n = t - kRoundMagic;
  float r = fma(n, -kLn2Hi, y);
  r = fma(n, -kLn2Lo, r);
  float q = 0.016625041142106056f;
  q = fma(q, r, 0.08378031849861145f);
  q = fma(q, r, 0.3333422839641571f);
  q = fma(q, r, 0.999984622001648f);
  q = fma(q, r, 2.0f);
  q = fma(q, r, 2.0f);
  return q * from_bits((bits(t) << 23) + (126u << 23));
}

// e^x - 1 for x <= 0, accurate near 0 (where e^x - 1 cancels): Taylor terms to x^7 on
// |x| < ln2 / 2 (error below x^8 / 8!), e^x - 1 elsewhere (no cancellation beyond 2 bits).
JR_HD float expm1_nonpositive(float x) {
  if (x > -0.34657359f) {
    float p = 1.98412698e-4f;  // 1/5040
    p = fma(p, x, 1.38888889e-3f);
    p = fma(p, x, 8.33333377e-3f);
    p = fma(p, x, 4.16666679e-2f);
    p = fma(p, x, 1.66666672e-1f);
    p = fma(p, x, 0.5f);
    return fma(p, x * x, x);
  }
  return exp(x) - 1.0f;
}

// ---- log -----------------------------------------------------------------------------------

// ln(m) for finite m >= 1 (the only arguments log1p gives it): m = 2^k f with f in
// [sqrt(1/2), sqrt(2)), ln f = z - z^2/2 + z^3 Q(z) with z = f - 1 (exact), plus k ln 2.
JR_HD float log_ge1(float m) {
  const uint32_t u = bits(m);
  const int32_t k = static_cast<int32_t>((u - 0x3F3504F3u) & 0xFF800000u) >> 23;
  const float f = from_bits(u - (static_cast<uint32_t>(k) << 23));
  const float z = f - 1.0f;
  float q = 7.0376836292e-2f;
  q = fma(q, z, -1.1514610310e-1f);
  q = fma(q, z, 1.1676998740e-1f);
  q = fma(q, z, -1.2420140846e-1f);
  q = fma(q, z, 1.4249322787e-1f);
  q = fma(q, z, -1.6668057665e-1f);
  q = fma(q, z, 2.0000714765e-1f);
  q = fma(q, z, -2.4999993993e-1f);
  q = fma(q, z, 3.3333331174e-1f);
  const float z2 = z * z;
  const float kf = static_cast<float>(k);
  float y = z * z2 * q;
  y = fma(kf, -2.12194440e-4f, y);
  y = fma(-0.5f, z2, y);
  return fma(kf, 0.693359375f, z + y);
}

// ln(1 + u) for u >= 0 (or NaN): ln(m) * u / (m - 1) with m = 1 + u rounded, which cancels
// the rounding of m; u itself when m rounds to 1. u = inf gives inf.
JR_HD float log1p_nonnegative(float u) {
  const float m = 1.0f + u;
  const float d = m - 1.0f;
  if (!(u <= 3.40282347e38f)) return u;  // inf and NaN
  return d == 0.0f ? u : log_ge1(m) * (u / d);
}

// ---- row sums in one order ------------------------------------------------------------------

// Sums over a row of E elements (softmax denominators, aux-score normalisers) are taken in
// one order on every platform: element e goes to partial e % 32, partials add in ascending e
// from +0, then the partials combine pairwise at distance 16, 8, 4, 2, 1 - exactly what a
// CUDA warp computes when lane l accumulates elements l, l + 32, ... and then runs an xor
// butterfly (addition is commutative, so every lane ends with these bits).
constexpr int kSumLanes = 32;

JR_HD float combine_partials(float (&p)[kSumLanes]) {
  for (int o = kSumLanes / 2; o > 0; o >>= 1) {
    for (int i = 0; i < o; ++i) p[i] = p[i] + p[i + o];
  }
  return p[0];
}

}  // namespace exact
}  // namespace jax_router
