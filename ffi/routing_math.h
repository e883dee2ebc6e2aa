// The routing math, written once (docs/semantics.md): score functions, selection order,
// group scores, weights and every backward formula. The CPU routines, the CUDA kernels and the
// aux-score kernels of both platforms call these functions; a fast path that reformulates one
// (router_cpu_avx512.h, the CUDA fast forward) must give the same bits, and
// tests/test_cross_platform.py checks that the CPU and CUDA kernels do.
//
// Plain C++ usable from host and device code (exact_math.h supplies the IEEE-exact float
// functions); no XLA or CUDA headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "exact_math.h"

namespace jax_router {

// ---- score functions ----------------------------------------------------------------------

// Every score function, once: enumerator, value and Python name. The value is what
// jax_router/options.py's ScoreFunction sends (tests compare the lists through the extension's
// enum_values()). Adding a function: a line here, its activation and activation_grad below,
// the Python enum and reference, and the docs.
#define JR_SCORE_FUNCTIONS(X) \
  X(kSoftmax, 0, softmax)     \
  X(kSigmoid, 1, sigmoid)     \
  X(kSqrtSoftplus, 2, sqrtsoftplus)

enum class ScoreFn : int32_t {
#define JR_ENUMERATOR(name, value, py) name = value,
  JR_SCORE_FUNCTIONS(JR_ENUMERATOR)
#undef JR_ENUMERATOR
};

// Whether v is one of the values above (FFI attributes are checked with this; nothing maps an
// unknown value to a known one).
constexpr bool IsKnownScoreFn(int64_t v) {
#define JR_MATCH(name, value, py) v == value ||
  return JR_SCORE_FUNCTIONS(JR_MATCH) false;
#undef JR_MATCH
}

template <ScoreFn F>
using ScoreFnTag = std::integral_constant<ScoreFn, F>;

// Calls fn(ScoreFnTag<F>{}) for the run-time value f, so that kernels take the score function
// as a template argument. f must be known (IsKnownScoreFn); the switch has no default.
template <typename Fn>
JR_HD auto DispatchScoreFn(ScoreFn f, Fn&& fn) -> decltype(fn(ScoreFnTag<ScoreFn::kSoftmax>{})) {
  switch (f) {
#define JR_CASE(name, value, py) \
  case ScoreFn::name:        \
    return fn(ScoreFnTag<ScoreFn::name>{});
    JR_SCORE_FUNCTIONS(JR_CASE)
#undef JR_CASE
  }
  __builtin_unreachable();  // values are checked where they are decoded (ffi_contract.h)
}

// Softmax is the one row-wise function: it selects on the raw logits (or, with pre-softmax,
// on the softmax over the row) and takes no bias. Every other function is element-wise,
// selects on s + bias and normalises its weights by their sum.
constexpr bool IsElementwise(ScoreFn f) { return f != ScoreFn::kSoftmax; }
constexpr bool UsesBias(ScoreFn f) { return IsElementwise(f); }

// How a call's outputs are laid out (mirrors options.py's OutputMode; a test compares them).
enum class OutputMode : int32_t {
  kCompact = 0,  // weights f32 [T,k] + indices [T,k]
  kMap = 1,      // probs [T,E] + routing map
  kDense = 2,    // probs [T,E] + indices [T,k]
};
constexpr bool IsKnownOutputMode(int64_t v) { return v >= 0 && v <= 2; }

enum class MapFormat : int32_t {
  kBytemap = 0,   // bool [T,E]
  kBitmapU8 = 1,  // uint8 [T, ceil(E/8)], bit e%8 of byte e/8
};
constexpr bool IsKnownMapFormat(int64_t v) { return v == 0 || v == 1; }

// The static options of one routing call, decoded and checked once (ffi_contract.h).
struct RouteParams {
  int64_t topk;
  ScoreFn score_fn;
  bool pre_softmax;    // softmax only
  int64_t num_groups;  // 0: no group-limited routing
  int64_t group_topk;  // 0: no group-limited routing
  float scaling;
  int64_t num_bins;    // quantile balancing's histogram bins; 0: no quantile balancing
};

// Quantile balancing (docs/semantics.md#qb) ranks one expert more than it keeps: the
// (topk + 1)-th selection score is the row's cutoff.
JR_HD bool is_qb(const RouteParams& p) { return p.num_bins > 0; }
JR_HD int64_t ranked_count(const RouteParams& p) { return p.topk + (is_qb(p) ? 1 : 0); }

// Added to sums of selected scores before dividing (forward normalisation and its gradient).
constexpr float kEps = 1e-20f;

// ---- activations --------------------------------------------------------------------------

JR_HD float sigmoid(float x) { return 1.0f / (1.0f + exact::exp_for_sigmoid(-x)); }

// softplus(x) = ln(1 + e^x), and x itself past 20 where the two agree in float32.
JR_HD float softplus(float x) { return x > 20.0f ? x : exact::log1p_nonnegative(exact::exp(x)); }

// s(x) of an element-wise function; softmax's raw selection score is x itself (its row-wise
// form is softmax_numerator / row_sum below).
template <ScoreFn F>
JR_HD float activation(float x) {
  if constexpr (F == ScoreFn::kSigmoid) {
    return sigmoid(x);
  } else if constexpr (F == ScoreFn::kSqrtSoftplus) {
    return sqrtf(softplus(x));
  } else {
    static_assert(F == ScoreFn::kSoftmax, "a new score function needs its activation here");
    return x;
  }
}

// ds/dx in terms of s alone, so that the backward needs only the saved [T, k] scores:
//   sigmoid:       s (1 - s)
//   sqrtsoftplus:  sigma(x) / (2 s + eps), with sigma(x) = 1 - e^{-softplus(x)} = -expm1(-s^2)
template <ScoreFn F>
JR_HD float activation_grad(float s) {
  if constexpr (F == ScoreFn::kSigmoid) {
    return s * (1.0f - s);
  } else if constexpr (F == ScoreFn::kSqrtSoftplus) {
    return -exact::expm1_nonpositive(-(s * s)) / (2.0f * s + kEps);
  } else {
    static_assert(F == ScoreFn::kSoftmax, "a new score function needs its gradient here");
    return 1.0f;
  }
}

// Run-time forms, for code that is not templated on the function.
JR_HD float activation(ScoreFn f, float x) {
  return DispatchScoreFn(f, [x](auto tag) { return activation<decltype(tag)::value>(x); });
}
JR_HD float activation_grad(ScoreFn f, float s) {
  return DispatchScoreFn(f, [s](auto tag) { return activation_grad<decltype(tag)::value>(s); });
}

// Softmax over a row: s_e = e^{x_e - max} / sum_e' e^{x_e' - max}, the sum taken in the order
// of exact::combine_partials. The max ignores NaN (a NaN logit still makes its term, hence
// the sum and the row, NaN); max over an all -inf row is -inf and the row is NaN.
JR_HD float row_max_step(float m, float x) { return x > m ? x : m; }
JR_HD float softmax_numerator(float x, float row_max) { return exact::exp(x - row_max); }

// ---- selection order ----------------------------------------------------------------------

// Keys below every real number: an expert outside the kept groups, then a NaN score.
constexpr uint32_t kExcludedKey = 0u;
constexpr uint32_t kNanKey = 1u;

// Order-preserving map float -> uint32: a larger key is a larger score. NaN ranks below -inf;
// +0 ranks above -0, as in jax.lax.top_k.
JR_HD uint32_t order_key(float z) {
  const uint32_t u = exact::bits(z);
  const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return z != z ? kNanKey : key;  // a select, not a branch: the CPU loop vectorises
}

// One 64-bit key per candidate: score key high, inverted expert id low. Keys are distinct
// within a row and a larger key is the better candidate (higher score, then lower id), so
// "the k largest keys, descending" is exactly the selection and its slot order.
JR_HD uint64_t slot_key(uint32_t key, uint32_t expert) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - expert);
}
JR_HD uint32_t slot_expert(uint64_t k) { return 0xFFFFFFFFu - static_cast<uint32_t>(k); }

// The score a key came from (inverse of order_key on every key it returns; NaN for kNanKey).
// kExcludedKey has no score (callers never decode it).
JR_HD float order_key_value(uint32_t key) {
  if (key == kNanKey) return exact::from_bits(exact::kCanonicalNanBits);
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  return exact::from_bits(u);
}

// Selection score z of an element: s + bias where the function takes a bias.
JR_HD float selection_score(float s, float bias) { return s + bias; }

// A group's score is the sum of its top m selection scores, added one at a time in descending
// order starting from the best: group_score = z_0, then group_score_add(group_score, z_q).
JR_HD float group_score_add(float acc, float z) { return acc + z; }

// ---- weights ------------------------------------------------------------------------------
//
// Per row, over the k selected experts in slot order:
//   softmax (raw):  u_j = e^{x_j - x_0} (x_0 the best logit), p_j = u_j / sum_j u_j;
//   pre-softmax:    p_j = s_j (the row softmax, not renormalised);
//   element-wise:   p_j = s_j / (sum_j s_j + eps) when k > 1, s_j when k == 1.
// Sums over slots run in slot order from the first term (slot_sum_add).

JR_HD float slot_sum_add(float acc, float v) { return acc + v; }

// The value each slot contributes before normalisation, from the selected expert's logit x,
// the best logit x0 (softmax raw) and its activation s.
template <ScoreFn F>
JR_HD float weight_numerator(bool pre_softmax, float x, float x0, float s) {
  if constexpr (F == ScoreFn::kSoftmax) {
    return pre_softmax ? s : exact::exp(x - x0);
  } else {
    return s;
  }
}

// The normaliser's denominator given the slot sum of the numerators; weight() divides by it.
template <ScoreFn F>
JR_HD float weight_denominator(float sum) {
  if constexpr (F == ScoreFn::kSoftmax) {
    return sum;
  } else {
    return sum + kEps;
  }
}

template <ScoreFn F>
JR_HD bool weights_normalised(bool pre_softmax, int64_t k) {
  return F == ScoreFn::kSoftmax ? !pre_softmax : k > 1;
}

template <ScoreFn F>
JR_HD float weight(bool pre_softmax, int64_t k, float u, float denominator) {
  return weights_normalised<F>(pre_softmax, k) ? u / denominator : u;
}

// The compact residual the backward reads for a slot: the weight p for raw softmax, else the
// unbiased activation s.
template <ScoreFn F>
JR_HD float residual(bool pre_softmax, float p, float s) {
  return (F == ScoreFn::kSoftmax && !pre_softmax) ? p : s;
}

// ---- backward -----------------------------------------------------------------------------
//
// g_j = scaling * (cotangent at slot j). With r_j the residual of slot j:
//   element-wise, k > 1:  A = sum r_j, B = sum g_j r_j, d = A + eps,
//                         ds_j = (g_j - B / d) / d   (= g_j / d - B / d^2 without overflow);
//   element-wise, k == 1: ds_j = g_j;   then dx_j = ds_j * activation_grad(r_j);
//   softmax (raw):        D = sum g_j p_j, dx_j = p_j (g_j - D);
//   pre-softmax:          D = sum g_j s_j, dx_i = s_i (g_i - D) for every i (g_i = 0 off S).
// Dot products run in slot order from +0 with one fused multiply-add a term (dot_add).

JR_HD float dot_add(float acc, float g, float r) { return exact::fma(g, r, acc); }

JR_HD float softmax_grad(float s, float g, float D) { return s * (g - D); }

// ds of a slot whose weight was normalised (element-wise functions, k > 1; aux scores).
JR_HD float normalised_grad(float g, float A, float B) {
  const float d = A + kEps;
  return (g - B / d) / d;
}

template <ScoreFn F>
JR_HD float grad_logit(int64_t k, float g, float r, float A, float B) {
  if constexpr (F == ScoreFn::kSoftmax) {
    return softmax_grad(r, g, B);  // raw softmax: B holds D; pre-softmax rows call softmax_grad
  } else {
    const float ds = k > 1 ? normalised_grad(g, A, B) : g;
    return ds * activation_grad<F>(r);
  }
}

// ---- quantile balancing (docs/semantics.md#qb) ---------------------------------------------
//
// Per row, with cutoff c = the score of slot topk (the best expert not kept), every expert e
// adds one to histogram[e, qb_bin(c, s_e, ...)]: the bias it would have needed to be kept, on
// num_bins bins of [lower, upper). scale = num_bins / (upper - lower), once per call.

// The largest num_bins: float32(num_bins) and every bin edge below it are exact.
constexpr int64_t kMaxQbBins = int64_t{1} << 24;

JR_HD float qb_scale(int64_t num_bins, float lower, float upper) {
  return static_cast<float>(num_bins) / (upper - lower);
}

// clamp(floor(((c - s) - lower) * scale), 0, num_bins - 1), NaN to bin 0. The first test is
// false for NaN and for every v < 1 (whose floor clamps to 0); past it, v in [1, num_bins)
// truncates to its floor.
JR_HD int64_t qb_bin(float cutoff, float s, float lower, float scale, int64_t num_bins) {
  const float v = ((cutoff - s) - lower) * scale;
  if (!(v >= 1.0f)) return 0;
  if (v >= static_cast<float>(num_bins)) return num_bins - 1;
  return static_cast<int64_t>(v);
}

// ---- sizes --------------------------------------------------------------------------------

JR_HD int64_t bitmap_bytes(int64_t num_experts) { return (num_experts + 7) / 8; }

JR_HD int64_t map_bytes_per_row(MapFormat f, int64_t num_experts) {
  return f == MapFormat::kBitmapU8 ? bitmap_bytes(num_experts) : num_experts;
}

}  // namespace jax_router
